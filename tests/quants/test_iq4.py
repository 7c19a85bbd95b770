"""Regression tests for IQ4_NL / IQ4_XS quantization (llmdeploy.quants.iq4).

test_oracle.py checks both types on generic cases; these name the details
that decide byte-exactness for the non-linear grid and guard each one
against ggml directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from llmdeploy import quants
from llmdeploy.quants import _jit, iq4

from .cases import mixed_blocks
from .gpu import requires_cuda

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

NL, XS = GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS
BACKENDS = ["reference", "fast"] if _jit.AVAILABLE else ["reference"]


def ours_and_ggml(x: np.ndarray, qtype: GGMLQuantizationType) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x = np.ascontiguousarray(x, np.float32)
    theirs = ggml.quantize(x, qtype)
    ours = {b: quants.quantize(x, qtype, backend=b, threads=1) for b in BACKENDS}
    for backend, got in ours.items():
        assert np.array_equal(got, theirs), f"{qtype.name} {backend} differs from ggml"
    return ours, theirs


def ggml_best_index(x: np.float32) -> int:
    """ggml's best_index_int8 transcribed for one float32: binary search, then the
    float32 comparison of the two distances (ties to the upper index)."""
    val = iq4.KVALUES
    if x <= val[0]:
        return 0
    if x >= val[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < val[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(x - val[hi - 1]) < np.float32(val[hi] - x) else hi


def probe_values() -> np.ndarray:
    """Each midpoint and grid point, 3 float32 steps either side, and the specials."""
    anchors = np.concatenate([iq4._MID, iq4.KVALUES, [0.0, -0.0]]).astype(np.float32)
    probes = [anchors]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        v = anchors
        for _ in range(3):
            v = np.nextafter(v, direction)
            probes.append(v)
    specials = np.array([np.inf, -np.inf, 1e30, -1e30, 1e-45, -1e-45, 200, -200], np.float32)
    return np.concatenate(probes + [specials]).astype(np.float32)


def test_best_index_ties_at_midpoints_go_up() -> None:
    """Guards the midpoint-count form of best_index: exact midpoints, one ulp either side, ends."""
    x = probe_values()
    expected = np.array([ggml_best_index(v) for v in x])
    _, mid, _ = iq4._grid(torch.device("cpu"))
    np.testing.assert_array_equal(iq4._best_index(torch.from_numpy(x), mid).numpy(), expected)
    # a value exactly on a midpoint takes the upper grid point
    np.testing.assert_array_equal(iq4._best_index(torch.from_numpy(iq4._MID), mid).numpy(), np.arange(1, 16))
    if _jit.AVAILABLE:
        np.testing.assert_array_equal([iq4._nb_best_index(v) for v in x], expected)


def test_best_index_nan_is_top_index() -> None:
    """ggml's binary search never moves `hi` for NaN and ends at index 15."""
    nan = np.array([np.nan], np.float32)
    _, mid, _ = iq4._grid(torch.device("cpu"))
    assert iq4._best_index(torch.from_numpy(nan), mid)[0] == 15
    if _jit.AVAILABLE:
        assert iq4._nb_best_index(nan[0]) == 15


def test_blocks_on_the_grid_and_midpoints_match_ggml() -> None:
    """Sub-blocks whose max is 127, so the first candidate maps values onto grid points and midpoints."""
    rng = np.random.default_rng(7)
    grid = np.concatenate([iq4._MID, iq4.KVALUES, -iq4._MID]).astype(np.float32)
    x = rng.choice(grid, (16, 256)).astype(np.float32)
    x[:, ::32] = np.float32(127)
    ours_and_ggml(x, NL)
    ours_and_ggml(x, XS)


def test_all_zero_block() -> None:
    """IQ4_NL: d = +0, every index 8 (best_index(0)).  IQ4_XS: d = -0.0/32 = -0.0 (fp16 0x8000),
    every l = 0 stored as 32 (scales_h bits 0b10, scales_l 0), every index 8."""
    _, nl = ours_and_ggml(np.zeros((1, 32), np.float32), NL)
    assert nl[0].tolist() == [0x00, 0x00] + [0x88] * 16
    _, xs = ours_and_ggml(np.zeros((1, 256), np.float32), XS)
    assert xs[0].tolist() == [0x00, 0x80, 0xAA, 0xAA, 0, 0, 0, 0] + [0x88] * 128
    # -0.0 inputs and values below GROUP_MAX_EPS (1e-15, subnormals included) take the same path
    ours_and_ggml(np.full((1, 256), -0.0, np.float32), XS)
    ours_and_ggml(np.array([[9e-16, -1e-45] * 16], np.float32), NL)


def test_max_abs_tie_keeps_first_occurrence_and_its_sign() -> None:
    """|3| == |-3|: whichever comes first sets max (and with it the sign of d)."""
    pos_first = np.where(np.arange(32) % 2 == 0, 3.0, -3.0).astype(np.float32)[None]
    neg_first = -pos_first
    for x, sign in ((pos_first, 0), (neg_first, 0x80)):
        _, nl = ours_and_ggml(x, NL)
        assert nl[0, 1] & 0x80 == sign  # d takes the sign of the first extreme value
        ours_and_ggml(np.tile(x, 8), XS)


def test_iq4_xs_scale_packing_covers_full_6bit_range() -> None:
    """Sub-block scales spanning l = -32..31: low nibbles in scales_l (even sub-block low
    nibble), high 2 bits in scales_h bits 2*ib, 2*ib+1."""
    rng = np.random.default_rng(3)
    mags = np.array([1.0, -0.97, 0.5, -0.25, 0.03, -0.6, 0.8, -1e-3], np.float32)
    x = (np.abs(rng.standard_normal((4, 8, 32))).astype(np.float32) * mags[None, :, None]).reshape(4, 256)
    _, xs = ours_and_ggml(x, XS)
    scales_h = xs[:, 2].astype(np.uint16) | (xs[:, 3].astype(np.uint16) << 8)
    low = np.stack([xs[:, 4 + ib // 2] >> (4 * (ib % 2)) & 0xF for ib in range(8)], axis=1)
    high = np.stack([(scales_h >> (2 * ib)) & 3 for ib in range(8)], axis=1)
    biased = low | (high << 4)  # l + 32
    assert biased.min() == 0 and biased.max() >= 62  # l = -32 for the largest scale


def test_overflowing_weights_give_ggml_nan_scale() -> None:
    """|x| > 1.8e19 makes w = x*x inf; opposite-signed inf terms make sumqx NaN, so d is
    x86's default NaN (negative): fp16 0xFE00 and every index 15 (best_index(NaN))."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = 1e30, -1e20
    _, nl = ours_and_ggml(x, NL)
    assert nl[0].tolist() == [0x00, 0xFE] + [0xFF] * 16
    xs = np.zeros((1, 256), np.float32)
    xs[0, :32] = x[0]
    xs[0, 40:64] = np.float32(2.5)
    ours_and_ggml(xs, XS)  # the NaN sub-block never wins the max-|d| search


@pytest.mark.parametrize("qtype", [NL, XS], ids=lambda t: t.name)
def test_fast_equals_reference_on_mixed_blocks(qtype: GGMLQuantizationType) -> None:
    """64 blocks of mixed 32-value patterns (zero, constant, spikes, ties, fp16-range, subnormal)."""
    cls = quants.quant_type(qtype)
    rng = np.random.default_rng(int(qtype))
    x = mixed_blocks(rng, 64 * cls.block_size // 256, 256)
    ours_and_ggml(x, qtype)


@pytest.mark.parametrize("qtype", [NL, XS], ids=lambda t: t.name)
def test_full_range_float32_bits(qtype: GGMLQuantizationType) -> None:
    """Random finite float32 bit patterns: magnitudes from subnormal to 3.4e38 in one block."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 2**32, (8, 512), dtype=np.uint64).astype(np.uint32).view(np.float32).copy()
    x[~np.isfinite(x)] = np.float32(-3e38)
    ours_and_ggml(x, qtype)


def test_reference_nan_follows_x86() -> None:
    """CUDA's NaN (0x7FFFFFFF) is not x86's (0xFFC00000): the reference's helpers give x86's
    results for either bit pattern (nearest_int 0, fp16 0xFE00)."""
    nans = torch.tensor([0xFFC00000 - 2**32, 0x7FFFFFFF, 0x7FC00000], dtype=torch.int64).to(torch.int32)
    v = nans.view(torch.float32)
    assert iq4._nearest_int(v).tolist() == [0, 0, 0]
    assert iq4._fp16_bytes(v).tolist() == [[0x00, 0xFE]] * 3


@requires_cuda
@pytest.mark.parametrize("qtype", [NL, XS], ids=lambda t: t.name)
def test_reference_on_cuda_matches_ggml(qtype: GGMLQuantizationType) -> None:
    """Mixed edge-case blocks, full-range float32 bits and overflowing weights, quantized on the GPU."""
    cls = quants.quant_type(qtype)
    rng = np.random.default_rng(int(qtype))
    mixed = mixed_blocks(rng, 64 * cls.block_size // 256, 256)
    bits = rng.integers(0, 2**32, (8, 512), dtype=np.uint64).astype(np.uint32).view(np.float32).copy()
    bits[~np.isfinite(bits)] = np.float32(-3e38)
    overflow = np.zeros((1, 256), np.float32)
    overflow[0, 0], overflow[0, 1], overflow[0, 40:64] = 1e30, -1e20, 2.5
    for x in (mixed, bits, overflow):
        blocks = np.ascontiguousarray(x, np.float32).reshape(-1, cls.block_size)
        ours = cls.quantize_blocks(torch.from_numpy(blocks).cuda()).cpu().numpy()
        np.testing.assert_array_equal(ours, ggml.quantize(blocks, qtype))
