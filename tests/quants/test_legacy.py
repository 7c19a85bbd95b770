"""Regressions for the legacy types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (llmdeploy/quants/legacy.py).

Each test names the ggml detail it guards and checks every backend (the torch
reference and, where numba loads, the fast kernel) against ggml's own bytes
(``ggml_quantize_chunk``), plus the expected bytes where they are easy to
state by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmdeploy import quants
from llmdeploy.quants import _jit

from .cases import mixed_blocks
from .gpu import requires_cuda

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
BACKENDS = ["reference", "fast"] if _jit.AVAILABLE else ["reference"]


def both_backends(x: np.ndarray, qtype: T) -> np.ndarray:
    """ggml's bytes for x, after checking that every backend gives exactly them."""
    x = np.asarray(x, np.float32).reshape(-1, 32)
    expected = ggml.quantize(x, qtype)
    for backend in BACKENDS:
        np.testing.assert_array_equal(quants.quantize(x, qtype, backend=backend, threads=1), expected, err_msg=backend)
    return expected


def fp16(data: np.ndarray, at: int) -> int:
    return int(data[..., at]) | int(data[..., at + 1]) << 8


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("zero", [0.0, -0.0, "mixed"])
def test_zero_block_scale_is_negative_zero(qtype: T, zero: object) -> None:
    # ggml's max-|x| search starts from +0 with a strict '<', so any zero
    # block gives max = +0 and d = +0/-8 = -0, stored as 0x8000.  (gguf-py's
    # argmax picks the -0.0 and stores +0.)
    x = np.zeros(32, np.float32) if zero != "mixed" else np.where(np.arange(32) % 3, 0.0, -0.0).astype(np.float32)
    if zero != "mixed":
        x[:] = zero
    data = both_backends(x, qtype)[0]
    assert fp16(data, 0) == 0x8000
    mid = 0x88 if qtype == T.Q4_0 else 0x00  # q = 8 (Q4_0); q = 16 (Q5_0): low nibbles 0, all qh bits set
    assert (data[-16:] == mid).all()
    if qtype == T.Q5_0:
        assert (data[2:6] == 0xFF).all()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("first", [3.0, -3.0])
def test_tied_magnitudes_first_sign_wins(qtype: T, first: float) -> None:
    x = np.where(np.arange(32) % 2 == 0, first, -first).astype(np.float32)
    x[5] = 1.0
    data = both_backends(x, qtype)[0]
    nmax = 8 if qtype == T.Q4_0 else 16
    assert fp16(data, 0) == int(np.float16(first / -nmax).view(np.uint16))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("order", [(0.0, -0.0), (-0.0, 0.0)])
def test_min_keeps_sign_of_first_zero(qtype: T, order: tuple[float, float]) -> None:
    # min/max are found with strict comparisons, so of several zeros the first
    # is kept, sign and all: it is stored as m.
    x = np.abs(np.linspace(0.0, 2.0, 32, dtype=np.float32))
    x[3], x[7] = order
    x[0] = 1.0
    data = both_backends(x, qtype)[0]
    assert fp16(data, 2) == (0x8000 if np.signbit(order[0]) else 0x0000)
    # and a block of zeros only: d = 0, m = the first zero, every q 0
    z = np.array([order[0], order[1]] * 16, np.float32)
    data = both_backends(z, qtype)[0]
    assert fp16(data, 0) == 0 and fp16(data, 2) == (0x8000 if np.signbit(order[0]) else 0)
    assert (data[4:] == 0).all()


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_subnormal_scale_gives_zero_values(qtype: T) -> None:
    # d is a float32 subnormal, 1.0f/d overflows to inf and every x*id is
    # +-inf or NaN; x86 converts those to INT32_MIN, whose low byte is 0.  So
    # every q is 0 (Q4_0 would give 8 if id were simply 0).
    x = (np.random.default_rng(1).standard_normal(32) * 1e-40).astype(np.float32)
    x[4] = 0.0
    data = both_backends(x, qtype)[0]
    offset = {T.Q8_0: 2, T.Q4_0: 2, T.Q5_0: 2, T.Q4_1: 4, T.Q5_1: 4}[qtype]
    assert (data[offset:] == 0).all()


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1], ids=lambda t: t.name)
def test_overflowing_range_gives_inf_scale_and_zero_values(qtype: T) -> None:
    # max - min overflows: d = inf (0x7C00), id = 0, and (x - min)*0 is 0 or,
    # where x - min overflows too, NaN -- which Q5_1's unclamped (uint8_t)
    # cast turns into 0 like the others.
    x = np.linspace(-3e38, 3e38, 32, dtype=np.float32)
    data = both_backends(x, qtype)[0]
    assert fp16(data, 0) == 0x7C00 and fp16(data, 2) == 0xFC00
    assert (data[4:] == 0).all()


def test_q5_1_uses_all_32_levels() -> None:
    # Values on the exact grid min + k*d, k = 0..31: every level, and the 5th
    # bit of each goes to qh (bit j = value j), low nibbles pairing j, j+16.
    k = np.random.default_rng(2).permutation(32)
    x = (np.float32(-1.0) + k.astype(np.float32) * np.float32(0.125)).astype(np.float32)
    data = both_backends(x, T.Q5_1)[0]
    qh = int.from_bytes(data[4:8].tobytes(), "little")
    assert [(qh >> j) & 1 for j in range(32)] == [int(v >> 4) for v in k]
    assert data[8:].tolist() == [int((k[j] & 15) | (k[j + 16] & 15) << 4) for j in range(16)]


def test_q8_0_rounds_half_away_from_zero() -> None:
    # max|x| = 127 gives d = 1 and id = 1, so x*id is x itself: roundf rounds
    # the halves away from zero (numpy's rint would give 0, 2, -2, 0).
    x = np.zeros(32, np.float32)
    x[:6] = [0.5, 1.5, 2.5, -2.5, -0.5, 127.0]
    data = both_backends(x, T.Q8_0)[0]
    assert data[2:8].view(np.int8).tolist() == [1, 2, 3, -3, -1, 127]


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_fast_equals_reference_on_mixed_blocks(qtype: T) -> None:
    x = mixed_blocks(np.random.default_rng(int(qtype)), 5, 1024)
    both_backends(x, qtype)


_edge_values = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 0.5, -0.5, 1.0, -1.0, 3e38, -3.4e38])


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@given(data=st.data())
def test_edge_value_blocks_match_ggml(qtype: T, data: st.DataObject) -> None:
    # Blocks built from zeros of both signs, subnormals, halves and extremes.
    x = data.draw(hnp.arrays(np.float32, (2, 32), elements=_edge_values))
    both_backends(x, qtype)


def _edge_blocks() -> np.ndarray:
    """mixed_blocks plus blocks of subnormals, signed zeros, ties and overflowing ranges."""
    rng = np.random.default_rng(7)
    edges = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 0.5, -0.5, 3e38, -3.4e38], np.float32)
    return np.concatenate(
        [
            mixed_blocks(rng, 8, 1024).reshape(-1, 32),
            rng.choice(edges, (64, 32)).astype(np.float32),
            (rng.standard_normal((8, 32)) * 1e-40).astype(np.float32),
            np.linspace(-3e38, 3e38, 32, dtype=np.float32)[None],
        ]
    )


@requires_cuda
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_reference_on_cuda_matches_ggml(qtype: T) -> None:
    x = _edge_blocks()
    ours = quants.quant_type(qtype).quantize_blocks(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_array_equal(ours, ggml.quantize(x, qtype).reshape(ours.shape))
