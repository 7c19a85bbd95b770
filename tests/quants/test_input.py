"""Input conversion: exact, chunk by chunk, and bounded in memory whatever the tensor size."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from llmdeploy import errors, quants
from llmdeploy.quants import _input, base

from .gpu import requires_cuda


def _weights(n_rows: int, n_cols: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n_rows, n_cols), dtype=np.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_torch_inputs_quantize_like_their_exact_float32_values(dtype: torch.dtype) -> None:
    t = torch.from_numpy(_weights(6, 256)).to(dtype)
    expected = quants.quantize(t.to(torch.float32).numpy(), "q4_k")
    assert np.array_equal(quants.quantize(t, "q4_k"), expected)


def test_non_contiguous_inputs_are_read_in_logical_order() -> None:
    x = _weights(64, 128)
    assert np.array_equal(quants.quantize(x.T, "q8_0"), quants.quantize(np.ascontiguousarray(x.T), "q8_0"))
    t = torch.from_numpy(x).to(torch.bfloat16).T
    assert np.array_equal(quants.quantize(t, "q8_0"), quants.quantize(t.float().contiguous().numpy(), "q8_0"))


def test_float64_overflow_is_located_in_later_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CHUNK_VALUES", 64)
    x = torch.zeros(4, 64, dtype=torch.float64)
    x[3, 7] = 1e39
    with pytest.raises(errors.NonFiniteValueError, match=r"the first at index \(3, 7\) \(value 1e\+39\)"):
        quants.quantize(x, "q8_0", threads=2)


def test_non_finite_in_a_bf16_tensor_is_counted_and_located() -> None:
    t = torch.zeros(3, 3, 64, dtype=torch.bfloat16)
    t[1, 2, 9] = float("inf")
    t[2, 0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteValueError, match=r"2 non-finite value\(s\) \(1 NaN, 1 inf\), the first at index \(1, 2, 9\)"):
        quants.quantize(t, "q8_0")


def test_integer_torch_tensor_is_refused() -> None:
    with pytest.raises(errors.InputDTypeError, match="torch.int32"):
        _input.Values(torch.zeros(2, 32, dtype=torch.int32))


@pytest.mark.parametrize("source_dtype", [np.float32, np.float16])
def test_memory_beyond_output_is_bounded_by_chunks_not_by_the_tensor(source_dtype: type) -> None:
    """Guards the streaming promise: a 32 MiB float32 (or 16 MiB fp16) tensor costs no whole-tensor temporary."""
    x = _weights(2048, 4096).astype(source_dtype)
    quants.quantize(x[:2], "q4_k")  # compile / warm up outside the measurement
    tracemalloc.start()
    try:
        out = quants.quantize(x, "q4_k", threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Output plus a few 1 MiB float32 chunks per thread (the fp16 chunks are widened one at a time).
    budget = out.nbytes + 8 * base.CHUNK_VALUES * 4
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB (input {x.nbytes / 2**20:.0f} MiB)"


@requires_cuda
def test_cuda_tensor_is_quantized_on_its_device_with_the_same_bytes() -> None:
    x = _weights(16, 256)
    cuda = torch.from_numpy(x).cuda()
    for name in quants.quantizable_type_names():
        assert np.array_equal(quants.quantize(cuda, name), quants.quantize(x, name)), name
