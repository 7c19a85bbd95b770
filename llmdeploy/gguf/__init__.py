"""GGUF export: HF checkpoint -> llama.cpp-ready GGUF files in one streaming pass.

See docs/design/gguf-export.md for the stages and their contracts.
"""
