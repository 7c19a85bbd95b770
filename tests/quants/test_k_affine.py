"""Regression tests for Q2_K / Q4_K / Q5_K (llmdeploy.quants.k_affine).

test_oracle.py already checks every type against ggml on generic cases; these
name the specific numerical traps of the affine K-quants, each checked on
every backend (the torch reference and the numba fast kernel) against ggml's
own bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from llmdeploy import quants
from llmdeploy.quants import _jit, k_affine

from .gpu import requires_cuda

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

TYPES = [GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K]
BACKENDS = ["reference", "fast"] if _jit.AVAILABLE else ["reference"]
# byte offset of the fp16 dmin in each block
DMIN_AT = {GGMLQuantizationType.Q2_K: 82, GGMLQuantizationType.Q4_K: 2, GGMLQuantizationType.Q5_K: 2}

type_params = pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
backend_params = pytest.mark.parametrize("backend", BACKENDS)


def quantize_checked(x: np.ndarray, qtype: GGMLQuantizationType, backend: str) -> np.ndarray:
    """Our bytes, asserted equal to ggml's (with the first differing block in the message)."""
    ours = quants.quantize(x, qtype, backend=backend, threads=1)
    theirs = ggml.quantize(x, qtype)
    bad = np.flatnonzero((ours != theirs).reshape(-1, quants.quant_type(qtype).type_size).any(axis=1))
    assert bad.size == 0, f"{qtype.name}/{backend}: blocks {bad[:8].tolist()} differ from ggml"
    return ours


@type_params
@backend_params
@pytest.mark.parametrize("zero", [0.0, -0.0], ids=["+0", "-0"])
def test_all_zero_block_stores_positive_zero_dmin(qtype: GGMLQuantizationType, backend: str, zero: float) -> None:
    # Each sub-block's min is -(+0.0) = -0.0; ggml's running max of the mins
    # starts at +0.0 and only moves on a strictly larger value, so dmin is
    # fp16 +0 (0x0000), not 0x8000.
    x = np.full((1, 256), zero, np.float32)
    out = quantize_checked(x, qtype, backend)
    assert out[0, DMIN_AT[qtype]] == 0 and out[0, DMIN_AT[qtype] + 1] == 0
    assert not out.any()


@backend_params
def test_q4_k_sub_block_with_zero_scale_keeps_optimizer_levels(backend: str) -> None:
    # Sub-block 1 spans [0, 1] next to a sub-block spanning +-2000: its
    # 6-bit scale rounds to 0, so ggml skips the requantization
    # (`if (!d) continue`) and stores make_qkx2_quants' levels, not zeros.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    x[0, :32] *= np.float32(1000)
    x[0, 32:64] = np.linspace(0, 1, 32, dtype=np.float32)
    out = quantize_checked(x, GGMLQuantizationType.Q4_K, backend)
    assert out[0, 4 + 1] & 63 == 0  # scale of sub-block 1
    levels = out[0, 16:48] >> 4  # sub-block 1 = high nibbles of the first 32 qs bytes
    assert levels.any()


@backend_params
def test_q2_k_sub_block_with_zero_scale_keeps_optimizer_levels(backend: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    x[0, :16] *= np.float32(1000)
    x[0, 16:32] = np.linspace(0, 1, 16, dtype=np.float32)
    out = quantize_checked(x, GGMLQuantizationType.Q2_K, backend)
    assert out[0, 1] & 0xF == 0  # scale nibble of sub-block 1
    levels = out[0, 16 + 16 : 16 + 32] & 3  # values 16..31: bits 0-1 of qs[16..31]
    assert levels.any()


@type_params
@backend_params
def test_signed_zeros_and_negative_constants(qtype: GGMLQuantizationType, backend: str) -> None:
    # -0.0/+0.0 in either order (the first of equal values wins the min/max
    # search), negative constant sub-blocks (early return with min = -c) and
    # positive constants (min clamped to 0).
    x = np.zeros((4, 256), np.float32)
    x[0, ::2] = -0.0
    x[1, 1::2] = -0.0
    x[2] = np.float32(-1.25)
    x[3] = np.float32(0.75)
    x[3, 100] = np.float32(-0.0)
    quantize_checked(x, qtype, backend)


def _extreme_blocks() -> np.ndarray:
    """Ranges that overflow float32 (max - min = inf -> iscale 0 -> 0*inf = nan
    levels via nearest_int's bit trick), scales beyond fp16, subnormals."""
    rng = np.random.default_rng(3)
    base = rng.uniform(-1, 1, (8, 256)).astype(np.float32)
    scales = np.array([3e38, 1e38, 1e20, 7e4, 1e-20, 1e-38, 1e-42, 1.0], np.float32)
    x = (base * scales[:, None]).astype(np.float32)
    x[7, ::3] = np.float32(3.4e38)
    x[7, 1::3] = np.float32(-3.4e38)
    return x


@type_params
@backend_params
def test_extreme_magnitudes(qtype: GGMLQuantizationType, backend: str) -> None:
    quantize_checked(_extreme_blocks(), qtype, backend)


def _mixed_blocks(n_blocks: int, seed: int) -> np.ndarray:
    """Blocks whose 16-value pieces are each one of several stress patterns."""
    rng = np.random.default_rng(seed)
    pieces = rng.standard_normal((n_blocks * 16, 16)).astype(np.float32)
    kind = rng.integers(0, 8, n_blocks * 16)
    pieces[kind == 0] = 0
    pieces[kind == 1] = np.abs(pieces[kind == 1])
    pieces[kind == 2] = -np.abs(pieces[kind == 2])
    pieces[kind == 3] *= np.float32(1e-3)
    pieces[kind == 3, 0] = np.float32(50)
    pieces[kind == 4] = np.round(pieces[kind == 4] * 2)
    pieces[kind == 5] *= np.float32(3e4)
    pieces[kind == 6] = np.float32(0.5)
    return pieces.reshape(n_blocks, 256)


@type_params
def test_fast_equals_reference_equals_ggml_on_mixed_blocks(qtype: GGMLQuantizationType) -> None:
    # 67 blocks: not a multiple of the fast kernel's batch, so the zero-padded
    # last batch is exercised too.
    x = _mixed_blocks(67, seed=int(qtype))
    theirs = ggml.quantize(x.reshape(1, -1), qtype).reshape(67, -1)
    cls = quants.quant_type(qtype)
    np.testing.assert_array_equal(cls.quantize_blocks(torch.from_numpy(x)).numpy(), theirs)
    if _jit.AVAILABLE:
        out = np.empty_like(theirs)
        cls.fast_kernel(x, out)
        np.testing.assert_array_equal(out, theirs)


@type_params
def test_fast_kernel_batch_boundaries(qtype: GGMLQuantizationType) -> None:
    # Every block count around one and two batches gives the same bytes.
    if not _jit.AVAILABLE:
        pytest.skip("numba unavailable")
    cls = quants.quant_type(qtype)
    x = _mixed_blocks(2 * k_affine._LANES // 8 + 1, seed=7)
    theirs = ggml.quantize(x.reshape(1, -1), qtype).reshape(x.shape[0], -1)
    for n in range(1, x.shape[0] + 1):
        out = np.empty((n, cls.type_size), np.uint8)
        cls.fast_kernel(x[:n], out)
        np.testing.assert_array_equal(out, theirs[:n], err_msg=f"{n} blocks")


@requires_cuda
@type_params
def test_torch_on_cuda_equals_ggml(qtype: GGMLQuantizationType) -> None:
    # The mixed blocks plus the float32-overflowing ones, whose nan levels are
    # where CUDA (canonical nan 0x7FFFFFFF) and x86 (0xFFC00000) part ways.
    x = np.concatenate([_mixed_blocks(67, seed=int(qtype)), _extreme_blocks()])
    theirs = ggml.quantize(x.reshape(1, -1), qtype).reshape(x.shape[0], -1)
    ours = quants.quant_type(qtype).quantize_blocks(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_nearest_int_maps_every_nan_to_zero() -> None:
    # ggml (x86) only ever sees the default nan 0xFFC00000 here, whose
    # nearest_int is 0; other devices make other nans (CUDA: 0x7FFFFFFF, which
    # the bit trick alone would turn into 0x3FFFFF).
    nans = torch.tensor([0x7FFFFFFF, -0x400000, 0x7FC00000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(nans).all()
    assert not k_affine._nearest_int(nans).any()


def test_nearest_int_rounds_half_to_even_and_wraps_out_of_range() -> None:
    # In range, the add-1.5*2**23 trick rounds half to even; from 2**22 on
    # (and for inf) ggml returns what the bits say: 2**22 + 1.5*2**23 = 2**24,
    # whose mantissa is 0, so 0 - 0x400000.
    f = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 4194303.0, 4194304.0, np.inf], dtype=torch.float32)
    expected = [0, 2, 2, 0, -2, 0, 4194303, -4194304, -4194304]
    assert k_affine._nearest_int(f).tolist() == expected


def test_make_qkx2_quants_flat_sub_block() -> None:
    # max == min: ggml returns before the search, with L = 0, scale 0 and the_min = -min.
    x = torch.tensor([[-2.0] * 16, [0.0] * 16, [3.0] * 16], dtype=torch.float32)
    L, scale, the_min = (t.numpy() for t in k_affine.make_qkx2_quants(x, torch.abs(x), 3, -0.5, 0.1, 15, True))
    assert not L[:2].any()
    np.testing.assert_array_equal(scale[:2], [0.0, 0.0])
    np.testing.assert_array_equal(the_min[:2], [2.0, -0.0])
    assert np.signbit(the_min[1])  # -(+0.0)
    assert scale[2] > 0  # a positive constant has min clamped to 0: not flat
