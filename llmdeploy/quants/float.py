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

This module also provides :func:`fp16_bits`, the fp16 conversion the fast
kernels of the other families use for their block scales: the F16C
instruction where the CPU has one, ``_jit.fp32_to_fp16_bits`` (integer code,
about ten times slower) elsewhere.
"""

from __future__ import annotations

import platform

import numpy as np
from gguf import GGMLQuantizationType

from . import _jit
from .base import QuantType
from .gguf_py import GgufPyQuantize


def _hardware_fp16() -> bool:
    """Whether LLVM lowers a float->half ``fptrunc`` to one instruction for numba's target.

    On x86 that needs F16C (every AVX2 CPU has it); without it LLVM would call
    a compiler-rt routine that numba does not link.  A NUMBA_CPU_NAME or
    NUMBA_CPU_FEATURES override (portable caches) may drop the feature, so
    then the integer code is used.
    """
    if not _jit.AVAILABLE:
        return False
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c", False))
    return machine in ("aarch64", "arm64")


HARDWARE_FP16 = _hardware_fp16()

if HARDWARE_FP16:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _fp16_bits_hw(typingctx, x):  # type: ignore[no-untyped-def]
        """IEEE binary16 bits of a float32 (LLVM ``fptrunc``: round to nearest even)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            half = builder.fptrunc(args[0], ir.HalfType())
            return builder.zext(builder.bitcast(half, ir.IntType(16)), ir.IntType(32))

        return types.int32(types.float32), codegen

    @_jit.helper
    def fp16_bits(f):  # type: ignore[no-untyped-def]
        """fp16 bits of a finite float32, as ggml rounds it (NaN payloads may differ)."""
        return _fp16_bits_hw(np.float32(f))  # (the class F32 below shadows _jit.F32)

    @_jit.kernel
    def _f16_kernel(blocks, out):  # type: ignore[no-untyped-def]
        # Blocks are single values: one flat loop, one uint16 store per value,
        # which LLVM turns into vcvtps2ph on whole vectors.
        x = blocks.reshape(blocks.size)
        o = out.view(np.uint16).reshape(blocks.size)
        for i in range(x.shape[0]):
            o[i] = np.uint16(_fp16_bits_hw(x[i]))

else:
    fp16_bits = _jit.fp32_to_fp16_bits
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
        # A copy; having a kernel at all lets quantize() use its fast finiteness check.
        x = blocks.reshape(blocks.size)
        o = out.view(np.float32).reshape(blocks.size)
        for i in range(x.shape[0]):
            o[i] = x[i]

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
