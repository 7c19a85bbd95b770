"""Unquantized types: F32, F16 and BF16 (written), F64 (read).

What ``ggml_quantize_chunk`` writes for them:

* F32: a plain copy.
* F16: ``ggml_fp32_to_fp16_row``, IEEE binary16 rounded to nearest even,
  float32 values beyond the fp16 range become +-inf, those below it +-0 or
  fp16 subnormals.  numpy's ``astype(np.float16)`` and the x86 F16C
  instruction ``vcvtps2ph`` round exactly the same way.
* BF16: ``ggml_fp32_to_bf16_row_ref``, the top 16 bits of the float32 rounded
  to nearest even, ``(bits + 0x7fff + ((bits >> 16) & 1)) >> 16``; a NaN is
  truncated and forced quiet (``bits >> 16 | 0x40``) instead.

"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from . import _jit
from .base import QuantType
from .gguf_py import GgufPyQuantize


if _jit.HARDWARE_FP16:

    @_jit.kernel
    def _f16_kernel(blocks, out):  # type: ignore[no-untyped-def]
        # Blocks are single values: one flat loop, one uint16 store per value,
        # which LLVM turns into vcvtps2ph on whole vectors.
        x = blocks.reshape(blocks.size)
        o = out.view(np.uint16).reshape(blocks.size)
        for i in range(x.shape[0]):
            o[i] = np.uint16(_jit.fp16_bits(x[i]))

else:
    # Without F16C numpy's conversion (SIMD where it can) is the faster path.
    _f16_kernel = None

if _jit.AVAILABLE:
    from ._jit import f32_bits

    _U16 = np.uint32(16)
    _ROUND = np.uint32(0x7FFF)

    @_jit.kernel
    def _bf16_kernel(blocks, out):  # type: ignore[no-untyped-def]
        # Branch-free (the NaN case is a select), in uint32 like ggml, so the
        # loop vectorizes; the rounding add cannot overflow for a non-NaN.
        x = blocks.reshape(blocks.size)
        o = out.view(np.uint16).reshape(blocks.size)
        for i in range(x.shape[0]):
            u = np.uint32(f32_bits(x[i]))
            rounded = (u + _ROUND + ((u >> _U16) & np.uint32(1))) >> _U16
            quiet_nan = (u >> _U16) | np.uint32(0x40)
            o[i] = np.uint16(quiet_nan if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded)

    @_jit.kernel
    def _f32_kernel(blocks, out):  # type: ignore[no-untyped-def]
        # A copy that counts non-finite values on the way (exponent bits all
        # ones), so the data is read once, like ggml's memcpy.
        x = blocks.reshape(blocks.size)
        o = out.view(np.float32).reshape(blocks.size)
        bad = 0
        for i in range(x.shape[0]):
            v = x[i]
            o[i] = v
            bad += (f32_bits(v) & 0x7F800000) == 0x7F800000
        return bad

else:  # pragma: no cover - numba missing
    _bf16_kernel = _f32_kernel = None


class F32(QuantType, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.float32, copy=False).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float32).copy()

    fast_kernel = staticmethod(_f32_kernel) if _f32_kernel is not None else None
    fast_kernel_counts_non_finite = True


class F16(QuantType, qtype=GGMLQuantizationType.F16):
    # ggml_fp32_to_fp16_row rounds to nearest even and overflows to inf, as numpy does.
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return blocks.astype("<f2").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view("<f2").astype(np.float32)

    fast_kernel = staticmethod(_f16_kernel) if _f16_kernel is not None else None


class BF16(GgufPyQuantize, qtype=GGMLQuantizationType.BF16):
    """bfloat16, rounded to nearest even (gguf-py's numpy code is ggml's ``ggml_compute_fp32_to_bf16``)."""

    fast_kernel = staticmethod(_bf16_kernel) if _bf16_kernel is not None else None


class F64(QuantType, qtype=GGMLQuantizationType.F64):
    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float64).astype(np.float32)
