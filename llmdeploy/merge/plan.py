"""The merge plan: every output tensor, its base tensor and the adapter terms applied to it.

Both sources build a :class:`MergePlan` before any byte is written (an in-memory PEFT model
in :mod:`.memory`, an adapter folder on a base folder in :mod:`.stream`); the folder
writer (:mod:`.folder`) then produces the tensors one at a time with :func:`merge_tensor`.
Everything that can be checked without computing the merge (shapes, tied embeddings,
dtypes) is checked here, so errors come before output.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import AdapterShapeError, InvalidOptionError, NonFiniteValueError
from .lora import Term, apply_terms

__all__ = ["Entry", "MergePlan", "OutTensor", "merge_tensor", "resolve_dtype"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip


@dataclass
class Entry:
    """One tensor of the merged checkpoint, before it is computed.

    Args:
        name: the checkpoint tensor name (as ``save_pretrained`` writes it).
        module: the module path, for messages (``model.layers.0.self_attn.q_proj``).
        shape: the base tensor's shape (the output shape).
        dtype: the base tensor's dtype.
        load: returns the base tensor (CPU; never modified).
        terms: the adapters' changes, applied in order.
        source: identifies the base tensor (tensors loaded from the same source are the same).
        raw: for a tensor read from a file: ``(path, offset, nbytes)``, copied byte for byte when
            nothing changes it.
        release: called once the tensor is written (gives memory-mapped pages back).
    """

    name: str
    module: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    terms: tuple[Term, ...] = ()
    source: Hashable = None
    raw: tuple[str, int, int] | None = None
    release: Callable[[], None] | None = None

    def recipe(self) -> tuple[Hashable, tuple[Hashable, ...]]:
        return (self.source, tuple(t.key for t in self.terms))


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its name, shape, dtype and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    raw: tuple[str, int, int] | None = None  # bytes to copy as they are, instead of produce()

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class MergePlan:
    """What the merged folder holds, decided before writing.

    Attributes:
        entries: the output tensors in checkpoint order (tied copies already dropped).
        untied: the tied pairs ``{target: source}`` that had to be written separately (the
            trained head differs from the embeddings), so ``tie_word_embeddings`` becomes False.
        vocab_size: the new vocabulary size when the adapter resized the embeddings, else None.
        lora_modules: the number of LoRA modules merged (for the report).
    """

    entries: list[Entry]
    untied: dict[str, str] = field(default_factory=dict)
    vocab_size: int | None = None
    lora_modules: int = 0
    base_dtype: torch.dtype = torch.bfloat16

    def check_shapes(self) -> None:
        """Raise :class:`AdapterShapeError` for the first term that does not fit its base tensor."""
        for e in self.entries:
            for term in e.terms:
                bad = term.problem(e.shape)
                if bad:
                    raise AdapterShapeError(
                        f"the adapter does not fit the base model at {e.name!r} (module {e.module!r}): {bad}. "
                        "Merge the adapter into the base model it was trained on (check base= or "
                        "base_model_name_or_path in adapter_config.json)"
                    )

    def out_tensors(self, dtype: torch.dtype) -> Iterator[OutTensor]:
        """Each output tensor, in order, cast to ``dtype`` (see :func:`out_dtype`).

        The tensors share one :class:`Scratch`: produce them one at a time (each result is a
        tensor of its own; the scratch holds only intermediates).
        """
        scratch = Scratch()
        for e in self.entries:
            target = out_dtype(e.dtype, self.base_dtype, dtype)
            raw = e.raw if (not e.terms and target == e.dtype) else None
            yield OutTensor(e.name, e.shape, target, _producer(e, target, scratch), raw)


class Scratch:
    """Reusable float buffers for the merge: one per slot, grown to the largest request.

    A fresh float32 tensor per intermediate costs page faults and zeroing on every tensor of
    the model (and leaves freed memory the allocator keeps); these buffers are faulted in once,
    so the merge runs at memory speed and its footprint is the largest tensor's intermediates.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def __call__(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get((slot, dtype))
        if buf is None or buf.numel() < n:
            self._buffers.pop((slot, dtype), None)  # drop the smaller one first
            buf = self._buffers[(slot, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


def _producer(e: Entry, dtype: torch.dtype, scratch: Scratch | None = None) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        out = merge_tensor(e.load(), e.terms, dtype=dtype, module=e.module, name=e.name, scratch=scratch)
        if e.release is not None:
            if not e.terms and out.dtype == e.dtype:
                out = out.clone()  # still a view of the base file: copy before its pages are given back
            e.release()
        return out

    return produce


def merge_tensor(
    base: torch.Tensor,
    terms: Sequence[Term],
    *,
    dtype: torch.dtype,
    module: str,
    name: str,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """``base`` with ``terms`` applied (in float32), rounded once to ``dtype``; NaN/Inf is an error.

    Args:
        base: the base tensor (never modified).
        terms: the adapters' changes, in merge order.
        dtype: the saved dtype.
        module: the module path, named in errors.
        name: the tensor name, named in errors.
        scratch: buffers for the intermediates (the result is always a new tensor).
    """
    if not terms:
        return base.detach().to(dtype)
    with torch.no_grad():
        merged = apply_terms(base.detach(), terms, buffers=scratch)
        out = torch.empty(merged.shape, dtype=dtype)
        out.copy_(merged)  # the one rounding (the same as merged.to(dtype)); contiguous
    if _finite(out):
        return out
    # NaN and infinity survive the rounding, so a finite result means a finite merge; only now
    # is the float32 result inspected to say which went wrong
    if not bool(torch.isfinite(merged).all()):
        raise NonFiniteValueError(
            f"merging the adapter into module {module!r} ({name}) gives NaN or infinity: the adapter weights "
            "(lora_A/lora_B, magnitude or scaling) are broken there. Check the training run, or leave this module "
            "out of the adapter"
        )
    raise NonFiniteValueError(
        f"the merged weight of module {module!r} ({name}) overflows {_name(dtype)}: its largest magnitude is "
        f"{merged.abs().max().item():.4g}. Save with dtype='bfloat16' or 'float32' instead"
    )


def _finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: one reduction (NaN and ±inf reach the min or max), no mask."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype | None, base_dtype: torch.dtype) -> torch.dtype:
    """The saved dtype: ``dtype`` if given, else the base's 16-bit dtype, else bfloat16.

    Args:
        dtype: ``None``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, ``"float32"``/``"fp32"``,
            or a torch dtype.
        base_dtype: the dtype most of the base weights are stored in.
    """
    if dtype is None:
        return base_dtype if base_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    elif dtype in (torch.bfloat16, torch.float16, torch.float32):
        return dtype
    raise InvalidOptionError(
        f"dtype={dtype!r} is not a dtype a merged model can be saved in; use 'bfloat16' (the default), "
        "'float16' or 'float32'"
    )


def out_dtype(tensor_dtype: torch.dtype, base_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The saved dtype of one tensor.

    Integer and bool tensors keep their dtype. A float32 tensor in a 16-bit checkpoint was kept
    in float32 on purpose (``_keep_in_fp32_modules``) and stays float32; every other float
    tensor is saved in ``dtype``.
    """
    if tensor_dtype not in _FLOATS:
        return tensor_dtype
    if tensor_dtype == torch.float32 and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def dominant_dtype(entries: Sequence[Entry]) -> torch.dtype:
    """The float dtype that holds the most elements (the checkpoint's dtype)."""
    count: dict[torch.dtype, int] = {}
    for e in entries:
        if e.dtype in _FLOATS:
            n = 1
            for d in e.shape:
                n *= d
            count[e.dtype] = count.get(e.dtype, 0) + n
    return max(count, key=lambda k: count[k]) if count else torch.float32


def resolve_ties(entries: list[Entry], tied: dict[str, str]) -> tuple[list[Entry], dict[str, str]]:
    """Drop the tied copies that equal their source; keep the ones that differ.

    ``tied`` maps each tied target to its source (``{"lm_head.weight": "model.embed_tokens.weight"}``).
    A target is dropped when it has the same base tensor and the same adapter terms as its
    source (it would load identical). When any tied target differs (a trained ``lm_head`` in
    ``modules_to_save``, a LoRA on only one side), every tied target is written and the pairs
    are returned, so the config says ``tie_word_embeddings=False`` and the trained head is kept.

    Returns:
        ``(entries to write, untied pairs)``.
    """
    by_name = {e.name: e for e in entries}
    pairs = {t: s for t, s in tied.items() if t in by_name and s in by_name}
    differ = {t: s for t, s in pairs.items() if by_name[t].recipe() != by_name[s].recipe()}
    if differ:
        return entries, dict(pairs)
    drop = set(pairs)
    return [e for e in entries if e.name not in drop], {}
