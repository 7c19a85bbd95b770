"""K-quants with one signed scale per 16-value sub-block and no min: Q3_K, Q6_K.

Both types cut a 256-value super-block into 16 sub-blocks of 16 values, fit
each sub-block with a symmetric integer grid (``make_q3_quants`` for Q3_K,
``make_qx_quants`` for Q6_K, weights ``x*x``), quantize the 16 sub-block
scales against the largest one, store that super-block scale as fp16 and
requantize every value with the *rounded* scale.  This is what ggml's
``quantize_row_q3_K_ref`` / ``quantize_row_q6_K_ref`` do, which is what
``ggml_quantize_chunk(type, ..., imatrix=NULL)`` (llama-quantize without
``--imatrix``) runs.

Two implementations give ggml's bytes:

* the reference, ``quantize_blocks``: eager torch, readable, vectorized over
  sub-blocks (one tensor row each), on the CPU or a GPU;
* the fast kernel, ``fast_kernel``: numba on the CPU, vectorized over SIMD
  lanes (one sub-block per lane).

Byte-exactness rests on doing every float32 operation that ggml does, in the
same order, with the same rounding:

* every sum is a sequential ``acc += term`` over the 16 elements of a
  sub-block, so both implementations loop over the element index and work on
  many sub-blocks at once;
* a product such as ``w*x*l`` is ``(w*x)*l``; since ``w*x`` does not depend on
  the candidate grid it is computed once (the same float32 product);
* ``nearest_int`` is ggml's ``1.5*2**23`` bit trick, kept literally wherever
  its argument can be out of range (x/d, the refinement of make_q3_quants):
  there it yields ggml's garbage (nan -> 0, +-inf -> -4194304) before clamping;
* huge inputs make ``w = x*x`` overflow; ``inf*0`` then turns a sum into nan,
  and ggml's comparisons (false on nan) and truth tests (nan is true) decide
  what happens.  Both implementations carry the nan through the same way.

Layout: shared helpers (torch, then numba), then one section per ggml helper
(make_qx_quants, make_q3_quants) holding its torch version (over tensor rows)
and its numba twin (over SIMD lanes), then one section per type with its
numba kernel and its class.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import _jit
from ._jit import F32, bits_f32, f32_bits, fp16_bits_to_fp32, fp32_to_fp16_bits
from .gguf_py import GgufPyDequantize

QK_K = 256
SUB = 16  # values per sub-block
N_SUB = QK_K // SUB  # sub-blocks per super-block

GROUP_MAX_EPS = F32(1e-15)  # below this max|x| a group counts as all zero
_MAGIC = F32(12582912.0)  # 1.5 * 2**23, ggml's nearest_int constant
_ZERO = F32(0.0)
_ONE = F32(1.0)
_TENTH = F32(0.1)

#: Sub-blocks the numba kernels process side by side: one per SIMD lane, 8
#: super-blocks at a time.  Several vectors per loop step keep independent
#: work in flight while each lane's sequential sums wait on their previous
#: addition (measured on one core, Q3_K: 16 lanes 1.3x ggml's speed, 32 lanes
#: 2.2x, 64-256 lanes about 3x; Q6_K 2x, 3.5x, 5-6x).
LANES = 128
_SUPER_PER_GROUP = LANES // N_SUB


# =========================================================================== shared helpers


# torch: float32/int32 tensors on any device, one eager op at a time, with
# three habits that keep CPU and CUDA on ggml's bytes:
#
# * a constant that divides is a float32 tensor on the device (``_f32``):
#   ``number / tensor`` is ``tensor.reciprocal() * number`` in torch (Tensor.__rdiv__),
#   not a correctly rounded division (``-(nmax + 0.1*step) / vmax`` differs in
#   about a quarter of cases); and on CUDA ``tensor / number`` (or a CPU scalar)
#   multiplies by the reciprocal too.  Every division here is device tensor
#   by device tensor, which is IEEE division on both devices;
# * no fused op (add/sub with alpha, addcmul, fma, matmul...): ``a * b`` and
#   ``+ c`` are separate kernels, so CUDA cannot contract them into an FMA;
# * a nan produced by arithmetic (inf*0, 0/0, inf-inf) is 0xFFC00000 on x86,
#   where ggml runs, and 0x7FFFFFFF on CUDA: whatever reads a nan's bits
#   (nearest_int, fp16 rounding) selects x86's answer explicitly.


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar tensor on ``like``'s device (``value`` rounded to float32, as F32(value))."""
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int on a float32 tensor, as int32: round half to even for |f| < 2**22, garbage beyond.

    ``f + 1.5*2**23`` is a float32 addition (the constant is exact), then its
    bits are read.  Of nan the bits are the nan's: x86's nan (mantissa
    0x400000) gives 0, CUDA's (0x7FFFFF) would give 4194303, so nan is mapped to
    x86's 0 explicitly.  +-inf gives -4194304 on both.
    """
    r = ((f + float(_MAGIC)).view(torch.int32) & 0x7FFFFF) - 0x400000
    return torch.where(torch.isnan(f), 0, r)


def _to_int8(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to int8_t (wraps modulo 256), on int32."""
    return ((v + 128) & 255) - 128


def _fp16_round_trip(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 bytes little-endian as int32 (n, 2), the float32 ggml reads back) of float32 scales.

    The conversion rounds to nearest even on CPU and CUDA alike; a nan is
    stored as sign | 0x7E00 as ggml does (CUDA's would be 0x7FFF).  No nan
    reaches it here (the super-block scale never is nan), but the bits stay
    defined if one did.
    """
    h = d.to(torch.float16)
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (d.view(torch.int32) >> 16) & 0x8000
    bits = torch.where(torch.isnan(d), sign | 0x7E00, bits)
    return torch.stack([bits & 0xFF, bits >> 8], dim=1), h.to(torch.float32)


def _signed_absmax(v: torch.Tensor) -> torch.Tensor:
    """Per row, the value with the largest |v| (first one on ties, sign kept), +0 if every |v| is 0.

    ggml's scan ``if (fabsf(v) > amax)`` from amax = 0, column by column: a
    strict comparison, so the first maximum wins and neither a zero (-0
    included) nor a nan ever does.
    """
    amax = torch.zeros(v.shape[0], dtype=torch.float32, device=v.device)
    vmax = torch.zeros_like(amax)
    for i in range(v.shape[1]):
        a = v[:, i].abs()
        up = a > amax
        amax = torch.where(up, a, amax)
        vmax = torch.where(up, v[:, i], vmax)
    return vmax


def _sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Row sums accumulated left to right in float32, as ggml's ``acc += term`` loops (never torch.sum)."""
    acc = torch.zeros(terms.shape[0], dtype=torch.float32, device=terms.device)
    for i in range(terms.shape[1]):
        acc = acc + terms[:, i]
    return acc


def _grid(iscale: torch.Tensor, x: torch.Tensor, nmax: int) -> torch.Tensor:
    """clamp(nearest_int(iscale*x), -nmax, nmax-1) per row scale ``iscale``, as int32."""
    return _nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)


def _requantize(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """L = clamp(nearest_int(x/d), lo, hi) - lo per sub-block scale d (n, 16); L is kept where d == 0.

    ggml's ``if (!d) continue`` keeps the optimizer's L for a sub-block whose
    rounded scale is 0 (a nan d is "true" and is requantized, to nearest_int(nan) = 0).
    """
    xs = x.reshape(-1, N_SUB, SUB)
    new = _nearest_int(xs / d[:, :, None]).clamp(lo, hi) - lo
    return torch.where((d != 0)[:, :, None], new, L.reshape(-1, N_SUB, SUB)).reshape(-1, QK_K)


# numba side.  The kernels transpose a group of super-blocks into arrays
# ``xt[i, lane]``: element i (0..15) of sub-block ``lane`` (= 16*super-block
# + sub-block).  Every hot loop is ``for i: for lane:`` with a branch-free body
# (conditional expressions become selects), so LLVM vectorizes over lanes
# while each lane still adds its 16 terms in ggml's order.  numba types
# ``float32 op int`` and ``float32 op python float`` as float64, so every
# constant is an np.float32 and ints are cast with F32(...).


@_jit.helper
def _nint(v):  # type: ignore[no-untyped-def]
    """ggml's nearest_int for any float32 (garbage and all), as an int."""
    return (f32_bits(v + _MAGIC) & 0x7FFFFF) - 0x400000


@_jit.helper
def _nint_f32(v):  # type: ignore[no-untyped-def]
    """ggml's nearest_int for any float32 (garbage and all), as a float32.

    The integer is (mantissa bits of v + 1.5*2**23) - 2**22; the float whose
    bits are those mantissa bits under exponent 2**23 is 2**23 + mantissa, so
    subtracting 1.5*2**23 gives it exactly, with no float<->int conversion.
    """
    return bits_f32(np.int32((f32_bits(v + _MAGIC) & 0x7FFFFF) | 0x4B000000)) - _MAGIC


@_jit.helper
def _rint_small(v):  # type: ignore[no-untyped-def]
    """nearest_int(v) as a float32, for |v| < 2**22 only.

    There ``v + 1.5*2**23`` lies in [2**23, 2**24), whose spacing is 1, so the
    addition rounds v half to even and the subtraction is exact: the same
    integer as ggml's bit trick, without leaving the float registers.  Used on
    iscale*x with |x| <= max|x| of the sub-block, i.e. |v| <= nmax + 1.
    """
    return (v + _MAGIC) - _MAGIC


@_jit.kernel
def _load_lanes(blocks, first, count, xt, w, wx, vmax):  # type: ignore[no-untyped-def]
    """Transpose super-blocks first..first+count-1 into lanes (zero-padded) and
    per lane: the signed value of largest |x| (first on ties), w = x*x, w*x."""
    for b in range(_SUPER_PER_GROUP):
        for j in range(N_SUB):
            for i in range(SUB):
                xt[i, b * N_SUB + j] = blocks[first + b, j * SUB + i] if b < count else _ZERO
    amax = np.zeros(LANES, np.float32)
    for lane in range(LANES):
        vmax[lane] = _ZERO
    for i in range(SUB):
        for lane in range(LANES):
            v = xt[i, lane]
            a = abs(v)
            up = a > amax[lane]  # strict: the first maximum stays
            amax[lane] = a if up else amax[lane]
            vmax[lane] = v if up else vmax[lane]
    for i in range(SUB):
        for lane in range(LANES):
            v = xt[i, lane]
            w[i, lane] = v * v
            wx[i, lane] = (v * v) * v


@_jit.helper
def _max_abs_scale(scale, base):  # type: ignore[no-untyped-def]
    """ggml's scan for the sub-block scale of largest |s| in one super-block (nan never wins)."""
    amax = _ZERO
    max_scale = _ZERO
    for j in range(N_SUB):
        s = scale[base + j]
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    return amax, max_scale


# =========================================================================== make_qx_quants (rmse_type=1, no qw)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on each float32 row of ``x``.

    Returns (scale float32 (m,), L int32 (m, n) in [0, 2*nmax-1]; 0 for all-zero rows).
    Tries the grid iscale = -nmax/max and 18 stretched ones -(nmax + 0.1*is)/max,
    is = -9..9, and keeps the one with the best weighted least-squares fit, weight
    ``x*x``; a candidate must beat the best strictly (``sumlx**2 > best*suml2``).
    """
    vmax = _signed_absmax(x)
    zero = vmax.abs() < _f32(GROUP_MAX_EPS, x)
    w = x * x
    wx = w * x  # ggml's w*x[i]*l is (w*x[i])*l: this product is the same for every candidate

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf = _grid(iscale, x, nmax).to(torch.float32)
        return _sequential_sum(wx * lf), _sequential_sum((w * lf) * lf)

    fmax = _f32(nmax, x)
    tenth = _f32(0.1, x)
    best_iscale = -fmax / vmax
    sumlx, suml2 = sums(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)  # C: suml2 ? .. : 0 (nan is true)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + tenth * step) / vmax  # float32: nmax + 0.1f*step, then an IEEE division
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    L = _grid(best_iscale, x, nmax) + nmax  # ggml rewrites L with the winning iscale: same values
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0, L)


@_jit.helper
def _lane_sums(xt, w, wx, iscale, lo, hi, sumlx, suml2):  # type: ignore[no-untyped-def]
    """Per lane: sum of w*x*l and of w*l*l over the 16 elements, in order, l = grid(iscale*x)."""
    for lane in range(LANES):
        sumlx[lane] = _ZERO
        suml2[lane] = _ZERO
    for i in range(SUB):
        for lane in range(LANES):
            r = _rint_small(iscale[lane] * xt[i, lane])
            r = lo if r < lo else r
            r = hi if r > hi else r
            sumlx[lane] += wx[i, lane] * r
            suml2[lane] += (w[i, lane] * r) * r


@_jit.kernel
def _make_qx_quants_lanes(xt, w, wx, vmax, nmax, scale, best_iscale):  # type: ignore[no-untyped-def]
    """make_qx_quants per lane: writes the scale (0 for all-zero lanes) and the
    winning iscale, from which the caller rebuilds L where it needs it."""
    iscale = np.empty(LANES, np.float32)
    sumlx = np.empty(LANES, np.float32)
    suml2 = np.empty(LANES, np.float32)
    best = np.empty(LANES, np.float32)
    fmax = F32(nmax)
    lo = -fmax
    hi = fmax - _ONE
    for lane in range(LANES):
        iscale[lane] = -fmax / vmax[lane]
    _lane_sums(xt, w, wx, iscale, lo, hi, sumlx, suml2)
    for lane in range(LANES):
        s2 = suml2[lane]
        sc = sumlx[lane] / s2 if s2 != _ZERO else _ZERO
        scale[lane] = sc
        best[lane] = sc * sumlx[lane]
        best_iscale[lane] = iscale[lane]
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(fmax + _TENTH * F32(step))
        for lane in range(LANES):
            iscale[lane] = num / vmax[lane]
        _lane_sums(xt, w, wx, iscale, lo, hi, sumlx, suml2)
        for lane in range(LANES):
            lx = sumlx[lane]
            s2 = suml2[lane]
            better = (s2 > _ZERO) and (lx * lx > best[lane] * s2)
            sc = lx / s2
            scale[lane] = sc if better else scale[lane]
            best[lane] = sc * lx if better else best[lane]
            best_iscale[lane] = iscale[lane] if better else best_iscale[lane]
    for lane in range(LANES):
        if abs(vmax[lane]) < GROUP_MAX_EPS:
            scale[lane] = _ZERO


# =========================================================================== make_q3_quants (do_rmse=true)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on each float32 row of ``x``.

    Start from L = grid(-nmax/max), then improve one element at a time: for each
    i, the best level for x[i] given the other elements' sums is
    nearest_int(x[i]*sl2/slx); it is taken when it raises ``sumlx**2/suml2``.
    Each accepted change updates the running sums that the next element sees,
    so the elements of a row are visited in order; rows are independent and
    run side by side.  A pass that changes nothing ends ggml's refinement of a
    row (at most 5 passes); here all 5 passes run and ``active`` masks out the
    rows that stopped (no data-dependent Python branch, so nothing waits on
    the device).

    Returns (scale float32 (m,), L int32 (m, n) in [0, 2*nmax-1]; 0 for all-zero rows).
    """
    m, n = x.shape
    vmax = _signed_absmax(x)
    zero = vmax.abs() < _f32(GROUP_MAX_EPS, x)
    w = x * x
    wx = w * x
    L = _grid(-_f32(nmax, x) / vmax, x, nmax)
    lf = L.to(torch.float32)
    sumlx = _sequential_sum(wx * lf)
    suml2 = _sequential_sum((w * lf) * lf)
    active = ~zero
    for _ in range(5):
        changed = torch.zeros(m, dtype=torch.bool, device=x.device)
        for i in range(n):
            old = L[:, i].to(torch.float32)
            slx = sumlx - wx[:, i] * old  # the sums without element i
            sl2 = suml2 - (w[:, i] * old) * old
            # x*sl2/slx is unbounded (slx may be tiny): nearest_int's garbage, then the clamp, as in C
            new = _nearest_int((x[:, i] * sl2) / slx).clamp(-nmax, nmax - 1)
            newf = new.to(torch.float32)
            slx_new = slx + wx[:, i] * newf
            sl2_new = sl2 + (w[:, i] * newf) * newf
            take = (
                active
                & (slx > 0)
                & (new != L[:, i])
                & (sl2_new > 0)
                & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
            )
            L[:, i] = torch.where(take, new, L[:, i])
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            changed = changed | take
        active = active & changed
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0, L + nmax)


@_jit.helper
def _q3_refine_pass(x, w, wx, L, sumlx, suml2, changed, n_lanes, lo, hi):  # type: ignore[no-untyped-def]
    """One refinement pass of make_q3_quants over lanes 0..n_lanes-1 (levels L as float32).

    Element i of a lane sees the sums as left by element i-1, as in ggml; the
    lanes are independent.  ``changed[lane]``: whether any level moved.
    """
    for lane in range(n_lanes):
        changed[lane] = False
    for i in range(SUB):
        for lane in range(n_lanes):
            old = L[i, lane]
            lx = sumlx[lane]
            l2 = suml2[lane]
            slx = lx - wx[i, lane] * old  # the sums without element i
            sl2 = l2 - (w[i, lane] * old) * old
            # x*sl2/slx is unbounded (slx may be tiny): the exact bit trick, then clamp
            new = _nint_f32((x[i, lane] * sl2) / slx)
            new = lo if new < lo else new
            new = hi if new > hi else new
            slx_new = slx + wx[i, lane] * new
            sl2_new = sl2 + (w[i, lane] * new) * new
            take = slx > _ZERO and new != old and sl2_new > _ZERO and (slx_new * slx_new) * l2 > (lx * lx) * sl2_new
            L[i, lane] = new if take else old
            sumlx[lane] = slx_new if take else lx
            suml2[lane] = sl2_new if take else l2
            changed[lane] = changed[lane] or take


@_jit.helper
def _copy_lane(src, src_lane, dst, dst_lane):  # type: ignore[no-untyped-def]
    for i in range(SUB):
        dst[i, dst_lane] = src[i, src_lane]


@_jit.kernel
def _make_q3_quants_lanes(xt, w, wx, vmax, nmax, scale, Lt, packed, sums, changed, idx):  # type: ignore[no-untyped-def]
    """make_q3_quants per lane: writes the scale and Lt[i, lane], the levels + nmax
    as float32 (0 for all-zero lanes).  packed (4, SUB, LANES), sums (4, LANES),
    changed (LANES,) and idx (LANES,) are scratch space.

    ggml stops refining a sub-block after a pass that changed nothing (such a
    state is a fixed point: another pass would change nothing either).  After
    the first pass, which every lane runs, the lanes still changing are packed
    to the front of ``packed`` and only they run the next passes (typically a
    fifth of the lanes after pass 1, far fewer after pass 2), instead of all
    lanes waiting for the slowest one.  Per lane the work and its order are ggml's.
    """
    sumlx = sums[0]
    suml2 = sums[1]
    fmax = F32(nmax)
    lo = -fmax
    hi = fmax - _ONE
    iscale = sums[2]  # free until the packing below
    for lane in range(LANES):
        iscale[lane] = -fmax / vmax[lane]
        sumlx[lane] = _ZERO
        suml2[lane] = _ZERO
    for i in range(SUB):
        for lane in range(LANES):
            r = _rint_small(iscale[lane] * xt[i, lane])
            r = lo if r < lo else r
            r = hi if r > hi else r
            Lt[i, lane] = r
            sumlx[lane] += wx[i, lane] * r
            suml2[lane] += (w[i, lane] * r) * r
    _q3_refine_pass(xt, w, wx, Lt, sumlx, suml2, changed, LANES, lo, hi)
    px = packed[0]
    pw = packed[1]
    pwx = packed[2]
    pL = packed[3]
    psumlx = sums[2]
    psuml2 = sums[3]
    n_active = 0
    for lane in range(LANES):
        if changed[lane]:
            _copy_lane(xt, lane, px, n_active)
            _copy_lane(w, lane, pw, n_active)
            _copy_lane(wx, lane, pwx, n_active)
            _copy_lane(Lt, lane, pL, n_active)
            psumlx[n_active] = sumlx[lane]
            psuml2[n_active] = suml2[lane]
            idx[n_active] = lane
            n_active += 1
    for _ in range(4):  # passes 2..5
        if n_active == 0:
            break
        _q3_refine_pass(px, pw, pwx, pL, psumlx, psuml2, changed, n_active, lo, hi)
        kept = 0
        for k in range(n_active):
            if changed[k]:  # keep refining: move to slot `kept` (<= k)
                if kept != k:
                    _copy_lane(px, k, px, kept)
                    _copy_lane(pw, k, pw, kept)
                    _copy_lane(pwx, k, pwx, kept)
                    _copy_lane(pL, k, pL, kept)
                    psumlx[kept] = psumlx[k]
                    psuml2[kept] = psuml2[k]
                    idx[kept] = idx[k]
                kept += 1
            else:  # converged: its result goes back to its lane
                _copy_lane(pL, k, Lt, idx[k])
                sumlx[idx[k]] = psumlx[k]
                suml2[idx[k]] = psuml2[k]
        n_active = kept
    for k in range(n_active):  # still changing after 5 passes: ggml stops there too
        _copy_lane(pL, k, Lt, idx[k])
        sumlx[idx[k]] = psumlx[k]
        suml2[idx[k]] = psuml2[k]
    for lane in range(LANES):
        s2 = suml2[lane]
        sc = sumlx[lane] / s2 if s2 > _ZERO else _ZERO
        scale[lane] = _ZERO if abs(vmax[lane]) < GROUP_MAX_EPS else sc
    for i in range(SUB):
        for lane in range(LANES):
            Lt[i, lane] = _ZERO if abs(vmax[lane]) < GROUP_MAX_EPS else Lt[i, lane] + fmax


# =========================================================================== Q3_K


@_jit.kernel
def _q3_k_kernel(blocks, out):  # type: ignore[no-untyped-def]
    """Q3_K bytes of f32 (n, 256) blocks into u8 (n, 110), 8 super-blocks per group:
    make_q3_quants over lanes, the super-block scale per block (scalar), the
    requantization over lanes again, then the packing per block."""
    n = blocks.shape[0]
    xt = np.empty((SUB, LANES), np.float32)
    w = np.empty((SUB, LANES), np.float32)
    wx = np.empty((SUB, LANES), np.float32)
    Lt = np.empty((SUB, LANES), np.float32)
    vmax = np.empty(LANES, np.float32)
    scale = np.empty(LANES, np.float32)
    dl = np.empty(LANES, np.float32)
    sc = np.empty(LANES, np.int32)
    Lq = np.empty((SUB, LANES), np.int32)
    dbits = np.empty(_SUPER_PER_GROUP, np.int32)
    L = np.empty(QK_K, np.int32)
    packed = np.empty((4, SUB, LANES), np.float32)
    sums = np.empty((4, LANES), np.float32)
    changed = np.empty(LANES, np.bool_)
    idx = np.empty(LANES, np.int64)
    for first in range(0, n, _SUPER_PER_GROUP):
        count = min(_SUPER_PER_GROUP, n - first)
        _load_lanes(blocks, first, count, xt, w, wx, vmax)
        _make_q3_quants_lanes(xt, w, wx, vmax, 4, scale, Lt, packed, sums, changed, idx)
        for b in range(_SUPER_PER_GROUP):
            base = b * N_SUB
            max_scale = _max_abs_scale(scale, base)[1]
            if max_scale != _ZERO:
                iscale = F32(-32.0) / max_scale
                for j in range(N_SUB):
                    q = _nint(iscale * scale[base + j])
                    q = ((q + 128) & 255) - 128  # C stores it in an int8_t before clamping
                    sc[base + j] = max(-32, min(31, q)) + 32
                db = fp32_to_fp16_bits(_ONE / iscale)
            else:
                for j in range(N_SUB):
                    sc[base + j] = 0
                db = 0
            dbits[b] = db
            dd = fp16_bits_to_fp32(db)
            for j in range(N_SUB):
                dl[base + j] = dd * F32(sc[base + j] - 32)  # what the stored bytes say
        # x/d is unbounded (exact nearest_int); a sub-block whose d is 0 keeps
        # make_q3_quants' levels (ggml's `if (!d) continue`).
        for i in range(SUB):
            for lane in range(LANES):
                d = dl[lane]
                q = max(-4, min(3, _nint(xt[i, lane] / d))) + 4
                Lq[i, lane] = q if d != _ZERO else np.int32(Lt[i, lane])
        for b in range(count):
            ob = out[first + b]
            base = b * N_SUB
            for j in range(N_SUB):  # back to value order
                for i in range(SUB):
                    L[j * SUB + i] = Lq[i, base + j]
            for m in range(32):
                ob[m] = 0
            for k in range(8):  # bit k of hmask[m]: bit 2 of the level of value 32k + m
                for m in range(32):
                    ob[m] |= (L[32 * k + m] >> 2) << k
            for h in range(2):
                for l in range(32):
                    e = 128 * h + l
                    ob[32 + 32 * h + l] = (
                        (L[e] & 3) | ((L[e + 32] & 3) << 2) | ((L[e + 64] & 3) << 4) | ((L[e + 96] & 3) << 6)
                    )
            for j in range(8):
                ob[96 + j] = (sc[base + j] & 15) | ((sc[base + j + 8] & 15) << 4)
            for k in range(4):
                ob[104 + k] = (
                    (sc[base + k] >> 4)
                    | ((sc[base + k + 4] >> 4) << 2)
                    | ((sc[base + k + 8] >> 4) << 4)
                    | ((sc[base + k + 12] >> 4) << 6)
                )
            ob[108] = dbits[b] & 255
            ob[109] = (dbits[b] >> 8) & 255


class Q3_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q3_K):
    """110 bytes per 256 values: hmask[32], qs[64], scales[12], d (fp16).

    Each value is a 3-bit level L in [0, 7] (value = d * (sc - 32) * (L - 4)):
    bit 2 of L goes to bit (j // 32) of hmask[j % 32] and the low two bits to
    the 2-bit planes ``qs[32h + l] = L[128h+l] | L[128h+l+32]<<2 | L[128h+l+64]<<4
    | L[128h+l+96]<<6``.  The 16 sub-block scales sc in [0, 63] take 6 bits
    each: low nibbles in scales[0:8] (sub-block j<8 low nibble, j+8 high nibble),
    high 2-bit pairs in scales[8 + j%4] at bit 2*(j//4).
    """

    fast_kernel = staticmethod(_q3_k_kernel)

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 256) on any device -> uint8 (n, 110) on the same device, ggml's bytes."""
        x = blocks.to(torch.float32).reshape(-1, QK_K)
        n = x.shape[0]
        scales, L = make_q3_quants(x.reshape(-1, SUB), 4)
        scales = scales.reshape(n, N_SUB)
        L = L.reshape(n, QK_K)

        max_scale = _signed_absmax(scales)
        has_scale = max_scale != 0
        iscale = _f32(-32.0, x) / torch.where(has_scale, max_scale, 1.0)
        # C stores nearest_int into an int8_t before clamping, hence the wrap.
        sc = _to_int8(_nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32
        sc = torch.where(has_scale[:, None], sc, 0)  # no scale: the 12 bytes stay zero
        d_bytes, d = _fp16_round_trip(torch.where(has_scale, _f32(1.0, x) / iscale, 0.0))
        # The block is requantized with what the bytes say: d(fp16) * (sc - 32).
        d_sub = d[:, None] * (sc - 32).to(torch.float32)
        L = _requantize(x, L, d_sub, -4, 3)

        high = (L > 3).to(torch.int32)
        planes = high.reshape(n, 8, 32)  # bit k of hmask[m]: bit 2 of the level of value 32k + m
        hmask = planes[:, 0]
        for k in range(1, 8):
            hmask = hmask | (planes[:, k] << k)
        low = torch.where(L > 3, L - 4, L).reshape(n, 2, 4, 32)  # [half, quarter, l]
        qs = low[:, :, 0]
        for q in range(1, 4):
            qs = qs | (low[:, :, q] << (2 * q))
        sc_low = (sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4)
        hi2 = (sc >> 4).reshape(n, 4, 4)  # [j // 4, j % 4]
        sc_high = hi2[:, 0]
        for q in range(1, 4):
            sc_high = sc_high | (hi2[:, q] << (2 * q))
        out = torch.cat([hmask, qs.reshape(n, 64), sc_low, sc_high, d_bytes], dim=1)
        return (out & 0xFF).to(torch.uint8)


# =========================================================================== Q6_K


@_jit.kernel
def _q6_k_kernel(blocks, out):  # type: ignore[no-untyped-def]
    """Q6_K bytes of f32 (n, 256) blocks into u8 (n, 210), 8 super-blocks per group,
    in the same four steps as the Q3_K kernel."""
    n = blocks.shape[0]
    xt = np.empty((SUB, LANES), np.float32)
    w = np.empty((SUB, LANES), np.float32)
    wx = np.empty((SUB, LANES), np.float32)
    vmax = np.empty(LANES, np.float32)
    scale = np.empty(LANES, np.float32)
    best_iscale = np.empty(LANES, np.float32)
    dl = np.empty(LANES, np.float32)
    sc = np.empty(LANES, np.int32)
    Lq = np.empty((SUB, LANES), np.int32)
    dbits = np.empty(_SUPER_PER_GROUP, np.int32)
    L = np.empty(QK_K, np.int32)
    for first in range(0, n, _SUPER_PER_GROUP):
        count = min(_SUPER_PER_GROUP, n - first)
        _load_lanes(blocks, first, count, xt, w, wx, vmax)
        _make_qx_quants_lanes(xt, w, wx, vmax, 32, scale, best_iscale)
        for b in range(_SUPER_PER_GROUP):
            base = b * N_SUB
            amax, max_scale = _max_abs_scale(scale, base)
            if amax < GROUP_MAX_EPS:  # ggml memsets the block: marked by dbits = -1
                dbits[b] = -1
                for j in range(N_SUB):
                    dl[base + j] = _ZERO
                continue
            iscale = F32(-128.0) / max_scale
            db = fp32_to_fp16_bits(_ONE / iscale)
            dbits[b] = db
            dd = fp16_bits_to_fp32(db)
            for j in range(N_SUB):
                q = min(127, _nint(iscale * scale[base + j]))
                q = ((q + 128) & 255) - 128  # stored as int8_t
                sc[base + j] = q
                dl[base + j] = dd * F32(q)
        # Requantize with d = fp16(d)*sc where d != 0; elsewhere keep make_qx_quants'
        # levels, rebuilt from the winning iscale (0 for an all-zero sub-block).
        for i in range(SUB):
            for lane in range(LANES):
                x = xt[i, lane]
                d = dl[lane]
                q = max(-32, min(31, _nint(x / d))) + 32
                r = _rint_small(best_iscale[lane] * x)
                r = F32(-32.0) if r < F32(-32.0) else r
                r = F32(31.0) if r > F32(31.0) else r
                r = _ZERO if abs(vmax[lane]) < GROUP_MAX_EPS else r + F32(32.0)
                Lq[i, lane] = q if d != _ZERO else np.int32(r)
        for b in range(count):
            ob = out[first + b]
            if dbits[b] < 0:
                for k in range(210):
                    ob[k] = 0
                continue
            base = b * N_SUB
            for j in range(N_SUB):
                for i in range(SUB):
                    L[j * SUB + i] = Lq[i, base + j]
            for h in range(2):
                for l in range(32):
                    e = 128 * h + l
                    q1 = L[e]
                    q2 = L[e + 32]
                    q3 = L[e + 64]
                    q4 = L[e + 96]
                    ob[64 * h + l] = (q1 & 15) | ((q3 & 15) << 4)
                    ob[64 * h + 32 + l] = (q2 & 15) | ((q4 & 15) << 4)
                    ob[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
            for j in range(N_SUB):
                ob[192 + j] = sc[base + j] & 255
            ob[208] = dbits[b] & 255
            ob[209] = (dbits[b] >> 8) & 255


class Q6_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q6_K):
    """210 bytes per 256 values: ql[128], qh[64], scales[16] (int8), d (fp16).

    Each value is a 6-bit level L in [0, 63] (value = d * sc * (L - 32)).  Per
    half h (values 128h..128h+127, l = 0..31): the low nibbles go to
    ``ql[64h+l] = L[128h+l] | L[128h+l+64]<<4`` and
    ``ql[64h+32+l] = L[128h+l+32] | L[128h+l+96]<<4``; the top two bits to
    ``qh[32h+l]``, one 2-bit field per quarter (l, l+32, l+64, l+96 at bits 0, 2, 4, 6).
    """

    fast_kernel = staticmethod(_q6_k_kernel)

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 256) on any device -> uint8 (n, 210) on the same device, ggml's bytes."""
        x = blocks.to(torch.float32).reshape(-1, QK_K)
        n = x.shape[0]
        scales, L = make_qx_quants(x.reshape(-1, SUB), 32)
        scales = scales.reshape(n, N_SUB)
        L = L.reshape(n, QK_K)

        max_scale = _signed_absmax(scales)
        empty = max_scale.abs() < _f32(GROUP_MAX_EPS, x)  # ggml memsets the whole block
        iscale = _f32(-128.0, x) / torch.where(empty, 1.0, max_scale)
        sc = _to_int8(_nearest_int(iscale[:, None] * scales).clamp(max=127))
        d_bytes, d = _fp16_round_trip(_f32(1.0, x) / iscale)
        d_sub = d[:, None] * sc.to(torch.float32)
        L = _requantize(x, L, d_sub, -32, 31)

        L = L.reshape(n, 2, 4, 32)  # [half, quarter, l]
        ql = torch.stack(  # [half, 0: quarters 0|2, 1: quarters 1|3, l]
            [(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], dim=2
        )
        qh = L[:, :, 0] >> 4
        for q in range(1, 4):
            qh = qh | ((L[:, :, q] >> 4) << (2 * q))
        out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc & 0xFF, d_bytes], dim=1)
        out = torch.where(empty[:, None], 0, out)
        return (out & 0xFF).to(torch.uint8)
