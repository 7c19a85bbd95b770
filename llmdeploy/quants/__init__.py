"""GGUF block kernels: quantize and dequantize every GGUF block type, byte-identical to ggml.

>>> import numpy as np
>>> from llmdeploy import quants
>>> x = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
>>> data = quants.quantize(x, "q4_k")          # uint8, shape (4, 144): ggml's bytes
>>> y = quants.dequantize(data, "Q4_K")        # float32, shape (4, 256)
"""

from __future__ import annotations

# Importing the family modules registers their types.
from . import float, gguf_py, iq4, k_affine, k_symmetric, legacy, ternary  # noqa: F401
from .base import (
    QuantType,
    default_threads,
    dequantize,
    quant_type,
    quantizable_type_names,
    quantize,
    supported_type_names,
)

__all__ = [
    "QuantType",
    "default_threads",
    "dequantize",
    "quant_type",
    "quantizable_type_names",
    "quantize",
    "supported_type_names",
]
