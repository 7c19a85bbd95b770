"""The legacy 32-value block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Every block of 32 values is quantized on its own with one scale ``d`` (and,
for the ``_1`` types, one offset ``m``), both stored as fp16, exactly as
ggml's ``quantize_row_<type>_ref`` (what ``ggml_quantize_chunk`` runs for
these types, with or without llama-quantize's threads):

========  ===========================  ==============================================
type      scale                        value
========  ===========================  ==============================================
Q8_0      d = max|x| / 127             q = roundf(x/d)            (int8)
Q4_0      d = x[argmax|x|] / -8        q = MIN(15, (int8_t)(x/d + 8.5f))
Q5_0      d = x[argmax|x|] / -16       q = MIN(31, (int8_t)(x/d + 16.5f))
Q4_1      d = (max-min) / 15, m = min  q = MIN(15, (int8_t)((x-min)/d + 0.5f))
Q5_1      d = (max-min) / 31, m = min  q = (uint8_t)((x-min)/d + 0.5f), no clamp
========  ===========================  ==============================================

where ``x/d`` is really ``x*id`` with ``id = d ? 1.0f/d : 0.0f`` (a float32
product, not a division) and every operation is float32 in that order.

Block layouts (little-endian, fp16 = IEEE binary16)::

    Q8_0  d:f16 | qs[32] int8
    Q4_0  d:f16 | qs[16]                 qs[j] = q[j] | q[j+16] << 4
    Q4_1  d:f16 m:f16 | qs[16]           (same nibble order)
    Q5_0  d:f16 | qh:u32 | qs[16]        qs[j] = (q[j] & 15) | (q[j+16] & 15) << 4
    Q5_1  d:f16 m:f16 | qh:u32 | qs[16]  qh bit j = bit 4 of q[j], j = 0..31

Details that decide byte-exactness:

* Q4_0/Q5_0 pick the *signed* value of largest magnitude with a strict ``<``
  search that starts from ``+0``: the first of tied magnitudes wins, and a
  block of zeros (of either sign) gives ``max = +0``, so ``d = +0/-8 = -0``,
  stored as 0x8000.  The ``_1`` types pick min and max with strict
  comparisons too, so of several zeros the first one (and its sign) is kept.
* ggml's casts ``(int8_t)f`` / ``(uint8_t)f`` compile to x86's truncating
  float->int32 conversion followed by taking the low byte; NaN and
  out-of-range floats convert to INT32_MIN, whose low byte is 0.  That
  matters when ``d`` is a float32 subnormal: ``1.0f/d`` overflows to inf, every
  ``x*id`` is +-inf or NaN (``0*inf``), and every q comes out 0 (not 8/16).
* ``roundf`` rounds half away from zero (not to even, as ``torch.round`` does).

Two implementations of the same arithmetic:

* the reference, ``quantize_blocks``: eager torch, vectorized across blocks,
  readable step by step, byte-identical on the CPU and on a CUDA GPU;
* the fast kernel (numba, CPU): the same bytes, one block after another.

Dequantization goes through gguf-py, which equals ggml's ``dequantize_row_*``.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import _jit
from ._jit import F32, fp16_bits
from .float import _fp16_bytes, _le_bytes
from .gguf_py import GgufPyDequantize

QK = 32  # values per block

_ZERO = F32(0.0)
_HALF = F32(0.5)
_ONE = F32(1.0)
_INF = F32(np.inf)


# =========================================================================== reference (torch)
#
# Eager torch on any device: every tensor and constant lives on
# ``blocks.device``, everything is float32 with one rounding per op, and
# nothing branches on data.  What keeps CPU and CUDA byte-identical to ggml:
#
# * Products and sums are separate ops (``x * id`` then ``+ 8.5``), never a
#   fused kernel that CUDA could contract to an FMA.
# * Divisors are float32 tensors on the device, never Python numbers: CUDA
#   turns a division by a CPU scalar into a multiplication by its reciprocal,
#   which for 1/15, 1/31 or 1/127 is not the same float32.  (``1.0 / t`` is
#   ``t.reciprocal() * 1.0`` in torch, so the inverse divides a ones tensor.)
# * float -> int casts see in-range values only; the x86 result (INT32_MIN)
#   for NaN and out-of-range values is selected explicitly, since CUDA
#   saturates and maps NaN to 0 instead.
# * The max-|x| and min/max searches are loops over the element index with
#   ggml's strict comparisons, which settle ties, signed zeros and NaN as C does.


def _f32_const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on ``like``'s device (see above: used for every divisor)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _cvtt_i32(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 as gcc's casts run on x86 (cvttss2si / cvttps2dq).

    Truncation toward zero; NaN and values outside the int32 range give
    INT32_MIN.  C leaves those undefined, but this is what libggml does.
    """
    ok = (v >= -(2.0**31)) & (v < 2.0**31)  # False for NaN
    return torch.where(ok, torch.where(ok, v, 0.0).to(torch.int32), -(2**31))


def _int8(t: torch.Tensor) -> torch.Tensor:
    """C's ``(int8_t)`` of an int32: the low byte, sign-extended."""
    return ((t & 0xFF) ^ 0x80) - 0x80


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """ggml's ``id = d ? 1.0f/d : 0.0f`` (inf when d is a tiny subnormal)."""
    nonzero = d != 0.0
    return torch.where(nonzero, _f32_const(1.0, d) / torch.where(nonzero, d, 1.0), 0.0)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero) on float32, exactly: ``v - trunc(v)`` is exact; +-inf and NaN pass."""
    t = torch.trunc(v)
    return torch.where((v - t).abs() >= 0.5, t + torch.copysign(torch.ones_like(v), v), t)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per block, the first value of largest magnitude, with its sign; +0 for a zero block.

    ggml: ``amax = max = 0.0f; if (amax < fabsf(v)) { amax = fabsf(v); max = v; }``.
    """
    amax = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    signed = torch.zeros_like(amax)
    for j in range(x.shape[1]):
        a = x[:, j].abs()
        take = amax < a
        amax = torch.where(take, a, amax)
        signed = torch.where(take, x[:, j], signed)
    return signed


def _min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, ggml's ``if (v < min) min = v; if (v > max) max = v;`` from +-FLT_MAX.

    The first of equal extremes is kept, which only shows for zeros: the sign
    of the first zero is what Q4_1/Q5_1 store in ``m``.
    """
    flt_max = torch.finfo(torch.float32).max
    lo = torch.full((x.shape[0],), flt_max, dtype=torch.float32, device=x.device)
    hi = torch.full_like(lo, -flt_max)
    for j in range(x.shape[1]):
        v = x[:, j]
        lo = torch.where(v < lo, v, lo)
        hi = torch.where(v > hi, v, hi)
    return lo, hi


def _pack_nibbles(q: torch.Tensor, mask: int = 0xFF) -> torch.Tensor:
    """(n, 32) int32 -> (n, 16) uint8: low nibble value j, high nibble value j+16.

    Q5 masks each value to its low 4 bits first; Q4 ORs the whole bytes (ggml's
    ``qs = xi0 | xi1 << 4``), which differs only if a value exceeded 15.
    """
    return (((q[:, :16] & mask) | ((q[:, 16:] & mask) << 4)) & 0xFF).to(torch.uint8)


def _pack_qh(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) int32 -> (n, 4) uint8: the little-endian u32 whose bit j is bit 4 of value j."""
    shifts = torch.arange(QK, dtype=torch.int64, device=q.device)
    qh = (((q >> 4) & 1).to(torch.int64) << shifts).sum(dim=1)  # disjoint bits: the integer sum is their OR
    return _le_bytes(qh, 4)


def _symmetric(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): the scale d and the unsigned values q."""
    d = _signed_absmax(x) / _f32_const(-nmax, x)
    id_ = _inverse(d)
    v = x * id_[:, None] + (nmax + 0.5)  # product, then sum, each rounded to float32
    # With d subnormal, id is inf and every v is +-inf or NaN: INT32_MIN, byte 0.
    q = _int8(_cvtt_i32(v)).clamp(max=2 * nmax - 1)
    return d, q & 0xFF  # MIN() is an int, stored as uint8_t


def _affine(x: torch.Tensor, nmax: int, clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (nmax 15, clamped) / Q5_1 (nmax 31, not clamped): d, m = min and the values q."""
    lo, hi = _min_max(x)
    d = (hi - lo) / _f32_const(nmax, x)  # inf if max - min overflows: id 0, v 0.5 or NaN
    id_ = _inverse(d)
    v = (x - lo[:, None]) * id_[:, None] + 0.5
    q = _cvtt_i32(v)
    if clamp:  # MIN(15, (int8_t)v)
        q = _int8(q).clamp(max=nmax)
    return d, lo, q & 0xFF  # (uint8_t)v is the low byte


# =========================================================================== numba kernels
#
# One block after another, each inner loop running over the block's values
# with no data-dependent branch, so LLVM vectorizes it.  What keeps it
# vectorizing, found by measurement:
#
# * Loop bounds come from ``blocks.shape[1]`` (always 32) rather than a
#   literal: with a constant trip count LLVM unrolls the loop completely
#   before its loop vectorizer runs, and then cannot re-vectorize the
#   straight-line code because the uint8 stores might alias the float loads.
#   A runtime bound keeps the loop, which gets vectorized behind one alias check.
# * Blocks are indexed as ``blocks[b, j]``, never sliced, and helpers that
#   take the arrays are branch-free: a row view, or an array passed into an
#   inlined helper with loops and branches, costs numba a reference-count
#   increment and decrement per block, which is more than the block's math.
#   So the block loop lives in one generic function per family, inlined into
#   each type's kernel with constant parameters.
#
# Magnitudes and extremes are found on the float bits, because an integer
# max/min reduction vectorizes where a float one (without fastmath) does not:
# for non-negative floats the bit patterns order like the values.  The
# per-block regimes (zero d, subnormal d with an infinite ``id``, overflowing
# ``max - min``) are settled per block by selecting ``id``, the offset and the
# subtracted minimum, so the SIMD loops only ever convert in-range floats.
# The fp16 scales go through ``_jit.fp16_bits`` (the F16C instruction where
# there is one): the integer ``_jit.fp32_to_fp16_bits`` cost as much as the
# rest of a Q4_1 block.

_ABS_MASK = np.int32(0x7FFFFFFF)

if _jit.AVAILABLE:
    from ._jit import bits_f32, f32_bits

    @_jit.helper
    def _put_fp16(out, b, at, v):  # type: ignore[no-untyped-def]
        h = fp16_bits(v)
        out[b, at] = np.uint8(h & 0xFF)
        out[b, at + 1] = np.uint8(h >> 8)

    @_jit.helper
    def _put_qh(out, b, at, qh):  # type: ignore[no-untyped-def]
        for k in range(4):  # little-endian u32
            out[b, at + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))

    @_jit.helper
    def _ordered(bits):  # type: ignore[no-untyped-def]
        """float32 bits -> int32 key that orders like the floats (-0 < +0); its own inverse."""
        return np.int32(bits ^ ((bits >> np.int32(31)) & _ABS_MASK))

    @_jit.kernel
    def _q8_0_kernel(blocks, out):  # type: ignore[no-untyped-def]
        qk = blocks.shape[1]
        for b in range(blocks.shape[0]):
            a = np.int32(0)
            for j in range(qk):
                a = max(a, np.int32(f32_bits(blocks[b, j]) & _ABS_MASK))
            d = bits_f32(a) / F32(127)
            id_ = _ONE / d if d != _ZERO else _ZERO
            if id_ == _INF:  # ggml's +-inf/NaN products all convert to byte 0, as id 0 gives
                id_ = _ZERO
            _put_fp16(out, b, 0, d)
            for j in range(qk):
                # roundf, half away from zero: |v| <= 127, so trunc(v) converts
                # exactly and v - trunc(v) is exact.
                v = blocks[b, j] * id_
                t = np.int32(v)
                f = v - F32(t)
                t += np.int32(f >= _HALF) - np.int32(f <= -_HALF)
                out[b, 2 + j] = np.uint8(t & 0xFF)

    @_jit.helper
    def _symmetric_rows(blocks, out, nmax, five_bit):  # type: ignore[no-untyped-def]
        """Q4_0 (nmax 8) and Q5_0 (nmax 16); Q5_0 puts the 5th bit of each value in qh."""
        qk = blocks.shape[1]
        half = qk >> 1
        qs_at = 6 if five_bit else 2
        for b in range(blocks.shape[0]):
            # The first value of largest magnitude, sign kept, as one int64 max
            # over |x| bits << 7 | (63 - j) << 1 | sign (j < 64): the largest
            # magnitude wins, then among equal ones the smallest j; the low bit
            # is that value's sign.
            key = np.int64(0)
            for j in range(qk):
                bits = f32_bits(blocks[b, j])
                k = (np.int64(bits & _ABS_MASK) << 7) | np.int64((63 - j) << 1) | np.int64((bits >> 31) & 1)
                key = max(key, k)
            a = bits_f32(np.int32(key >> 7))
            m = -a if key & 1 else a
            if key < (1 << 7):  # all magnitudes zero: ggml keeps its initial +0
                m = _ZERO
            # m/-nmax and m*(-1/nmax) are the same correctly rounded float32 (a power of 2).
            d = m * (F32(-1.0) / F32(nmax))
            id_ = _ONE / d if d != _ZERO else _ZERO
            off = F32(nmax) + _HALF
            if id_ == _INF or id_ == -_INF:
                # d subnormal: in ggml every x*id is +-inf or NaN and converts
                # to byte 0; id 0 with offset 0.5 gives those zeros.
                id_ = _ZERO
                off = _HALF
            _put_fp16(out, b, 0, d)
            qh = np.uint32(0)
            for j in range(half):
                # x*id lies within [-nmax, nmax] (to float32 rounding), so
                # x*id + nmax + 0.5 truncates to 0..2*nmax: no wrap-around.
                q0 = min(np.int32(blocks[b, j] * id_ + off), np.int32(2 * nmax - 1))
                q1 = min(np.int32(blocks[b, j + half] * id_ + off), np.int32(2 * nmax - 1))
                out[b, qs_at + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
                if five_bit:
                    qh |= (np.uint32(q0 >> 4) << np.uint32(j)) | (np.uint32(q1 >> 4) << np.uint32(j + half))
            if five_bit:
                _put_qh(out, b, 2, qh)

    @_jit.helper
    def _affine_rows(blocks, out, nmax, five_bit):  # type: ignore[no-untyped-def]
        """Q4_1 (nmax 15, clamped) and Q5_1 (nmax 31, not clamped; 5th bit in qh)."""
        qk = blocks.shape[1]
        half = qk >> 1
        qs_at = 8 if five_bit else 4
        for b in range(blocks.shape[0]):
            lo = np.int32(0x7FFFFFFF)
            hi = np.int32(-0x80000000)
            for j in range(qk):
                k = _ordered(f32_bits(blocks[b, j]))
                lo = min(lo, k)
                hi = max(hi, k)
            mn = bits_f32(_ordered(lo))
            mx = bits_f32(_ordered(hi))
            if mn == _ZERO or mx == _ZERO:
                # The keys put -0 below +0, but C keeps the first zero, whatever its sign.
                j = 0
                while blocks[b, j] != _ZERO:
                    j += 1
                if mn == _ZERO:
                    mn = blocks[b, j]
                if mx == _ZERO:
                    mx = blocks[b, j]
            d = (mx - mn) / F32(nmax)
            id_ = _ONE / d if d != _ZERO else _ZERO
            _put_fp16(out, b, 0, d)
            _put_fp16(out, b, 2, mn)
            sub = mn
            if id_ == _INF or d == _INF:
                # d subnormal (id inf: every v inf or NaN) or max - min
                # overflowing (d inf, id 0: v is 0.5 or NaN): every q is 0 in
                # ggml, as (x - 0)*0 + 0.5 gives.  (d == 0 needs nothing: id 0.)
                id_ = _ZERO
                sub = _ZERO
            qh = np.uint32(0)
            for j in range(half):
                # (x - min)*id lies within [0, nmax] (to float32 rounding).
                q0 = np.int32((blocks[b, j] - sub) * id_ + _HALF)
                q1 = np.int32((blocks[b, j + half] - sub) * id_ + _HALF)
                if not five_bit:
                    q0 = min(q0, np.int32(15))
                    q1 = min(q1, np.int32(15))
                out[b, qs_at + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
                if five_bit:
                    qh |= (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + half))
            if five_bit:
                _put_qh(out, b, 4, qh)

    @_jit.kernel
    def _q4_0_kernel(blocks, out):  # type: ignore[no-untyped-def]
        _symmetric_rows(blocks, out, 8, False)

    @_jit.kernel
    def _q5_0_kernel(blocks, out):  # type: ignore[no-untyped-def]
        _symmetric_rows(blocks, out, 16, True)

    @_jit.kernel
    def _q4_1_kernel(blocks, out):  # type: ignore[no-untyped-def]
        _affine_rows(blocks, out, 15, False)

    @_jit.kernel
    def _q5_1_kernel(blocks, out):  # type: ignore[no-untyped-def]
        _affine_rows(blocks, out, 31, True)

else:  # pragma: no cover - numba missing
    _q8_0_kernel = _q4_0_kernel = _q5_0_kernel = _q4_1_kernel = _q5_1_kernel = None


# =========================================================================== types
#
# quantize_blocks: float32 (n, 32) on any device -> uint8 (n, type_size) on
# the same device, ggml's bytes.


class Q8_0(GgufPyDequantize, qtype=GGMLQuantizationType.Q8_0):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = blocks.abs().amax(dim=1) / _f32_const(127.0, blocks)  # a max is exact in any order (finite input)
        id_ = _inverse(d)
        q = _cvtt_i32(_roundf(blocks * id_[:, None]))
        return torch.cat([_fp16_bytes(d), (q & 0xFF).to(torch.uint8)], dim=1)

    fast_kernel = staticmethod(_q8_0_kernel) if _q8_0_kernel is not None else None


class Q4_0(GgufPyDequantize, qtype=GGMLQuantizationType.Q4_0):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, q = _symmetric(blocks, 8)
        return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)

    fast_kernel = staticmethod(_q4_0_kernel) if _q4_0_kernel is not None else None


class Q4_1(GgufPyDequantize, qtype=GGMLQuantizationType.Q4_1):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, m, q = _affine(blocks, 15, clamp=True)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _pack_nibbles(q)], dim=1)

    fast_kernel = staticmethod(_q4_1_kernel) if _q4_1_kernel is not None else None


class Q5_0(GgufPyDequantize, qtype=GGMLQuantizationType.Q5_0):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, q = _symmetric(blocks, 16)
        return torch.cat([_fp16_bytes(d), _pack_qh(q), _pack_nibbles(q, 0x0F)], dim=1)

    fast_kernel = staticmethod(_q5_0_kernel) if _q5_0_kernel is not None else None


class Q5_1(GgufPyDequantize, qtype=GGMLQuantizationType.Q5_1):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, m, q = _affine(blocks, 31, clamp=False)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _pack_qh(q), _pack_nibbles(q, 0x0F)], dim=1)

    fast_kernel = staticmethod(_q5_1_kernel) if _q5_1_kernel is not None else None
