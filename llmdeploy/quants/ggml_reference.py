"""ggml's own C quantizers, through ctypes: the oracle for tests and benchmarks.

llama-cpp-python (pinned to 0.3.36, the project's reference llama.cpp) ships
``libggml-base.so``.  Its ``ggml_quantize_chunk(type, src, dst, start, nrows,
n_per_row, imatrix)`` with ``imatrix=NULL`` is exactly what ``llama-quantize``
runs without ``--imatrix``; its ``dequantize_row_*`` functions are ggml's
``to_float``.  Nothing in llmdeploy's export path uses this module.
"""

from __future__ import annotations

import ctypes
import pathlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import LLMDeployError


class GGMLUnavailableError(LLMDeployError, ImportError):
    """llama-cpp-python (and with it libggml-base) is not installed."""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """``libggml-base`` from the installed llama-cpp-python, with argument types declared."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GGMLUnavailableError(
            "The ggml reference needs llama-cpp-python: pip install 'llama-cpp-python==0.3.36'."
        ) from exc
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise GGMLUnavailableError(f"No libggml-base library found in {lib_dir}.")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def _dequantize_fn(qtype: GGMLQuantizationType):  # type: ignore[no-untyped-def]
    name = {
        GGMLQuantizationType.F16: "ggml_fp16_to_fp32_row",
        GGMLQuantizationType.BF16: "ggml_bf16_to_fp32_row",
    }.get(qtype, f"dequantize_row_{qtype.name.lower().replace('_k', '_K')}")
    fn = getattr(library(), name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, *, threads: int = 1) -> np.ndarray:
    """ggml's bytes for float32 rows ``x`` (``ggml_quantize_chunk``, no imatrix).

    With ``threads > 1`` the rows are split across threads, as llama-quantize
    does; ctypes releases the GIL during each call, so they run in parallel.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    rows = x.reshape(-1, n_per_row)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty((rows.shape[0], n_per_row // block_size * type_size), np.uint8)
    lib = library()
    lib.ggml_quantize_init(int(qtype))

    def run(lo: int, hi: int) -> None:
        # start is an element offset and must be a whole number of rows
        lib.ggml_quantize_chunk(
            int(qtype), rows.ctypes.data, out.ctypes.data, lo * n_per_row, hi - lo, n_per_row, None
        )

    bounds = np.linspace(0, rows.shape[0], min(threads, rows.shape[0]) + 1).astype(int)
    if threads <= 1 or rows.shape[0] < 2:
        run(0, rows.shape[0])
    else:
        list(_pool(threads).map(lambda b: run(*b), zip(bounds[:-1], bounds[1:])))
    return out.reshape(*x.shape[:-1], out.shape[-1])


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    """A persistent pool per thread count, so benchmarks do not time thread start-up."""
    return ThreadPoolExecutor(threads, thread_name_prefix="ggml-reference")


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """ggml's float32 values for one type's block bytes (``dequantize_row_*``)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    n_values = data.size // type_size * block_size
    out = np.empty(n_values, np.float32)
    if qtype == GGMLQuantizationType.F32:
        out[:] = data.reshape(-1).view(np.float32)
    else:
        _dequantize_fn(qtype)(data.ctypes.data, out.ctypes.data, n_values)
    return out.reshape(*data.shape[:-1], data.shape[-1] // type_size * block_size)
