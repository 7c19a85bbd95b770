"""Ternary types TQ1_0 and TQ2_0 (BitNet b1.58 style: values in {-d, 0, +d}).

Reference: gguf-py's numpy code (byte-exact with ggml).
"""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .gguf_py import GgufPyQuantize


class TQ1_0(GgufPyQuantize, qtype=GGMLQuantizationType.TQ1_0):
    pass


class TQ2_0(GgufPyQuantize, qtype=GGMLQuantizationType.TQ2_0):
    pass
