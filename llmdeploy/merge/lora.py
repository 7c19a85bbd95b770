"""LoRA merge math on plain tensors, as PEFT computes it (``tuners/lora/layer.py``, ``variants.py``).

Nothing here knows about modules, files or dtypes of the output: each function takes
tensors and returns a new tensor (inputs are never modified). The merge wiring (which
base tensor, in which order, casting, NaN checks) lives in :mod:`llmdeploy.merge.plan`.

Shapes, in PEFT's storage order:

    Linear     weight (out, in)  [(in, out) when fan_in_fan_out, as GPT-2's Conv1D]
               lora_A (r, in), lora_B (out, r), lora_B bias (out,), DoRA magnitude (out,)
    Embedding  weight (num, dim)
               lora_embedding_A (r, num), lora_embedding_B (dim, r), DoRA magnitude (dim,)

Every expression below is written in the same order of operations as PEFT's, so that in
float32 the result is bit-identical to ``merge_and_unload()`` on a float32 model; the
compute dtype is float32 (float64 for a float64 base), and the caller rounds once to the
saved dtype (PEFT on a 16-bit model rounds the delta, then the sum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DoraTerm",
    "ExpertLoraTerm",
    "LoraBiasTerm",
    "LoraTerm",
    "Term",
    "TokenRowsTerm",
    "apply_terms",
    "compute_dtype",
    "dora_merge",
    "embedding_delta",
    "expert_lora_delta",
    "lora_bias_merge",
    "lora_delta",
    "lora_scaling",
    "token_rows_merge",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merge is computed in: float64 for a float64 base, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_scaling(lora_alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """PEFT's ``scaling``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA.

    Args:
        lora_alpha: the adapter's ``lora_alpha`` (after ``alpha_pattern``).
        r: the adapter's rank (after ``rank_pattern``).
        use_rslora: rank-stabilized LoRA.
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _t(x: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    # PEFT's `transpose(weight, fan_in_fan_out)`: a view, never a copy
    return x.T if fan_in_fan_out else x


def _power_of_two(x: float) -> bool:
    return x >= 1.0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def _scaled_product(
    B: torch.Tensor, A: torch.Tensor, scaling: float, transpose: bool, out: torch.Tensor | None
) -> torch.Tensor:
    # transpose(B @ A) * scaling, in the compute dtype. With `out` (a contiguous buffer shaped
    # as B @ A), the product is written into it (the same matmul call, so the same bits) and
    # scaled in place. When scaling is 2**k (k >= 0: alpha = r, 2r, rsLoRA's 16/sqrt(16), ...),
    # it is folded into B instead, saving a pass over ΔW: B*2**k is exact, so every product and
    # partial sum of (B*2**k) @ A is exactly 2**k times that of B @ A and rounds the same way —
    # bit-identical, outside float32's extremes: a partial sum that overflows makes the merge
    # Inf/NaN, which is refused; products below 2**-126 (subnormal, |ΔW| ~ 1e-38) may round
    # differently.
    ct = compute_dtype(A.dtype)
    if out is None:
        return _t(B.to(ct) @ A.to(ct), transpose) * scaling
    A, B = A.to(device=out.device, dtype=ct), B.to(device=out.device, dtype=ct)  # e.g. a CUDA adapter
    if scaling == 1.0:
        torch.matmul(B, A, out=out)
    elif _power_of_two(scaling) and bool(torch.isfinite(B * scaling).all()):
        torch.matmul(B * scaling, A, out=out)
    else:
        torch.matmul(B, A, out=out)
        out.mul_(scaling)
    return _t(out, transpose)


def lora_delta(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW of a Linear LoRA: ``transpose(B @ A, fan_in_fan_out) * scaling`` (PEFT ``Linear.get_delta_weight``).

    Args:
        lora_A: ``(r, in)``.
        lora_B: ``(out, r)``.
        scaling: see :func:`lora_scaling`.
        fan_in_fan_out: the base weight is stored ``(in, out)``.
        out: a contiguous ``(out, in)`` buffer in the compute dtype to compute into (the result
            is then a view of it, transposed when ``fan_in_fan_out``); bit-identical either way.

    Returns:
        ΔW in the compute dtype, shaped as the base weight.
    """
    return _scaled_product(lora_B, lora_A, scaling, fan_in_fan_out, out)


def expert_lora_delta(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    num_experts: int,
    out_first: bool,
) -> torch.Tensor:
    """ΔW of a LoRA on a stacked-experts parameter (PEFT ``ParamWrapper.get_delta_weight``, ``target_parameters``).

    PEFT keeps one ``nn.Linear`` pair for all experts: ``lora_A`` ``(E·r, in)`` holds expert ``e``'s
    ``A`` in rows ``e·r .. e·r+r-1``, and ``lora_B`` ``(out, r·E)`` holds its ``B`` in columns ``e, e+E,
    e+2E, ...`` (rank-major, expert-minor). For each expert ``ΔW_e = scaling · (B_e @ A_e)``.

    Args:
        lora_A: ``(num_experts * r, in)``.
        lora_B: ``(out, r * num_experts)``.
        scaling: see :func:`lora_scaling`.
        num_experts: the leading size of the stacked parameter.
        out_first: the parameter is stored ``(experts, out, in)``; else ``(experts, in, out)``.

    Returns:
        ΔW ``(experts, out, in)`` or ``(experts, in, out)``, in the compute dtype.
    """
    ct = compute_dtype(lora_A.dtype)
    a = lora_A.to(ct).reshape(num_experts, -1, lora_A.shape[-1])  # (E, r, in)
    b = lora_B.to(ct).reshape(lora_B.shape[0], -1, num_experts)  # (out, r, E)
    # the same contraction as PEFT's einsum (a batched matmul over the rank), then the scaling
    pattern = "o r e, e r i -> e o i" if out_first else "o r e, e r i -> e i o"
    return torch.einsum(pattern, b, a) * scaling


def embedding_delta(
    lora_embedding_A: torch.Tensor,
    lora_embedding_B: torch.Tensor,
    scaling: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW of an Embedding LoRA: ``(B @ A).T * scaling``, shaped ``(num, dim)`` (PEFT ``Embedding.get_delta_weight``).

    Args:
        lora_embedding_A: ``(r, num)``.
        lora_embedding_B: ``(dim, r)``.
        scaling: see :func:`lora_scaling`.
        out: a contiguous ``(dim, num)`` buffer in the compute dtype to compute into (the result
            is its transpose); bit-identical either way.
    """
    return _scaled_product(lora_embedding_B, lora_embedding_A, scaling, True, out)


def dora_merge(
    weight: torch.Tensor,
    base_weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
) -> torch.Tensor:
    """DoRA: ``m / ||W0 + ΔW|| · (W + ΔW)`` (PEFT ``DoraLinearVariant`` / ``DoraEmbeddingVariant.merge_safe``).

    The norm is taken on the weight *before* any adapter of this layer was merged (``W0``),
    as PEFT's forward sees it; the factor multiplies the current weight ``W``, which already
    holds the adapters merged before this one.

    Args:
        weight: the current weight ``W`` (compute dtype).
        base_weight: ``W0``, the layer's weight with no adapter merged (compute dtype).
        delta: ΔW from :func:`lora_delta` / :func:`embedding_delta`.
        magnitude: the DoRA magnitude vector ``m``: ``(out,)``, or ``(dim,)`` for an embedding.
        fan_in_fan_out: the Linear weight is stored ``(in, out)``.
        embedding: an Embedding layer (norm per embedding dimension).
    """
    m = magnitude.to(delta.dtype)
    if embedding:
        # DoraEmbeddingLayer(fan_in_fan_out=True).get_weight_norm(W0, ΔW.T): rows of W0.T
        weight_norm = torch.linalg.norm(base_weight.T + delta.T, dim=1).to(delta.dtype)
        factor = (m / weight_norm).view(1, -1)
    else:
        weight_norm = torch.linalg.norm(_t(base_weight, fan_in_fan_out) + _t(delta, fan_in_fan_out), dim=1)
        factor = _t((m / weight_norm.to(delta.dtype)).view(-1, 1), fan_in_fan_out)
    return factor * (weight + delta)


def lora_bias_merge(bias: torch.Tensor, lora_B_bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """``lora_bias=True``: ``bias + lora_B.bias * scaling`` (PEFT ``Linear.merge``)."""
    return bias + lora_B_bias.to(bias.dtype) * scaling


def token_rows_merge(weight: torch.Tensor, token_indices: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """``trainable_token_indices``: the trained rows replace the base rows (PEFT ``TrainableTokensLayer.merge``)."""
    index = torch.tensor(list(token_indices), dtype=torch.long)
    return weight.index_copy(0, index, rows.to(weight.dtype))


# -- one adapter's contribution to one tensor, as a small strategy object ----------------------


class Term:
    """One adapter's change to one base tensor.

    ``apply(weight, base)`` returns the new weight (compute dtype) from the current one and
    the tensor as it was before any term; ``problem(shape)`` says why the term does not fit a
    base tensor of that shape (None when it fits); ``key`` identifies the adapter tensors,
    so two output tensors built from the same base tensor and the same keys are equal.
    """

    kind: str = "term"

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def problem(self, shape: tuple[int, ...]) -> str | None:
        raise NotImplementedError(f"{type(self).__name__} must define problem()")

    @property
    def key(self) -> Hashable:
        raise NotImplementedError(f"{type(self).__name__} must define key")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@dataclass(frozen=True, eq=False)
class LoraTerm(Term):
    """``W + ΔW`` for a Linear (``embedding=False``) or Embedding LoRA."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    embedding: bool = False
    kind = "lora"

    def delta(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (into ``out``, a buffer shaped as :meth:`product_shape`, when given)."""
        if self.embedding:
            return embedding_delta(self.lora_A, self.lora_B, self.scaling, out=out)
        return lora_delta(self.lora_A, self.lora_B, self.scaling, fan_in_fan_out=self.fan_in_fan_out, out=out)

    def product_shape(self) -> tuple[int, int]:
        """The shape of ``B @ A`` (before any transpose)."""
        return (self.lora_B.shape[0], self.lora_A.shape[1])

    def expected_shape(self) -> tuple[int, ...]:
        if self.embedding:  # A (r, num), B (dim, r)
            return (self.lora_A.shape[1], self.lora_B.shape[0])
        out_in = (self.lora_B.shape[0], self.lora_A.shape[1])
        return out_in[::-1] if self.fan_in_fan_out else out_in

    def problem(self, shape: tuple[int, ...]) -> str | None:
        a, b = ("lora_embedding_A", "lora_embedding_B") if self.embedding else ("lora_A", "lora_B")
        if self.lora_A.ndim != 2 or self.lora_B.ndim != 2:
            return f"{a} {_shape(self.lora_A)} and {b} {_shape(self.lora_B)} must be matrices"
        if self.lora_B.shape[1] != self.lora_A.shape[0]:
            return f"{a} {_shape(self.lora_A)} and {b} {_shape(self.lora_B)} disagree on the rank"
        if tuple(shape) != self.expected_shape():
            return (
                f"{a} {_shape(self.lora_A)} @ {b} {_shape(self.lora_B)} gives a {self.expected_shape()} update "
                f"for a base weight of shape {tuple(shape)}"
            )
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()

    @property
    def key(self) -> Hashable:
        return (self.kind, id(self.lora_A), id(self.lora_B), self.scaling, self.fan_in_fan_out, self.embedding)


@dataclass(frozen=True, eq=False)
class ExpertLoraTerm(Term):
    """``W + ΔW`` for a LoRA on a stacked-experts parameter (see :func:`expert_lora_delta`)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    num_experts: int
    out_first: bool
    kind = "expert_lora"

    def expected_shape(self) -> tuple[int, ...]:
        out, n_in = self.lora_B.shape[0], self.lora_A.shape[1]
        return (self.num_experts, out, n_in) if self.out_first else (self.num_experts, n_in, out)

    def problem(self, shape: tuple[int, ...]) -> str | None:
        a, b = _shape(self.lora_A), _shape(self.lora_B)
        if self.lora_A.ndim != 2 or self.lora_B.ndim != 2:
            return f"lora_A {a} and lora_B {b} must be matrices"
        if self.lora_A.shape[0] % self.num_experts or self.lora_B.shape[1] != self.lora_A.shape[0]:
            return f"lora_A {a} and lora_B {b} do not hold a rank-r pair for each of {self.num_experts} experts"
        if tuple(shape) != self.expected_shape():
            return f"lora_A {a} and lora_B {b} give a {self.expected_shape()} update for a parameter of shape {shape}"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        delta = expert_lora_delta(
            self.lora_A, self.lora_B, self.scaling, num_experts=self.num_experts, out_first=self.out_first
        )
        return weight + delta

    @property
    def key(self) -> Hashable:
        return (self.kind, id(self.lora_A), id(self.lora_B), self.scaling, self.num_experts, self.out_first)


@dataclass(frozen=True, eq=False)
class DoraTerm(LoraTerm):
    """DoRA: ``m / ||W0 + ΔW|| · (W + ΔW)``."""

    magnitude: torch.Tensor | None = None
    kind = "dora"

    def problem(self, shape: tuple[int, ...]) -> str | None:
        bad = super().problem(shape)
        if bad or self.magnitude is None:
            return bad or "the DoRA magnitude vector is missing"
        rows = shape[1] if (self.embedding or self.fan_in_fan_out) else shape[0]
        if _shape(self.magnitude) != (rows,):
            return f"lora_magnitude_vector {_shape(self.magnitude)} should be ({rows},) for a weight of shape {shape}"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        assert self.magnitude is not None
        return dora_merge(
            weight, base, self.delta(), self.magnitude, fan_in_fan_out=self.fan_in_fan_out, embedding=self.embedding
        )

    @property
    def key(self) -> Hashable:
        return (*super().key, id(self.magnitude))  # type: ignore[misc]


@dataclass(frozen=True, eq=False)
class LoraBiasTerm(Term):
    """``lora_bias=True``: ``bias + lora_B.bias * scaling``."""

    lora_B_bias: torch.Tensor
    scaling: float
    kind = "lora_bias"

    def problem(self, shape: tuple[int, ...]) -> str | None:
        if tuple(shape) != _shape(self.lora_B_bias):
            return f"lora_B.bias {_shape(self.lora_B_bias)} for a base bias of shape {tuple(shape)}"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return lora_bias_merge(weight, self.lora_B_bias, self.scaling)

    @property
    def key(self) -> Hashable:
        return (self.kind, id(self.lora_B_bias), self.scaling)


@dataclass(frozen=True, eq=False)
class TokenRowsTerm(Term):
    """``trainable_token_indices``: trained rows replace rows ``token_indices`` of the embedding."""

    token_indices: tuple[int, ...]
    rows: torch.Tensor
    kind = "trainable_tokens"

    def problem(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2 or _shape(self.rows) != (len(self.token_indices), shape[1]):
            return (
                f"trainable_tokens_delta {_shape(self.rows)} should be ({len(self.token_indices)}, {shape[-1]}) "
                f"for an embedding of shape {tuple(shape)}"
            )
        bad = [i for i in self.token_indices if not 0 <= i < shape[0]]
        if bad:
            return f"token indices {bad[:5]} are outside the embedding's {shape[0]} rows"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return token_rows_merge(weight, self.token_indices, self.rows)

    @property
    def key(self) -> Hashable:
        return (self.kind, id(self.rows), self.token_indices)


Buffers = Callable[[int, tuple[int, ...], torch.dtype], torch.Tensor]
"""``buffer(slot, shape, dtype)``: a contiguous scratch tensor, the same memory for the same slot."""


def apply_terms(base: torch.Tensor, terms: Sequence[Term], *, buffers: Buffers | None = None) -> torch.Tensor:
    """The base tensor with every term applied in order, in the compute dtype.

    Args:
        base: the base tensor (never modified).
        terms: the changes, in merge order.
        buffers: scratch memory to compute plain LoRA terms in (see :data:`Buffers`); the result
            is then a view of a buffer, valid until the buffers are used again. Without it, a new
            tensor. The bits are the same either way.
    """
    ct = compute_dtype(base.dtype)
    if (
        buffers is not None
        and terms
        and all(type(t) is LoraTerm and compute_dtype(t.lora_A.dtype) == ct for t in terms)
    ):
        return _apply_lora_terms(base, terms, buffers)  # type: ignore[arg-type]
    w0 = base.to(ct)
    w = w0
    for term in terms:
        w = term.apply(w, w0)
    return w


_CHUNK = 1 << 22  # elements of W0 converted to the compute dtype at a time (16 MiB in float32)


def _apply_lora_terms(base: torch.Tensor, terms: Sequence[LoraTerm], buffers: Buffers) -> torch.Tensor:
    # ((W0 + ΔW1) + ΔW2) + ...: PEFT's order, one float32 buffer the size of W. ΔW1 is computed
    # into it and W0 added in place (ΔW1 + W0 == W0 + ΔW1: one IEEE addition of the same two
    # values); W0 is first converted to float32 a few rows at a time, as adding a bf16 tensor to a
    # float32 one directly takes torch's mixed-dtype path, several times slower. Each further ΔW
    # goes to a second buffer and is added in place.
    ct = compute_dtype(base.dtype)
    w = terms[0].delta(out=buffers(0, terms[0].product_shape(), ct))
    rows = base.shape[0] if base.ndim else 1
    step = max(1, _CHUNK // max(1, base[0].numel() if base.ndim else 1))
    tmp = buffers(2, (min(step, rows), *base.shape[1:]), ct)
    for i in range(0, rows, step):
        part = tmp[: min(step, rows - i)]
        part.copy_(base[i : i + step])
        w[i : i + step].add_(part)
    for term in terms[1:]:
        w.add_(term.delta(out=buffers(1, term.product_shape(), ct)))
    return w
