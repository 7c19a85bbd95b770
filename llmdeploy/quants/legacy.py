"""The legacy 32-value block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Reference: gguf-py's numpy code (byte-exact with ggml).
"""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .gguf_py import GgufPyQuantize


class Q8_0(GgufPyQuantize, qtype=GGMLQuantizationType.Q8_0):
    pass


class Q4_0(GgufPyQuantize, qtype=GGMLQuantizationType.Q4_0):
    pass


class Q4_1(GgufPyQuantize, qtype=GGMLQuantizationType.Q4_1):
    pass


class Q5_0(GgufPyQuantize, qtype=GGMLQuantizationType.Q5_0):
    pass


class Q5_1(GgufPyQuantize, qtype=GGMLQuantizationType.Q5_1):
    pass
