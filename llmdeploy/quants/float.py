"""Unquantized types: F32, F16 and BF16 (written), F64 (read).

What ``ggml_quantize_chunk`` writes for them:

* F32: a plain copy.
* F16: ``ggml_fp32_to_fp16_row``, IEEE binary16 rounded to nearest even,
  float32 values beyond the fp16 range become +-inf, those below it +-0 or
  fp16 subnormals.  torch's ``.to(torch.float16)`` (CPU and CUDA) and the x86
  F16C instruction ``vcvtps2ph`` round exactly the same way.
* BF16: ``ggml_fp32_to_bf16_row_ref``, the top 16 bits of the float32 rounded
  to nearest even, ``(bits + 0x7fff + ((bits >> 16) & 1)) >> 16``; a NaN is
  truncated and forced quiet (``bits >> 16 | 0x40``) instead.

Two implementations: the reference ``quantize_blocks`` (eager torch, CPU or
GPU, integer bit arithmetic so every device gives the same bytes) and the
numba fast kernels (CPU).  The torch helpers ``_le_bytes`` and ``_fp16_bytes``
are also what the block types use to store their fp16 scales.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import _jit
from ._jit import f32_bits
from .base import QuantType


# =========================================================================== reference (torch)
#
# Integer bit arithmetic in int32/int64 (torch's unsigned types are limited),
# so the result is the same on every device.


def _le_bytes(v: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """Integer tensor (...) -> uint8 (..., n_bytes): its low n_bytes bytes, little-endian as GGUF stores them."""
    shifts = torch.arange(0, 8 * n_bytes, 8, dtype=torch.int64, device=v.device)
    return ((v.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def _fp16_bits(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 in 0..0xFFFF: ggml's ``GGML_FP32_TO_FP16(v)``.

    Round to nearest even, overflow to +-inf, fp16 subnormals kept: what
    ``.to(torch.float16)`` does on CPU and CUDA alike.  Only NaN differs by
    device (payload kept, or CUDA's canonical 0x7FFF), so it is selected
    explicitly: ggml stores ``sign | 0x7E00``.
    """
    bits = v.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (v.view(torch.int32) >> 16) & 0x8000
    return torch.where(torch.isnan(v), sign | 0x7E00, bits)


def _bf16_bits(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in 0..0xFFFF: ``ggml_compute_fp32_to_bf16``, on the uint32 bits held in int64."""
    u = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    quiet_nan = (u >> 16) | 0x40  # truncated, forced quiet
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # nearest even; cannot carry past bit 31 unless NaN
    return torch.where(is_nan, quiet_nan, rounded)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8: ggml's fp16 of each value, little-endian."""
    return _le_bytes(_fp16_bits(v), 2)


def _value_blocks(blocks: torch.Tensor, bits: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """Per-value bit patterns of single-value blocks -> uint8 (n_blocks, n_bytes)."""
    return _le_bytes(bits, n_bytes).reshape(blocks.shape[0], -1)


@_jit.kernel
def _f16_kernel(blocks, out):  # type: ignore[no-untyped-def]
    # Blocks are single values: one flat loop, one uint16 store per value,
    # which LLVM turns into vcvtps2ph on whole vectors where the CPU has F16C
    # (elsewhere _jit.fp16_bits is the exact integer conversion).
    x = blocks.reshape(blocks.size)
    o = out.view(np.uint16).reshape(blocks.size)
    for i in range(x.shape[0]):
        o[i] = np.uint16(_jit.fp16_bits(x[i]))


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


class F32(QuantType, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 1) on any device -> uint8 (n, 4) on the same device: the bits, copied."""
        return _value_blocks(blocks, blocks.contiguous().view(torch.int32), 4)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float32).copy()

    fast_kernel = staticmethod(_f32_kernel)
    fast_kernel_counts_non_finite = True


class F16(QuantType, qtype=GGMLQuantizationType.F16):
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 1) on any device -> uint8 (n, 2) on the same device, ggml's bytes."""
        return _value_blocks(blocks, _fp16_bits(blocks), 2)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view("<f2").astype(np.float32)

    fast_kernel = staticmethod(_f16_kernel)


class BF16(QuantType, qtype=GGMLQuantizationType.BF16):
    """bfloat16, rounded to nearest even (ggml's ``ggml_compute_fp32_to_bf16``)."""

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n, 1) on any device -> uint8 (n, 2) on the same device, ggml's bytes."""
        return _value_blocks(blocks, _bf16_bits(blocks), 2)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        # a bfloat16 is the top half of a float32: widening is exact (NaN payloads included)
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32)

    fast_kernel = staticmethod(_bf16_kernel)


class F64(QuantType, qtype=GGMLQuantizationType.F64):
    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float64).astype(np.float32)
