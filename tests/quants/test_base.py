"""The quantize/dequantize front-end: type lookup, input checks, chunking and threads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from llmdeploy import errors, quants
from llmdeploy.quants import base


def test_qtype_accepts_enum_and_any_case_name() -> None:
    for spelling in ("q8_0", "Q8_0", " q8_0 ", GGMLQuantizationType.Q8_0):
        assert quants.quant_type(spelling).qtype is GGMLQuantizationType.Q8_0


def test_unknown_type_name_lists_supported_types() -> None:
    with pytest.raises(errors.UnsupportedQuantTypeError, match=r"Unknown or unsupported GGUF type 'q4_kk'.*Q4_K") as info:
        quants.quantize(np.zeros((1, 256), np.float32), "q4_kk")
    assert isinstance(info.value, ValueError)


def test_read_only_type_says_which_types_can_be_written() -> None:
    with pytest.raises(errors.UnsupportedQuantTypeError, match=r"can read IQ2_XXS but not write it.*Q8_0"):
        quants.quantize(np.zeros((1, 256), np.float32), "iq2_xxs")


def test_every_required_type_quantizes() -> None:
    required = "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS TQ1_0 TQ2_0".split()
    assert set(required) <= set(quants.quantizable_type_names())


def test_every_gguf_py_dequantizable_type_is_readable() -> None:
    from gguf import quants as gguf_quants

    readable = {t.name for t in gguf_quants._type_traits} | {"F32", "F16"}
    assert readable <= set(quants.supported_type_names())


def test_row_length_not_multiple_of_block_names_type_block_and_length() -> None:
    with pytest.raises(errors.BlockSizeError, match=r"Q4_K packs blocks of 256 values, but the row has length 640"):
        quants.quantize(np.zeros((2, 640), np.float32), "q4_k")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_counted_and_located(bad: float) -> None:
    x = np.zeros((4, 64), np.float32)
    x[2, 5] = bad
    x[3, 0] = bad
    with pytest.raises(errors.NonFiniteValueError, match=r"2 non-finite value\(s\).*first at row 2, column 5"):
        quants.quantize(x, "q8_0")


def test_non_finite_detected_in_every_chunk_and_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CHUNK_VALUES", 64)
    x = np.ones((16, 64), np.float32)
    x[15, 63] = np.nan  # the last chunk only
    for backend in ("auto", "reference"):
        with pytest.raises(errors.NonFiniteValueError, match=r"1 non-finite value\(s\) \(1 NaN, 0 inf\).*row 15, column 63"):
            quants.quantize(x, "q8_0", threads=3, backend=backend)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.complex64, np.bool_])
def test_wrong_dtype_is_refused(dtype: type) -> None:
    with pytest.raises(errors.InputDTypeError, match=r"Cannot quantize an array of dtype"):
        quants.quantize(np.zeros((1, 32), dtype), "q8_0")


def test_zero_dim_and_non_array_inputs_are_refused() -> None:
    with pytest.raises(errors.InputDTypeError, match="0-d"):
        quants.quantize(np.float32(1.0), "f16")
    with pytest.raises(errors.InputDTypeError, match="Cannot quantize a list"):
        quants.quantize([[1.0] * 32], "q8_0")


def test_float64_is_converted_but_overflow_is_an_error() -> None:
    x64 = np.random.default_rng(0).standard_normal((2, 32))
    assert np.array_equal(quants.quantize(x64, "q8_0"), quants.quantize(x64.astype(np.float32), "q8_0"))
    x64[1, 3] = 1e300
    with pytest.raises(errors.NonFiniteValueError, match=r"overflow float32, the first at index \(1, 3\)"):
        quants.quantize(x64, "q8_0")


def test_torch_half_and_bfloat16_tensors_are_converted_exactly() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = quants.quantize(t.float().numpy(), "q4_0")
    assert np.array_equal(quants.quantize(t, "q4_0"), expected)
    assert np.array_equal(quants.quantize(t.half(), "f16"), t.half().numpy().view(np.uint8).reshape(3, 128))
    with pytest.raises(errors.InputDTypeError, match="torch.int64"):
        quants.quantize(torch.zeros(1, 32, dtype=torch.int64), "q8_0")


def test_imatrix_is_accepted_by_the_signature_but_not_yet_supported() -> None:
    x = np.ones((2, 256), np.float32)
    with pytest.raises(errors.NotSupportedYetError, match="importance matrix"):
        quants.quantize(x, "q4_k", imatrix=np.ones(256, np.float32))
    with pytest.raises(errors.InputDTypeError, match=r"one weight per column, shape \(256,\)"):
        quants.quantize(x, "q4_k", imatrix=np.ones(255, np.float32))


def test_leading_shape_is_kept_and_result_independent_of_threads_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(1).standard_normal((3, 5, 256), dtype=np.float32)
    whole = quants.quantize(x, "q8_0", threads=1)
    assert whole.shape == (3, 5, 8 * 34)
    monkeypatch.setattr(base, "CHUNK_VALUES", 96)  # chunks of 3 blocks, not aligned to rows
    assert np.array_equal(quants.quantize(x, "q8_0", threads=4), whole)
    assert np.array_equal(quants.quantize(x.reshape(15, 256), "q8_0", threads=2), whole.reshape(15, -1))


def test_threads_must_be_positive() -> None:
    with pytest.raises(errors.InputDTypeError, match="threads must be at least 1"):
        quants.quantize(np.zeros((1, 32), np.float32), "q8_0", threads=0)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(errors.UnsupportedQuantTypeError, match="backend must be"):
        quants.quantize(np.zeros((1, 32), np.float32), "q8_0", backend="gpu")  # type: ignore[arg-type]


def test_empty_tensor_round_trips() -> None:
    out = quants.quantize(np.zeros((0, 256), np.float32), "q4_k")
    assert out.shape == (0, 144)
    assert quants.dequantize(out, "q4_k").shape == (0, 256)


def test_dequantize_checks_dtype_and_block_bytes() -> None:
    with pytest.raises(errors.InputDTypeError, match="uint8 block data"):
        quants.dequantize(np.zeros((1, 34), np.float32), "q8_0")
    with pytest.raises(errors.BlockSizeError, match=r"Q8_0 blocks are 34 bytes each, but the rows hold 35 bytes"):
        quants.dequantize(np.zeros((1, 35), np.uint8), "q8_0")


def test_dequantize_accepts_bytes() -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    data = quants.quantize(x, "q8_0")
    assert np.array_equal(quants.dequantize(data.tobytes(), "q8_0"), quants.dequantize(data, "q8_0").reshape(-1))


def test_missing_numba_falls_back_to_reference_with_one_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmdeploy.quants import _jit

    monkeypatch.setattr(_jit, "AVAILABLE", False)
    monkeypatch.setattr(_jit, "UNAVAILABLE_REASON", "ImportError: no numba here")
    monkeypatch.setattr(base, "_notices", set())
    fast_types = [n for n in quants.quantizable_type_names() if quants.quant_type(n).fast_kernel is not None]
    if not fast_types:
        pytest.skip("no type has a fast kernel")
    x = np.random.default_rng(2).standard_normal((2, 256), dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = quants.quantize(x, fast_types[0])
        quants.quantize(x, fast_types[-1])
    notices = [w for w in caught if "numba is unavailable" in str(w.message)]
    assert len(notices) == 1
    assert np.array_equal(first, quants.quantize(x, fast_types[0], backend="reference"))
    with pytest.raises(errors.NotSupportedYetError, match="need numba"):
        quants.quantize(x, fast_types[0], backend="fast")


def test_cuda_device_without_a_gpu_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(errors.UnsupportedQuantTypeError, match=r"device='cuda' was asked for, but this torch .* sees no CUDA GPU"):
        quants.quantize(np.zeros((1, 32), np.float32), "q8_0", device="cuda")


def test_fast_backend_refuses_a_gpu_device() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    with pytest.raises(errors.UnsupportedQuantTypeError, match="run on the CPU only"):
        quants.quantize(np.zeros((1, 32), np.float32), "q8_0", device="cuda", backend="fast")
