"""Non-linear 4-bit types IQ4_NL and IQ4_XS.  (quantize: TODO)"""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .gguf_py import GgufPyDequantize


class IQ4_NL(GgufPyDequantize, qtype=GGMLQuantizationType.IQ4_NL):
    pass


class IQ4_XS(GgufPyDequantize, qtype=GGMLQuantizationType.IQ4_XS):
    pass
