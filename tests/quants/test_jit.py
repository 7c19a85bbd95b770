"""The scalar float helpers every numba kernel shares, checked against numpy on raw bit patterns."""

from __future__ import annotations

import numpy as np
import pytest

from llmdeploy.quants import _jit

if not _jit.AVAILABLE:  # pragma: no cover
    pytest.skip(f"numba unavailable: {_jit.UNAVAILABLE_REASON}", allow_module_level=True)


@_jit.kernel
def _apply(a, fp16_bits, hw_bits, near, rounded, roundf):  # type: ignore[no-untyped-def]
    for i in range(a.size):
        fp16_bits[i] = _jit.fp32_to_fp16_bits(a[i])
        hw_bits[i] = _jit.fp16_bits(a[i])
        near[i] = _jit.nearest_int(a[i])
        rounded[i] = _jit.fp16_round(a[i])
        if abs(a[i]) < 1e18:
            roundf[i] = _jit.roundf(a[i])


def _bit_patterns() -> np.ndarray:
    rng = np.random.default_rng(0)
    edges = np.array(
        [0, 0x80000000, 1, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,  # zeros, subnormal, inf, nan
         0x477FF000, 0x477FEFFF, 0x477FE000,  # 65520 (rounds to inf), just below, 65504
         0x38800000, 0x387FFFFF, 0x33000000, 0x33000001, 0x32FFFFFF],  # fp16 normal/subnormal edges
        np.uint32,
    )  # fmt: skip
    return np.concatenate([
        edges,
        rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32),
        rng.integers(0x30000000, 0x48000000, 400_000).astype(np.uint32),  # around the fp16 range
    ]).view(np.float32)  # fmt: skip


def test_fp16_conversion_nearest_int_and_roundf_match_numpy_and_ggml_definitions() -> None:
    a = _bit_patterns()
    n = a.size
    fp16_bits, hw_bits, near = np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.int64)
    rounded, roundf = np.zeros(n, np.float32), np.zeros(n, np.int64)
    _apply(a, fp16_bits, hw_bits, near, rounded, roundf)
    with np.errstate(all="ignore"):
        expected_fp16 = a.astype(np.float16)  # numpy: RNE, overflow to inf, nan keeps its sign
        # ggml's nearest_int, literally: the 1.5*2**23 bit trick, garbage out of range included
        expected_near = ((a + np.float32(12582912)).view(np.int32) & 0x7FFFFF) - 0x400000
    nan = np.isnan(a)
    np.testing.assert_array_equal(fp16_bits[~nan], expected_fp16.view(np.uint16)[~nan])
    np.testing.assert_array_equal(hw_bits[~nan], expected_fp16.view(np.uint16)[~nan])
    np.testing.assert_array_equal(fp16_bits[nan] & 0x7FFF, 0x7E00)  # ggml's quiet nan ...
    np.testing.assert_array_equal(fp16_bits[nan] >> 15, a[nan].view(np.uint32) >> 31)  # ... with the sign kept
    np.testing.assert_array_equal(near, expected_near)
    np.testing.assert_array_equal(rounded[~nan], expected_fp16[~nan].astype(np.float32))
    small = np.abs(a) < 1e18
    c_roundf = np.sign(a[small]) * np.floor(np.abs(a[small]).astype(np.float64) + 0.5)  # half away from zero
    np.testing.assert_array_equal(roundf[small], c_roundf.astype(np.int64))
    default_nan = np.array([0xFFC00000], np.uint32).view(np.float32)  # what x86 arithmetic makes
    _apply(default_nan, fp16_bits[:1], hw_bits[:1], near[:1], rounded[:1], roundf[:1])
    assert fp16_bits[0] == hw_bits[0] == 0xFE00
