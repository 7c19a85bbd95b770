"""Ternary types TQ1_0 and TQ2_0 (BitNet b1.58 style: values in {-d, 0, +d}).

Both quantize 256-value blocks as ggml's ``quantize_row_tq1_0_ref`` /
``quantize_row_tq2_0_ref`` do: ``d = max|x|`` (no divisor), ``id = d ? 1/d :
0`` and the trit ``t = lroundf(x*id) + 1`` in {0, 1, 2} (``lroundf`` rounds
half away from zero, so ``t`` is 0 for ``x*id <= -0.5`` and 2 for ``>= 0.5``).

Block layouts (``d`` is fp16, little-endian)::

    TQ2_0 (66 bytes)  qs[64] | d
        2 bits per trit: qs[32c + m] = t[128c + m] | t[128c + m + 32] << 2
                                       | t[128c + m + 64] << 4 | t[128c + m + 96] << 6

    TQ1_0 (54 bytes)  qs[48] | qh[4] | d
        5 trits per byte, base 3, first trit most significant:
        q = 81*t0 + 27*t1 + 9*t2 + 3*t3 + t4 (0..242), stored as
        ceil(q * 256 / 243) = (q*256 + 242) // 243, so that the byte is a
        fixed-point fraction q/243 and trit n is ``(byte * 3**n) & 0xFF``'s
        top "digit": ``((byte * 3**n) & 0xFF) * 3 >> 8``.
        qs[m],      m < 32: trits of values m + 32n,        n = 0..4 (values 0..159)
        qs[32 + m], m < 16: trits of values 160 + m + 16n,  n = 0..4 (values 160..239)
        qh[j],      j < 4:  trits of values 240 + j + 4n,   n = 0..3 (values 240..255),
                            a fifth trit 0 appended (q *= 3) before scaling.

If ``d`` is a float32 subnormal below 2**-128, ``1/d`` overflows to inf, every ``x*id`` is
+-inf or NaN and glibc's ``lroundf`` returns LONG_MIN for them, whose low 32
bits plus one are 1: every trit is 1, exactly what ``id = 0`` gives.

Two implementations: the reference ``quantize_blocks`` (a port of ggml's
loops to eager torch, vectorized across blocks, byte-identical on the CPU and
on a CUDA GPU; it selects the subnormal case explicitly) and the numba fast
kernels (CPU).  Dequantization goes through gguf-py.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import _jit
from ._jit import F32, fp16_bits
from .float import _fp16_bytes
from .gguf_py import GgufPyDequantize
from .legacy import _inverse, _roundf

_ZERO = F32(0.0)
_HALF = F32(0.5)
_ONE = F32(1.0)
_INF = F32(np.inf)
_ABS_MASK = np.int32(0x7FFFFFFF)


# =========================================================================== reference (torch)
#
# A port of ggml's quantize_row_tq{1,2}_0_ref, vectorized across blocks, in
# eager torch on any device (see legacy.py for the rules that keep it
# byte-identical on CPU and CUDA).


def _trits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 256) float32 -> d (n,) and the trits ``lroundf(x*id) + 1`` (n, 256) int32."""
    d = x.abs().amax(dim=1)  # ggml's MAX(amax, fabsf(v)) from 0: a max is exact in any order (finite input)
    id_ = _inverse(d)
    v = x * id_[:, None]
    # Finite v lies within [-1, 1] (to float32 rounding).  If d is a subnormal
    # below 2**-128, id is inf and v is +-inf or NaN (0*inf): glibc's lroundf
    # returns LONG_MIN for those, ``int xi`` keeps its low 32 bits, 0, and the
    # trit is 1.  Selected here, so that no NaN or inf reaches a cast (whose
    # result differs between CPU and CUDA).
    finite = torch.isfinite(v)
    r = _roundf(torch.where(finite, v, 0.0)).to(torch.int32)
    return d, torch.where(finite, r, 0) + 1


def _base3(t: torch.Tensor, n_trits: int, width: int) -> torch.Tensor:
    """(n, n_trits*width) trits -> (n, width): ``q = q*3 + t`` over trits m + width*k, k = 0..n_trits-1."""
    groups = t.reshape(t.shape[0], n_trits, width)
    q = torch.zeros_like(groups[:, 0])
    for k in range(n_trits):
        q = q * 3 + groups[:, k]
    return q


# =========================================================================== numba kernels
#
# As for the legacy types (see legacy.py), loops take their bounds from the
# array shape so that LLVM vectorizes rather than fully unrolls them, and the
# arrays are indexed, never sliced, in the block loop.

if _jit.AVAILABLE:
    from ._jit import bits_f32, f32_bits

    @_jit.helper
    def _inverse_scale(blocks, b):  # type: ignore[no-untyped-def]
        """(d, id) of block b: d = max|x| (int max over the magnitude bits), id = 1/d or 0."""
        a = np.int32(0)
        for j in range(blocks.shape[1]):
            a = max(a, np.int32(f32_bits(blocks[b, j]) & _ABS_MASK))
        d = bits_f32(a)
        id_ = _ONE / d if d != _ZERO else _ZERO
        if id_ == _INF:  # d subnormal: all trits 1 in ggml, as id 0 gives
            id_ = _ZERO
        return d, id_

    @_jit.helper
    def _trit(v):  # type: ignore[no-untyped-def]
        """lroundf(v) + 1 for |v| <= 1 (to float32 rounding), branch-free."""
        return np.int32(1) + np.int32(v >= _HALF) - np.int32(v <= -_HALF)

    @_jit.helper
    def _put_fp16(out, b, at, v):  # type: ignore[no-untyped-def]
        h = fp16_bits(v)
        out[b, at] = np.uint8(h & 0xFF)
        out[b, at + 1] = np.uint8(h >> 8)

    @_jit.kernel
    def _tq2_0_kernel(blocks, out):  # type: ignore[no-untyped-def]
        w = blocks.shape[1] >> 3  # 32 bytes per 128 values
        for b in range(blocks.shape[0]):
            d, id_ = _inverse_scale(blocks, b)
            for c in range(2):
                base = 4 * w * c
                for m in range(w):
                    q = _trit(blocks[b, base + m] * id_)
                    q |= _trit(blocks[b, base + m + w] * id_) << 2
                    q |= _trit(blocks[b, base + m + 2 * w] * id_) << 4
                    q |= _trit(blocks[b, base + m + 3 * w] * id_) << 6
                    out[b, w * c + m] = np.uint8(q)
            _put_fp16(out, b, 2 * w, d)

    @_jit.helper
    def _tq1_byte(q):  # type: ignore[no-untyped-def]
        """ceil(q * 256 / 243) for a base-3 number q of 5 trits (0..242)."""
        return np.uint8((q * np.int32(256) + np.int32(242)) // np.int32(243))

    @_jit.kernel
    def _tq1_0_kernel(blocks, out):  # type: ignore[no-untyped-def]
        w = blocks.shape[1] >> 3  # 32: the widths below are w, w/2 and w/8
        h = w >> 1
        for b in range(blocks.shape[0]):
            d, id_ = _inverse_scale(blocks, b)
            for m in range(w):  # values 0..159
                q = _trit(blocks[b, m] * id_)
                for n in range(1, 5):
                    q = q * np.int32(3) + _trit(blocks[b, m + w * n] * id_)
                out[b, m] = _tq1_byte(q)
            for m in range(h):  # values 160..239
                q = _trit(blocks[b, 5 * w + m] * id_)
                for n in range(1, 5):
                    q = q * np.int32(3) + _trit(blocks[b, 5 * w + m + h * n] * id_)
                out[b, w + m] = _tq1_byte(q)
            for j in range(4):  # values 240..255: 4 trits, then a zero trit
                q = _trit(blocks[b, 5 * w + 5 * h + j] * id_)
                for n in range(1, 4):
                    q = q * np.int32(3) + _trit(blocks[b, 5 * w + 5 * h + j + 4 * n] * id_)
                out[b, w + h + j] = _tq1_byte(q * np.int32(3))
            _put_fp16(out, b, w + h + 4, d)

else:  # pragma: no cover - numba missing
    _tq1_0_kernel = _tq2_0_kernel = None


# =========================================================================== types
#
# quantize_blocks: float32 (n, 256) on any device -> uint8 (n, type_size) on
# the same device, ggml's bytes.


class TQ1_0(GgufPyDequantize, qtype=GGMLQuantizationType.TQ1_0):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, t = _trits(blocks)
        q = torch.cat(
            [
                _base3(t[:, :160], 5, 32),  # qs[0:32]
                _base3(t[:, 160:240], 5, 16),  # qs[32:48]
                _base3(t[:, 240:], 4, 4) * 3,  # qh[0:4]: a fifth trit 0
            ],
            dim=1,
        )
        qs = torch.div(q * 256 + (243 - 1), 243, rounding_mode="floor")  # ceil(q * 256 / 243), 0..255
        return torch.cat([qs.to(torch.uint8), _fp16_bytes(d)], dim=1)

    fast_kernel = staticmethod(_tq1_0_kernel) if _tq1_0_kernel is not None else None


class TQ2_0(GgufPyDequantize, qtype=GGMLQuantizationType.TQ2_0):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d, t = _trits(blocks)
        t = (t & 3).reshape(-1, 2, 4, 32)  # [block, 128-value half c, n, m] = value 128c + 32n + m
        qs = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
        return torch.cat([qs.reshape(-1, 64).to(torch.uint8), _fp16_bytes(d)], dim=1)

    fast_kernel = staticmethod(_tq2_0_kernel) if _tq2_0_kernel is not None else None
