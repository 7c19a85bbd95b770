"""Types whose numpy implementation gguf-py already has, byte-exact with ggml.

gguf-py's quantizers for BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0 and TQ2_0,
and its dequantizers for every type, are tested byte for byte against
libggml upstream (gguf-py/tests/test_quants.py) and again here; llmdeploy
uses them as the reference path instead of rewriting them.  The fast numba
kernels live beside the other kernels of each family.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .base import QuantType


class GgufPyDequantize(QuantType):
    """Dequantize through gguf-py (which equals ggml's ``to_float``)."""

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # inf/nan scales decode to inf/nan, as in ggml
            return gguf_quants.dequantize(data, cls.qtype)


class GgufPyQuantize(GgufPyDequantize):
    """Quantize and dequantize through gguf-py's numpy code."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # overflowing scales are part of ggml's result too
            return gguf_quants.quantize(blocks, cls.qtype)


# Types llmdeploy reads (dequantizes) through gguf-py but does not write.
for _qtype in (
    GGMLQuantizationType.IQ1_S,
    GGMLQuantizationType.IQ1_M,
    GGMLQuantizationType.IQ2_XXS,
    GGMLQuantizationType.IQ2_XS,
    GGMLQuantizationType.IQ2_S,
    GGMLQuantizationType.IQ3_XXS,
    GGMLQuantizationType.IQ3_S,
    GGMLQuantizationType.MXFP4,
    GGMLQuantizationType.NVFP4,
):
    type(_qtype.name, (GgufPyDequantize,), {"__module__": __name__}, qtype=_qtype)
