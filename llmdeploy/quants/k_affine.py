"""K-quants with a scale and a min per sub-block: Q2_K, Q4_K, Q5_K.

All three quantize a 256-value super-block the same way (ggml's
``quantize_row_q{2,4,5}_K_ref``, which ``ggml_quantize_chunk`` runs when there
is no importance matrix):

1. Each sub-block (16 values for Q2_K, 32 for Q4_K/Q5_K) gets an affine fit
   ``x ~ scale * L - min`` with ``L`` in ``[0, nmax]`` from ggml's
   ``make_qkx2_quants``: a first guess from the value range, then a search
   over ``nstep + 1`` candidate grid spacings, each refined by weighted least
   squares and kept if its weighted error is strictly smaller.
2. The sub-block scales and mins are themselves quantized against the
   largest of each (4 bits for Q2_K, 6 bits for Q4_K/Q5_K); the two
   super-block factors ``d`` and ``dmin`` are stored as fp16.
3. Every ``L`` is recomputed from the *fp16-rounded* factors, except in a
   sub-block whose quantized scale is 0: there ggml keeps the ``L`` of step 1.

Byte-exactness rests on doing every float operation in float32, in ggml's
order: each sum is a sequential ``acc += term`` from ``acc = 0`` (starting at
+0.0 matters: ``0 + -0.0`` is +0.0), products associate left to right
(``w*l*x`` is ``(w*l)*x``), and ints meet floats only through a float32
conversion.  ``nearest_int`` is ggml's add-1.5*2**23-and-read-the-bits trick,
kept literally because its garbage for out-of-range inputs (nan -> 0, huge ->
wrapped) reaches the output for extreme inputs.

Two implementations produce the same bytes:

* ``quantize_blocks``, the reference: eager torch, readable, vectorized
  across every sub-block of the input (sequential sums loop over the element
  index in Python), on the device of its input, CPU or CUDA; the rules that
  keep it byte-exact on both are at the top of its section.
* ``fast_kernel``: numba, on the CPU.  The candidate search is the hot spot
  (for Q4_K, 21 candidates x 2 passes x 32 values per sub-block).  It runs on
  a batch of ``_LANES`` sub-blocks laid out ``[element, lane]``, with the lane
  loop innermost and branch-free, so LLVM turns it into SIMD code in which
  every lane is one independent sub-block that still sums sequentially,
  exactly as ggml's scalar loop.  Nothing is reordered, only interleaved.

``dequantize_blocks`` is gguf-py's (equal to ggml's ``dequantize_row_*``).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import _jit
from ._jit import F32
from .gguf_py import GgufPyDequantize

_ZERO = F32(0.0)
_ONE = F32(1.0)
_63 = F32(63.0)
_15 = F32(15.0)
_32 = F32(32.0)
# make_qkx2_quants' candidate grid: iscale = (rmin + rdelta*step + nmax) / (max - min)
_RDELTA = F32(0.1)
_RMIN_Q4_K = F32(-1.0)
_RMIN_Q2_K_Q5_K = F32(-0.5)


# =========================================================================== torch reference
#
# Eager torch on whatever device ``blocks`` lives on (CPU or CUDA give the
# same bytes), vectorized across sub-blocks.  Rules that keep it byte-exact
# on both:
#
# * float32 throughout; each sequential sum is an explicit loop over the
#   element index (never torch.sum/cumsum, whose order is unspecified), and
#   every ``a * b + c`` is two separate ops (no fused kernels, no FMA).
# * Division only as ``tensor / tensor`` with a float32 tensor on the device
#   on both sides (``_const``).  ``63.0 / t`` is *not* a division in torch:
#   ``Tensor.__rtruediv__`` computes ``t.reciprocal() * 63.0``, which is off
#   by an ulp for about a quarter of all inputs; and on CUDA ``t / 63.0`` (a
#   CPU scalar divisor) becomes ``t * (1/63)``.
# * No float -> int cast anywhere: ``nearest_int`` reads the bits of a float32
#   sum, and levels meet floats only through exact int -> float32 conversion.
#   Levels, scales and bytes are int32 until the final uint8 conversion.
# * Strict comparisons through torch.where, as C's ``if (a > b)``: no
#   torch.max/min/argmax, which differ from C on nan and signed zeros.


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar tensor on ``like``'s device (a constant operand that is never a CPU scalar)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` on float32, as int32.

    Adding 1.5*2**23 pushes the value into the binade where the float32 ulp is
    1, so the addition itself rounds half to even and the integer sits in the
    low mantissa bits.  For |f| > 2**22 (and inf) ggml returns what the bits
    say, not a rounded value; so does this.

    No float -> int cast, so the result is the same on every device, except
    for a nan, whose bits differ: extreme but finite inputs do produce nans
    here (``0 * inf`` when ``max - min`` overflows).  On x86, where ggml runs,
    every nan that finite inputs can produce is the default nan 0xFFC00000,
    and ``nan + 1.5*2**23`` keeps those bits, so ggml's level is
    ``0x400000 - 0x400000 = 0``; CUDA's canonical nan 0x7FFFFFFF would give
    0x3FFFFF.  So a nan is mapped to 0 explicitly.
    """
    bits = ((f + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000  # 12582912 = 1.5 * 2**23, exact
    return torch.where(torch.isnan(f), 0, bits)


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """``acc = +0.0; for i: acc += terms[..., i]`` in float32, vectorized over the leading axes."""
    acc = torch.zeros(terms.shape[:-1], dtype=torch.float32, device=terms.device)
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


def _sqrtf(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C's sqrtf).

    torch's float32 sqrt on CPU is not always correctly rounded; the float64
    sqrt is, and rounding it to float32 gives the correctly rounded float32
    result (float64 has more than 2*24+2 bits, so no double-rounding error).
    """
    return torch.sqrt(v.double()).float()


def _fp16_round(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 bits as int32, the float32 ggml reads back) of float32 ``f``: ggml's FP32_TO_FP16.

    ``.to(float16)`` rounds to nearest even on CPU and CUDA alike; only a nan
    differs between devices, so it is mapped to ggml's ``sign | 0x7E00``.
    """
    h = f.to(torch.float16)
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (f.view(torch.int32) >> 16) & 0x8000
    bits = torch.where(torch.isnan(f), sign | 0x7E00, bits)
    return bits, h.to(torch.float32)


def _fp16_bytes(d_bits: torch.Tensor, dmin_bits: torch.Tensor) -> torch.Tensor:
    """The two fp16 super-block factors, little-endian: int32 (n, 4)."""
    return torch.stack([d_bits & 0xFF, d_bits >> 8, dmin_bits & 0xFF, dmin_bits >> 8], dim=1)


def _to_bytes(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate int32 (n, k) byte values into the uint8 block rows."""
    return (torch.cat(parts, dim=1) & 0xFF).to(torch.uint8)


# --------------------------------------------------------------------------- make_qkx2_quants


def _affine_levels(x: torch.Tensor, iscale: torch.Tensor, mn: torch.Tensor, nmax: int) -> torch.Tensor:
    """``clamp(nearest_int(iscale * (x - min)), 0, nmax)`` per sub-block row, as int32."""
    return torch.clamp(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)


def _weighted_error(
    x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, use_mad: bool
) -> torch.Tensor:
    """Sequential ``sum w * e(scale*L + min - x)``, e = |.| (use_mad) or square."""
    diff = (scale[:, None] * L.to(torch.float32) + mn[:, None]) - x
    diff = torch.abs(diff) if use_mad else diff * diff
    return _seq_sum(w * diff)


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` for many sub-blocks at once.

    ``x``, ``w``: float32 (m, n), one sub-block per row.  Returns ``(L, scale,
    the_min)``: int32 (m, n) levels, float32 (m,) scales and float32 (m,)
    mins (stored negated, as ggml's ``*the_min = -min``).
    """
    n = x.shape[1]
    zero = _const(0.0, x)
    fnmax = _const(nmax, x)
    # Strict comparisons, as ggml: the first of equal values wins, so -0.0
    # and +0.0 are kept as they come, and a nan never replaces anything.
    mn = x[:, 0]
    mx = x[:, 0]
    sum_w = w[:, 0]
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = torch.where(x[:, i] < mn, x[:, i], mn)
        mx = torch.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = torch.where(mn > 0, zero, mn)
    flat = mx == mn  # ggml returns early: L = 0, scale 0, the_min = -min

    # First guess: spread [min, max] over the nmax+1 levels.
    iscale = fnmax / (mx - mn)
    scale = _const(1.0, x) / iscale
    L = _affine_levels(x, iscale, mn, nmax)
    best_error = _weighted_error(x, w, L, scale, mn, use_mad)

    rmin_t = _const(rmin, x)
    rdelta_t = _const(rdelta, x)  # float32(0.1), as C's 0.1f
    for step in range(nstep + 1):
        # (rmin + rdelta*step + nmax), each operation rounded to float32.
        # ``mn`` is the running best min: a taken candidate shifts the grid
        # that later candidates are measured on.
        iscale = (rmin_t + rdelta_t * step + fnmax) / (mx - mn)
        Laux = _affine_levels(x, iscale, mn, nmax)
        lf = Laux.to(torch.float32)
        wl = w * lf
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * lf)
        sum_xl = _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0  # a positive min is not allowed: refit the scale through 0
        this_min = torch.where(clamp, zero, this_min)
        this_scale = torch.where(clamp, sum_xl / sum_l2, this_scale)
        cur_error = _weighted_error(x, w, Laux, this_scale, this_min, use_mad)
        take = ~flat & (D > 0) & (cur_error < best_error)  # both False for nan, as in C
        L = torch.where(take[:, None], Laux, L)
        best_error = torch.where(take, cur_error, best_error)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)

    L = torch.where(flat[:, None], 0, L)
    scale = torch.where(flat, zero, scale)
    return L, scale, -mn


def _max_positive(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``m = 0; for j: if (v[j] > m) m = v[j]`` along the last axis (+0.0 if none is > 0)."""
    m = torch.zeros(v.shape[:-1], dtype=torch.float32, device=v.device)
    for j in range(v.shape[-1]):
        m = torch.where(v[..., j] > m, v[..., j], m)
    return m


def _requantize(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, nmax: int) -> torch.Tensor:
    """Final levels from the fp16-rounded sub-block scale ``d`` and min ``dm`` (per sub-block row).

    ``clamp(nearest_int((x + dm) / d), 0, nmax)``; a sub-block with ``d == 0``
    keeps the optimizer's ``L`` (ggml's ``if (!d) continue``; nan is not 0).
    """
    new = torch.clamp(_nearest_int((x + dm[..., None]) / d[..., None]), 0, nmax)
    return torch.where((d != 0)[..., None], new, L)


# --------------------------------------------------------------------------- Q4_K / Q5_K


def _k32_sub_block_fits(
    blocks: torch.Tensor, nmax: int, rmin: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K step 1: x (n, 8, 32), and L, scales, mins per 32-value sub-block."""
    x = blocks.reshape(-1, 8, 32)
    av_x = _sqrtf(_seq_sum(x * x) / _const(32.0, x))
    w = av_x[..., None] + torch.abs(x)
    L, scales, mins = make_qkx2_quants(x.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, float(_RDELTA), nstep, False)
    return x, L.reshape(-1, 8, 32), scales.reshape(-1, 8), mins.reshape(-1, 8)


def _k32_scales(
    x: torch.Tensor, L: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K steps 2-3: (d/dmin fp16 bytes (n, 4), packed scales (n, 12), final L (n, 8, 32))."""
    zero = _const(0.0, x)
    c63 = _const(63.0, x)
    max_scale = _max_positive(scales)
    max_min = _max_positive(mins)
    inv_scale = torch.where(max_scale > 0, c63 / max_scale, zero)
    inv_min = torch.where(max_min > 0, c63 / max_min, zero)
    # ggml stores nearest_int into a uint8 (wraps mod 256) before MIN(63, .)
    ls = torch.clamp(_nearest_int(inv_scale[:, None] * scales) & 0xFF, max=63)
    lm = torch.clamp(_nearest_int(inv_min[:, None] * mins) & 0xFF, max=63)
    d_bits, d = _fp16_round(max_scale / c63)
    dmin_bits, dmin = _fp16_round(max_min / c63)
    L = _requantize(x, L, d[:, None] * ls.to(torch.float32), dmin[:, None] * lm.to(torch.float32), nmax)
    return _fp16_bytes(d_bits, dmin_bits), _pack_scales_k4(ls, lm), L


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins into 12 bytes, int32 (n, 12), in ggml's ``get_scale_min_k4`` layout.

    Bytes 0-3: scale j (j < 4) in the low 6 bits; bytes 4-7: min j likewise.
    Bytes 8-11: scale j+4 in the low nibble and min j+4 in the high nibble;
    their top 2 bits go to the spare top bits of bytes j and j+4.
    """
    return torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=1,
    )


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    x, L, scales, mins = _k32_sub_block_fits(blocks, 15, float(_RMIN_Q4_K), 20)
    dd, sc, L = _k32_scales(x, L, scales, mins, 15)
    # qs: 64-value chunk c = sub-blocks 2c (low nibbles) and 2c+1 (high nibbles), 32 bytes
    qs = L[:, 0::2] | (L[:, 1::2] << 4)
    return _to_bytes([dd, sc, qs.reshape(-1, 128)])


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    x, L, scales, mins = _k32_sub_block_fits(blocks, 31, float(_RMIN_Q2_K_Q5_K), 15)
    dd, sc, L = _k32_scales(x, L, scales, mins, 31)
    # low 4 bits as Q4_K; bit 4 of value l of sub-block j goes to bit j of qh[l]
    qs = (L[:, 0::2] & 0xF) | ((L[:, 1::2] & 0xF) << 4)
    qh = torch.zeros_like(L[:, 0])
    for j in range(8):
        qh = qh | ((L[:, j] >> 4) << j)
    return _to_bytes([dd, sc, qh, qs.reshape(-1, 128)])


# --------------------------------------------------------------------------- Q2_K


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    x = blocks.reshape(-1, 16, 16)
    # weights |x|, absolute (not squared) error
    fit = make_qkx2_quants(
        x.reshape(-1, 16), torch.abs(x).reshape(-1, 16), 3, float(_RMIN_Q2_K_Q5_K), float(_RDELTA), 15, True
    )
    L, scales, mins = fit[0].reshape(-1, 16, 16), fit[1].reshape(-1, 16), fit[2].reshape(-1, 16)
    zero = _const(0.0, x)
    c15 = _const(15.0, x)
    max_scale = _max_positive(scales)
    max_min = _max_positive(mins)
    # scale in the low nibble, min in the high nibble; ggml writes the ints
    # into a uint8, so both wrap mod 256 (and a wrapped scale can spill into
    # the min nibble's place before the OR).  ``(v << 4) & 0xFF`` is written
    # ``(v & 0xF) << 4``: the same byte, without shifting bits out of an int32.
    has_s = (max_scale > 0)[:, None]
    ls = torch.where(has_s, _nearest_int((c15 / max_scale)[:, None] * scales), 0) & 0xFF
    has_m = (max_min > 0)[:, None]
    lm = torch.where(has_m, (_nearest_int((c15 / max_min)[:, None] * mins) & 0xF) << 4, 0)
    sc = ls | lm
    d_bits, d = _fp16_round(torch.where(max_scale > 0, max_scale / c15, zero))
    dmin_bits, dmin = _fp16_round(torch.where(max_min > 0, max_min / c15, zero))
    d_sub = d[:, None] * (sc & 0xF).to(torch.float32)
    dm_sub = dmin[:, None] * (sc >> 4).to(torch.float32)
    L = _requantize(x, L, d_sub, dm_sub, 3)
    # 2-bit planes: byte 32h+l holds values 128h+l+32k at bits 2k
    planes = L.reshape(-1, 2, 4, 32)
    qs = planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)
    return _to_bytes([sc, qs.reshape(-1, 64), _fp16_bytes(d_bits, dmin_bits)])

# =========================================================================== numba fast kernels
#
# Same operations, same order, per sub-block; what changes is only which
# sub-block is worked on when.  A batch of _LANES sub-blocks is transposed to
# xs[element, lane]; every loop that touches values runs ``for i`` (element,
# sequential: that is ggml's summation order) around ``for k`` (lane,
# independent sub-blocks, no branches: selects only), so the lane loop
# becomes SIMD code.  Per-lane state lives in the rows of one small array.

# Sub-blocks searched side by side: 4 Q2_K or 8 Q4_K/Q5_K super-blocks per
# batch (must be a multiple of 16).  Wide batches give LLVM whole vectors and
# several independent add chains per element step: on an AVX-512 machine 16
# lanes ran at ~2.3x ggml's single-thread speed, 32 at ~4.5x, 64 at ~7x;
# 128 and 256 were no faster.  A short last batch is padded with zero
# sub-blocks, whose results are dropped.
_LANES = 64

# rows of the per-lane state array of _qkx2_search
_MN, _MX, _SW, _SX, _BEST, _SCALE, _BIS, _BMN, _ISC, _SL, _SL2, _SXL, _ERR, _TS, _TM, _D, _FLAT = range(17)
_N_STATE = 17


@_jit.helper
def _level(f, nmax):  # type: ignore[no-untyped-def]
    """``MAX(0, MIN(nmax, nearest_int(f)))``."""
    return min(max(_jit.nearest_int(f), 0), nmax)


@_jit.helper
def _qkx2_search(xs, ws, n, nmax, rmin, rdelta, nstep, use_mad, st, lf, L):  # type: ignore[no-untyped-def]
    """make_qkx2_quants on the _LANES sub-blocks in ``xs``/``ws`` (n, _LANES).

    Writes L (n, _LANES) uint8, and per lane ``st[_SCALE]`` (the scale) and
    ``st[_MN]`` (the min, *not* negated).  ``lf`` (n, _LANES) is scratch for
    one candidate's levels as floats.

    Instead of copying a taken candidate's levels, each lane remembers the
    iscale and min that produced them (_BIS, _BMN) and recomputes L once at
    the end: the same float operations give the same levels.
    """
    mn = st[_MN]
    mx = st[_MX]
    sw = st[_SW]
    sx = st[_SX]
    best = st[_BEST]
    scale = st[_SCALE]
    bis = st[_BIS]
    bmn = st[_BMN]
    isc = st[_ISC]
    sl = st[_SL]
    sl2 = st[_SL2]
    sxl = st[_SXL]
    err = st[_ERR]
    ts = st[_TS]
    tm = st[_TM]
    dd = st[_D]
    flat = st[_FLAT]
    fmax = F32(nmax)
    for k in range(_LANES):
        mn[k] = xs[0, k]
        mx[k] = xs[0, k]
        sw[k] = ws[0, k]
        sx[k] = ws[0, k] * xs[0, k]
    for i in range(1, n):
        for k in range(_LANES):
            v = xs[i, k]
            w = ws[i, k]
            # explicit strict compares, not min()/max(): ggml's tie and
            # signed-zero behaviour (first of -0.0/+0.0 wins) must be kept
            mn[k] = v if v < mn[k] else mn[k]  # noqa: FURB136
            mx[k] = v if v > mx[k] else mx[k]  # noqa: FURB136
            sw[k] += w
            sx[k] += w * v
    for k in range(_LANES):
        m = _ZERO if mn[k] > _ZERO else mn[k]  # noqa: FURB136  (keeps a -0.0 min)
        mn[k] = m
        flat[k] = _ONE if mx[k] == m else _ZERO
        iscale = fmax / (mx[k] - m)
        isc[k] = iscale
        scale[k] = _ONE / iscale
        bis[k] = iscale
        bmn[k] = m
        err[k] = _ZERO
    for i in range(n):
        for k in range(_LANES):
            x = xs[i, k]
            diff = scale[k] * F32(_level(isc[k] * (x - mn[k]), nmax)) + mn[k] - x
            diff = abs(diff) if use_mad else diff * diff
            err[k] += ws[i, k] * diff
    for k in range(_LANES):
        best[k] = err[k]

    for step in range(nstep + 1):
        c = rmin + rdelta * F32(step) + fmax
        for k in range(_LANES):
            isc[k] = c / (mx[k] - mn[k])
            sl[k] = _ZERO
            sl2[k] = _ZERO
            sxl[k] = _ZERO
        for i in range(n):
            for k in range(_LANES):
                x = xs[i, k]
                l = F32(_level(isc[k] * (x - mn[k]), nmax))
                lf[i, k] = l
                wl = ws[i, k] * l
                sl[k] += wl
                sl2[k] += wl * l
                sxl[k] += wl * x
        for k in range(_LANES):
            D = sw[k] * sl2[k] - sl[k] * sl[k]
            this_scale = (sw[k] * sxl[k] - sx[k] * sl[k]) / D
            this_min = (sl2[k] * sx[k] - sl[k] * sxl[k]) / D
            pos = this_min > _ZERO
            ts[k] = sxl[k] / sl2[k] if pos else this_scale
            tm[k] = _ZERO if pos else this_min
            dd[k] = D
            err[k] = _ZERO
        for i in range(n):
            for k in range(_LANES):
                diff = ts[k] * lf[i, k] + tm[k] - xs[i, k]
                diff = abs(diff) if use_mad else diff * diff
                err[k] += ws[i, k] * diff
        for k in range(_LANES):
            if dd[k] > _ZERO and err[k] < best[k] and flat[k] == _ZERO:
                best[k] = err[k]
                scale[k] = ts[k]
                bis[k] = isc[k]
                bmn[k] = mn[k]
                mn[k] = tm[k]

    for k in range(_LANES):
        if flat[k] != _ZERO:
            scale[k] = _ZERO
    for i in range(n):
        for k in range(_LANES):
            lv = _level(bis[k] * (xs[i, k] - bmn[k]), nmax)
            L[i, k] = 0 if flat[k] != _ZERO else lv


@_jit.helper
def _gather(blocks, b0, n, nsub, xs):  # type: ignore[no-untyped-def]
    """xs[i, k] = value i of sub-block k of the batch starting at block b0 (zeros past the end)."""
    nb = blocks.shape[0]
    for k in range(_LANES):
        b = b0 + k // nsub
        j = k % nsub
        if b < nb:
            for i in range(n):
                xs[i, k] = blocks[b, n * j + i]
        else:
            for i in range(n):
                xs[i, k] = _ZERO


@_jit.helper
def _put_fp16(out, pos, bits):  # type: ignore[no-untyped-def]
    out[pos] = bits & 0xFF
    out[pos + 1] = (bits >> 8) & 0xFF


# --------------------------------------------------------------------------- Q4_K / Q5_K kernels


@_jit.helper
def _k32_block(x, out, L, lane0, st, nmax, five_bit, lq):  # type: ignore[no-untyped-def]
    """Steps 2-3 and packing of one Q4_K/Q5_K block whose sub-blocks are lanes lane0..lane0+7."""
    scale = st[_SCALE]
    mn = st[_MN]
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        s = scale[lane0 + j]
        m = -mn[lane0 + j]
        if s > max_scale:  # noqa: PLR1730  (strict, from +0.0: a nan or -0.0 never wins)
            max_scale = s
        if m > max_min:  # noqa: PLR1730
            max_min = m
    inv_scale = _63 / max_scale if max_scale > _ZERO else _ZERO
    inv_min = _63 / max_min if max_min > _ZERO else _ZERO
    d_bits = _jit.fp32_to_fp16_bits(max_scale / _63)
    dmin_bits = _jit.fp32_to_fp16_bits(max_min / _63)
    d = _jit.fp16_bits_to_fp32(d_bits)
    dmin = _jit.fp16_bits_to_fp32(dmin_bits)
    _put_fp16(out, 0, d_bits)
    _put_fp16(out, 2, dmin_bits)
    for j in range(8):
        ls = min(_jit.nearest_int(inv_scale * scale[lane0 + j]) & 0xFF, 63)
        lm = min(_jit.nearest_int(inv_min * -mn[lane0 + j]) & 0xFF, 63)
        if j < 4:
            out[4 + j] = ls
            out[8 + j] = lm
        else:
            out[12 + j - 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[4 + j - 4] |= (ls >> 4) << 6
            out[8 + j - 4] |= (lm >> 4) << 6
        dj = d * F32(ls)
        base = 32 * j
        if dj == _ZERO:  # ggml's `if (!d) continue`: keep the optimizer's levels
            for i in range(32):
                lq[base + i] = L[i, lane0 + j]
        else:
            dm = dmin * F32(lm)
            for i in range(32):
                lq[base + i] = _level((x[base + i] + dm) / dj, nmax)
    qs = 48 if five_bit else 16
    for c in range(4):
        for i in range(32):
            out[qs + 32 * c + i] = (lq[64 * c + i] & 0xF) | ((lq[64 * c + 32 + i] & 0xF) << 4)
    if five_bit:
        for i in range(32):
            h = 0
            for j in range(8):
                h |= (lq[32 * j + i] >> 4) << j
            out[16 + i] = h


@_jit.helper
def _k32_quantize(blocks, out, nmax, rmin, nstep, five_bit):  # type: ignore[no-untyped-def]
    nb = blocks.shape[0]
    xs = np.empty((32, _LANES), np.float32)
    ws = np.empty((32, _LANES), np.float32)
    lf = np.empty((32, _LANES), np.float32)
    L = np.empty((32, _LANES), np.uint8)
    st = np.empty((_N_STATE, _LANES), np.float32)
    av = np.empty(_LANES, np.float32)
    lq = np.empty(256, np.uint8)
    per_batch = _LANES // 8
    for b0 in range(0, nb, per_batch):
        _gather(blocks, b0, 32, 8, xs)
        # weights: w = sqrt(sum x^2 / 32) + |x|, the sum sequential per sub-block
        for k in range(_LANES):
            av[k] = _ZERO
        for i in range(32):
            for k in range(_LANES):
                av[k] += xs[i, k] * xs[i, k]
        for k in range(_LANES):
            av[k] = np.sqrt(av[k] / _32)
        for i in range(32):
            for k in range(_LANES):
                ws[i, k] = av[k] + abs(xs[i, k])
        _qkx2_search(xs, ws, 32, nmax, rmin, _RDELTA, nstep, False, st, lf, L)
        for t in range(per_batch):
            b = b0 + t
            if b < nb:
                _k32_block(blocks[b], out[b], L, 8 * t, st, nmax, five_bit, lq)


@_jit.kernel
def _q4_k_kernel(blocks, out):  # type: ignore[no-untyped-def]
    _k32_quantize(blocks, out, 15, _RMIN_Q4_K, 20, False)


@_jit.kernel
def _q5_k_kernel(blocks, out):  # type: ignore[no-untyped-def]
    _k32_quantize(blocks, out, 31, _RMIN_Q2_K_Q5_K, 15, True)


# --------------------------------------------------------------------------- Q2_K kernel


@_jit.helper
def _q2_k_block(x, out, L, lane0, st, lq):  # type: ignore[no-untyped-def]
    """Steps 2-3 and packing of one Q2_K block whose 16 sub-blocks are lanes lane0..lane0+15."""
    scale = st[_SCALE]
    mn = st[_MN]
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        s = scale[lane0 + j]
        m = -mn[lane0 + j]
        if s > max_scale:  # noqa: PLR1730  (strict, from +0.0: a nan or -0.0 never wins)
            max_scale = s
        if m > max_min:  # noqa: PLR1730
            max_min = m
    d_bits = 0
    dmin_bits = 0
    for j in range(16):
        out[j] = 0
    if max_scale > _ZERO:
        iscale = _15 / max_scale
        for j in range(16):
            out[j] = _jit.nearest_int(iscale * scale[lane0 + j]) & 0xFF
        d_bits = _jit.fp32_to_fp16_bits(max_scale / _15)
    if max_min > _ZERO:
        iscale = _15 / max_min
        for j in range(16):
            out[j] |= (_jit.nearest_int(iscale * -mn[lane0 + j]) << 4) & 0xFF
        dmin_bits = _jit.fp32_to_fp16_bits(max_min / _15)
    _put_fp16(out, 80, d_bits)
    _put_fp16(out, 82, dmin_bits)
    d = _jit.fp16_bits_to_fp32(d_bits)
    dmin = _jit.fp16_bits_to_fp32(dmin_bits)
    for j in range(16):
        sc = out[j]
        dj = d * F32(sc & 0xF)
        base = 16 * j
        if dj == _ZERO:  # ggml's `if (!d) continue`
            for i in range(16):
                lq[base + i] = L[i, lane0 + j]
        else:
            dm = dmin * F32(sc >> 4)
            for i in range(16):
                lq[base + i] = _level((x[base + i] + dm) / dj, 3)
    for h in range(2):
        for i in range(32):
            b = 128 * h + i
            out[16 + 32 * h + i] = lq[b] | (lq[b + 32] << 2) | (lq[b + 64] << 4) | (lq[b + 96] << 6)


@_jit.kernel
def _q2_k_kernel(blocks, out):  # type: ignore[no-untyped-def]
    nb = blocks.shape[0]
    xs = np.empty((16, _LANES), np.float32)
    ws = np.empty((16, _LANES), np.float32)
    lf = np.empty((16, _LANES), np.float32)
    L = np.empty((16, _LANES), np.uint8)
    st = np.empty((_N_STATE, _LANES), np.float32)
    lq = np.empty(256, np.uint8)
    per_batch = _LANES // 16
    for b0 in range(0, nb, per_batch):
        _gather(blocks, b0, 16, 16, xs)
        for i in range(16):
            for k in range(_LANES):
                ws[i, k] = abs(xs[i, k])
        _qkx2_search(xs, ws, 16, 3, _RMIN_Q2_K_Q5_K, _RDELTA, 15, True, st, lf, L)
        for t in range(per_batch):
            b = b0 + t
            if b < nb:
                _q2_k_block(blocks[b], out[b], L, 16 * t, st, lq)


# =========================================================================== classes


class Q2_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q2_K):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 256) on any device -> uint8 (n, 84) on the same device, ggml's bytes."""
        return _q2_k(blocks.to(torch.float32))

    fast_kernel = staticmethod(_q2_k_kernel)


class Q4_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q4_K):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 256) on any device -> uint8 (n, 144) on the same device, ggml's bytes."""
        return _q4_k(blocks.to(torch.float32))

    fast_kernel = staticmethod(_q4_k_kernel)


class Q5_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q5_K):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 256) on any device -> uint8 (n, 176) on the same device, ggml's bytes."""
        return _q5_k(blocks.to(torch.float32))

    fast_kernel = staticmethod(_q5_k_kernel)
