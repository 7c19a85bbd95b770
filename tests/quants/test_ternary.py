"""Regressions for TQ1_0 and TQ2_0 (llmdeploy/quants/ternary.py), checked against ggml."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from llmdeploy import quants
from llmdeploy.quants import _jit

from .cases import mixed_blocks
from .gpu import requires_cuda

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

BACKENDS = ["reference", "fast"] if _jit.AVAILABLE else ["reference"]


def both_backends(x: np.ndarray, qtype: T) -> np.ndarray:
    """ggml's bytes for x, after checking that every backend (torch reference, numba) gives exactly them."""
    x = np.asarray(x, np.float32).reshape(-1, 256)
    expected = ggml.quantize(x, qtype)
    for backend in BACKENDS:
        np.testing.assert_array_equal(quants.quantize(x, qtype, backend=backend, threads=1), expected, err_msg=backend)
    return expected


def _ceil_byte(q: int) -> int:
    return -(-q * 256 // 243)


def _tq1_0_bytes(t: np.ndarray) -> list[int]:
    """TQ1_0's 52 packed bytes for 256 trits, written out from the layout (not from ggml's loops)."""
    out = []
    for m in range(32):  # values 0..159: m + 32n
        out.append(_ceil_byte(int(sum(t[m + 32 * n] * 3 ** (4 - n) for n in range(5)))))
    for m in range(16):  # values 160..239: 160 + m + 16n
        out.append(_ceil_byte(int(sum(t[160 + m + 16 * n] * 3 ** (4 - n) for n in range(5)))))
    for j in range(4):  # values 240..255: 240 + j + 4n, plus a zero fifth trit
        out.append(_ceil_byte(int(sum(t[240 + j + 4 * n] * 3 ** (4 - n) for n in range(4)))))
    return out


def _trits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random trits and values whose quantization gives them (d = 1.5)."""
    t = np.random.default_rng(seed).integers(0, 3, 256)
    t[17] = 2  # max|x| = d
    x = ((t - 1) * 1.5).astype(np.float32)
    return t, x


def test_tq1_0_base3_packing() -> None:
    t, x = _trits(1)
    data = both_backends(x, T.TQ1_0)[0]
    assert data[:52].tolist() == _tq1_0_bytes(t)
    assert data[52:].view("<f2")[0] == np.float16(1.5)


def test_tq1_0_bytes_decode_back() -> None:
    # The ceil(q*256/243) scaling lets ggml read trit n as ((byte*3**n) & 255)*3 >> 8.
    for q in range(243):
        byte = _ceil_byte(q)
        digits = [((byte * 3**n) & 0xFF) * 3 >> 8 for n in range(5)]
        assert sum(d * 3 ** (4 - n) for n, d in enumerate(digits)) == q


def test_tq2_0_two_bit_packing() -> None:
    t, x = _trits(2)
    data = both_backends(x, T.TQ2_0)[0]
    expected = [
        int(sum(t[128 * c + m + 32 * n] << (2 * n) for n in range(4))) for c in range(2) for m in range(32)
    ]
    assert data[:64].tolist() == expected


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_halves_round_away_from_zero(qtype: T) -> None:
    # d = 1, so x*id = x: lroundf(+-0.5) = +-1, lroundf(+-0.49999997) = 0.
    x = np.zeros(256, np.float32)
    x[:6] = [1.0, 0.5, -0.5, 0.49999997, -0.49999997, -1.0]
    data = both_backends(x, qtype)[0]
    if qtype == T.TQ2_0:  # values 0..3 are bytes 0..3, trit n = 0
        assert [b & 3 for b in data[:6]] == [2, 2, 0, 1, 1, 0]


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_subnormal_scale_gives_zero_trits(qtype: T) -> None:
    # max|x| subnormal: 1/d overflows, every x*id is +-inf or NaN, glibc's
    # lroundf returns LONG_MIN and LONG_MIN + 1 truncated to int is 1: trit 1.
    x = (np.random.default_rng(3).standard_normal(256) * 1e-40).astype(np.float32)
    data = both_backends(x, qtype)[0]
    ones = [1] * 256
    packed = _tq1_0_bytes(np.array(ones)) if qtype == T.TQ1_0 else [0x55] * 64
    assert data[: len(packed)].tolist() == packed


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_fast_equals_reference_on_mixed_blocks(qtype: T) -> None:
    x = mixed_blocks(np.random.default_rng(int(qtype)), 3, 2048)
    both_backends(x, qtype)


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [1e-40, 5e-39, 1.1754942e-38], ids=["id-inf", "id-finite", "largest"])
def test_subnormal_scales(qtype: T, scale: float) -> None:
    # A subnormal d below 2**-128 gives id = inf (every trit 1, see above);
    # above it 1/d is finite and the trits are the usual ones.
    x = np.random.default_rng(4).uniform(-1, 1, 256).astype(np.float32) * np.float32(scale)
    x[9] = np.float32(scale)
    both_backends(x, qtype)


def _edge_blocks() -> np.ndarray:
    """mixed_blocks plus subnormal-scale blocks (inf and finite 1/d) and half-way trits."""
    rng = np.random.default_rng(8)
    halves = np.zeros((1, 256), np.float32)
    halves[0, :6] = [1.0, 0.5, -0.5, 0.49999997, -0.49999997, -1.0]
    return np.concatenate(
        [
            mixed_blocks(rng, 4, 2048).reshape(-1, 256),
            (rng.standard_normal((4, 256)) * 1e-40).astype(np.float32),
            (rng.uniform(-1, 1, (4, 256)) * 5e-39).astype(np.float32),
            halves,
        ]
    )


@requires_cuda
@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_reference_on_cuda_matches_ggml(qtype: T) -> None:
    x = _edge_blocks()
    ours = quants.quant_type(qtype).quantize_blocks(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_array_equal(ours, ggml.quantize(x, qtype).reshape(ours.shape))
