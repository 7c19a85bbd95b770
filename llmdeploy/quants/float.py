"""Unquantized types: F32, F16 and BF16 (written), F64 (read)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .base import QuantType
from .gguf_py import GgufPyQuantize


class F32(QuantType, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.float32, copy=False).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float32).copy()


class F16(QuantType, qtype=GGMLQuantizationType.F16):
    # ggml_fp32_to_fp16_row rounds to nearest even and overflows to inf, as numpy does.
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return blocks.astype(np.float16).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float16).astype(np.float32)


class BF16(GgufPyQuantize, qtype=GGMLQuantizationType.BF16):
    """bfloat16, rounded to nearest even (gguf-py's numpy code is ggml's ``ggml_compute_fp32_to_bf16``)."""


class F64(QuantType, qtype=GGMLQuantizationType.F64):
    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float64).astype(np.float32)
