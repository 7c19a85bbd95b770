"""Regression tests for Q3_K / Q6_K (llmdeploy.quants.k_symmetric) against ggml's own bytes.

test_oracle.py covers both types on generic cases; each test here pins one
numerical corner of quantize_row_q3_K_ref / quantize_row_q6_K_ref that a
plausible rewrite could get wrong, on every backend: the torch reference (on
the CPU; on CUDA too where a GPU exists) and the numba kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from llmdeploy import quants
from llmdeploy.quants import _jit
from llmdeploy.quants import k_symmetric as ks

from .cases import mixed_blocks, tiny_and_huge_rows
from .gpu import requires_cuda

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

TYPES = [T.Q3_K, T.Q6_K]
BACKENDS = ["reference", "fast"] if _jit.AVAILABLE else ["reference"]
CLASSES = {T.Q3_K: ks.Q3_K, T.Q6_K: ks.Q6_K}


def same_as_ggml(x: np.ndarray, qtype: T) -> np.ndarray:
    """Quantize with every backend, assert each equals ggml, return ggml's blocks (n, type_size)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1, 256)
    expected = ggml.quantize(x, qtype)
    for backend in BACKENDS:
        ours = quants.quantize(x, qtype, backend=backend, threads=1)
        bad = np.flatnonzero((ours != expected).any(axis=1))
        assert bad.size == 0, f"{qtype.name} {backend}: blocks {bad[:8].tolist()} differ from ggml"
    return expected


def sub_block_fit(qtype: T, sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, L) that the reference's sub-block optimizer of ``qtype`` gives float32 rows of 16."""
    make, nmax = (ks.make_q3_quants, 4) if qtype == T.Q3_K else (ks.make_qx_quants, 32)
    scale, L = make(torch.from_numpy(np.ascontiguousarray(sub, np.float32)), nmax)
    return scale.numpy(), L.numpy()


def q3_levels(block: np.ndarray) -> np.ndarray:
    """The 256 3-bit levels (0..7) stored in one Q3_K block (hmask bit = bit 2, qs = bits 0-1)."""
    j = np.arange(256)
    high = (block[j % 32] >> (j // 32)) & 1
    half, rest = j // 128, j % 128
    low = (block[32 + 32 * half + rest % 32] >> (2 * (rest // 32))) & 3
    return (high * 4 + low).astype(np.int32)


def q6_levels(block: np.ndarray) -> np.ndarray:
    """The 256 6-bit levels (0..63) stored in one Q6_K block."""
    j = np.arange(256)
    half, rest = j // 128, j % 128
    quarter, lo = rest // 32, rest % 32
    nibble = (block[64 * half + 32 * (quarter % 2) + lo] >> (4 * (quarter // 2))) & 15
    top = (block[128 + 32 * half + lo] >> (2 * quarter)) & 3
    return (nibble | (top << 4)).astype(np.int32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_max_abs_ties_keep_first_value_and_its_sign(qtype: T) -> None:
    # Equal |x| everywhere: the scale's sign comes from the first element of each
    # sub-block (ggml's strict `>` scan); flipping it must flip the stored scales.
    ties = np.where(np.arange(256) % 3 == 0, np.float32(2.5), np.float32(-2.5))
    a = same_as_ggml(ties, qtype)
    b = same_as_ggml(-ties, qtype)
    assert not np.array_equal(a, b)
    # and ties between sub-blocks' scales: 16 identical sub-blocks but one negated
    x = np.tile(np.linspace(-1, 1, 16, dtype=np.float32), 16)
    x[16:32] *= -1
    same_as_ggml(x, qtype)


def test_q6_k_block_of_tiny_values_is_all_zero_bytes() -> None:
    # max|x| ~2e-14 is above GROUP_MAX_EPS (make_qx_quants runs) but every scale
    # is below it, so ggml memsets the whole block, fp16 d included.
    x = (np.random.default_rng(0).standard_normal((2, 256)) * 5e-15).astype(np.float32)
    scales, _ = sub_block_fit(T.Q6_K, x.reshape(-1, 16))
    assert np.abs(x).max() > ks.GROUP_MAX_EPS and np.abs(scales).max() < ks.GROUP_MAX_EPS
    assert not same_as_ggml(x, T.Q6_K).any()


def test_make_q3_quants_refinement_matches_ggml() -> None:
    # The refinement of make_q3_quants changes levels one element at a time over
    # up to 5 passes; its result decides the Q3_K sub-block scales.  Many
    # sub-blocks of varied shapes, many of which the refinement changes.
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            rng.standard_normal((32, 256)),
            rng.laplace(size=(32, 256)),
            rng.uniform(-1, 1, (32, 256)),
            rng.standard_normal((32, 256)) ** 3,
        ]
    ).astype(np.float32)
    sub = x.reshape(-1, 16)
    _, refined = sub_block_fit(T.Q3_K, sub)
    vmax = sub[np.arange(sub.shape[0]), np.argmax(np.abs(sub), axis=1)]
    first_guess = np.clip(np.rint((np.float32(-4) / vmax)[:, None] * sub), -4, 3) + 4
    assert (refined != first_guess).any(axis=1).mean() > 0.1
    same_as_ggml(x, T.Q3_K)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_huge_values_whose_squares_overflow(qtype: T) -> None:
    # |x| > 1.8e19 makes w = x*x inf; inf * (level 0) is nan inside ggml's sums.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[0] *= np.float32(1e38)
    x[1] = np.float32(0)
    x[1, ::7] = np.float32(3e38)
    x[1, 1::7] = np.float32(-1e20)
    x[2] *= np.float32(1e25)
    x[2, :128] = 0
    x[3, :] = np.float32(-3.4e38)
    x[4] = np.where(rng.random(256) < 0.5, np.float32(1e19), np.float32(1e-3))
    x[5] = np.float32(65504) * np.sign(x[5])
    same_as_ggml(x, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_nan_sub_block_scale_never_becomes_the_max(qtype: T) -> None:
    # In [1e15, 1e13, ...] the 1e13 gets level 0 while w*x = 1e39 overflows:
    # inf*0 makes that sub-block's scale nan.  ggml's `fabsf(s) > amax` scan
    # skips it, so the other sub-blocks set the super-block scale (argmax would pick nan).
    x = np.random.default_rng(11).standard_normal(256).astype(np.float32)
    x[:16] = 0
    x[0], x[1] = np.float32(1e15), np.float32(1e13)
    scales, _ = sub_block_fit(qtype, x.reshape(16, 16))
    assert np.isnan(scales[0]) and np.isfinite(scales[1:]).all()
    same_as_ggml(x, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zero_constant_and_subnormal_blocks(qtype: T) -> None:
    x = np.zeros((6, 256), np.float32)
    x[1] = np.float32(-0.0)
    x[2] = np.float32(0.75)
    x[3] = np.float32(-1e-40)  # float32 subnormals: below GROUP_MAX_EPS
    x[4, 17] = np.float32(1e-40)
    x[5, 200] = np.float32(-7)  # one spike, the rest zero
    blocks = same_as_ggml(x, qtype)
    assert not blocks[0].any() and not blocks[1].any()


@pytest.mark.parametrize("n_blocks", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fast_equals_reference_on_mixed_blocks(qtype: T, n_blocks: int) -> None:
    # The fast kernels work on groups of 8 super-blocks (padded): odd counts too.
    rng = np.random.default_rng(n_blocks)
    x = np.concatenate([mixed_blocks(rng, 6, 2048).reshape(-1, 256), tiny_and_huge_rows(rng, 10, 256)])
    x = x[rng.permutation(x.shape[0])[:n_blocks]]
    same_as_ggml(x, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fast_equals_reference_on_64_mixed_blocks(qtype: T) -> None:
    rng = np.random.default_rng(64)
    x = np.concatenate([mixed_blocks(rng, 6, 2048).reshape(-1, 256), tiny_and_huge_rows(rng, 16, 256)])
    assert x.shape[0] == 64
    same_as_ggml(x, qtype)


def edge_case_blocks() -> np.ndarray:
    """Mixed 32-value patterns, whole blocks at the extremes, and the overflow/nan corners above."""
    rng = np.random.default_rng(2024)
    huge = rng.standard_normal((5, 256)).astype(np.float32)
    huge[0] *= np.float32(1e38)
    huge[1, ::7] = np.float32(3e38)
    huge[1, 1::7] = np.float32(-1e20)
    huge[2, :16] = 0
    huge[2, 0], huge[2, 1] = np.float32(1e15), np.float32(1e13)  # a nan sub-block scale
    huge[3, :16] *= np.float32(1e-4)  # a sub-block scale that rounds to 0
    huge[4] = np.float32(-0.0)
    return np.concatenate(
        [mixed_blocks(rng, 4, 2048).reshape(-1, 256), tiny_and_huge_rows(rng, 10, 256), huge]
    ).astype(np.float32)


def sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Row sums in float32, left to right, as ggml's ``acc += term`` loops."""
    acc = np.zeros(terms.shape[0], np.float32)
    for i in range(terms.shape[1]):
        acc = acc + terms[:, i]
    return acc


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_sub_block_fit_matches_ggml_where_its_scale_rounds_to_zero(qtype: T) -> None:
    # The sub-block optimizer on its own, against ggml's bytes.  Each test
    # sub-block (|x| <= 100) leads a super-block whose 15 other sub-blocks are
    # ~1e5 (small enough for a finite fp16 d): its 6/8-bit scale rounds to 0,
    # and ggml then skips the requantization (`if (!d) continue`) and stores
    # the optimizer's levels.
    sub = edge_case_blocks().reshape(-1, 16)
    sub = sub[np.abs(sub).max(axis=1) <= 100]
    x = (np.random.default_rng(99).standard_normal((sub.shape[0], 256)) * 1e5).astype(np.float32)
    x[:, :16] = sub
    blocks = same_as_ggml(x, qtype)
    scale, L = sub_block_fit(qtype, sub)
    if qtype == T.Q3_K:
        assert ((blocks[:, 96] & 15) | ((blocks[:, 104] & 3) << 4) == 32).all()  # stored scale 32 means 0
        stored = np.stack([q3_levels(b)[:16] for b in blocks])
    else:
        assert (blocks[:, 192] == 0).all()
        stored = np.stack([q6_levels(b)[:16] for b in blocks])
    np.testing.assert_array_equal(L, stored)
    assert (np.ptp(stored, axis=1) > 2).mean() > 0.5  # really the optimizer's levels, not constants

    # The scale is the least-squares fit of those levels, weight x*x:
    # sum(w*x*l) / sum(w*l*l) in ggml's order, 0 for an all-zero sub-block.
    nmax = 4 if qtype == T.Q3_K else 32
    lf = (stored - nmax).astype(np.float32)
    w = sub * sub
    sumlx, suml2 = sequential_sum((w * sub) * lf), sequential_sum((w * lf) * lf)
    with np.errstate(all="ignore"):
        fit = np.where(suml2 > 0 if qtype == T.Q3_K else suml2 != 0, sumlx / suml2, np.float32(0))
    fit = np.where(np.abs(sub).max(axis=1) < ks.GROUP_MAX_EPS, np.float32(0), fit).astype(np.float32)
    if qtype == T.Q6_K:  # the winning candidate's sums are exactly these
        np.testing.assert_array_equal(scale.view(np.int32), fit.view(np.int32))
    else:  # make_q3_quants keeps running sums while it refines: exact where it changed nothing
        vmax = sub[np.arange(sub.shape[0]), np.argmax(np.abs(sub), axis=1)]
        with np.errstate(all="ignore"):
            first_guess = np.clip(np.rint((np.float32(-4) / vmax)[:, None] * sub), -4, 3) + 4
        refined = (stored != first_guess).any(axis=1) & (np.abs(vmax) >= ks.GROUP_MAX_EPS)
        assert refined.sum() > 20
        np.testing.assert_array_equal(scale[~refined].view(np.int32), fit[~refined].view(np.int32))
        # Where it refined, ggml's running sums were updated term by term, so they
        # differ from a fresh recomputation by float32 rounding (a few ulps,
        # seen up to 1.4e-7 relative); the bytes themselves are checked exactly
        # by the oracle tests.
        np.testing.assert_allclose(scale[refined], fit[refined], rtol=1e-6)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=requires_cuda,
        ),
    ],
)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_kernel_on_device_matches_ggml(qtype: T, device: str) -> None:
    x = edge_case_blocks()
    out = CLASSES[qtype].quantize_blocks(torch.from_numpy(x).to(device))
    assert out.device.type == device and out.dtype == torch.uint8
    ours = out.cpu().numpy()
    expected = ggml.quantize(x, qtype).reshape(ours.shape)
    bad = np.flatnonzero((ours != expected).any(axis=1))
    assert bad.size == 0, f"{qtype.name} reference on {device}: blocks {bad[:8].tolist()} differ from ggml"
