"""Regressions for F32, F16 and BF16 (llmdeploy/quants/float.py), checked against ggml."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from llmdeploy import quants
from llmdeploy.quants import _jit

from .gpu import requires_cuda

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

FLOATS = [T.F32, T.F16, T.BF16]


def backends(qtype: T) -> list[str]:
    has_fast = quants.quant_type(qtype).fast_kernel is not None and _jit.AVAILABLE
    return ["reference", "fast"] if has_fast else ["reference"]


def both_backends(x: np.ndarray, qtype: T) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(1, -1)
    expected = ggml.quantize(x, qtype)
    for backend in backends(qtype):
        np.testing.assert_array_equal(quants.quantize(x, qtype, backend=backend, threads=1), expected, err_msg=backend)
    return expected


def _bits(*words: int) -> np.ndarray:
    return np.array(words, np.uint32).view(np.float32)


# fp16 edges: largest finite (65504), the overflow threshold 65520 (ties to
# inf), just below it, smallest normal and subnormal, the half-way point to
# zero (2**-25, ties to 0) and just above it, a tie to even, float32
# subnormals, and signed zeros.
F16_EDGES = np.concatenate(
    [
        np.array([65504.0, 65519.996, 65520.0, 1e6, 6.1035156e-05, 6.097555e-05, 5.9604645e-08], np.float32),
        _bits(0x33000000, 0x33000001, 0x32FFFFFF, 0x3F801000, 0x3F803000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF),
        np.array([0.0, -0.0, 1.0, -1.0, 1.0009766, 2049.0, 2051.0], np.float32),
    ]
)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_f16_rounding_edges(sign: float) -> None:
    data = both_backends(F16_EDGES * np.float32(sign), T.F16)
    h = data.view("<u2")[0]
    assert h[2] == (0x7C00 if sign > 0 else 0xFC00)  # 65520 rounds to inf
    assert h[1] & 0x7FFF == 0x7BFF  # 65519.996 to 65504


def test_f16_random_bit_patterns() -> None:
    u = np.random.default_rng(0).integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    both_backends(np.where(np.isfinite(x), x, np.float32(0.0)), T.F16)


def test_bf16_rounds_to_nearest_even() -> None:
    # Low halves exactly 0x8000 round to even; the largest float32 rounds up to inf.
    x = _bits(0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00008000, 0x80000000)
    data = both_backends(x, T.BF16).view("<u2")[0]
    assert data.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0xFF80, 0x0000, 0x8000]


def test_f32_is_a_bit_exact_copy() -> None:
    x = _bits(0x80000000, 0x00000001, 0x7F7FFFFF, 0x3F800000, 0xFF7FFFFF, 0x00800000)
    data = both_backends(x, T.F32)
    assert data.view(np.uint32)[0].tolist() == x.view(np.uint32).tolist()


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_fast_equals_reference_across_chunks(qtype: T) -> None:
    # More than one 2**18-value chunk, on two threads, with an odd tail.
    x = np.random.default_rng(int(qtype)).standard_normal((3, 100_003)).astype(np.float32)
    ours = {b: quants.quantize(x, qtype, backend=b, threads=2) for b in backends(qtype)}
    expected = ggml.quantize(x, qtype)
    for backend, data in ours.items():
        np.testing.assert_array_equal(data, expected, err_msg=backend)


def _edge_values() -> np.ndarray:
    """The F16/BF16 edges of both signs, then random bit patterns (NaN and inf included)."""
    u = np.random.default_rng(1).integers(0, 2**32, 1 << 14, dtype=np.uint64).astype(np.uint32)
    bf16_edges = _bits(0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00008000)
    nans = _bits(0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7F800000, 0xFF800000)
    return np.concatenate([F16_EDGES, -F16_EDGES, bf16_edges, nans, u.view(np.float32)])


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_reference_non_finite_values_match_ggml(qtype: T) -> None:
    # quantize() rejects NaN and inf, but the reference is written to give
    # ggml's bytes for them too: F16 NaN -> sign | 0x7E00, BF16 NaN truncated and quieted.
    x = _edge_values()
    ours = quants.quant_type(qtype).quantize_blocks(torch.from_numpy(x[:, None])).numpy()
    np.testing.assert_array_equal(ours.reshape(-1), ggml.quantize(x[None], qtype).reshape(-1))


@requires_cuda
@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_reference_on_cuda_matches_ggml(qtype: T) -> None:
    x = _edge_values()
    ours = quants.quant_type(qtype).quantize_blocks(torch.from_numpy(x[:, None]).cuda()).cpu().numpy()
    np.testing.assert_array_equal(ours.reshape(-1), ggml.quantize(x[None], qtype).reshape(-1))
