"""Byte-for-byte equality with ggml's own C code, for every registered type.

The oracle is ``libggml-base`` from llama-cpp-python 0.3.36: ``ggml_quantize_chunk``
with no imatrix (what llama-quantize runs) and ``dequantize_row_*``.  The
parameters are generated from the type registry, so a new type is covered
as soon as it is registered.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmdeploy import quants
from llmdeploy.quants import _jit

from .cases import CASES, WIDTHS

ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
try:
    ggml.library()
except ggml.GGMLUnavailableError as exc:  # pragma: no cover
    pytest.skip(f"ggml oracle unavailable: {exc}", allow_module_level=True)

QUANTIZABLE = [GGMLQuantizationType[n] for n in quants.quantizable_type_names()]
READABLE = [GGMLQuantizationType[n] for n in quants.supported_type_names()]


def backends(qtype: GGMLQuantizationType) -> list[str]:
    """'reference' always; 'fast' too where the type has a numba kernel and numba loads."""
    has_fast = quants.quant_type(qtype).fast_kernel is not None and _jit.AVAILABLE
    return ["reference", "fast"] if has_fast else ["reference"]


def assert_same_bytes(ours: np.ndarray, theirs: np.ndarray, qtype: GGMLQuantizationType) -> None:
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    if not np.array_equal(ours, theirs):
        cls = quants.quant_type(qtype)
        blocks_ours = ours.reshape(-1, cls.type_size)
        blocks_theirs = theirs.reshape(-1, cls.type_size)
        bad = np.flatnonzero((blocks_ours != blocks_theirs).any(axis=1))
        first = bad[0]
        byte = np.flatnonzero(blocks_ours[first] != blocks_theirs[first])
        pytest.fail(
            f"{qtype.name}: {bad.size}/{blocks_ours.shape[0]} blocks differ from ggml; first block {first}, "
            f"bytes {byte[:8].tolist()}: ours {blocks_ours[first][byte[:8]].tolist()} "
            f"ggml {blocks_theirs[first][byte[:8]].tolist()}"
        )


def _params() -> list:  # type: ignore[type-arg]
    params = []
    for qtype in QUANTIZABLE:
        block = quants.quant_type(qtype).block_size
        for width in WIDTHS:
            if width % block:
                continue
            for case in CASES:
                for backend in backends(qtype):
                    params.append(pytest.param(qtype, width, case, backend, id=f"{qtype.name}-{width}-{case}-{backend}"))
    return params


@pytest.mark.parametrize(("qtype", "width", "case", "backend"), _params())
def test_quantize_matches_ggml(qtype: GGMLQuantizationType, width: int, case: str, backend: str) -> None:
    rng = np.random.default_rng([int(qtype), width, len(case)])
    n_rows = 7 if width <= 256 else 3  # odd row counts
    x = CASES[case](rng, n_rows, width)
    assert np.isfinite(x).all()
    ours = quants.quantize(x, qtype, backend=backend, threads=2)
    assert_same_bytes(ours, ggml.quantize(x, qtype), qtype)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_ggml(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    block = quants.quant_type(qtype).block_size
    width = max(block, 256)
    x = np.concatenate([CASES[c](rng, 3, width) for c in CASES])
    data = ggml.quantize(x, qtype)
    np.testing.assert_array_equal(quants.dequantize(data, qtype), ggml.dequantize(data, qtype))


# Types read through gguf-py only: arbitrary block bytes must decode as ggml decodes them.
READ_ONLY = [t for t in READABLE if t not in QUANTIZABLE and t != GGMLQuantizationType.F64]


@pytest.mark.parametrize("qtype", READ_ONLY, ids=lambda t: t.name)
def test_dequantize_arbitrary_bytes_matches_ggml(qtype: GGMLQuantizationType) -> None:
    cls = quants.quant_type(qtype)
    data = np.random.default_rng(int(qtype)).integers(0, 256, (4, 8 * cls.type_size), dtype=np.uint8)
    np.testing.assert_array_equal(quants.dequantize(data, qtype), ggml.dequantize(data, qtype))


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
small_f32 = st.floats(min_value=-4.0, max_value=4.0, width=32)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@given(data=st.data())
def test_quantize_matches_ggml_on_generated_arrays(qtype: GGMLQuantizationType, data: st.DataObject) -> None:
    cls = quants.quant_type(qtype)
    n_rows = data.draw(st.integers(1, 3), label="n_rows")
    n_blocks = data.draw(st.integers(1, 2 if cls.block_size == 256 else 4), label="n_blocks")
    elements = data.draw(st.sampled_from([finite_f32, small_f32]), label="elements")
    x = data.draw(hnp.arrays(np.float32, (n_rows, n_blocks * cls.block_size), elements=elements), label="x")
    expected = ggml.quantize(x, qtype)
    for backend in backends(qtype):
        assert_same_bytes(quants.quantize(x, qtype, backend=backend, threads=1), expected, qtype)
