"""Non-linear 4-bit types IQ4_NL and IQ4_XS.

Both store, per 32 values, sixteen bytes of 4-bit indices into the fixed
non-linear grid ``KVALUES`` (llama.cpp's ``kvalues_iq4nl``); a value decodes
as ``scale * KVALUES[index]``.

Block layouts (little-endian)::

    IQ4_NL  (32 values, 18 bytes)    d:fp16 | qs[16]
    IQ4_XS (256 values, 136 bytes)   d:fp16 | scales_h:u16 | scales_l[4] | qs[128]

``qs`` holds each 32-value group as 16 bytes: byte ``j`` packs the index of
value ``j`` in its low nibble and that of value ``j + 16`` in its high nibble.
IQ4_XS gives each of its eight 32-value sub-blocks a 6-bit signed scale
``l`` in [-32, 31], stored biased as ``l + 32`` in [0, 63] and split: the low
4 bits of sub-block ``ib`` go to nibble ``ib % 2`` of ``scales_l[ib // 2]``
(even sub-blocks low nibble), the high 2 bits to bits ``2*ib, 2*ib+1`` of
``scales_h``.  Sub-block ``ib`` decodes with scale ``d * l``.

The quantizer is ggml's ``ggml_quantize_chunk`` without an imatrix, which for
these types runs ``quantize_iq4_nl`` / ``quantize_iq4_xs`` -> the shared
``quantize_row_iq4_nl_impl`` with ``ntry=7`` (the ``*_ref`` functions pass
``ntry=-1`` and give other bytes).  Per 32-value sub-block, weights
``w = x*x``:

1. ``max`` = the value of largest ``|x|`` (first occurrence, sign kept).  If
   ``|max| < 1e-15`` the sub-block scale is 0.
2. 16 candidate inverse scales: ``1 / (max / 127)`` first, then
   ``(t - 127) / max`` for ``t = -7..7``.  For each, every value is mapped
   to its nearest grid index ``best_index(id * x)`` and the float32 sums
   ``sumqx += (w*q)*x`` and ``sumq2 += (w*q)*q`` are accumulated in element
   order.  The first candidate sets ``d = sumqx/sumq2`` (0 if ``sumq2 <= 0``)
   and ``best = d*sumqx``; each later one replaces them when
   ``sumq2 > 0 and sumqx*sumqx > best*sumq2``.  The candidates' sums are
   independent of each other, so they are computed side by side and only the
   replacement scan runs in candidate order.
3. IQ4_NL: ``d`` is stored as fp16 and the indices are recomputed with
   ``1/d`` (the float32 ``d``, not its fp16 rounding; 0 when ``d == 0``).
   IQ4_XS: the super-block scale is ``-dmax/32`` where ``dmax`` is the
   sub-block ``d`` of largest ``|d|`` (first occurrence); each sub-block gets
   ``l = clamp(nearest_int(d_sub / D), -32, 31)`` and its indices are
   recomputed with ``1 / (D * l)`` (0 when that is 0), ``D`` again float32.

Two implementations write these bytes: ``quantize_blocks``, the reference,
readable eager torch vectorized across (sub-)blocks that runs on the CPU or a
GPU; and the numba fast kernel (CPU only), one sub-block at a time with the 16
candidates as vector lanes.  Dequantization is gguf-py's.

Exactness notes.  Every operation is float32 in ggml's association order:
products are evaluated left to right (``(w*q)*x`` and ``w*(q*x)`` round
differently) and sums sequentially.  ggml's ``best_index_int8`` (a binary
search, then ``x - lo < hi - x ? lo : hi`` with float32 subtractions) equals
counting the grid midpoints ``m`` with ``not (x < m)``: the subtractions round,
but checking every float32 near each midpoint shows the switch happens
exactly at the midpoint, which goes to the upper index.  Written with
``not <`` a NaN input gives 15, as ggml's search does.  Inputs with
``|x| > ~1.8e19`` make ``w`` infinite and the sums inf or NaN; the formulas
above then reproduce ggml's bytes as they are, including a NaN scale (fp16
``0xFE00``: x86's default NaN is negative).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import _jit
from ._jit import F32, fp32_to_fp16_bits, nearest_int
from .gguf_py import GgufPyDequantize

#: llama.cpp's ``kvalues_iq4nl``: the 16 grid points.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
#: Midpoints between neighbouring grid points (exact in float32): best_index thresholds.
_MID = ((KVALUES[:-1] + KVALUES[1:]) / np.float32(2)).astype(np.float32)
#: Gaps between neighbouring grid points: KVALUES[i] == KVALUES[0] + sum(_STEP[:i]).
_STEP = np.diff(KVALUES).astype(np.float32)
#: Numerators of the 15 trial inverse scales ``(t + KVALUES[0]) / max``, t = -7..7.
_TRY_NUM = np.arange(-7, 8, dtype=np.float32) + KVALUES[0]

_EPS = F32(1e-15)  # GROUP_MAX_EPS
_ZERO = F32(0.0)
_ONE = F32(1.0)
_KV0 = KVALUES[0]
_NTRY = _TRY_NUM.size
_NCAND = _NTRY + 1  # the initial 1/d candidate, then the trials
_NMID = _MID.size


# --------------------------------------------------------------------------- reference (torch)
#
# Eager float32 torch: the same bytes on CPU and CUDA tensors.  Blocks
# (sub-blocks) are the vectorized dimension; the Python loops run only over
# element indices, candidates and sub-block numbers, in ggml's order.
# Device-independence rests on a few rules:
#
# * Every sum is ``acc = acc + term`` in element order; products are separate
#   ops (no fused multiply-add can form).
# * Divisions are tensor / tensor.  ``1.0 / t`` is ``t.reciprocal() * 1.0`` in
#   torch, and on CUDA ``t / python_float`` is ``t * (1 / python_float)``: both
#   may differ from the IEEE quotient ggml computes.  (``/ 32`` is exact either
#   way: a power of two.)
# * The inputs are finite (NaN and inf are rejected before quantizing), so a
#   NaN here only comes from an invalid operation (inf - inf, 0 * inf,
#   inf / inf).  On x86, where ggml runs, that NaN is the default NaN
#   0xFFC00000, and NaNs derived from it keep it.  CUDA's NaN is 0x7FFFFFFF,
#   so the two places where NaN bits matter (the fp16 scale and nearest_int)
#   select x86's result explicitly; comparisons and best_index do not look at
#   NaN bits.


def _grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``KVALUES``, ``_MID`` and ``_TRY_NUM`` as float32 tensors on ``device``."""
    kv, mid, try_num = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (KVALUES, _MID, _TRY_NUM))
    return kv, mid, try_num


def _best_index(a: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8, elementwise (int64): midpoints not above ``a`` (NaN -> 15)."""
    return (~(a.unsqueeze(-1) < mid)).sum(dim=-1)  # a count of booleans: exact in any order


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (int32): float32 add of 1.5 * 2**23, then the low mantissa bits.
    +-inf gives -4194304.  x86's NaN (0xFFC00000) gives 0; CUDA's would not, so NaN
    is mapped to 0 explicitly."""
    r = ((v + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000
    return torch.where(torch.isnan(v), 0, r)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) int32 byte values: fp16 little-endian, round to nearest even
    (overflow to inf).  NaN is x86's default NaN, negative: 0xFE00."""
    bits = d.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = torch.where(torch.isnan(d), 0xFE00, bits)
    return torch.stack([bits & 0xFF, bits >> 8], dim=1)


def _pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """(..., 32) indices -> (..., 16) byte values: value j low nibble, value j+16 high nibble."""
    return idx[..., :16] | (idx[..., 16:] << 4)


def _sub_block_scales(x: torch.Tensor) -> torch.Tensor:
    """(m, 32) float32 sub-blocks -> (m,) float32 scale ``d`` chosen by ggml's search (ntry=7)."""
    m, dev = x.shape[0], x.device
    kv, mid, try_num = _grid(dev)
    one = torch.ones((), dtype=torch.float32, device=dev)
    eps = torch.tensor(1e-15, dtype=torch.float32, device=dev)  # GROUP_MAX_EPS = 1e-15f
    # max = the value of largest |x|: ggml's strict `>` scan, so the first occurrence wins
    amax = torch.zeros(m, dtype=torch.float32, device=dev)
    mx = torch.zeros(m, dtype=torch.float32, device=dev)
    for j in range(x.shape[1]):
        ax = x[:, j].abs()
        better = ax > amax
        amax = torch.where(better, ax, amax)
        mx = torch.where(better, x[:, j], mx)
    skip = amax < eps
    mx = torch.where(skip, one, mx)  # any nonzero value: skipped rows are zeroed below
    # 16 candidate inverse scales: id = 1/d with d = -max/values[0], then (t + values[0])/max
    ids = torch.cat([(one / (-mx / kv[0])).unsqueeze(1), try_num / mx.unsqueeze(1)], dim=1)
    w = x * x
    sumqx = torch.zeros(m, _NCAND, dtype=torch.float32, device=dev)
    sumq2 = torch.zeros(m, _NCAND, dtype=torch.float32, device=dev)
    for j in range(x.shape[1]):  # element order, as ggml accumulates; candidates side by side
        xj = x[:, j].unsqueeze(1)
        q = kv[_best_index(ids * xj, mid)]
        wq = w[:, j].unsqueeze(1) * q  # (w*q)*x and (w*q)*q: ggml's association
        sumqx = sumqx + wq * xj
        sumq2 = sumq2 + wq * q
    d = torch.where(sumq2[:, 0] > 0, sumqx[:, 0] / sumq2[:, 0], 0.0)
    best = d * sumqx[:, 0]
    for t in range(1, _NCAND):  # candidate order: a later equal score does not replace
        sqx, sq2 = sumqx[:, t], sumq2[:, t]
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / sq2, d)
        best = torch.where(better, d * sqx, best)
    return torch.where(skip, 0.0, d)


def _quantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    x = blocks.to(torch.float32)
    _, mid, _ = _grid(x.device)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    d = _sub_block_scales(x)
    inv = torch.where(d != 0, one / d, 0.0)  # the float32 d, not its fp16 rounding; NaN != 0
    idx = _best_index(inv.unsqueeze(1) * x, mid)
    out = torch.cat([_fp16_bytes(d), _pack_nibbles(idx)], dim=1)
    return out.to(torch.uint8)


def _quantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    x = blocks.to(torch.float32)
    n, dev = x.shape[0], x.device
    _, mid, _ = _grid(dev)
    one = torch.ones((), dtype=torch.float32, device=dev)
    sub = x.reshape(n, 8, 32)
    scales = _sub_block_scales(sub.reshape(n * 8, 32)).reshape(n, 8)
    # the sub-block scale of largest |d|, first occurrence (NaN never wins)
    amax = torch.zeros(n, dtype=torch.float32, device=dev)
    dmax = torch.zeros(n, dtype=torch.float32, device=dev)
    for ib in range(8):
        a = scales[:, ib].abs()
        better = a > amax
        amax = torch.where(better, a, amax)
        dmax = torch.where(better, scales[:, ib], dmax)
    d = -dmax / 32  # exact; -0.0 for an all-zero super-block: fp16 0x8000
    inv = torch.where(d != 0, one / d, 0.0)
    ls = _nearest_int(inv.unsqueeze(1) * scales).clamp(-32, 31)  # (n, 8) int32
    dl = d.unsqueeze(1) * ls.to(torch.float32)
    idl = torch.where(dl != 0, one / dl, 0.0)
    idx = _best_index(idl.unsqueeze(2) * sub, mid)  # (n, 8, 32)
    biased = ls + 32  # l + 32 in [0, 63]
    scales_h = torch.zeros(n, dtype=torch.int32, device=dev)
    for ib in range(8):  # high 2 bits of sub-block ib -> bits 2*ib, 2*ib+1
        scales_h = scales_h | ((biased[:, ib] >> 4) << (2 * ib))
    low = biased & 0xF
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)  # even sub-blocks in the low nibble
    out = torch.cat(
        [
            _fp16_bytes(d),
            torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1),
            scales_l,
            _pack_nibbles(idx).reshape(n, 128).to(torch.int32),
        ],
        dim=1,
    )
    return out.to(torch.uint8)


# --------------------------------------------------------------------------- numba kernels
#
# Layout: one 32-value sub-block at a time, with the 16 candidate inverse
# scales as the vector lanes.  For each value (in element order, so each
# lane's sums accumulate exactly as ggml's) the inner loop over the 16
# candidates is branch-free: the grid value is built as KVALUES[0] plus the
# gaps of the midpoints it has passed (integer-valued float32 sums: exact).


@_jit.helper
def _nb_best_index(a):  # type: ignore[no-untyped-def]
    n = 0
    for k in range(_NMID):
        n += not (a < _MID[k])
    return n


@_jit.helper
def _nb_sub_block_scale(x, base, ids, sumqx, sumq2):  # type: ignore[no-untyped-def]
    """ggml's scale search (ntry=7) over x[base:base+32]; ids/sumqx/sumq2 are scratch[16]."""
    amax = _ZERO
    mx = _ZERO
    for j in range(32):
        ax = abs(x[base + j])
        if ax > amax:
            amax = ax
            mx = x[base + j]
    if amax < _EPS:
        return _ZERO
    ids[0] = _ONE / (-mx / _KV0)
    for t in range(_NTRY):
        ids[t + 1] = _TRY_NUM[t] / mx
    for t in range(_NCAND):
        sumqx[t] = _ZERO
        sumq2[t] = _ZERO
    for j in range(32):
        xj = x[base + j]
        w = xj * xj
        for t in range(_NCAND):
            a = ids[t] * xj
            q = _KV0
            for k in range(_NMID):
                q += _STEP[k] if not (a < _MID[k]) else _ZERO
            wq = w * q
            sumqx[t] += wq * xj
            sumq2[t] += wq * q
    d = sumqx[0] / sumq2[0] if sumq2[0] > _ZERO else _ZERO
    best = d * sumqx[0]
    for t in range(1, _NCAND):
        if sumq2[t] > _ZERO and sumqx[t] * sumqx[t] > best * sumq2[t]:
            d = sumqx[t] / sumq2[t]
            best = d * sumqx[t]
    return d


@_jit.helper
def _nb_pack(x, base, inv, out, b, ob):  # type: ignore[no-untyped-def]
    """Indices of x[base:base+32] at inverse scale inv, packed into out[b, ob:ob+16]."""
    for j in range(16):
        lo = _nb_best_index(inv * x[base + j])
        hi = _nb_best_index(inv * x[base + 16 + j])
        out[b, ob + j] = lo | (hi << 4)


@_jit.kernel
def _iq4_nl_kernel(blocks, out):  # type: ignore[no-untyped-def]
    ids = np.empty(_NCAND, np.float32)
    sumqx = np.empty(_NCAND, np.float32)
    sumq2 = np.empty(_NCAND, np.float32)
    for b in range(blocks.shape[0]):
        x = blocks[b]
        d = _nb_sub_block_scale(x, 0, ids, sumqx, sumq2)
        h = fp32_to_fp16_bits(d)
        out[b, 0] = h & 0xFF
        out[b, 1] = (h >> 8) & 0xFF
        inv = _ONE / d if d != _ZERO else _ZERO
        _nb_pack(x, 0, inv, out, b, 2)


@_jit.kernel
def _iq4_xs_kernel(blocks, out):  # type: ignore[no-untyped-def]
    ids = np.empty(_NCAND, np.float32)
    sumqx = np.empty(_NCAND, np.float32)
    sumq2 = np.empty(_NCAND, np.float32)
    scales = np.empty(8, np.float32)
    for b in range(blocks.shape[0]):
        x = blocks[b]
        amax = _ZERO
        dmax = _ZERO
        for ib in range(8):
            s = _nb_sub_block_scale(x, 32 * ib, ids, sumqx, sumq2)
            scales[ib] = s
            if abs(s) > amax:
                amax = abs(s)
                dmax = s
        d = -dmax / F32(32.0)
        h = fp32_to_fp16_bits(d)
        out[b, 0] = h & 0xFF
        out[b, 1] = (h >> 8) & 0xFF
        inv = _ONE / d if d != _ZERO else _ZERO
        scales_h = 0
        for ib in range(8):
            l = min(31, max(-32, nearest_int(inv * scales[ib])))
            dl = d * F32(l)
            idl = _ONE / dl if dl != _ZERO else _ZERO
            _nb_pack(x, 32 * ib, idl, out, b, 8 + 16 * ib)
            l += 32
            scales_h |= (l >> 4) << (2 * ib)
            if ib % 2 == 0:
                out[b, 4 + ib // 2] = l & 0xF
            else:
                out[b, 4 + ib // 2] |= (l & 0xF) << 4
        out[b, 2] = scales_h & 0xFF
        out[b, 3] = (scales_h >> 8) & 0xFF


# --------------------------------------------------------------------------- registry


class IQ4_NL(GgufPyDequantize, qtype=GGMLQuantizationType.IQ4_NL):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 32) on any device -> uint8 (n, 18) on the same device, ggml's bytes."""
        return _quantize_iq4_nl(blocks)

    fast_kernel = staticmethod(_iq4_nl_kernel)


class IQ4_XS(GgufPyDequantize, qtype=GGMLQuantizationType.IQ4_XS):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 256) on any device -> uint8 (n, 136) on the same device, ggml's bytes."""
        return _quantize_iq4_xs(blocks)

    fast_kernel = staticmethod(_iq4_xs_kernel)
