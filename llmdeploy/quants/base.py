"""The quant-type registry and the row/block wiring around the block kernels.

A quant type is one small class, registered by the gguf enum it implements::

    class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0):
        @classmethod
        def quantize_blocks(cls, blocks): ...      # numpy reference
        fast_kernel = staticmethod(_q8_0_kernel)  # optional numba kernel

Kernels only ever see blocks: ``quantize_blocks`` maps float32
``(n_blocks, block_size)`` to uint8 ``(n_blocks, type_size)`` and
``dequantize_blocks`` maps back.  Without an importance matrix every GGUF
block type quantizes each block independently of the others, so the wiring
below may cut a tensor into chunks of whole blocks anywhere, run them on
several threads, and still produce exactly ggml's bytes.  Block geometry comes
from gguf's ``GGML_QUANT_SIZES`` only.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Literal, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import (
    BlockSizeError,
    InputDTypeError,
    NonFiniteValueError,
    NotSupportedYetError,
    UnsupportedQuantTypeError,
)
from . import _jit

QTypeLike = Union[GGMLQuantizationType, str]
Backend = Literal["auto", "fast", "reference"]

#: Values per work chunk.  1 MiB of float32: big enough to amortise the
#: per-chunk Python overhead, small enough to stay in cache and to keep the
#: temporaries of the numpy reference path small whatever the tensor size.
CHUNK_VALUES = 1 << 18

_REGISTRY: dict[GGMLQuantizationType, type["QuantType"]] = {}


class QuantType:
    """One GGUF block type.  Subclasses pass ``qtype=`` and override the block methods."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    #: numba kernel ``(blocks: f32[n, block_size], out: u8[n, type_size]) -> None``
    #: that writes exactly what ``quantize_blocks`` returns; None if there is none.
    fast_kernel: ClassVar[Callable[[np.ndarray, np.ndarray], Any] | None] = None
    #: True if ``fast_kernel`` itself returns the number of non-finite values it
    #: read, sparing quantize() its own checking pass (worth it for a bare copy).
    fast_kernel_counts_non_finite: ClassVar[bool] = False

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an intermediate base class
            return
        if qtype in _REGISTRY:
            raise RuntimeError(f"{qtype.name} is registered twice ({_REGISTRY[qtype].__name__}, {cls.__name__})")
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        _REGISTRY[qtype] = cls

    @classmethod
    def can_quantize(cls) -> bool:
        return cls.quantize_blocks.__func__ is not QuantType.quantize_blocks.__func__  # type: ignore[attr-defined]

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """float32 ``(n, block_size)`` -> uint8 ``(n, type_size)``, ggml's bytes (numpy reference)."""
        raise UnsupportedQuantTypeError(
            f"llmdeploy can read {cls.qtype.name} but not write it. "
            f"Types it can quantize to: {', '.join(quantizable_type_names())}."
        )

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        """uint8 ``(n, type_size)`` -> float32 ``(n, block_size)``, equal to ggml's ``to_float``."""
        raise NotImplementedError  # every registered type overrides this


# --------------------------------------------------------------------------- registry


def quant_type(qtype: QTypeLike) -> type[QuantType]:
    """The registered class for a ``GGMLQuantizationType`` or its name in any case (``"q4_k"``)."""
    if isinstance(qtype, GGMLQuantizationType):
        key: GGMLQuantizationType | None = qtype
    elif isinstance(qtype, str):
        key = GGMLQuantizationType.__members__.get(qtype.strip().upper())
    else:
        raise UnsupportedQuantTypeError(
            f"qtype must be a gguf.GGMLQuantizationType or a type name such as 'q4_k', got {type(qtype).__name__}."
        )
    if key is None or key not in _REGISTRY:
        raise UnsupportedQuantTypeError(
            f"Unknown or unsupported GGUF type {qtype!r}. Supported types: {', '.join(supported_type_names())}."
        )
    return _REGISTRY[key]


def supported_type_names() -> list[str]:
    """Every type llmdeploy can dequantize (and so read)."""
    return [t.name for t in sorted(_REGISTRY)]


def quantizable_type_names() -> list[str]:
    """Every type llmdeploy can quantize to."""
    return [t.name for t in sorted(_REGISTRY) if _REGISTRY[t].can_quantize()]


# --------------------------------------------------------------------------- input checks


def _as_float32(x: Any) -> np.ndarray:
    """Values to quantize as a C-contiguous float32 numpy array, converting only exactly."""
    torch = _torch_if_tensor(x)
    if torch is not None:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise InputDTypeError(
                f"Cannot quantize a torch tensor of dtype {x.dtype}; pass float32, float16, bfloat16 or float64."
            )
        x = x.detach().to("cpu")
        x = x.numpy() if x.dtype in (torch.float32, torch.float64) else x.float().numpy()
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise InputDTypeError(f"Cannot quantize a {type(x).__name__}; pass a numpy array or a torch tensor.")
    if x.dtype == np.float64:
        with np.errstate(over="ignore"):
            narrowed = x.astype(np.float32)
        overflow = np.isfinite(x) & ~np.isfinite(narrowed)
        if overflow.any():
            first = np.argwhere(overflow)[0]
            raise NonFiniteValueError(
                f"{int(overflow.sum())} float64 value(s) overflow float32, first at index {tuple(int(i) for i in first)} "
                f"(value {x[tuple(first)]!r}). Scale the tensor or clip it before quantizing."
            )
        x = narrowed
    elif x.dtype == np.float16:
        x = x.astype(np.float32)
    elif x.dtype != np.float32:
        raise InputDTypeError(
            f"Cannot quantize an array of dtype {x.dtype}; pass float32 (float16 and float64 are converted)."
        )
    if x.ndim == 0:
        raise InputDTypeError("Cannot quantize a 0-d array: pass rows of values, shape (n_rows, n_cols).")
    return np.ascontiguousarray(x)


def _torch_if_tensor(x: Any) -> Any:
    torch = __import__("sys").modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return None


def _check_row_length(n_cols: int, cls: type[QuantType], what: str) -> None:
    if n_cols % cls.block_size:
        raise BlockSizeError(
            f"{cls.qtype.name} packs blocks of {cls.block_size} values, but the {what} has length {n_cols}, "
            f"which is not a multiple of {cls.block_size}. Pick a type whose block size divides {n_cols} "
            f"(F32/F16/BF16 always do) or pad the rows."
        )


def _raise_non_finite(x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    n_nan = int(np.isnan(x).sum())
    where = f"row {first[0]}, column {first[-1]}" if x.ndim == 2 else f"index {first}"
    raise NonFiniteValueError(
        f"Cannot quantize: {int(bad.sum())} non-finite value(s) ({n_nan} NaN, {int(bad.sum()) - n_nan} inf), "
        f"the first at {where} (value {x[first]!r}). Fix the weights (e.g. a diverged fine-tune) before exporting."
    )


# --------------------------------------------------------------------------- dispatch


def default_threads() -> int:
    """Threads used when ``threads`` is not given: ``LLMDEPLOY_NUM_THREADS`` or every usable core."""
    env = os.environ.get("LLMDEPLOY_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_notices: set[str] = set()


def _notice_once(key: str, message: str) -> None:
    if key not in _notices:
        _notices.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _block_quantizer(cls: type[QuantType], backend: Backend) -> Callable[[np.ndarray, np.ndarray], None]:
    """``f(blocks, out)`` for the chosen backend; 'auto' prefers the fast kernel."""

    def reference(blocks: np.ndarray, out: np.ndarray) -> None:
        out[...] = cls.quantize_blocks(blocks)

    if backend == "reference":
        return reference
    if backend not in ("auto", "fast"):
        raise UnsupportedQuantTypeError(f"backend must be 'auto', 'fast' or 'reference', got {backend!r}.")
    kernel = cls.fast_kernel
    if kernel is None:
        if backend == "fast":
            raise UnsupportedQuantTypeError(f"{cls.qtype.name} has no fast kernel; use backend='auto' or 'reference'.")
        return reference
    if not _jit.AVAILABLE:
        if backend == "fast":
            raise NotSupportedYetError(f"The fast kernels need numba, which failed to load ({_jit.UNAVAILABLE_REASON}).")
        _notice_once(
            "numba",
            f"llmdeploy: numba is unavailable ({_jit.UNAVAILABLE_REASON}); quantizing with the slower "
            "numpy reference kernels (same bytes). `pip install numba` restores the fast path.",
        )
        return reference
    return kernel


def _all_finite_reference(blocks: np.ndarray) -> bool:
    return bool(np.isfinite(blocks).all())


if _jit.AVAILABLE:

    @_jit.kernel
    def _count_non_finite(bits):  # type: ignore[no-untyped-def]
        # A float32 is inf or nan exactly when its 8 exponent bits are all ones;
        # an integer count vectorizes, unlike a float test in C order.
        n = 0
        for i in range(bits.size):
            n += (bits[i] & 0x7F800000) == 0x7F800000
        return n

    def _all_finite_fast(blocks: np.ndarray) -> bool:
        return _count_non_finite(blocks.reshape(-1).view(np.int32)) == 0

else:
    _all_finite_fast = _all_finite_reference


def quantize(
    x: Any,
    qtype: QTypeLike,
    *,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    backend: Backend = "auto",
) -> np.ndarray:
    """Quantize rows of float values to a GGUF block type, byte for byte as ggml does.

    Args:
        x: float32 values, shape ``(n_rows, n_cols)`` (any leading shape works; the last
            axis is the row). float16/bfloat16/float64 numpy arrays or torch tensors are
            converted to float32 first; float64 values that overflow float32 are an error.
        qtype: a ``gguf.GGMLQuantizationType`` or its name in any case (``"q4_k"``).
        imatrix: importance weights, one per column (llama.cpp's imatrix). Not yet supported.
        threads: worker threads; default ``LLMDEPLOY_NUM_THREADS`` or all usable cores.
        backend: ``"auto"`` (numba kernels when available, else numpy), ``"fast"`` or
            ``"reference"`` (the readable numpy implementation; same bytes, slower).

    Returns:
        uint8 array of shape ``(*x.shape[:-1], n_cols // block_size * type_size)`` laid out
        exactly as ggml's ``ggml_quantize_chunk`` writes it.

    Raises:
        UnsupportedQuantTypeError: unknown type name, or a read-only type.
        BlockSizeError: the row length is not a multiple of the type's block size.
        NonFiniteValueError: NaN or inf in ``x``.
        InputDTypeError: an integer, complex or 0-d input.
    """
    cls = quant_type(qtype)
    if not cls.can_quantize():
        cls.quantize_blocks(np.empty((0, cls.block_size), np.float32))  # raises the explanatory error
    values = _as_float32(x)
    n_cols = values.shape[-1]
    _check_row_length(n_cols, cls, "row")
    if imatrix is not None:
        if np.shape(imatrix) != (n_cols,):
            raise InputDTypeError(f"imatrix must hold one weight per column, shape ({n_cols},), got {np.shape(imatrix)}.")
        raise NotSupportedYetError(
            "Quantizing with an importance matrix is not implemented yet; call quantize() without imatrix= "
            "(llama-quantize without --imatrix)."
        )
    out_shape = (*values.shape[:-1], n_cols // cls.block_size * cls.type_size)
    blocks = values.reshape(-1, cls.block_size)
    out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
    block_fn = _block_quantizer(cls, backend)
    is_fast = block_fn is cls.fast_kernel
    finite = _all_finite_fast if is_fast else _all_finite_reference
    kernel_counts = is_fast and cls.fast_kernel_counts_non_finite

    def run(lo: int, hi: int) -> bool:
        chunk = blocks[lo:hi]
        if kernel_counts:
            return block_fn(chunk, out[lo:hi]) == 0
        if not finite(chunk):
            return False
        block_fn(chunk, out[lo:hi])
        return True

    if not all(_map_chunks(run, blocks.shape[0], cls.block_size, threads)):
        _raise_non_finite(values.reshape(-1, n_cols) if values.ndim != 2 else values)
    return out.reshape(out_shape)


def dequantize(data: Any, qtype: QTypeLike, *, threads: int | None = None) -> np.ndarray:
    """Decode GGUF block data to float32, exactly as ggml does.

    Args:
        data: uint8 array whose last axis holds whole blocks of one row
            (``n_cols // block_size * type_size`` bytes), or a bytes-like object
            holding whole blocks (then the result is 1-D).
        qtype: a ``gguf.GGMLQuantizationType`` or its name in any case.
        threads: worker threads; default as for :func:`quantize`.

    Returns:
        float32 array of shape ``(*data.shape[:-1], n_bytes // type_size * block_size)``.
    """
    cls = quant_type(qtype)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, np.uint8)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise InputDTypeError(f"dequantize() takes uint8 block data (a numpy array or bytes), got {got}.")
    if data.ndim == 0:
        raise InputDTypeError("Cannot dequantize a 0-d array: pass rows of block bytes.")
    n_bytes = data.shape[-1]
    if n_bytes % cls.type_size:
        raise BlockSizeError(
            f"{cls.qtype.name} blocks are {cls.type_size} bytes each, but the rows hold {n_bytes} bytes, "
            f"which is not a multiple of {cls.type_size}. Check the type and the row length."
        )
    out_shape = (*data.shape[:-1], n_bytes // cls.type_size * cls.block_size)
    blocks = np.ascontiguousarray(data).reshape(-1, cls.type_size)
    out = np.empty((blocks.shape[0], cls.block_size), np.float32)

    def run(lo: int, hi: int) -> bool:
        out[lo:hi] = cls.dequantize_blocks(blocks[lo:hi])
        return True

    _map_chunks(run, blocks.shape[0], cls.block_size, threads)
    return out.reshape(out_shape)


_executors: dict[int, ThreadPoolExecutor] = {}


def _map_chunks(fn: Callable[[int, int], bool], n_blocks: int, block_size: int, threads: int | None) -> list[bool]:
    """Run ``fn(lo, hi)`` over chunks of whole blocks, on up to ``threads`` threads."""
    n_threads = default_threads() if threads is None else int(threads)
    if n_threads < 1:
        raise InputDTypeError(f"threads must be at least 1, got {threads}.")
    per_chunk = max(1, CHUNK_VALUES // block_size)
    if n_threads > 1:  # give every thread work even for mid-sized tensors
        per_chunk = max(1, min(per_chunk, -(-n_blocks // n_threads)))
    bounds = [(lo, min(lo + per_chunk, n_blocks)) for lo in range(0, n_blocks, per_chunk)]
    if n_threads == 1 or len(bounds) <= 1:
        return [fn(lo, hi) for lo, hi in bounds]
    if n_threads not in _executors:
        _executors[n_threads] = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="llmdeploy-quant")
    return list(_executors[n_threads].map(lambda b: fn(*b), bounds))
