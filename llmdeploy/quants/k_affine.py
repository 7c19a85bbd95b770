"""K-quants with a scale and a min per sub-block: Q2_K, Q4_K, Q5_K.  (quantize: TODO)"""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .gguf_py import GgufPyDequantize


class Q2_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q2_K):
    pass


class Q4_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q4_K):
    pass


class Q5_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q5_K):
    pass
