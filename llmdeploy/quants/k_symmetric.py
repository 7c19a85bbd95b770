"""K-quants with a signed scale per sub-block and no min: Q3_K, Q6_K.  (quantize: TODO)"""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .gguf_py import GgufPyDequantize


class Q3_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q3_K):
    pass


class Q6_K(GgufPyDequantize, qtype=GGMLQuantizationType.Q6_K):
    pass
