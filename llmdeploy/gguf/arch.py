"""What llama.cpp's ``convert_hf_to_gguf.py`` does per architecture, as small tables.

For each supported HF architecture: the GGUF architecture, the metadata KVs the converter
writes (all but ``tokenizer.*``, see :mod:`.tokenizer`), the GGUF tensors in the converter's
order with their names (gguf-py's ``TensorNameMap``), shapes and value transforms (Llama Q/K
permutation, Gemma's norm + 1, Gemma 3's embedding truncation, MoE expert stacking, generated
RoPE factor tensors), and which tensors the converter keeps in F32 whatever the outtype.

Values load lazily, one tensor at a time, in float32 after the converter's transforms: the
converter computes in the checkpoint dtype when it is fp16 or fp32 and in fp32 otherwise
(bf16 is widened first), and so do we, which matters for Gemma's ``+ 1`` on fp16 norms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from ..errors import UnexpectedTensorError, UnsupportedArchitectureError
from .plan import ModelHParams
from .tokenizer import read_tokenizer_json

if TYPE_CHECKING:
    from ..source import Source

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ExportTensor",
    "architecture_for",
]

KV = tuple[str, Any, "gguf.GGUFValueType | None"]


@dataclass(frozen=True)
class ExportTensor:
    """One tensor of the GGUF file.

    Args:
        name: the GGUF name, "blk.0.attn_q.weight".
        shape: numpy order (the last axis is the row; the GGUF stores the dims reversed).
        load: returns the float32 CPU values after the converter's transforms; read-only (an
            untransformed fp32 tensor may share memory with the checkpoint or the model).
        keep_f32: the converter writes it as F32 whatever the outtype (1-D tensors, norms,
            biases, MoE routers).
        load_rows: ``load_rows(lo, hi)`` returns ``load()[lo:hi]`` (rows of the first axis of
            ``shape``) without reading the rest; None when the transforms need the whole tensor.
    """

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    keep_f32: bool
    load_rows: Callable[[int, int], torch.Tensor] | None = None


# -- hparams, as the converter reads them -------------------------------------------------------


@dataclass
class _Ctx:
    hp: dict[str, Any]  # config, text_config merged in
    rope: dict[str, Any]  # the converter's normalised rope parameters
    n_layer: int
    file_type: int
    folder: pathlib.Path | None = None
    early: dict[str, Any] = dataclasses.field(default_factory=dict)  # KVs the converter writes first


def _find(hp: dict[str, Any], *keys: str) -> Any:
    """The converter's ``find_hparam(optional=True)``: the first key present wins, even if None."""
    for k in keys:
        if k in hp:
            return hp[k]
    return None


def _need(hp: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in hp:
            return hp[k]
    arch = (hp.get("architectures") or ["this model"])[0]
    raise UnsupportedArchitectureError(
        f"config.json of {arch} has none of {', '.join(keys)}, which the GGUF export needs; "
        "add it to the config (as the original model's config has it)"
    )


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    hp = dict(config)
    if isinstance(hp.get("text_config"), dict):
        hp = {**hp, **hp["text_config"]}
    return hp


def _rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling, with the top-level keys mirrored in."""
    rope = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    theta = _find(hp, "global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
    local = _find(
        hp, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"
    )
    mirrored = {
        "rope_theta": theta,
        "rope_type": rope.get("type"),
        "partial_rotary_factor": _find(hp, "partial_rotary_factor", "rope_pct", "rope_percent"),
        "original_max_position_embeddings": _find(hp, "original_max_position_embeddings"),
    }
    if local is not None:
        rope["sliding_attention"] = {"rope_theta": local}
    for key, value in mirrored.items():
        if key not in rope and value is not None:
            rope[key] = value
    return rope


def _head_dim(hp: dict[str, Any]) -> int:
    if (dim := hp.get("head_dim")) is None:
        dim = hp["hidden_size"] // hp["num_attention_heads"]
    return dim


# -- metadata steps: each writes KVs through gguf-py's GGUFWriter helpers (names and types) ------

_Step = Callable[[gguf.GGUFWriter, _Ctx], None]


def _kv(method: str, value: Callable[[_Ctx], Any]) -> _Step:
    """Write ``value(ctx)`` with ``GGUFWriter.<method>`` unless it is None."""

    def step(w: gguf.GGUFWriter, c: _Ctx) -> None:
        if (v := value(c)) is not None:
            getattr(w, method)(v)

    return step


def _opt(*keys: str) -> Callable[[_Ctx], Any]:
    return lambda c: _find(c.hp, *keys)


def _req(*keys: str) -> Callable[[_Ctx], Any]:
    return lambda c: _need(c.hp, *keys)


def _rope_scaling(w: gguf.GGUFWriter, c: _Ctx) -> None:
    params = c.rope.get("full_attention", c.rope)
    rope_type = params.get("rope_type")
    factor = params.get("factor")
    if rope_type is None:
        return
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for method, keys in (
            ("add_rope_scaling_yarn_ext_factor", ("extrapolation_factor",)),
            ("add_rope_scaling_yarn_attn_factor", ("attention_factor", "attn_factor")),
            ("add_rope_scaling_yarn_beta_fast", ("beta_fast",)),
            ("add_rope_scaling_yarn_beta_slow", ("beta_slow",)),
        ):
            value = next((params[k] for k in keys if params.get(k) is not None), None)
            if value is not None:
                getattr(w, method)(value)
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    # "llama3" becomes the rope_freqs tensor; "default", "dynamic" and others write nothing.


def _mrope_sections(w: gguf.GGUFWriter, c: _Ctx) -> None:
    if "mrope_section" in c.rope:
        sections = list(c.rope["mrope_section"])
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])


def _gating(w: gguf.GGUFWriter, c: _Ctx) -> None:
    func = _find(c.hp, "score_function", "scoring_func", "score_func", "moe_router_activation",
                 "moe_router_activation_func", "expert_selection_fn")  # fmt: skip
    if func is None:
        return
    types = {"sigmoid": "SIGMOID", "softmax": "SOFTMAX", "sqrtsoftplus": "SQRTSOFTPLUS"}
    if func not in types or not hasattr(gguf.ExpertGatingFuncType, types[func]):
        raise UnsupportedArchitectureError(f"expert gating function {func!r} cannot be exported to GGUF")
    w.add_expert_gating_func(getattr(gguf.ExpertGatingFuncType, types[func]))


def _head_dim_kvs(w: gguf.GGUFWriter, c: _Ctx) -> None:
    if (head_dim := c.hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _causal(w: gguf.GGUFWriter, c: _Ctx) -> None:
    if c.hp.get("is_causal") is False:
        w.add_causal_attention(False)


_FILE_TYPE = _kv("add_file_type", lambda c: c.file_type)

# TextModel.set_gguf_parameters: the keys every text model gets, in the converter's order.
_TEXT: tuple[_Step, ...] = (
    _kv("add_block_count", lambda c: c.n_layer),
    _kv("add_context_length", _opt("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                   "max_sequence_length", "model_max_length")),
    _kv("add_embedding_length", _opt("hidden_size", "n_embd", "dim")),
    _kv("add_feed_forward_length", _opt("prefix_dense_intermediate_size", "dense_intermediate_size",
                                        "intermediate_size", "n_inner", "hidden_dim")),
    _kv("add_head_count", _opt("num_attention_heads", "n_head", "n_heads")),
    _kv("add_head_count_kv", _opt("num_key_value_heads", "n_kv_heads")),
    _causal,
    _rope_scaling,
    _mrope_sections,
    _kv("add_rope_freq_base", lambda c: c.rope.get("full_attention", c.rope).get("rope_theta")),
    _kv("add_rope_freq_base_swa", lambda c: c.rope.get("sliding_attention", {}).get("rope_theta")),
    _kv("add_layer_norm_rms_eps", _opt("rms_norm_eps", "norm_eps")),
    _kv("add_layer_norm_eps", _opt("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")),
    _kv("add_expert_count", _opt("num_local_experts", "num_experts", "n_routed_experts")),
    _kv("add_expert_used_count", _opt("num_experts_per_tok", "num_experts_per_token", "top_k_experts")),
    _kv("add_expert_group_count", lambda c: c.hp.get("n_group")),
    _kv("add_expert_group_used_count", lambda c: c.hp.get("topk_group")),
    _gating,
    _head_dim_kvs,
    _FILE_TYPE,
)  # fmt: skip

_LLAMA = _TEXT + (
    _kv("add_vocab_size", _req("vocab_size")),
    _kv("add_rope_dimension_count", lambda c: _head_dim(c.hp)),
)


def _pooling(w: gguf.GGUFWriter, c: _Ctx) -> None:
    """Sentence-transformers pooling (modules.json), as Qwen2/Qwen3 embedding exports carry it."""
    folder = c.folder
    modules = folder / "modules.json" if folder is not None else None
    if modules is None or not modules.is_file():
        return
    path = next(
        (m["path"] for m in json.loads(modules.read_text(encoding="utf-8")) if m["type"].endswith("Pooling")), None
    )
    if path is None:
        return
    pooling = json.loads((folder / path / "config.json").read_text(encoding="utf-8"))
    modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    for flag, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                       ("pooling_mode_lasttoken", "lasttoken")):  # fmt: skip
        if pooling.get(flag):
            w.add_pooling_type(modes[mode])
            return
    if pooling.get("pooling_mode") in modes:
        w.add_pooling_type(modes[pooling["pooling_mode"]])
        return
    raise UnsupportedArchitectureError(f"{folder / path / 'config.json'}: only mean, cls and last-token pooling export")


_QWEN2 = _TEXT + (_pooling,)
_QWEN_MOE = _TEXT + (
    _kv("add_expert_feed_forward_length", lambda c: c.hp.get("moe_intermediate_size")),
    _kv("add_expert_shared_feed_forward_length", lambda c: c.hp.get("shared_expert_intermediate_size")),
)

_GEMMA: tuple[_Step, ...] = (
    _kv("add_context_length", _req("max_position_embeddings")),
    _kv("add_embedding_length", _req("hidden_size")),
    _kv("add_block_count", lambda c: c.n_layer),
    _kv("add_feed_forward_length", _req("intermediate_size")),
    _kv("add_head_count", _req("num_attention_heads")),
    _kv("add_head_count_kv", lambda c: c.hp.get("num_key_value_heads", c.hp.get("num_attention_heads"))),
    _kv("add_layer_norm_rms_eps", _req("rms_norm_eps")),
    _kv("add_key_length", _req("head_dim")),
    _kv("add_value_length", _req("head_dim")),
    _FILE_TYPE,
)
_GEMMA2 = _GEMMA + (
    _kv("add_attn_logit_softcapping", _req("attn_logit_softcapping")),
    _kv("add_final_logit_softcapping", _req("final_logit_softcapping")),
    _kv("add_sliding_window", _req("sliding_window")),
)
# Gemma 3 rewrites some base keys with its defaults (a rewritten key keeps its first position).
_GEMMA3 = _TEXT + (
    _kv("add_context_length", lambda c: c.hp.get("max_position_embeddings", 131072)),
    _kv("add_head_count", lambda c: c.hp.get("num_attention_heads", 8)),
    _kv("add_layer_norm_rms_eps", lambda c: c.hp.get("rms_norm_eps", 1e-6)),
    _kv("add_key_length", lambda c: c.hp.get("head_dim", 256)),
    _kv("add_value_length", lambda c: c.hp.get("head_dim", 256)),
    _kv("add_rope_freq_base", lambda c: c.rope.get("full_attention", c.rope).get("rope_theta", 1_000_000.0)),
    _kv("add_final_logit_softcapping", lambda c: c.hp.get("final_logit_softcapping") or None),
    _kv("add_sliding_window", lambda c: c.hp["sliding_window"] if c.hp.get("sliding_window_pattern") != 1 else None),
    _kv("add_head_count_kv", lambda c: c.hp.get("num_key_value_heads", 4)),
)


def _phi3_rope_dims(c: _Ctx) -> int:
    n_embd = _need(c.hp, "hidden_size", "n_embd")
    return int(c.rope.get("partial_rotary_factor", 1.0) * n_embd) // _need(c.hp, "num_attention_heads", "n_head")


def _phi3_orig_ctx(c: _Ctx) -> int:
    if "original_max_position_embeddings" not in c.rope:
        raise UnsupportedArchitectureError(
            "Phi-3 config.json has no original_max_position_embeddings, which the GGUF export needs"
        )
    return c.rope["original_max_position_embeddings"]


_PHI3: tuple[_Step, ...] = (
    _kv("add_context_length", _req("n_positions", "max_position_embeddings")),
    _kv("add_rope_scaling_orig_ctx_len", _phi3_orig_ctx),
    _kv("add_embedding_length", _req("hidden_size", "n_embd")),
    _kv("add_feed_forward_length", _req("intermediate_size")),
    _kv("add_block_count", lambda c: c.n_layer),
    _kv("add_head_count", _req("num_attention_heads", "n_head")),
    _kv("add_head_count_kv", _req("num_key_value_heads", "n_head_kv")),
    _kv("add_layer_norm_rms_eps", _req("rms_norm_eps")),
    _kv("add_rope_dimension_count", _phi3_rope_dims),
    _kv("add_rope_freq_base", lambda c: c.rope.get("full_attention", c.rope)["rope_theta"]),
    _FILE_TYPE,
    _kv("add_sliding_window", lambda c: c.hp.get("sliding_window") or 0),  # 0 marks Phi-3 (not Phi-4)
)


# -- generated tensors --------------------------------------------------------------------------

_Extra = tuple[str, Callable[[], torch.Tensor], int]  # GGUF name, values, length


def _llama3_rope_freqs(c: _Ctx) -> list[_Extra]:
    params = c.rope.get("full_attention", c.rope)
    if not params or str(params.get("rope_type", "")).lower() != "llama3":
        return []
    dim = _head_dim(c.hp)
    base = params.get("rope_theta", 10000.0)
    factor = params.get("factor", 8.0)
    low = params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)

    def values() -> torch.Tensor:
        # float32 throughout, as the converter's per-element torch scalar arithmetic is.
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = 1 / ((1 - smooth) / factor + smooth)
        out = torch.where(wavelen > old_ctx / low, torch.tensor(factor, dtype=torch.float32), mid)
        return torch.where(wavelen < old_ctx / high, torch.tensor(1.0, dtype=torch.float32), out)

    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", values, dim // 2)]


def _phi3_rope_factors(c: _Ctx) -> list[_Extra]:
    long_factors = c.rope.get("long_factor")
    short_factors = c.rope.get("short_factor")
    if not long_factors:
        return []
    max_pos = _need(c.hp, "n_positions", "max_position_embeddings")
    orig = _phi3_orig_ctx(c)
    scale = max_pos / orig
    rope_type = str(c.rope.get("rope_type", "")).lower()
    if rope_type in ("su", "longrope"):
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif rope_type == "yarn":
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise UnsupportedArchitectureError(f"Phi-3 rope scaling type {rope_type!r} cannot be exported to GGUF")
    n = _phi3_rope_dims(c) / 2
    if short_factors is None or len(long_factors) != len(short_factors) or len(long_factors) != n:
        raise UnsupportedArchitectureError(
            f"Phi-3 rope scaling needs long_factor and short_factor of {n:g} values each"
        )
    c.early["attn_factor"] = attn_factor
    return [
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight",
         lambda: torch.tensor(long_factors, dtype=torch.float32), len(long_factors)),
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
         lambda: torch.tensor(short_factors, dtype=torch.float32), len(short_factors)),
    ]  # fmt: skip


# -- MoE experts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Experts:
    """How a checkpoint stores MoE experts, and how the converter stacks them into 3-D tensors.

    Every tensor whose name contains ``marker`` belongs to some layer's experts; once a layer
    has all ``n_expert * len(order)`` of them, the converter emits one stacked tensor per
    projection, in ``order``, named ``stacked`` (an HF-style name the TensorNameMap knows).
    """

    marker: str
    pattern: re.Pattern[str]  # groups: layer, expert, projection
    expert: str  # the same name as a template
    order: tuple[str, ...]
    stacked: str
    count_keys: tuple[str, ...]
    fused: re.Pattern[str] | None = None  # 3-D checkpoint tensors: groups: prefix, projection


_MIXTRAL_EXPERTS = _Experts(
    marker="block_sparse_moe.experts",
    pattern=re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"),
    expert="model.layers.{bid}.block_sparse_moe.experts.{x}.{proj}.weight",
    order=("w1", "w2", "w3"),
    stacked="layers.{bid}.feed_forward.experts.{proj}.weight",
    count_keys=("num_local_experts",),
)
_QWEN_EXPERTS = _Experts(
    marker="experts",
    pattern=re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight"),
    expert="model.layers.{bid}.mlp.experts.{x}.{proj}.weight",
    order=("down_proj", "gate_proj", "up_proj"),
    stacked="model.layers.{bid}.mlp.experts.{proj}.weight",
    count_keys=("num_local_experts", "num_experts"),
    fused=re.compile(r"(.*mlp\.experts)\.(down_proj|gate_up_proj)(?:\.weight)?"),
)


# -- the architectures --------------------------------------------------------------------------

# Tensors the converter drops from every checkpoint.
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

# Tensor kinds the converter always writes in F32 (the subset that these architectures can hold).
_F32_KINDS = frozenset(
    getattr(gguf.MODEL_TENSOR, k)
    for k in ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES")
    if hasattr(gguf.MODEL_TENSOR, k)
)


@dataclass(frozen=True)
class Architecture:
    """One converter model class, as data.

    Args:
        hf_names: the ``config.architectures[0]`` values it handles.
        gguf_arch: the GGUF architecture.
        params: the metadata steps, in the converter's order.
        permute_qk: Llama's Q/K row permutation (HF rotary halves -> GGUF interleaved pairs).
        norm_plus_one: add 1 to tensors whose HF name ends in "norm.weight" (Gemma's RMSNorm).
        dropped: HF names the converter skips (Gemma's unused ``lm_head.weight``).
        strip_prefixes: name parts the converter removes before mapping.
        experts: MoE expert layout, if any.
        truncate_embeddings: cut ``embed_tokens`` to the tokenizer's real vocabulary (Gemma 3).
        extra: tensors the converter generates before the checkpoint's (RoPE factors).
        reranker_check: refuse Qwen3 rerankers, which the converter exports differently.
    """

    hf_names: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    params: tuple[_Step, ...]
    permute_qk: bool = False
    norm_plus_one: bool = False
    dropped: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] = ("language_model.",)
    experts: _Experts | None = None
    truncate_embeddings: bool = False
    extra: Callable[[_Ctx], list[_Extra]] | None = None
    reranker_check: bool = False

    @property
    def name(self) -> str:
        """The GGUF architecture name, "llama"."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # - public ------------------------------------------------------------------------------

    def metadata(self, source: Source, *, file_type: int = int(gguf.LlamaFileType.MOSTLY_BF16)) -> list[KV]:
        """The converter's KVs for ``source``, in its order, tokenizer KVs excepted.

        ``general.*`` (architecture, type, name and the other model-card keys gguf-py's
        ``Metadata`` derives from the folder, size label, quantization version) and the
        ``{arch}.*`` hyperparameters.

        Args:
            source: the opened model.
            file_type: the ``general.file_type`` value (a ``llama_ftype``), written where the
                converter writes it. The default is what ``--outtype bf16`` writes; the exporter
                passes its plan's file type. (llama-quantize moves ``general.quantization_version``
                and ``general.file_type`` to the end of the KVs, in that order.)

        Returns:
            ``(key, value, GGUFValueType)`` triples.
        """
        ctx = self._ctx(source, file_type)
        tensors = self._tensors(source, ctx)
        w = _Recorder(self.name)
        if "attn_factor" in ctx.early:  # written while the converter generates its tensors, so early
            w.add_rope_scaling_attn_factors(ctx.early["attn_factor"])
        w.add_type(gguf.GGUFType.MODEL)
        _model_card(source, tensors).set_gguf_meta_model(w)
        for step in self.params:
            step(w, ctx)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return w.kvs()

    def tensors(self, source: Source) -> list[ExportTensor]:
        """The GGUF tensors, in the converter's order, values loaded lazily.

        Args:
            source: the opened model.

        Raises:
            UnexpectedTensorError: a checkpoint tensor this architecture has no GGUF name for
                (it is never silently dropped), or an incomplete set of MoE experts.
        """
        return self._tensors(source, self._ctx(source, int(gguf.LlamaFileType.MOSTLY_BF16)))

    def hparams(self, source: Source) -> ModelHParams:
        """What llama-quantize's rules read (plan.py's ``ModelHParams``), as our GGUF KVs state it.

        Args:
            source: the opened model.
        """
        ctx = self._ctx(source, int(gguf.LlamaFileType.MOSTLY_BF16))
        w = _Recorder(self.name)
        for step in self.params:
            step(w, ctx)
        kv = {k: v for k, v, _ in w.kvs()}
        n_head = kv[f"{self.name}.attention.head_count"]
        return ModelHParams(
            arch=self.name,
            n_layer=kv[f"{self.name}.block_count"],
            n_head=n_head,
            n_head_kv=kv.get(f"{self.name}.attention.head_count_kv", n_head),
            n_expert=kv.get(f"{self.name}.expert_count", 0),
        )

    # - internals ---------------------------------------------------------------------------

    def _ctx(self, source: Source, file_type: int) -> _Ctx:
        hp = _hparams(source.config)
        n_layer = _need(hp, "n_layers", "num_hidden_layers", "n_layer", "num_layers")
        ctx = _Ctx(hp=hp, rope=_rope_parameters(hp), n_layer=n_layer, file_type=int(file_type), folder=source.folder)
        if self.reranker_check and _is_qwen3_reranker(source, hp):
            raise UnsupportedArchitectureError(
                "Qwen3 rerankers are converted to a classifier head by llama.cpp; llmdeploy exports "
                "causal language models only"
            )
        return ctx

    def _tensors(self, source: Source, ctx: _Ctx) -> list[ExportTensor]:
        name_map = gguf.get_tensor_name_map(self.gguf_arch, ctx.n_layer)
        out: list[ExportTensor] = []
        for name, values, n in self.extra(ctx) if self.extra else ():
            out.append(ExportTensor(name, (n,), values, keep_f32=True))

        buckets: dict[int, dict[str, str]] = {}  # layer -> HF name -> HF name of the stored tensor
        n_vocab = self._real_vocab(source, ctx) if self.truncate_embeddings else None
        for stored in source.names():
            name = stored
            for prefix in self.strip_prefixes:
                name = name.replace(prefix, "")
            if name.endswith(_SKIPPED_SUFFIXES) or name in self.dropped:
                continue
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            if self.experts is not None and self.experts.marker in name:
                out.extend(self._expert_tensors(source, ctx, name_map, stored, name, bid, buckets))
                continue
            out.append(self._plain_tensor(source, ctx, name_map, stored, name, n_vocab))

        leftover = sorted(n for b in buckets.values() for n in b)
        if leftover:
            raise UnexpectedTensorError(
                f"incomplete MoE experts: {', '.join(leftover[:6])}{' ...' if len(leftover) > 6 else ''} "
                f"(every layer needs all {self._n_expert(ctx)} experts' {', '.join(self.experts.order)})"  # type: ignore[union-attr]
            )
        return out

    def _plain_tensor(
        self, source: Source, ctx: _Ctx, name_map: gguf.TensorNameMap, stored: str, name: str, n_vocab: int | None
    ) -> ExportTensor:
        shape = tuple(source.info(stored).shape)
        transforms: list[Callable[[torch.Tensor], torch.Tensor]] = []
        permuted = False
        if self.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            n_head = _need(ctx.hp, "n_heads", "num_attention_heads")
            n_kv = _need(ctx.hp, "n_kv_heads", "num_key_value_heads")
            heads = n_head if ".q_proj." in name or n_kv is None or n_head == n_kv else n_kv
            transforms.append(lambda t, h=heads: _permute(t, h))
            permuted = True
        if n_vocab is not None and "embed_tokens.weight" in name:
            shape = (len(range(shape[0])[:n_vocab]), *shape[1:])
            transforms.append(lambda t: t[:n_vocab])
        if self.norm_plus_one and name.endswith("norm.weight"):
            transforms.append(lambda t: t + 1)
        # Every transform but the Q/K permutation (which mixes the rows of a head) is row-wise.
        rows = None if permuted else (lambda lo, hi: _apply(source.load(stored)[lo:hi], transforms))
        return self._export(name_map, name, shape, lambda: _apply(source.load(stored), transforms), rows)

    def _export(
        self,
        name_map: gguf.TensorNameMap,
        name: str,
        shape: tuple[int, ...],
        load: Callable[[], torch.Tensor],
        load_rows: Callable[[int, int], torch.Tensor] | None = None,
    ) -> ExportTensor:
        mapped = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnexpectedTensorError(
                f"tensor {name!r} has no place in a GGUF {self.name} model: llama.cpp's converter cannot map it "
                "either. If it is an adapter or auxiliary weight, merge or remove it before exporting"
            )
        kind, gguf_name = mapped
        keep_f32 = (
            len(shape) <= 1
            or gguf_name.endswith("_norm.weight")
            or not gguf_name.endswith(".weight")
            or kind in _F32_KINDS
        )
        return ExportTensor(gguf_name, shape, load, keep_f32, load_rows)

    def _n_expert(self, ctx: _Ctx) -> int:
        assert self.experts is not None
        return _need(ctx.hp, *self.experts.count_keys)

    def _expert_tensors(
        self,
        source: Source,
        ctx: _Ctx,
        name_map: gguf.TensorNameMap,
        stored: str,
        name: str,
        bid: int | None,
        buckets: dict[int, dict[str, str]],
    ) -> Iterator[ExportTensor]:
        spec = self.experts
        assert spec is not None
        if spec.fused is not None and (m := spec.fused.fullmatch(name)):
            yield from self._fused_experts(source, name_map, stored, m.group(1), m.group(2))
            return
        m = spec.pattern.fullmatch(name)
        if m is None or bid is None:
            raise UnexpectedTensorError(
                f"tensor {name!r} looks like an MoE expert weight but not one of the "
                f"{', '.join(spec.order)} projections llama.cpp's converter stacks; it cannot be exported"
            )
        bucket = buckets.setdefault(bid, {})
        bucket[name] = stored
        n_expert = self._n_expert(ctx)
        if len(bucket) < n_expert * len(spec.order):
            return
        del buckets[bid]
        for proj in spec.order:
            parts = []
            for x in range(n_expert):
                key = spec.expert.format(bid=bid, x=x, proj=proj)
                if key not in bucket:
                    raise UnexpectedTensorError(f"MoE expert tensor {key!r} is missing from the checkpoint")
                parts.append(bucket[key])
            first = source.info(parts[0]).shape
            shape = (n_expert, *first)
            yield self._export(
                name_map,
                spec.stacked.format(bid=bid, proj=proj),
                shape,
                lambda parts=parts: torch.stack([_working(source.load(p)) for p in parts]).to(torch.float32),
                lambda lo, hi, parts=parts: torch.stack([_working(source.load(p)) for p in parts[lo:hi]]).to(
                    torch.float32
                ),
            )

    def _fused_experts(
        self, source: Source, name_map: gguf.TensorNameMap, stored: str, prefix: str, proj: str
    ) -> Iterator[ExportTensor]:
        shape = tuple(source.info(stored).shape)
        if proj == "down_proj":
            yield self._export(
                name_map, f"{prefix}.down_proj.weight", shape, lambda: _apply(source.load(stored), []),
                lambda lo, hi: _apply(source.load(stored)[lo:hi], []),
            )
            return
        if len(shape) < 3 or shape[-2] % 2:
            raise UnexpectedTensorError(
                f"fused expert tensor {stored!r} has shape {shape}; expected (n_expert, 2*n_ff, n_embd)"
            )
        n_ff = shape[-2] // 2
        half = (*shape[:-2], n_ff, shape[-1])
        for sub, sl in (("gate_proj", slice(0, n_ff)), ("up_proj", slice(n_ff, None))):
            yield self._export(
                name_map,
                f"{prefix}.{sub}.weight",
                half,
                lambda sl=sl: _apply(source.load(stored), [lambda t: t[..., sl, :]]),
                lambda lo, hi, sl=sl: _apply(source.load(stored)[lo:hi], [lambda t: t[..., sl, :]]),
            )

    def _real_vocab(self, source: Source, ctx: _Ctx) -> int | None:
        """Gemma 3: the tokenizer's real vocabulary size, to which the converter cuts ``embed_tokens``."""
        folder = source.folder
        if folder is None:
            return None
        if (folder / "tokenizer.model").is_file():
            n = _find(ctx.hp, "vocab_size_per_layer_input", "vocab_size")
            if not n:
                from sentencepiece import SentencePieceProcessor

                n = SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
            return n
        if (folder / "tokenizer.json").is_file():
            tok = read_tokenizer_json(folder / "tokenizer.json")
            return len(tok["model"]["vocab"]) + len(tok["added_tokens"])
        return None


def _is_qwen3_reranker(source: Source, hp: dict[str, Any]) -> bool:
    readme = source.folder / "README.md" if source.folder is not None else None
    text = readme.read_text(encoding="utf-8").lower() if readme is not None and readme.is_file() else ""
    if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text:
        return True
    hints = [
        source.folder.name if source.folder else "",
        str(hp.get("_name_or_path", "")),
        str(hp.get("model_type", "")),
    ]
    hints += [str((hp.get("architectures") or [""])[0])]
    return any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints)


def _working(t: torch.Tensor) -> torch.Tensor:
    """The dtype the converter computes in: fp16 and fp32 stay, everything else becomes fp32."""
    return t if t.dtype in (torch.float16, torch.float32) else t.to(torch.float32)


def _apply(t: torch.Tensor, transforms: list[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    t = _working(t)
    for f in transforms:
        t = f(t)
    return t.to(torch.float32).contiguous()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Recorder(gguf.GGUFWriter):
    """A GGUFWriter that only records KVs: its ``add_*`` helpers know every key's name and type."""

    def __init__(self, arch: str) -> None:
        super().__init__(None, arch)

    def add_key_value(self, key: str, val: Any, vtype: gguf.GGUFValueType, sub_type: Any = None) -> None:
        # a rewritten key keeps its first position (the converter's writer is a dict, too)
        self.kv_data[0][key] = gguf.GGUFValue(value=val, type=vtype, sub_type=sub_type)

    def kvs(self) -> list[KV]:
        return [(k, _plain(v.value), v.type) for k, v in self.kv_data[0].items()]


def _plain(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):  # IntEnum (file types, pooling types...) -> int
        return int(value)
    return value


def _model_card(source: Source, tensors: list[ExportTensor]) -> gguf.Metadata:
    """gguf-py's ``Metadata`` for the folder, as the converter builds it (name, size label...)."""
    counter = gguf.GGUFWriter(None, "counter")
    for t in tensors:
        counter.add_tensor_info(t.name, t.shape, np.dtype(np.float32), int(np.prod(t.shape)) * 4)
    total, shared, expert, n_expert = counter.get_total_parameter_count()
    meta = gguf.Metadata.load(None, source.folder, None, total)
    # llama.cpp 0.3.36's gguf-py also reads transformers' name for the repeat penalty.
    gen = gguf.Metadata.load_generation_config(source.folder) if source.folder is not None else {}
    if "penalty_repeat" not in gen and "repetition_penalty" in gen:
        meta.sampling_penalty_repeat = gen["repetition_penalty"]
    if meta.name is None:
        meta.name = source.folder.name if source.folder is not None else _model_id(source)
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    return meta


def _model_id(source: Source) -> str:
    name = str(source.config.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    return name or (source.config.get("architectures") or ["model"])[0]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"), gguf.MODEL_ARCH.LLAMA, _LLAMA,
        permute_qk=True, strip_prefixes=("language_model.", "text_model."), experts=_MIXTRAL_EXPERTS,
        extra=_llama3_rope_freqs,
    ),
    Architecture(("Qwen2ForCausalLM",), gguf.MODEL_ARCH.QWEN2, _QWEN2),
    Architecture(("Qwen3ForCausalLM",), gguf.MODEL_ARCH.QWEN3, _QWEN2, reranker_check=True),
    Architecture(("Qwen3MoeForCausalLM",), gguf.MODEL_ARCH.QWEN3MOE, _QWEN_MOE, experts=_QWEN_EXPERTS),
    Architecture(("GemmaForCausalLM",), gguf.MODEL_ARCH.GEMMA, _GEMMA, norm_plus_one=True, dropped=("lm_head.weight",)),
    Architecture(("Gemma2ForCausalLM",), gguf.MODEL_ARCH.GEMMA2, _GEMMA2, norm_plus_one=True, dropped=("lm_head.weight",)),
    Architecture(("Gemma3ForCausalLM",), gguf.MODEL_ARCH.GEMMA3, _GEMMA3, norm_plus_one=True, truncate_embeddings=True),
    Architecture(("Phi3ForCausalLM",), gguf.MODEL_ARCH.PHI3, _PHI3, extra=_phi3_rope_factors),
)  # fmt: skip

_BY_HF_NAME = {hf: arch for arch in ARCHITECTURES for hf in arch.hf_names}


def architecture_for(source: Source) -> Architecture:
    """The table entry for ``source``'s ``config.architectures[0]``.

    Args:
        source: the opened model.

    Raises:
        UnsupportedArchitectureError: an architecture llmdeploy cannot export (the message
            lists the supported ones).
    """
    config = source.config
    names = (config.get("text_config") or {}).get("architectures") or config.get("architectures") or []
    supported = ", ".join(sorted(_BY_HF_NAME))
    if not names:
        raise UnsupportedArchitectureError(
            f"config.json names no architecture (its 'architectures' list is missing); set it to one of: {supported}"
        )
    if names[0] not in _BY_HF_NAME:
        raise UnsupportedArchitectureError(
            f"GGUF export does not support {names[0]} yet; supported architectures: {supported}"
        )
    return _BY_HF_NAME[names[0]]
