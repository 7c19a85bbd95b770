"""Dequantization through gguf-py, and the types llmdeploy reads but does not write.

gguf-py's numpy dequantizers equal ggml's ``dequantize_row_*`` (tested here
against libggml for every type), so llmdeploy uses them instead of rewriting
them.  gguf-py's *quantizers* are not used: they differ from ggml on blocks of
signed zeros (its ``argmax`` picks a -0.0 where ggml's strict search keeps +0).
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
