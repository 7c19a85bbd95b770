"""Streaming GGUF v3 writer: one tensor in memory at a time, atomic, optionally split.

The file layout is llama.cpp's (``ggml/src/gguf.cpp``)::

    magic "GGUF" | version u32 = 3 | n_tensors u64 | n_kv u64
    n_kv    x  key (u64 length + utf-8) | type u32 | value
    n_tensors x name (u64 length + utf-8) | n_dims u32 | ne[0..n_dims) u64 | type u32 | offset u64
    zero padding to the alignment (32 unless ``general.alignment`` says otherwise)
    tensor data, each tensor zero-padded to the alignment; offsets are relative to here

Everything before the data is known once every KV and tensor info is declared, so
tensors can then be streamed one by one in their declared order.

Output goes to a hidden temporary file beside each final name (``.<name>.tmp-XXXXXXXX``)
and is renamed into place only when every tensor has been written and every file has
exactly its planned size; on any error (or KeyboardInterrupt) the temporary files are
removed and nothing appears under the final names.

Splitting follows llama.cpp's ``gguf-split`` and loader: ``<prefix>-00001-of-0000N.gguf``
names; the first file holds every KV, each file ends its KVs with ``split.no`` (u16,
0-based), ``split.count`` (u16) and ``split.tensors.count`` (i32, the tensors of all files).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import secrets
import struct
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from .._fsutil import fsync_dir
from ..errors import BlockSizeError, GGUFWriteError, OutputExistsError, UnsupportedQuantTypeError

__all__ = ["GGUFFileWriter", "GGUFPart", "split_path"]

_V = GGUFValueType
# Little-endian layouts of the fixed-size value types (struct for scalars, numpy for arrays).
_SCALAR_FORMATS = {
    _V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h", _V.UINT32: "<I", _V.INT32: "<i",
    _V.UINT64: "<Q", _V.INT64: "<q", _V.FLOAT32: "<f", _V.FLOAT64: "<d", _V.BOOL: "<?",
}  # fmt: skip
_ARRAY_DTYPES = {vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMATS.items()}
_NUMPY_TYPES = {(dt.kind, dt.itemsize): vtype for vtype, dt in _ARRAY_DTYPES.items()}

_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv
_MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) counts the terminating NUL
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
_SPLIT_NAME = "{prefix}-{no:05d}-of-{count:05d}.gguf"  # llama_split_path's format; no is 1-based


def split_path(path: str | os.PathLike[str], index: int, count: int) -> pathlib.Path:
    """The name llama.cpp gives part ``index`` (0-based) of ``count`` for the output ``path``.

    Args:
        path: the unsplit output name, e.g. ``out/model-Q4_K_M.gguf`` (a ``.gguf`` suffix is dropped).
        index: the part, 0-based (the name says ``index + 1``).
        count: the number of parts.

    Returns:
        e.g. ``out/model-Q4_K_M-00001-of-00003.gguf``, the name llama.cpp's loader derives the other
        parts' names from.
    """
    path = pathlib.Path(path)
    prefix = path.name.removesuffix(".gguf")
    return path.with_name(_SPLIT_NAME.format(prefix=prefix, no=index + 1, count=count))


@dataclasses.dataclass(frozen=True)
class GGUFPart:
    """One output file of a :class:`GGUFFileWriter`, as planned.

    Args:
        path: the final file name.
        nbytes: the exact size the file will have.
        tensors: the GGUF names of the tensors it holds, in order.
    """

    path: pathlib.Path
    nbytes: int
    tensors: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: the last axis is the row
    type: GGMLQuantizationType
    nbytes: int

    @property
    def info_bytes(self) -> int:
        return 8 + len(self.name.encode()) + 4 + 8 * len(self.shape) + 4 + 8


@dataclasses.dataclass
class _Layout:
    part: GGUFPart
    kv: bytes  # every KV entry, packed
    n_kv: int
    tensors: list[_Tensor]
    alignment: int


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _pack_string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return struct.pack("<Q", len(data)) + data


def _pack_strings(values: Sequence[str | bytes]) -> bytes:
    """``_pack_string`` of each value, concatenated: a uint64 length, then the UTF-8 bytes.

    Vectorized: the length fields and the string bytes are scattered into one buffer by index
    arithmetic (a large vocabulary is hundreds of thousands of strings).
    """
    encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    record = lengths + 8  # each string's record: the length field, then its bytes
    starts = np.cumsum(record) - record
    out = np.empty(int(record.sum()), dtype=np.uint8)
    out[(starts[:, None] + np.arange(8)).ravel()] = lengths.astype("<u8").view(np.uint8)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    # byte j of the joined strings belongs to string i and goes to starts[i] + 8 + (j - offset[i])
    shift = np.repeat(starts + 8 - (np.cumsum(lengths) - lengths), lengths)
    out[np.arange(data.size, dtype=np.int64) + shift] = data
    return out.tobytes()


def _infer_type(value: Any) -> GGUFValueType:
    """gguf-py's rule (``GGUFValueType.get_type``: bool, float -> FLOAT32, int -> INT32), plus numpy."""
    if isinstance(value, (str, bytes, bytearray)):
        return _V.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return _V.ARRAY
    if isinstance(value, bool):
        return _V.BOOL
    if isinstance(value, float):
        return _V.FLOAT32
    if isinstance(value, int):
        return _V.INT32
    if isinstance(value, np.generic) and (value.dtype.kind, value.dtype.itemsize) in _NUMPY_TYPES:
        return _NUMPY_TYPES[(value.dtype.kind, value.dtype.itemsize)]
    raise TypeError(f"no GGUF value type for {type(value).__name__}; pass value_type")


def _pack_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> bytes:
    """The bytes of ``value`` as type ``vtype``, after the type tag."""
    if vtype in _SCALAR_FORMATS:
        return struct.pack(_SCALAR_FORMATS[vtype], value)
    if vtype == _V.STRING:
        return _pack_string(value)
    if vtype != _V.ARRAY:
        raise TypeError(f"unknown GGUF value type {vtype!r}")
    if not isinstance(value, (list, tuple, np.ndarray, bytes, bytearray)):
        raise TypeError(f"an ARRAY value must be a list, tuple or 1-D numpy array, not {type(value).__name__}")
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise TypeError(f"an ARRAY value must be 1-D, not of shape {value.shape}")
    if sub_type is None:
        if isinstance(value, (bytes, bytearray)):
            sub_type = _V.UINT8
        elif isinstance(value, np.ndarray) and (value.dtype.kind, value.dtype.itemsize) in _NUMPY_TYPES:
            sub_type = _NUMPY_TYPES[(value.dtype.kind, value.dtype.itemsize)]
        elif len(value) == 0:
            raise TypeError("cannot infer the element type of an empty array; pass sub_type")
        else:
            # one representative per Python type (a 262k-token vocabulary has one: str)
            types = {_infer_type(item) for item in {type(item): item for item in value}.values()}
            if len(types) != 1:
                raise TypeError(f"array items of mixed types {sorted(t.name for t in types)}; pass sub_type")
            (sub_type,) = types
    sub_type = GGUFValueType(sub_type)
    head = struct.pack("<IQ", sub_type, len(value))
    if sub_type == _V.STRING:
        return head + _pack_strings(value)
    if sub_type == _V.ARRAY:
        raise TypeError("arrays of arrays: llama.cpp's GGUF reader rejects them")
    dtype = _ARRAY_DTYPES[sub_type]
    if isinstance(value, np.ndarray) and (value.dtype.kind, value.dtype.itemsize) != (dtype.kind, dtype.itemsize):
        value = value.tolist()  # so numpy range-checks the values instead of wrapping them
    return head + np.asarray(value, dtype=dtype).tobytes()


def _pack_kv(key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    return _pack_string(key) + struct.pack("<I", vtype) + _pack_value(value, vtype, sub_type)


def _tensor_nbytes(name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block_size:
        raise BlockSizeError(
            f"tensor {name!r}: row length {shape[-1]} is not a multiple of {ggml_type.name}'s block size "
            f"{block_size}; choose another type for it"
        )
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * (shape[-1] // block_size) * type_size


def _open_exclusive(final: pathlib.Path) -> tuple[pathlib.Path, BinaryIO]:
    """A new hidden file beside ``final``, created with the usual (umask) permissions."""
    while True:
        tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")


class GGUFFileWriter:
    """A GGUF v3 writer that streams tensor data, one tensor at a time, into an atomic output.

    Declare every KV (:meth:`add_metadata`) and tensor (:meth:`add_tensor`) first, then write each
    tensor's data (:meth:`write_tensor`) in the declared order. Use it as a context manager: leaving
    the ``with`` block normally checks that every tensor was written, fsyncs and renames the
    temporary file(s) to the final name(s); leaving it by an exception removes them.

    >>> with GGUFFileWriter("model.gguf") as w:                     # doctest: +SKIP
    ...     w.add_metadata("general.architecture", "llama")
    ...     w.add_tensor("token_embd.weight", (512, 256), GGMLQuantizationType.Q8_0, 512 * 272)
    ...     w.write_tensor("token_embd.weight", q8_0_bytes)

    Args:
        path: the output file. With ``max_file_bytes`` and more than one part, the parts are named
            ``<path without .gguf>-00001-of-0000N.gguf`` (see :func:`split_path`).
        overwrite: replace existing output file(s); the old file stays intact until the new one is
            complete. Without it an existing output raises :class:`~llmdeploy.errors.OutputExistsError`.
        max_file_bytes: split into parts of at most this many bytes each (whole files: header, KVs,
            tensor infos, padding and data). The output is one unsplit file when it fits.
        dry_run: write nothing: :meth:`write_tensor` only checks its input, :meth:`parts` gives the
            exact sizes; existing outputs are not checked.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        max_file_bytes: int | None = None,
        dry_run: bool = False,
    ) -> None:
        self.path = pathlib.Path(path)
        self.overwrite = overwrite
        self.max_file_bytes = max_file_bytes
        self.dry_run = dry_run
        if max_file_bytes is not None and max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be a positive number of bytes, got {max_file_bytes}")
        self._kv: dict[str, bytes] = {}
        self._alignment = GGUF_DEFAULT_ALIGNMENT
        self._tensors: dict[str, _Tensor] = {}
        self._layout: list[_Layout] | None = None  # fixed when streaming starts
        self._order: list[tuple[int, _Tensor]] = []  # (part index, tensor) in write order
        self._next = 0
        self._state = "declaring"  # -> "streaming" -> "done" | "aborted"
        self._temps: list[pathlib.Path] = []
        self._file: BinaryIO | None = None
        self._file_part = -1
        if not dry_run and not overwrite and max_file_bytes is None:
            self._check_free([self.path])

    # -- declaring ---------------------------------------------------------------------------

    def add_metadata(
        self, key: str, value: Any, value_type: GGUFValueType | None = None, *, sub_type: GGUFValueType | None = None
    ) -> None:
        """Declare one KV, written in the order of the calls.

        Args:
            key: e.g. ``"llama.context_length"``. Each key once; ``split.*`` keys are the writer's own.
            value: a ``str``/``bytes``, number, bool, or a list/tuple/1-D numpy array for ARRAY.
            value_type: the GGUF type; ``None`` infers it as gguf-py does (``bool`` -> BOOL,
                ``float`` -> FLOAT32, ``int`` -> INT32, ``str`` -> STRING, sequence -> ARRAY; numpy
                scalars by dtype). ``general.alignment`` is always UINT32.
            sub_type: the element type of an ARRAY; ``None`` infers it from the items (or dtype).
        """
        self._check_declaring()
        if key in self._kv:
            raise GGUFWriteError(f"metadata key {key!r} given twice; llama.cpp rejects files with duplicate keys")
        if key in _SPLIT_KEYS:
            raise GGUFWriteError(f"metadata key {key!r} is written by the writer itself when max_file_bytes splits")
        if key == Keys.General.ALIGNMENT:
            if value_type not in (None, _V.UINT32) or isinstance(value, bool) or not isinstance(value, int):
                raise GGUFWriteError(f"{key} must be an int of type UINT32 (llama.cpp rejects other types)")
            if value <= 0 or value & (value - 1):
                raise GGUFWriteError(f"{key} must be a power of two, got {value}")
            value_type = _V.UINT32
        try:
            vtype = _infer_type(value) if value_type is None else GGUFValueType(value_type)
            packed = _pack_kv(key, value, vtype, sub_type)
        except (TypeError, ValueError, OverflowError, struct.error) as e:
            raise GGUFWriteError(f"metadata key {key!r}: cannot write {value!r:.80} as GGUF: {e}") from None
        self._kv[key] = packed
        if key == Keys.General.ALIGNMENT:
            self._alignment = value

    def add_tensor(self, name: str, shape: Sequence[int], ggml_type: GGMLQuantizationType | int, nbytes: int) -> None:
        """Declare one tensor; tensors are stored (and must be written) in the order of the calls.

        Args:
            name: the GGUF name, e.g. ``"blk.0.attn_q.weight"`` (at most 63 UTF-8 bytes).
            shape: in numpy order, the last axis being the row (the file stores it reversed).
            ggml_type: the tensor's type, e.g. ``GGMLQuantizationType.Q4_K``.
            nbytes: its data size, which must be what ``shape`` and ``ggml_type`` give.
        """
        self._check_declaring()
        try:
            ggml_type = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise UnsupportedQuantTypeError(f"tensor {name!r}: {ggml_type!r} is not a GGML type") from None
        if ggml_type not in GGML_QUANT_SIZES:
            raise UnsupportedQuantTypeError(f"tensor {name!r}: type {ggml_type.name} has no block size in gguf-py")
        shape = tuple(int(n) for n in shape)
        if name in self._tensors:
            raise GGUFWriteError(f"tensor {name!r} declared twice")
        if len(name.encode()) > _MAX_NAME_BYTES:
            raise GGUFWriteError(f"tensor name {name!r} is longer than llama.cpp's {_MAX_NAME_BYTES} bytes")
        if not 1 <= len(shape) <= _MAX_DIMS or min(shape) < 1:
            raise GGUFWriteError(f"tensor {name!r}: shape {shape} must have 1 to {_MAX_DIMS} positive dimensions")
        expected = _tensor_nbytes(name, shape, ggml_type)
        if nbytes != expected:
            raise GGUFWriteError(
                f"tensor {name!r}: declared {nbytes} bytes, but shape {shape} in {ggml_type.name} takes {expected}"
            )
        self._tensors[name] = _Tensor(name, shape, ggml_type, expected)

    def parts(self) -> list[GGUFPart]:
        """The output file(s) as they will be written: final paths, exact sizes and tensors.

        Call it after declaring everything (it reflects the declarations so far); it writes nothing.
        Raises :class:`~llmdeploy.errors.GGUFWriteError` when one tensor cannot fit ``max_file_bytes``.
        """
        layout = self._layout if self._layout is not None else self._plan()
        return [p.part for p in layout]

    # -- streaming ---------------------------------------------------------------------------

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        """Write the data of the next declared tensor; the writer keeps no reference to it.

        Any error here (a name out of order, a size that differs from the declared one, a failed
        write) removes the temporary file(s) and leaves the writer unusable.

        Args:
            name: the tensor's GGUF name; must be the next one in declaration order.
            data: its bytes as a C-ordered array of any dtype (quantized blocks as uint8; F32/F16
                as float32/float16; BF16 as uint16...), exactly ``nbytes`` long, little-endian.
        """
        if self._state == "declaring":
            self._start()
        elif self._state != "streaming":
            raise GGUFWriteError(f"cannot write tensor {name!r}: the writer is {self._state}")
        try:
            self._write_tensor(name, data)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> list[pathlib.Path]:
        """Finish: check every tensor was written, fsync, and rename the file(s) into place.

        Called by ``__exit__`` when the ``with`` block ends normally. On failure the temporary
        file(s) are removed and nothing is left under the final name(s).

        Returns:
            The final path(s), in part order (none are written in dry-run mode).
        """
        if self._state == "declaring":
            self._start()
        if self._state != "streaming":
            raise GGUFWriteError(f"cannot commit: the writer is {self._state}")
        try:
            paths = self._commit()
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        return paths

    def abort(self) -> None:
        """Remove the temporary file(s); nothing appears under the final name(s). Idempotent."""
        if self._state == "done":
            return
        self._state = "aborted"
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # e.g. ENOSPC again when flushing; the file goes anyway
            self._file = None
        for tmp in self._temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._temps = []

    def __enter__(self) -> GGUFFileWriter:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # -- internals ---------------------------------------------------------------------------

    def _check_declaring(self) -> None:
        if self._state != "declaring":
            raise GGUFWriteError("every KV and tensor info must be declared before the first tensor is written")

    def _check_free(self, paths: Sequence[pathlib.Path]) -> None:
        for p in paths:
            if os.path.lexists(p):
                raise OutputExistsError(f"{p} exists; pass overwrite=True to replace it, or choose another path")

    def _part(self, path: pathlib.Path, kv: bytes, n_kv: int, tensors: list[_Tensor], alignment: int) -> _Layout:
        meta = _HEADER_BYTES + len(kv) + sum(t.info_bytes for t in tensors)
        size = meta + _pad(meta, alignment) + sum(t.nbytes + _pad(t.nbytes, alignment) for t in tensors)
        return _Layout(GGUFPart(path, size, tuple(t.name for t in tensors)), kv, n_kv, tensors, alignment)

    def _plan(self) -> list[_Layout]:
        tensors = list(self._tensors.values())
        kv = b"".join(self._kv.values())
        whole = self._part(self.path, kv, len(self._kv), tensors, self._alignment)
        limit = self.max_file_bytes
        if limit is None or whole.part.nbytes <= limit:
            return [whole]
        if not tensors:
            raise GGUFWriteError(
                f"the metadata alone takes {whole.part.nbytes} bytes, more than max_file_bytes={limit}; "
                "raise max_file_bytes"
            )

        def split_kv(no: int, count: int) -> bytes:
            values = ((no, _V.UINT16), (count, _V.UINT16), (len(tensors), _V.INT32))
            return b"".join(_pack_kv(key, v, vtype) for key, (v, vtype) in zip(_SPLIT_KEYS, values))

        # Greedy, in order: a part takes tensors while the whole file stays within the limit. The
        # split KVs have a fixed size, so placeholder values give the final sizes. As gguf-split,
        # only part 1 holds the KVs (general.alignment included); the others use the default alignment.
        groups: list[list[_Tensor]] = []
        meta = data = align = 0  # the current part's bytes before the data, its data, its alignment

        def fits(t: _Tensor) -> bool:
            m = meta + t.info_bytes
            return m + _pad(m, align) + data + t.nbytes + _pad(t.nbytes, align) <= limit

        for t in tensors:
            if not groups or not fits(t):
                first = not groups
                groups.append([])
                meta = _HEADER_BYTES + (len(kv) if first else 0) + len(split_kv(0, 0))
                data, align = 0, self._alignment if first else GGUF_DEFAULT_ALIGNMENT
                if not fits(t):
                    raise GGUFWriteError(
                        f"tensor {t.name!r} ({t.nbytes} bytes) does not fit in a file of max_file_bytes={limit} "
                        f"with its metadata; raise max_file_bytes"
                    )
            groups[-1].append(t)
            meta += t.info_bytes
            data += t.nbytes + _pad(t.nbytes, align)
        count = len(groups)
        if count > 0xFFFF:
            raise GGUFWriteError(f"{count} parts exceed split.count's u16; raise max_file_bytes")
        return [
            self._part(
                split_path(self.path, no, count),
                (kv if no == 0 else b"") + split_kv(no, count),
                (len(self._kv) if no == 0 else 0) + len(_SPLIT_KEYS),
                group,
                self._alignment if no == 0 else GGUF_DEFAULT_ALIGNMENT,
            )
            for no, group in enumerate(groups)
        ]

    def _start(self) -> None:
        layout = self._plan()
        if not self.dry_run and not self.overwrite:
            self._check_free([p.part.path for p in layout])
        self._layout = layout
        self._order = [(i, t) for i, p in enumerate(layout) for t in p.tensors]
        self._state = "streaming"

    def _open_part(self, index: int) -> None:
        if self._file is not None:
            self._close_file()
        p = self._layout[index]  # type: ignore[index]
        tmp, self._file = _open_exclusive(p.part.path)
        self._temps.append(tmp)
        self._file_part = index
        infos = bytearray()
        offset = 0
        for t in p.tensors:
            infos += _pack_string(t.name) + struct.pack(f"<I{len(t.shape)}Q", len(t.shape), *reversed(t.shape))
            infos += struct.pack("<IQ", t.type, offset)
            offset += t.nbytes + _pad(t.nbytes, p.alignment)
        head = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(p.tensors), p.n_kv) + p.kv + infos
        self._file.write(head + bytes(_pad(len(head), p.alignment)))

    def _close_file(self) -> None:
        f, self._file = self._file, None
        assert f is not None
        with f:
            f.flush()
            os.fsync(f.fileno())

    def _write_tensor(self, name: str, data: np.ndarray) -> None:
        if self._next >= len(self._order):
            declared = "declared and already written" if name in self._tensors else "not declared"
            raise GGUFWriteError(f"tensor {name!r} is {declared}: every declared tensor has been written")
        part, t = self._order[self._next]
        if name != t.name:
            why = "not declared" if name not in self._tensors else "out of order"
            raise GGUFWriteError(f"tensor {name!r} is {why}: the next tensor to write is {t.name!r}")
        if not isinstance(data, np.ndarray):
            raise GGUFWriteError(f"tensor {name!r}: data must be a numpy array, not {type(data).__name__}")
        if data.nbytes != t.nbytes:
            raise GGUFWriteError(
                f"tensor {name!r}: got {data.nbytes} bytes ({data.dtype}, shape {data.shape}), declared "
                f"{t.nbytes} bytes ({t.type.name}, shape {t.shape})"
            )
        self._next += 1
        if self.dry_run:
            return
        if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and sys.byteorder == "big"):
            data = data.astype(data.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(data)
        if part != self._file_part:
            self._open_part(part)
        assert self._file is not None
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._file.write(bytes(_pad(t.nbytes, self._layout[part].alignment)))  # type: ignore[index]

    def _commit(self) -> list[pathlib.Path]:
        assert self._layout is not None
        if self._next < len(self._order) and not (self.dry_run and self._next == 0):
            missing = [t.name for _, t in self._order[self._next :]]
            raise GGUFWriteError(
                f"tensor {missing[0]!r} was declared but never written ({len(missing)} of "
                f"{len(self._order)} tensors missing); no file was written"
            )
        finals = [p.part.path for p in self._layout]
        if self.dry_run:
            return finals
        for i in range(len(self._layout)):  # parts without tensors (a tensor-less file) still get written
            if i > self._file_part:
                self._open_part(i)
        if self._file is not None:
            self._close_file()
        for tmp, p in zip(self._temps, self._layout):
            if os.path.getsize(tmp) != p.part.nbytes:
                raise GGUFWriteError(f"{p.part.path}: wrote {os.path.getsize(tmp)} bytes, planned {p.part.nbytes}")
        if not self.overwrite:
            self._check_free(finals)
        # The first part last: a reader that finds it finds every other part complete.
        for tmp, final in reversed(list(zip(self._temps, finals))):
            os.replace(tmp, final)
            self._temps.remove(tmp)
        fsync_dir(self.path.parent)
        return finals
