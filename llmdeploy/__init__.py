"""llmdeploy: make fine-tuned HuggingFace/PEFT models deployable.

Merged 16-bit safetensors for vLLM/SGLang/transformers, and GGUF files for
llama.cpp/Ollama, written in one streaming pass by llmdeploy's own
quantization kernels (byte-identical to llama.cpp's).
"""

from . import errors, quants
from .errors import LLMDeployError
from .gguf.export import plan_gguf, save_pretrained_gguf
from .merge import save_pretrained_merged

__version__ = "0.1.0.dev0"

__all__ = ["LLMDeployError", "errors", "plan_gguf", "quants", "save_pretrained_gguf", "save_pretrained_merged"]
