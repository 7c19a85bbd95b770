"""The quant-type registry and the row/block wiring around the block kernels.

A quant type is one small class, registered by the gguf enum it implements::

    class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0):
        @classmethod
        def quantize_blocks(cls, blocks): ...      # reference: eager torch, CPU or GPU
        fast_kernel = staticmethod(_q8_0_kernel)  # optional numba kernel (CPU)

Kernels only ever see blocks: ``quantize_blocks`` maps float32
``(n_blocks, block_size)`` to uint8 ``(n_blocks, type_size)`` (torch tensors on
one device), the fast kernel does the same on numpy arrays, and
``dequantize_blocks`` maps numpy bytes back.  Without an importance matrix every GGUF
block type quantizes each block independently of the others, so the wiring
below may cut a tensor into chunks of whole blocks anywhere, run them on
several threads, and still produce exactly ggml's bytes.  Block geometry comes
from gguf's ``GGML_QUANT_SIZES`` only.
"""

from __future__ import annotations

import itertools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import (
    BlockSizeError,
    InputDTypeError,
    NotSupportedYetError,
    UnsupportedQuantTypeError,
)
from . import _jit
from ._input import Values

if TYPE_CHECKING:
    import torch

QTypeLike = Union[GGMLQuantizationType, str]
Backend = Literal["auto", "fast", "reference"]

#: Values per work chunk.  4 MiB of float32: big enough to amortise the
#: per-chunk Python overhead, small enough to stay in cache and to keep the
#: temporaries of the reference kernels small whatever the tensor size.
CHUNK_VALUES = 1 << 20
#: Values per chunk for the reference kernels on a GPU (16 MiB of float32).
GPU_CHUNK_VALUES = 1 << 22

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
    def quantize_blocks(cls, blocks: "torch.Tensor") -> "torch.Tensor":
        """float32 ``(n, block_size)`` -> uint8 ``(n, type_size)`` on the same device, ggml's bytes.

        The reference: eager torch, vectorized across blocks, in ggml's order of
        float operations, so the same code is exact on a CPU and on a CUDA GPU.
        """
        raise UnsupportedQuantTypeError(
            f"llmdeploy can read {cls.qtype.name} but not write it. "
            f"Types it can quantize to: {', '.join(quantizable_type_names())}."
        )

    @classmethod
    def dequantize_blocks(cls, data: np.ndarray) -> np.ndarray:
        """uint8 ``(n, type_size)`` -> float32 ``(n, block_size)``, equal to ggml's ``to_float``."""
        raise NotImplementedError(f"{cls.__name__} must define dequantize_blocks")  # every registered type does


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


def _check_row_length(n_cols: int, cls: type[QuantType], what: str) -> None:
    if n_cols % cls.block_size:
        raise BlockSizeError(
            f"{cls.qtype.name} packs blocks of {cls.block_size} values, but the {what} has length {n_cols}, "
            f"which is not a multiple of {cls.block_size}. Pick a type whose block size divides {n_cols} "
            f"(F32/F16/BF16 always do) or pad the rows."
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


def _resolve_backend(cls: type[QuantType], backend: Backend, device: Any, values: Values) -> tuple[str, Any]:
    """``("fast", None)`` or ``("reference", torch device)`` for this call.

    A non-CPU ``device`` (or a tensor already on one) means the reference
    (torch) kernels on that device; otherwise 'auto' prefers the numba kernel,
    falling back to the reference on the CPU, with one notice, when numba is missing.
    """
    import torch

    if backend not in ("auto", "fast", "reference"):
        raise UnsupportedQuantTypeError(f"backend must be 'auto', 'fast' or 'reference', got {backend!r}.")
    if device is None and values.device is not None and values.device.type != "cpu":
        device = values.device
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedQuantTypeError(
                f"device={str(device)!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU. "
                "Leave device unset to quantize on the CPU."
            )
        if backend == "fast":
            raise UnsupportedQuantTypeError(
                f"The fast (numba) kernels run on the CPU only; drop backend='fast' to quantize on {device}."
            )
        return "reference", device
    if backend == "reference":
        return "reference", device
    if cls.fast_kernel is None:
        if backend == "fast":
            raise UnsupportedQuantTypeError(f"{cls.qtype.name} has no fast kernel; use backend='auto' or 'reference'.")
        return "reference", device
    if not _jit.AVAILABLE:
        if backend == "fast":
            raise NotSupportedYetError(f"The fast kernels need numba, which failed to load ({_jit.UNAVAILABLE_REASON}).")
        _notice_once(
            "numba",
            f"llmdeploy: numba is unavailable ({_jit.UNAVAILABLE_REASON}); quantizing with the slower "
            "reference kernels (same bytes). `pip install numba` restores the fast path.",
        )
        return "reference", device
    return "fast", None


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

    def _all_finite_fast(blocks: np.ndarray) -> bool:
        return bool(np.isfinite(blocks).all())


def quantize(
    x: Any,
    qtype: QTypeLike,
    *,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    backend: Backend = "auto",
    device: Any = None,
) -> np.ndarray:
    """Quantize rows of float values to a GGUF block type, byte for byte as ggml does.

    Args:
        x: float32 values, shape ``(n_rows, n_cols)`` (any leading shape works; the last
            axis is the row): a numpy array or a torch tensor on any device. float16,
            bfloat16 and float64 are converted chunk by chunk (never the whole tensor at
            once); float64 values that overflow float32 are an error.
        qtype: a ``gguf.GGMLQuantizationType`` or its name in any case (``"q4_k"``).
        imatrix: importance weights, one per column (llama.cpp's imatrix). Not yet supported.
        threads: CPU worker threads; default ``LLMDEPLOY_NUM_THREADS`` or all usable cores.
        backend: ``"auto"`` (the numba kernels on the CPU when available), ``"fast"`` (numba,
            or an error) or ``"reference"`` (the readable torch kernels, which also run on
            GPUs). All give the same bytes.
        device: where the reference kernels run, e.g. ``"cuda"``. Default: the CPU, or the
            device of a tensor ``x`` that is not on the CPU.

    Returns:
        uint8 numpy array of shape ``(*x.shape[:-1], n_cols // block_size * type_size)`` laid
        out exactly as ggml's ``ggml_quantize_chunk`` writes it.

    Raises:
        UnsupportedQuantTypeError: unknown type name, or a read-only type.
        BlockSizeError: the row length is not a multiple of the type's block size.
        NonFiniteValueError: NaN or inf in ``x``.
        InputDTypeError: an integer, complex or 0-d input.
    """
    cls = quant_type(qtype)
    if not cls.can_quantize():
        cls.quantize_blocks(None)  # type: ignore[arg-type]  # raises the explanatory error
    values = Values(x)
    n_cols = values.shape[-1]
    _check_row_length(n_cols, cls, "row")
    if imatrix is not None:
        if np.shape(imatrix) != (n_cols,):
            raise InputDTypeError(f"imatrix must hold one weight per column, shape ({n_cols},), got {np.shape(imatrix)}.")
        raise NotSupportedYetError(
            "Quantizing with an importance matrix is not implemented yet; call quantize() without imatrix= "
            "(llama-quantize without --imatrix)."
        )
    mode, device = _resolve_backend(cls, backend, device, values)
    bs = cls.block_size
    out = np.empty((values.size // bs, cls.type_size), np.uint8)
    chunk_values = CHUNK_VALUES

    if mode == "reference":
        import torch

        if device.type != "cpu":  # one stream of large chunks keeps a GPU busy
            threads, chunk_values = 1, GPU_CHUNK_VALUES

        def run(lo: int, hi: int) -> bool:
            chunk = values.torch_chunk(lo * bs, hi * bs, device).reshape(-1, bs)
            if not bool(torch.isfinite(chunk).all()):
                return False
            out[lo:hi] = cls.quantize_blocks(chunk).cpu().numpy()
            return True

    else:
        kernel = cls.fast_kernel

        def run(lo: int, hi: int) -> bool:
            chunk = values.numpy_chunk(lo * bs, hi * bs).reshape(-1, bs)
            if cls.fast_kernel_counts_non_finite:
                return bool(kernel(chunk, out[lo:hi]) == 0)
            if not _all_finite_fast(chunk):
                return False
            kernel(chunk, out[lo:hi])
            return True

    if not all(_map_chunks(run, out.shape[0], bs, threads, chunk_values)):
        values.raise_non_finite(chunk_values)
    return out.reshape(*values.shape[:-1], n_cols // bs * cls.type_size)


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


def _map_chunks(
    fn: Callable[[int, int], bool], n_blocks: int, block_size: int, threads: int | None, chunk_values: int = 0
) -> list[bool]:
    """Run ``fn(lo, hi)`` over chunks of whole blocks, on up to ``threads`` threads."""
    n_threads = default_threads() if threads is None else int(threads)
    if n_threads < 1:
        raise InputDTypeError(f"threads must be at least 1, got {threads}.")
    per_chunk = max(1, (chunk_values or CHUNK_VALUES) // block_size)
    if n_threads > 1:  # give every thread work even for mid-sized tensors
        per_chunk = max(1, min(per_chunk, -(-n_blocks // n_threads)))
    bounds = [(lo, min(lo + per_chunk, n_blocks)) for lo in range(0, n_blocks, per_chunk)]
    if n_threads == 1 or len(bounds) <= 1:
        return [fn(lo, hi) for lo, hi in bounds]
    # The calling thread works too, beside n_threads - 1 pool threads; each
    # takes the next chunk as it finishes one (``next`` on a count is atomic).
    next_chunk = itertools.count()

    def drain() -> list[tuple[int, bool]]:
        done = []
        while (i := next(next_chunk)) < len(bounds):
            done.append((i, fn(*bounds[i])))
        return done

    helpers = min(n_threads, len(bounds)) - 1
    if helpers not in _executors:
        _executors[helpers] = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="llmdeploy-quant")
    futures = [_executors[helpers].submit(drain) for _ in range(helpers)]
    results = drain()
    for future in futures:
        results.extend(future.result())
    return [ok for _, ok in sorted(results)]
