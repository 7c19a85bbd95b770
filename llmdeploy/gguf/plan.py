"""Which GGUF type each tensor gets: the per-tensor choices of ``llama-quantize``.

``plan_quantization`` reproduces, without running it, what llama-cpp-python 0.3.36's
``llama_model_quantize`` (``src/llama-quant.cpp``, no imatrix, no overrides) decides for
a GGUF written by ``convert_hf_to_gguf.py --outtype bf16``:

- Only tensors of two or more dimensions whose name ends in ``weight`` change type,
  minus norms, MoE routers, position embeddings and a few small tables
  (``_is_quantizable``); every other tensor keeps the type the converter gave it.
- For the float file types (f32, f16, bf16) each of those simply takes that type.
- For the quantized ones a tensor starts at the file type's default type, is bumped
  up by the rules of its category (attn_v, ffn_down, attn_output, output; a tied
  token_embd follows output's rule), then falls back to a type whose block divides
  its rows (``_fallback``).
- The rules for ``attn_v`` and ``ffn_down`` depend on counters that advance as tensors
  are visited.  llama-quantize visits, and writes, tensors in its loader's order: by
  layer (``blk.N.``, -1 without one), then by name (``llama_quantize_order``).  The plan
  therefore depends on the set of tensors only, and lists them in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from collections import Counter
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Union

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import BlockSizeError, UnexpectedTensorError, UnsupportedQuantTypeError

__all__ = [
    "ALIASES",
    "FILE_TYPES",
    "QUANTIZATION_VERSION",
    "FileType",
    "ModelHParams",
    "PlanInput",
    "QuantPlan",
    "TensorPlan",
    "file_type",
    "llama_quantize_order",
    "plan_quantization",
    "tensor_nbytes",
]

_T = GGMLQuantizationType

#: What llama-quantize writes as ``general.quantization_version`` (``GGML_QNT_VERSION``).
QUANTIZATION_VERSION: int = gguf.GGML_QUANT_VERSION


@dataclasses.dataclass(frozen=True)
class FileType:
    """A GGUF file type llmdeploy writes: llama-quantize's ``ftype`` argument.

    Attributes:
        name: llmdeploy's name, lower case (``"q4_k_m"``).
        llama_ftype: the ``llama_ftype`` value, also written as ``general.file_type``.
        default_type: the type most tensors get before the per-tensor rules.
    """

    name: str
    llama_ftype: LlamaFileType
    default_type: GGMLQuantizationType


def _file_types() -> Mapping[str, FileType]:
    defaults = {
        "f32": _T.F32, "f16": _T.F16, "bf16": _T.BF16, "q8_0": _T.Q8_0,
        "q4_0": _T.Q4_0, "q4_1": _T.Q4_1, "q5_0": _T.Q5_0, "q5_1": _T.Q5_1,
        "q2_k": _T.Q2_K, "q3_k_s": _T.Q3_K, "q3_k_m": _T.Q3_K, "q3_k_l": _T.Q3_K,
        "q4_k_s": _T.Q4_K, "q4_k_m": _T.Q4_K, "q5_k_s": _T.Q5_K, "q5_k_m": _T.Q5_K, "q6_k": _T.Q6_K,
        "iq4_nl": _T.IQ4_NL, "iq4_xs": _T.IQ4_XS, "tq1_0": _T.TQ1_0, "tq2_0": _T.TQ2_0,
    }  # fmt: skip
    table = {}
    for name, default in defaults.items():
        ftype = LlamaFileType.ALL_F32 if name == "f32" else LlamaFileType[f"MOSTLY_{name.upper()}"]
        table[name] = FileType(name, ftype, default)
    return types.MappingProxyType(table)


#: Every file type llmdeploy writes, by lower-case name.  Use :func:`file_type` for a
#: case-insensitive lookup with a helpful error.
FILE_TYPES: Mapping[str, FileType] = _file_types()

#: Names users know from Unsloth's ``save_pretrained_gguf``, and the file type each means.
ALIASES: Mapping[str, str] = types.MappingProxyType(
    {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m",
     "q3_k": "q3_k_m"}
)  # fmt: skip


def file_type(name: str | FileType) -> FileType:
    """The :class:`FileType` called ``name`` (any case: ``"Q4_K_M"`` or ``"q4_k_m"``).

    Args:
        name: a file type name, one of Unsloth's names in :data:`ALIASES` (``"quantized"``
            means q4_k_m), or a :class:`FileType` (returned as is).

    Raises:
        UnsupportedQuantTypeError: for an unknown name; the message lists the valid ones.
    """
    if isinstance(name, FileType):
        return name
    key = str(name).strip().lower()
    found = FILE_TYPES.get(ALIASES.get(key, key))
    if found is None:
        raise UnsupportedQuantTypeError(
            f"Unknown GGUF file type {name!r}. Choose one of: {', '.join(FILE_TYPES)} "
            f"(or Unsloth's names: {', '.join(f'{k}={v}' for k, v in ALIASES.items())})."
        )
    return found


_lookup_file_type = file_type  # plan_quantization's argument of the same name shadows it


@dataclasses.dataclass(frozen=True)
class ModelHParams:
    """The model facts llama-quantize's rules read (from the GGUF's ``{arch}.*`` keys).

    Attributes:
        arch: GGUF architecture name (``general.architecture``: ``"llama"``, ``"qwen2"``...).
        n_layer: ``{arch}.block_count``.
        n_head: ``{arch}.attention.head_count`` (of layer 0 when it is per layer).
        n_head_kv: ``{arch}.attention.head_count_kv`` (of layer 0; equals n_head when absent).
        n_expert: ``{arch}.expert_count``; 0 for a dense model.
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head (0 without KV heads), as llama.cpp's ``n_gqa()``."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp types the model ``LLM_TYPE_70B``: attn_v then gets more bits."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return self.n_layer == {"qwen2": 80, "olmo": 80, "deci": 80, "jais2": 68}.get(self.arch, -1)


class PlanInput(NamedTuple):
    """One tensor as ``convert_hf_to_gguf.py --outtype bf16`` writes it.

    Attributes:
        name: GGUF name (``"blk.0.attn_q.weight"``).
        shape: numpy order, the last axis is the row (the reverse of ggml's ``ne``).
        type: the converter's type: BF16, or F32 for the tensors it keeps in float32.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType


PlanInputLike = Union[PlanInput, tuple[str, Sequence[int], GGMLQuantizationType]]


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """The type one tensor is written in, and its data size in bytes (without padding)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    nbytes: int


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """What llama-quantize writes for one file type.

    Attributes:
        file_type: the file type name (``"q4_k_m"``).
        llama_ftype: its ``llama_ftype``, written as ``general.file_type``.
        tensors: one entry per tensor, in llama-quantize's output order
            (:func:`llama_quantize_order`).
        total_bytes: tensor data bytes, without alignment padding.
        n_params: elements of all tensors.
        bits_per_weight: ``8 * total_bytes / n_params``, as llama-quantize reports it.
        n_fallback: tensors whose rows forced a fallback type (llama-quantize warns about them).
    """

    file_type: str
    llama_ftype: int
    tensors: tuple[TensorPlan, ...]
    total_bytes: int
    n_params: int
    bits_per_weight: float
    n_fallback: int = 0

    def __getitem__(self, name: str) -> TensorPlan:
        """The plan of the tensor called ``name``."""
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}

    def metadata(self) -> list[tuple[str, Any, gguf.GGUFValueType]]:
        """The KVs llama-quantize sets, in its order: it appends them after all the input's KVs.

        (It removes ``general.quantization_version`` and ``general.file_type`` from where
        the converter put them and adds them back at the end, in this order.)
        """
        return [
            (gguf.Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION, gguf.GGUFValueType.UINT32),
            (gguf.Keys.General.FILE_TYPE, int(self.llama_ftype), gguf.GGUFValueType.UINT32),
        ]

    def summary(self) -> str:
        """One readable paragraph: size, bits per weight, tensors per type."""
        counts = Counter(t.type.name for t in self.tensors)
        per_type = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        text = (
            f"{self.file_type.upper()}: {len(self.tensors)} tensors, {self.n_params:,} parameters, "
            f"{self.total_bytes / 2**20:.2f} MiB ({self.bits_per_weight:.2f} bits per weight); {per_type}"
        )
        if self.n_fallback:
            text += f"; {self.n_fallback} tensor(s) took a fallback type (rows not divisible by the block size)"
        return text

    def table(self) -> str:
        """A per-tensor table: name, shape, type, size."""
        width = max([len(t.name) for t in self.tensors] + [6])
        lines = [f"{'tensor':<{width}}  {'shape':<20}  {'type':<7}  {'bytes':>12}"]
        for t in self.tensors:
            shape = "x".join(str(d) for d in t.shape)
            lines.append(f"{t.name:<{width}}  {shape:<20}  {t.type.name:<7}  {t.nbytes:>12,}")
        lines.append(f"{'total':<{width}}  {'':<20}  {'':<7}  {self.total_bytes:>12,}")
        return "\n".join(lines)


def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Data bytes of a tensor of ``shape`` (numpy order) stored as ``qtype``."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape and int(shape[-1]) % block_size:
        raise BlockSizeError(f"Rows of {shape[-1]} values do not divide into {qtype.name} blocks of {block_size}.")
    return math.prod(int(d) for d in shape) // block_size * type_size


def _layer_of(name: str) -> int | None:
    # sscanf(name, "blk.%d.", &layer): the number counts even if the final "." is missing.
    m = re.match(r"blk\.\s*([+-]?\d+)", name)
    return int(m.group(1)) if m else None


def llama_quantize_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order llama-quantize visits and writes tensors.

    Its model loader keeps tensors in a map ordered by layer number (``blk.N.``, -1 for
    tensors outside the blocks), then by name (byte order).

    Args:
        names: GGUF tensor names, in any order.
    """

    def key(name: str) -> tuple[int, bytes]:
        layer = _layer_of(name)
        return (-1 if layer is None else layer, name.encode())

    return sorted(names, key=key)


# --- which tensors are converted at all ----------------------------------------------------

# Substrings that keep a tensor in its input type (norms, MoE routers, tiny tables of
# other architectures).  Position embeddings and BERT token types are matched exactly.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
_NEVER_QUANTIZED_NAMES = frozenset(
    gguf.TENSOR_NAMES[t] + ".weight" for t in (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)
)
_NEVER_QUANTIZED_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)  # fmt: skip


def _ggml_n_dims(shape: Sequence[int]) -> int:
    ne = [int(d) for d in reversed(shape)]
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _is_quantizable(name: str, shape: Sequence[int], arch: str) -> bool:
    if _ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES or any(s in name for s in _NEVER_QUANTIZED):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _NEVER_QUANTIZED_GLM5_NEXT))


# --- categories and rules ------------------------------------------------------------------

# llama-quant.cpp's tensor categories, first match wins (substring tests unless exact).
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"),  # fused QKV and MLA's kv_b count as attn_v
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for pattern, category in _CATEGORIES:
        if pattern in name:
            return category
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    # The first and last eighth of the layers, and every third layer in between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _State:
    """llama-quantize's counters: attn_v-like tensors and ffn_down tensors seen so far."""

    def __init__(self, names: Sequence[str], hp: ModelHParams) -> None:
        self.n_attn_v = sum(_category(n) == "attn_v" for n in names)
        self.i_attn_v = 0
        self.i_ffn_down = 0
        self.i_ffn_gate = 0
        self.i_ffn_up = 0
        self.tied_embeddings = "output.weight" not in names
        self.n_fallback = 0


def _ffn_layer(counter: int, name: str, hp: ModelHParams) -> int:
    """The layer index the ffn rules use: the running count, or for MoE the name's ``blk.N``."""
    if hp.n_expert <= 1:
        return counter
    layer = _layer_of(name)
    if layer is None:
        raise UnexpectedTensorError(f"Cannot determine the layer of MoE tensor {name!r} (expected 'blk.N.').")
    if not 0 <= layer < hp.n_layer:
        raise UnexpectedTensorError(f"Bad layer {layer} for tensor {name!r}: must be in [0, {hp.n_layer}).")
    return layer


def _attn_v(ft: str, new: _T, i: int, n: int, hp: ModelHParams) -> _T:
    if ft == "q2_k":
        new = _T.Q4_K if hp.n_gqa >= 4 else _T.Q3_K
    elif ft == "q3_k_m":
        new = _T.Q5_K if i < 2 else _T.Q4_K
    elif ft == "q3_k_l":
        new = _T.Q5_K
    elif ft in ("iq4_nl", "iq4_xs") and hp.n_gqa >= 4:
        new = _T.Q5_K
    elif ft in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
        new = _T.Q6_K
    elif ft == "q4_k_s" and i < 4:
        new = _T.Q5_K
    if hp.is_70b and new in (_T.Q3_K, _T.Q4_K):
        new = _T.Q5_K  # 70B: attn_v is 8x smaller than attn_q, more bits are cheap
    if hp.n_expert == 8:
        new = _T.Q8_0
    return new


def _ffn_down(ft: str, new: _T, i: int, n: int, falcon: bool) -> _T:
    if ft == "q2_k":
        return _T.Q3_K
    if ft == "q3_k_m":
        if i < n // 16:
            return _T.Q5_K
        return _T.Q4_K if not falcon or _use_more_bits(i, n) else _T.Q3_K
    if ft == "q3_k_l":
        return _T.Q4_K if falcon else _T.Q5_K
    if ft == "q4_k_m":
        if falcon:
            return _T.Q6_K if i < n // 16 else _T.Q5_K if _use_more_bits(i, n) else _T.Q4_K
        return _T.Q6_K if _use_more_bits(i, n) else new
    if ft in ("iq4_nl", "iq4_xs"):  # (without an imatrix)
        return _T.Q5_K if i < n // 8 else new
    if ft == "q5_k_m":
        return _T.Q6_K if _use_more_bits(i, n) else new
    if ft == "q4_k_s" and not falcon and i < n // 8:
        return _T.Q5_K
    return new


_ATTN_OUTPUT = {"q2_k": _T.Q3_K, "q3_k_m": _T.Q4_K, "q3_k_l": _T.Q5_K}
_ATTN_OUTPUT_MOE8 = frozenset({"q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs"})


def _rules(st: _State, ft: FileType, name: str, shape: Sequence[int], hp: ModelHParams) -> _T:
    """The type llama-quantize's category rules pick, before the row-size fallback."""
    new, cat, falcon = ft.default_type, _category(name), hp.arch == "falcon"
    if hp.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        return _T.Q8_0
    if cat == "output" or (cat == "token_embd" and st.tied_embeddings):
        if falcon or int(shape[-1]) % GGML_QUANT_SIZES[new][0]:
            return _T.Q8_0
        return new if new == _T.Q8_0 else _T.Q6_K
    if cat == "token_embd":
        return _T.Q4_K if ft.name in ("tq1_0", "tq2_0") else new
    if cat == "attn_v":
        new = _attn_v(ft.name, new, st.i_attn_v, st.n_attn_v, hp)
        st.i_attn_v += 1
        return new
    if cat == "attn_k":
        return _T.Q8_0 if hp.n_expert == 8 else new
    if cat == "ffn_down":
        new = _ffn_down(ft.name, new, _ffn_layer(st.i_ffn_down, name, hp), hp.n_layer, falcon)
        st.i_ffn_down += 1
        return new
    if cat == "attn_output":
        if falcon:
            return _T.Q4_K if ft.name == "q3_k_l" else new
        if hp.n_expert == 8:
            return _T.Q5_K if ft.name in _ATTN_OUTPUT_MOE8 else new
        return _ATTN_OUTPUT.get(ft.name, new)
    if cat == "ffn_gate":  # rules only for file types llmdeploy does not write; counted all the same
        _ffn_layer(st.i_ffn_gate, name, hp)
        st.i_ffn_gate += 1
    elif cat == "ffn_up":
        _ffn_layer(st.i_ffn_up, name, hp)
        st.i_ffn_up += 1
    return new


# Where a type's block does not divide the rows: the nearest type with 32-value blocks.
_FALLBACK = {
    _T.Q2_K: _T.Q4_0, _T.Q3_K: _T.Q4_0, _T.TQ1_0: _T.Q4_0, _T.TQ2_0: _T.Q4_0,
    _T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0, _T.IQ4_XS: _T.IQ4_NL,
}  # fmt: skip


def _fallback(st: _State, qtype: _T, ncols: int) -> _T:
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    st.n_fallback += 1
    qtype = _FALLBACK.get(qtype, qtype)
    # Still no fit (rows not a multiple of 32): F16.
    return qtype if ncols % GGML_QUANT_SIZES[qtype][0] == 0 else _T.F16


def plan_quantization(
    tensors: Sequence[PlanInputLike], file_type: str | FileType, hparams: ModelHParams
) -> QuantPlan:
    """The type and size of every tensor in the file llama-quantize writes for ``file_type``.

    Args:
        tensors: every tensor of the model as the converter's bf16 GGUF holds it:
            ``(name, shape in numpy order, BF16 or F32)``, in any order.
        file_type: a name of :data:`FILE_TYPES` (any case), or a :class:`FileType`.
        hparams: the model facts the rules read.

    Returns:
        A :class:`QuantPlan` whose tensors are in llama-quantize's output order.

    Raises:
        UnsupportedQuantTypeError: an unknown file type.
        UnexpectedTensorError: duplicate tensor names, or an MoE ffn tensor outside ``blk.N``.
    """
    ft = _lookup_file_type(file_type)
    inputs = [PlanInput(str(name), tuple(int(d) for d in shape), _T(qtype)) for name, shape, qtype in tensors]
    by_name = {t.name: t for t in inputs}
    if len(by_name) != len(inputs):
        dupes = sorted(n for n, c in Counter(t.name for t in inputs).items() if c > 1)
        raise UnexpectedTensorError(f"Tensor names must be unique; repeated: {', '.join(dupes)}.")

    order = llama_quantize_order(by_name)
    st = _State(order, hparams)
    quantized_default = GGML_QUANT_SIZES[ft.default_type][0] > 1
    planned = []
    for name in order:
        t = by_name[name]
        qtype = t.type
        if _is_quantizable(name, t.shape, hparams.arch):
            if quantized_default:
                qtype = _fallback(st, _rules(st, ft, name, t.shape, hparams), t.shape[-1])
            else:
                qtype = ft.default_type
        planned.append(TensorPlan(name, t.shape, qtype, tensor_nbytes(t.shape, qtype)))

    total = sum(t.nbytes for t in planned)
    n_params = sum(math.prod(t.shape) for t in planned)
    return QuantPlan(
        file_type=ft.name,
        llama_ftype=int(ft.llama_ftype),
        tensors=tuple(planned),
        total_bytes=total,
        n_params=n_params,
        bits_per_weight=8.0 * total / n_params if n_params else 0.0,
        n_fallback=st.n_fallback,
    )
