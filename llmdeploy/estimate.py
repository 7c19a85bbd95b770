"""How big a GGUF file is, and how much memory llama.cpp needs to run it, before anything is written.

``estimate(model, quantization=[...], context=8192)`` gives one :class:`Estimate` per file type:

- **File size**, exact: the per-tensor plan of :func:`llmdeploy.plan_gguf` (the types llama-quantize
  picks, byte for byte) laid out as the GGUF writer lays it out (header, every KV including the
  tokenizer's, tensor infos, and each tensor padded to the alignment). For a ``.gguf`` input without
  a quantization, the file's own size; with one, what requantizing it gives.
- **KV cache**, as llama.cpp (llama-cpp-python 0.3.36, ``src/llama-kv-cache*.cpp``) allocates it for
  one sequence: every attention layer holds ``cells x n_head_kv x head_dim`` values for K and again
  for V (``head_dim_k`` / ``head_dim_v``), in the cache type (f16 by default). The context is padded
  to a multiple of 256 cells. Sliding-window layers of the architectures llama.cpp runs with its
  SWA cache (Gemma 2 and 3, Cohere 2, gpt-oss, OLMo 2 with a window) hold only
  ``pad256(min(context, window + ubatch))`` cells (``llama_kv_cache_iswa``, ``swa_full=false``: the
  llama-server / llama-cli default). Other architectures cache the full context on every layer,
  whatever their ``config.json`` says: llama.cpp's ``llama`` architecture (Llama, Mistral, Mixtral),
  Qwen 2 and Phi-3 run without a sliding window, so a Mistral ``sliding_window`` saves nothing there.
- **Compute buffer**, an estimate of llama.cpp's scheduler buffer for one micro-batch of
  ``T = min(ubatch, context)`` tokens (activations in float32): the largest stage of the graph,
  with the graph inputs (embeddings, attention masks) alive until the last layer::

      inputs    = 4*T*n_embd + mask_bytes*T*(cells_full + cells_swa)      mask_bytes: 2 with flash
                                                                          attention, 4 without
      attention = 4*T*(n_head*head_dim_k + n_head_kv*(head_dim_k + head_dim_v) + n_embd)
                  + (without flash attention) 4*T*n_head*cells              the K*Q scores
      ffn       = 4*T*(3*n_ff + n_embd)                                     n_ff: the MoE's active
                                                                          experts' width in total
      output    = 4*T*(n_vocab + 2*n_embd)                                  the logits
      compute   = max(inputs + attention, inputs + ffn, output) + 4*n_vocab   (+ the host's buffer
                                                                          for one token's logits)

  It is within a few percent of the "compute buffer size" llama.cpp reports for the models in the
  tests (tests/test_estimate.py checks it against llama.cpp itself, Gemma 3 270M included).
- **Total** = tensor bytes (the weights: llama.cpp maps the file and uploads every tensor) + KV cache
  + compute buffer. Engine and driver overheads (a CUDA context is ~0.3-0.5 GiB) are not included;
  :mod:`llmdeploy.recommend` adds headroom for them.

Everything here is pure arithmetic on a :class:`ModelShape`, which is read from an HF ``config.json``
(:meth:`ModelShape.from_hf_config`) or from a GGUF's KVs (:meth:`ModelShape.from_gguf_metadata`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import (
    GGUFReadError,
    InvalidOptionError,
    MissingFileError,
    UnsupportedArchitectureError,
)
from .gguf.plan import PlanInput, QuantPlan, file_type, plan_quantization
from .gguf.reader import GGUFModelFile, open_gguf

__all__ = [
    "CELL_PADDING",
    "Estimate",
    "KVCacheLayout",
    "ModelShape",
    "compute_buffer_bytes",
    "estimate",
    "format_bytes",
    "kv_cache_bytes",
    "kv_cache_layout",
]

#: llama.cpp pads the context (and the SWA cache) to a multiple of this many cells.
CELL_PADDING = 256

# llama.cpp architectures that run sliding-window layers with the iSWA cache: the default layer
# pattern (every n-th layer is full attention: layer il is SWA when il % n < n - 1), the default
# window when the GGUF has none (0: no window key means no SWA), from src/models/<arch>.cpp.
_SWA_ARCHS: dict[str, tuple[int, int]] = {
    "gemma2": (2, 4096),
    "gemma3": (6, 0),
    "cohere2": (4, 0),
    "gpt-oss": (2, 0),
    "olmo2": (4, 0),
}
# HF architecture names -> GGUF architecture names, for the SWA rules above (others need no mapping).
_HF_TO_GGUF_ARCH = {
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Cohere2ForCausalLM": "cohere2",
    "GptOssForCausalLM": "gpt-oss",
    "Olmo2ForCausalLM": "olmo2",
}
_DEFAULT_QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, two decimals: "1.48 MiB", "4.37 GiB", "512 B"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# --- the model facts the memory math reads --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the memory math needs to know about a model, in llama.cpp's terms.

    Attributes:
        arch: the GGUF architecture name ("llama", "gemma3"...).
        n_layer: transformer blocks.
        n_embd: hidden size.
        n_head: query heads (the largest over layers).
        n_head_kv: KV heads of each layer (0 for a layer without attention).
        head_dim_k: values per K head.
        head_dim_v: values per V head.
        n_ff: feed-forward width a token goes through (for MoE: the active experts' total).
        n_vocab: vocabulary size (rows of the logits).
        swa_layers: per layer, whether llama.cpp runs it with the sliding-window cache.
        sliding_window: the window of those layers, in tokens (0 without SWA).
        context_train: the context the model was trained for (0 if unknown).
    """

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    swa_layers: tuple[bool, ...]
    sliding_window: int = 0
    context_train: int = 0

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read an HF ``config.json`` dict (a multimodal one's ``text_config`` is used).

        Args:
            config: the config dict, raw or as ``AutoConfig(...).to_dict()`` gives it.

        Raises:
            UnsupportedArchitectureError: a config without layer or head counts.
        """
        outer = dict(config)
        hp = {**outer, **(outer.get("text_config") or {})}
        names = hp.get("architectures") or outer.get("architectures") or []
        arch = _HF_TO_GGUF_ARCH.get(names[0] if names else "", str(hp.get("model_type") or "unknown"))
        n_layer = _first_int(hp, "num_hidden_layers", "n_layer", "num_layers")
        n_embd = _first_int(hp, "hidden_size", "n_embd", "d_model")
        n_head = _first_int(hp, "num_attention_heads", "n_head")
        if not (n_layer and n_embd and n_head):
            raise UnsupportedArchitectureError(
                f"config.json of architecture {names[0] if names else arch!r} gives no num_hidden_layers, "
                "hidden_size or num_attention_heads; cannot size its KV cache"
            )
        n_head_kv = _first_int(hp, "num_key_value_heads", "n_head_kv") or (1 if hp.get("multi_query") else n_head)
        # as the export writes {arch}.attention.key_length: Gemma 3's converter defaults it to 256
        head_dim = hp.get("head_dim") or (256 if arch == "gemma3" else n_embd // n_head)
        n_ff = _first_int(hp, "intermediate_size", "n_inner", "ffn_dim") or 4 * n_embd
        n_expert_used = _first_int(hp, "num_experts_per_tok", "num_experts_per_token", "moe_topk")
        if n_expert_used:
            n_ff = n_expert_used * (_first_int(hp, "moe_intermediate_size") or n_ff)
        swa_layers, window = _hf_swa_layers(arch, hp, n_layer)
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=(int(n_head_kv),) * n_layer,
            head_dim_k=int(head_dim),
            head_dim_v=int(head_dim),
            n_ff=int(n_ff),
            n_vocab=_first_int(hp, "vocab_size", "n_vocab"),
            swa_layers=swa_layers,
            sliding_window=window,
            context_train=_first_int(hp, "max_position_embeddings", "n_positions", "max_seq_len"),
        )

    @classmethod
    def from_gguf(cls, model: GGUFModelFile) -> ModelShape:
        """Read an opened GGUF (:func:`llmdeploy.gguf.reader.open_gguf`) as llama.cpp's model loader reads it.

        Args:
            model: the file; without ``{arch}.vocab_size`` and a token list, the vocabulary size
                is the rows of its ``token_embd.weight``.

        Raises:
            GGUFReadError: a required key is missing (the message names the file).
        """
        kv = model.kv
        arch = kv.get(gguf.Keys.General.ARCHITECTURE)
        n_vocab = None
        if not kv.get(f"{arch}.vocab_size") and "tokenizer.ggml.tokens" not in kv:
            embd = next((t for t in model.tensors if t.name == "token_embd.weight"), None)
            n_vocab = embd.shape[0] if embd is not None else 0
        try:
            return cls.from_gguf_metadata(kv, n_vocab=n_vocab)
        except GGUFReadError as e:
            raise GGUFReadError(f"{model.path}: {e}") from None

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, n_vocab: int | None = None) -> ModelShape:
        """Read a GGUF's ``{arch}.*`` KVs as llama.cpp's model loader reads them.

        Args:
            metadata: the file's KVs (``general.architecture`` and the ``{arch}.*`` keys at least).
            n_vocab: the vocabulary size, when the KVs lack ``{arch}.vocab_size`` and the token list.

        Raises:
            GGUFReadError: a required key (block count, embedding length, head count) is missing.
        """
        arch = str(metadata.get("general.architecture") or "")
        if not arch:
            raise GGUFReadError("the GGUF has no general.architecture key; it is not a model file")

        def need(key: str) -> Any:
            value = metadata.get(f"{arch}.{key}")
            if value is None:
                raise GGUFReadError(f"the GGUF lacks {arch}.{key}, which llama.cpp needs to run it")
            return value

        n_layer = int(need("block_count"))
        n_embd = int(need("embedding_length"))
        n_head_per_layer = _per_layer(need("attention.head_count"), n_layer)
        kv_value = metadata.get(f"{arch}.attention.head_count_kv")
        n_head_kv = n_head_per_layer if kv_value is None else _per_layer(kv_value, n_layer)
        n_head = max(n_head_per_layer)
        head_dim_k = int(metadata.get(f"{arch}.attention.key_length") or n_embd // max(n_head, 1))
        head_dim_v = int(metadata.get(f"{arch}.attention.value_length") or n_embd // max(n_head, 1))
        ff_value = metadata.get(f"{arch}.feed_forward_length")
        n_ff = max(_per_layer(0 if ff_value is None else ff_value, n_layer))
        n_expert_used = int(metadata.get(f"{arch}.expert_used_count") or 0)
        if n_expert_used:
            n_ff = n_expert_used * int(metadata.get(f"{arch}.expert_feed_forward_length") or n_ff)
        if n_vocab is None:
            n_vocab = int(metadata.get(f"{arch}.vocab_size") or 0) or len(metadata.get("tokenizer.ggml.tokens") or ())
        swa_layers, window = _gguf_swa_layers(arch, metadata, n_layer)
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=tuple(n_head_kv),
            head_dim_k=head_dim_k,
            head_dim_v=head_dim_v,
            n_ff=n_ff,
            n_vocab=int(n_vocab),
            swa_layers=swa_layers,
            sliding_window=window,
            context_train=int(metadata.get(f"{arch}.context_length") or 0),
        )


def _first_int(hp: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = hp.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            return int(value)
    return 0


def _as_list(value: Any) -> list[Any] | None:
    """The items of an array KV (list, numpy array or unread long array); None for a scalar."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return None
    return [value[i] for i in range(len(value))]


def _per_layer(value: Any, n_layer: int) -> list[int]:
    """A per-layer KV (a scalar for every layer, or an array of one value per layer)."""
    items = _as_list(value)
    if items is None:
        return [int(value)] * n_layer
    values = [int(v) for v in items]
    return (values + [values[-1] if values else 0] * n_layer)[:n_layer]


def _pattern(n_layer: int, n_pattern: int) -> tuple[bool, ...]:
    # llama_hparams::set_swa_pattern (dense_first=false): every n-th layer is full attention.
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _hf_swa_layers(arch: str, hp: Mapping[str, Any], n_layer: int) -> tuple[tuple[bool, ...], int]:
    no_swa = (False,) * n_layer, 0
    if arch not in _SWA_ARCHS:
        return no_swa  # llama.cpp caches the full context for every layer (Mistral's window too)
    default_pattern, default_window = _SWA_ARCHS[arch]
    window = int(hp.get("sliding_window") or default_window)
    pattern = hp.get("sliding_window_pattern")
    if not window or pattern == 1:  # Gemma 3 without a window (or pattern 1): the export writes no window
        return no_swa
    layer_types = hp.get("layer_types")
    if layer_types and len(layer_types) == n_layer:
        return tuple(t == "sliding_attention" for t in layer_types), window
    return _pattern(n_layer, int(pattern or default_pattern)), window


def _gguf_swa_layers(arch: str, kv: Mapping[str, Any], n_layer: int) -> tuple[tuple[bool, ...], int]:
    no_swa = (False,) * n_layer, 0
    if arch not in _SWA_ARCHS:
        return no_swa
    default_pattern, default_window = _SWA_ARCHS[arch]
    window = int(kv.get(f"{arch}.attention.sliding_window") or default_window)
    if not window:
        return no_swa
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern")
    flags = _as_list(pattern)
    if flags is not None:  # one bool per layer: true = sliding window
        return tuple(([bool(v) for v in flags] + [False] * n_layer)[:n_layer]), window
    return _pattern(n_layer, int(pattern if pattern is not None else default_pattern)), window


# --- KV cache ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KVCacheLayout:
    """The KV caches llama.cpp allocates for one sequence.

    Attributes:
        cells: cells of the full-attention cache (the context padded to 256).
        full_layers: layers that use it.
        swa_cells: cells of the sliding-window cache (0 without one).
        swa_layers: layers that use it.
        k_bytes: K bytes in all layers.
        v_bytes: V bytes in all layers.
    """

    cells: int
    full_layers: int
    swa_cells: int
    swa_layers: int
    k_bytes: int
    v_bytes: int

    @property
    def total_bytes(self) -> int:
        """K plus V."""
        return self.k_bytes + self.v_bytes


def _pad(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _cache_type(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    if isinstance(name, GGMLQuantizationType):
        return name
    try:
        return GGMLQuantizationType[str(name).strip().upper()]
    except KeyError:
        raise InvalidOptionError(
            f"Unknown KV cache type {name!r}; llama.cpp's --cache-type-k/-v take f16, bf16, f32, q8_0, q4_0, "
            "q4_1, q5_0, q5_1, iq4_nl."
        ) from None


def _row_bytes(n_values: int, qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if n_values % block:
        raise InvalidOptionError(f"a KV row of {n_values} values does not divide into {qtype.name} blocks of {block}")
    return n_values // block * size


def _shape(config: Mapping[str, Any] | ModelShape) -> ModelShape:
    if isinstance(config, ModelShape):
        return config
    if "general.architecture" in config:
        return ModelShape.from_gguf_metadata(config)
    return ModelShape.from_hf_config(config)


def kv_cache_layout(
    config: Mapping[str, Any] | ModelShape,
    context: int,
    *,
    ubatch: int = 512,
    cache_type: str | GGMLQuantizationType = "f16",
    swa_full: bool = False,
) -> KVCacheLayout:
    """The cells, layers and bytes of llama.cpp's KV cache(s) for ``context`` tokens of one sequence.

    Args:
        config: an HF ``config.json`` dict, a GGUF's KVs (with ``general.architecture``), or a
            :class:`ModelShape`.
        context: the context length (llama.cpp's ``n_ctx``); padded to a multiple of 256.
        ubatch: llama.cpp's physical batch (``n_ubatch``, default 512): the SWA cache holds the
            window plus one micro-batch.
        cache_type: the K and V cache type (``f16``; ``q8_0``... as llama.cpp's ``--cache-type-k/-v``).
        swa_full: llama.cpp's ``--swa-full``: sliding-window layers keep the whole context.
    """
    if context <= 0:
        raise InvalidOptionError(f"context must be a positive number of tokens, got {context}")
    if ubatch <= 0:
        raise InvalidOptionError(f"ubatch must be a positive number of tokens, got {ubatch}")
    shape = _shape(config)
    qtype = _cache_type(cache_type)
    cells = _pad(context, CELL_PADDING)
    any_swa = any(shape.swa_layers)
    swa_cells = 0
    if any_swa:
        # llama.cpp's n_ubatch is capped by the unpadded context (n_batch = min(n_ctx, n_batch) comes first)
        swa_cells = cells if swa_full else _pad(min(cells, shape.sliding_window + min(ubatch, context)), CELL_PADDING)
    k_bytes = v_bytes = 0
    full_layers = swa_layers = 0
    for il in range(shape.n_layer):
        if not shape.n_head_kv[il]:
            continue  # a layer without attention (hybrid models) has no KV cache
        is_swa = shape.swa_layers[il]
        n = swa_cells if is_swa else cells
        swa_layers += is_swa
        full_layers += not is_swa
        k_bytes += n * _row_bytes(shape.n_head_kv[il] * shape.head_dim_k, qtype)
        v_bytes += n * _row_bytes(shape.n_head_kv[il] * shape.head_dim_v, qtype)
    return KVCacheLayout(cells, full_layers, swa_cells, swa_layers, k_bytes, v_bytes)


def kv_cache_bytes(
    config: Mapping[str, Any] | ModelShape,
    context: int,
    *,
    ubatch: int = 512,
    cache_type: str | GGMLQuantizationType = "f16",
    swa_full: bool = False,
) -> int:
    """Bytes of llama.cpp's KV cache for ``context`` tokens of one sequence (K and V, every layer).

    Per layer: ``cells x n_head_kv x (head_dim_k + head_dim_v)`` values in ``cache_type``; ``cells`` is
    the context padded to 256, or for a sliding-window layer (Gemma 2/3...) ``pad256(min(context,
    window + ubatch))``. See :func:`kv_cache_layout` for the arguments.
    """
    return kv_cache_layout(config, context, ubatch=ubatch, cache_type=cache_type, swa_full=swa_full).total_bytes


def compute_buffer_bytes(
    config: Mapping[str, Any] | ModelShape,
    context: int,
    *,
    ubatch: int = 512,
    flash_attn: bool = True,
    swa_full: bool = False,
) -> int:
    """An estimate of llama.cpp's compute (scheduler) buffer, plus one token's logits.

    The formula is the module docstring's: the largest of the attention and feed-forward stages (with
    the graph inputs: token embeddings, attention masks) and the output stage (the logits), for one
    micro-batch in float32.

    Args:
        config: as for :func:`kv_cache_layout`.
        context: the context length.
        ubatch: llama.cpp's ``n_ubatch``.
        flash_attn: llama.cpp's flash attention (its default ``auto`` turns it on wherever the backend
            supports it: CUDA, Metal, Vulkan, CPU). Without it, each layer's ``T x n_head x cells``
            attention scores are materialized.
        swa_full: as for :func:`kv_cache_layout`.
    """
    shape = _shape(config)
    layout = kv_cache_layout(shape, context, ubatch=ubatch, swa_full=swa_full)
    tokens = min(ubatch, context)
    f32 = 4
    mask_bytes = 2 if flash_attn else 4  # llama.cpp casts the KQ mask to f16 for flash attention
    mask_cells = (layout.cells if layout.full_layers else 0) + (layout.swa_cells if layout.swa_layers else 0)
    inputs = f32 * tokens * shape.n_embd + mask_bytes * tokens * mask_cells
    n_head_kv = max(shape.n_head_kv) if shape.n_head_kv else 0
    qkv = shape.n_head * shape.head_dim_k + n_head_kv * (shape.head_dim_k + shape.head_dim_v)
    attention = f32 * tokens * (qkv + shape.n_embd)
    if not flash_attn:
        widest = layout.cells if layout.full_layers else layout.swa_cells
        attention += f32 * tokens * shape.n_head * widest
    ffn = f32 * tokens * (3 * shape.n_ff + shape.n_embd)
    output = f32 * tokens * (shape.n_vocab + 2 * shape.n_embd)  # the inputs are freed after the last layer
    return max(inputs + attention, inputs + ffn, output) + f32 * shape.n_vocab


# --- the estimate -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
    """File size and memory of one GGUF file type, for one context length.

    Attributes:
        quantization: the file type ("q4_k_m"; for a .gguf taken as it is, its type, e.g. "q8_0").
        file_bytes: the GGUF file's size on disk (exact; see ``file_bytes_exact``).
        file_bytes_exact: False when the tokenizer KVs could not be counted (no tokenizer files):
            ``file_bytes`` then lacks them.
        tensor_bytes: the weights' data bytes (what llama.cpp loads).
        n_params: parameters (elements of all tensors).
        bits_per_weight: ``8 * tensor_bytes / n_params``.
        context: the context length asked for.
        kv_cache: the KV cache(s).
        compute_bytes: the compute buffer estimate.
        shape: the model facts the memory math used.
    """

    quantization: str
    file_bytes: int
    file_bytes_exact: bool
    tensor_bytes: int
    n_params: int
    bits_per_weight: float
    context: int
    kv_cache: KVCacheLayout
    compute_bytes: int
    shape: ModelShape

    @property
    def kv_cache_bytes(self) -> int:
        """K and V bytes of every layer."""
        return self.kv_cache.total_bytes

    @property
    def total_bytes(self) -> int:
        """Memory to run the file: weights + KV cache + compute buffer."""
        return self.tensor_bytes + self.kv_cache.total_bytes + self.compute_bytes


def estimate(
    model: Any,
    *,
    quantization: str | Sequence[str] | None = None,
    context: int = 8192,
    ubatch: int = 512,
    flash_attn: bool = True,
    cache_type: str = "f16",
    swa_full: bool = False,
    base: str | os.PathLike[str] | None = None,
) -> list[Estimate]:
    """Sizes and memory of the GGUF files of ``model``, one :class:`Estimate` per file type.

    Args:
        model: what ``save_pretrained_gguf`` exports (an HF model folder, an in-memory
            ``transformers`` model, a LoRA adapter folder or ``peft.PeftModel``), or a ``.gguf`` file.
        quantization: file type name(s) as for ``save_pretrained_gguf``. Default: for a folder,
            q4_k_m q5_k_m q6_k q8_0 f16; for a ``.gguf``, the file as it is. With a ``.gguf``, a file
            type means the file ``requantize`` would write.
        context: tokens of context (llama.cpp's ``-c``).
        ubatch: llama.cpp's physical batch (``-ub``, default 512).
        flash_attn: whether llama.cpp runs flash attention (its default where supported).
        cache_type: KV cache type (llama.cpp's ``--cache-type-k/-v``), f16 by default.
        swa_full: llama.cpp's ``--swa-full``.
        base: for a LoRA adapter folder: the base model folder (default: the adapter's
            ``base_model_name_or_path``), as for ``save_pretrained_gguf``.

    Raises:
        MissingFileError, GGUFReadError, UnsupportedArchitectureError, UnsupportedQuantTypeError:
            the model or a name cannot be used.
    """
    if isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".gguf"):
        return _estimate_gguf(pathlib.Path(model), quantization, context, ubatch, flash_attn, cache_type, swa_full)
    names = list(_DEFAULT_QUANTS) if quantization is None else _names(quantization)
    file_types = list(dict.fromkeys(file_type(n) for n in names))
    if isinstance(model, (str, os.PathLike)) and not pathlib.Path(model).exists():
        raise MissingFileError(f"{model}: no such model folder or .gguf file")
    # The export's own way in (a checkpoint, or a LoRA fine-tune merged on the fly), its own plans
    # and KVs: the sizes are those of the files save_pretrained_gguf writes.
    from .gguf.arch import architecture_for
    from .gguf.export import open_model, quant_plans
    from .gguf.tokenizer import tokenizer_json_cache

    with open_model(model, base, None) as source, tokenizer_json_cache():
        arch = architecture_for(source)
        kvs, exact = _hf_metadata(arch, source)
        plans = quant_plans(arch.tensors(source), file_types, arch.hparams(source))
        shape = ModelShape.from_hf_config(source.config)
    kv = kv_cache_layout(shape, context, ubatch=ubatch, cache_type=cache_type, swa_full=swa_full)
    compute = compute_buffer_bytes(shape, context, ubatch=ubatch, flash_attn=flash_attn, swa_full=swa_full)
    return [
        Estimate(
            quantization=plan.file_type,
            file_bytes=_file_bytes(kvs + plan.metadata(), plan),
            file_bytes_exact=exact,
            tensor_bytes=plan.total_bytes,
            n_params=plan.n_params,
            bits_per_weight=plan.bits_per_weight,
            context=context,
            kv_cache=kv,
            compute_bytes=compute,
            shape=shape,
        )
        for plan in plans
    ]


def _names(quantization: str | Sequence[str]) -> list[str]:
    names = [quantization] if isinstance(quantization, str) else list(quantization)
    if not names:
        raise InvalidOptionError("quantization is empty; give at least one file type, e.g. 'q4_k_m'")
    return names


def _hf_metadata(arch: Any, source: Any) -> tuple[list[tuple[str, Any, Any]], bool]:
    """The KVs the export writes before the plan's own (as ``save_pretrained_gguf`` assembles them)."""
    from .gguf.tokenizer import tokenizer_metadata

    skip = (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)
    kvs = [kv for kv in arch.metadata(source) if kv[0] not in skip]
    try:
        return kvs + tokenizer_metadata(source), True
    except MissingFileError:
        return kvs, False  # no tokenizer files (the export then needs tokenizer=): sizes lack those KVs, flagged


def _file_bytes(kvs: list[tuple[str, Any, Any]], plan: QuantPlan) -> int:
    """The exact size the GGUF writer gives these KVs and tensors (it writes nothing: dry run)."""
    from .gguf.writer import GGUFFileWriter

    writer = GGUFFileWriter(os.devnull, dry_run=True)
    for key, value, value_type in kvs:
        writer.add_metadata(key, value, value_type)
    for t in plan.tensors:
        writer.add_tensor(t.name, t.shape, t.type, t.nbytes)
    return sum(part.nbytes for part in writer.parts())


def _estimate_gguf(
    path: pathlib.Path,
    quantization: str | Sequence[str] | None,
    context: int,
    ubatch: int,
    flash_attn: bool,
    cache_type: str,
    swa_full: bool,
) -> list[Estimate]:
    info = open_gguf(path)
    shape = ModelShape.from_gguf(info)
    kv = kv_cache_layout(shape, context, ubatch=ubatch, cache_type=cache_type, swa_full=swa_full)
    compute = compute_buffer_bytes(shape, context, ubatch=ubatch, flash_attn=flash_attn, swa_full=swa_full)

    def make(name: str, file_bytes: int, tensor_bytes: int, n_params: int) -> Estimate:
        bpw = 8.0 * tensor_bytes / n_params if n_params else 0.0
        return Estimate(name, file_bytes, True, tensor_bytes, n_params, bpw, context, kv, compute, shape)

    if quantization is None:
        return [make(info.file_type, info.file_bytes, info.tensor_bytes, info.n_params)]
    from .gguf.requant import source_hparams  # requantize's own reading of the plan's facts

    hparams = source_hparams(info)
    inputs = [PlanInput(t.name, t.shape, t.type) for t in info.tensors]
    estimates = []
    for ft in dict.fromkeys(file_type(n) for n in _names(quantization)):
        plan = plan_quantization(inputs, ft, hparams)
        estimates.append(make(plan.file_type, _requantized_bytes(info, plan), plan.total_bytes, plan.n_params))
    return estimates


def _requantized_bytes(info: GGUFModelFile, plan: QuantPlan) -> int:
    """llama-quantize keeps every KV (its file type and split keys aside) and the tensor infos' sizes."""
    header = 4 + 4 + 8 + 8
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in plan.tensors)
    meta = header + info.metadata_bytes + infos
    align = info.alignment
    return _pad(meta, align) + sum(_pad(t.nbytes, align) for t in plan.tensors)
