"""Read an existing GGUF: its metadata in file order and its tensors, memory-mapped.

``open_gguf(path)`` parses the header (in one pass; gguf-py's ``GGUFReader`` reads the same
but takes seconds over a large vocabulary, see :class:`_Parser`) and keeps what later stages
need: every KV as a value the :class:`~llmdeploy.gguf.writer.GGUFFileWriter` writes back
byte for byte (same key order, value types and array element types), and every tensor's
name, shape, type and place in the file. Tensor data is then read a range
of rows at a time from a memory map whose pages leave the resident set once the next
range is read, so reading a model tensor by tensor never holds more than one tensor.

A split model (``<prefix>-00001-of-0000N.gguf``, as llama.cpp's gguf-split and
``save_pretrained_gguf(max_file_size=...)`` write it) is read whole from its first part,
as llama.cpp's loader does: the KVs come from the first part (without the ``split.*``
keys) and the tensors from every part, in part order.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
import re
import struct
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .. import quants
from ..errors import GGUFReadError, MissingFileError
from ..source import _ShardMaps

__all__ = ["GGUFModelFile", "GGUFTensorInfo", "MetadataEntry", "open_gguf"]

_V = GGUFValueType
_SPLIT_KEYS = frozenset(
    (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
)
# llama.cpp's split file names (llama_split_path): the part number is 1-based.
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The float types a tensor can be read from without dequantizing (numpy has float16 and float32).
_NUMPY_FLOATS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclasses.dataclass(frozen=True)
class MetadataEntry:
    """One KV of a GGUF, as :meth:`GGUFFileWriter.add_metadata` takes it back unchanged.

    Attributes:
        key: e.g. ``"llama.block_count"``.
        value: ``str`` for a STRING (``bytes`` in the rare case it is not valid UTF-8), a Python
            ``int``/``float``/``bool`` for a scalar, a 1-D numpy array of the element type for a
            numeric ARRAY, and a list of ``str`` (or ``bytes``) for an ARRAY of STRING.
        type: its GGUF value type.
        sub_type: the element type of an ARRAY, else ``None``.
    """

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor of a GGUF lies, and what it is.

    Attributes:
        name: the GGUF name (``"blk.0.attn_q.weight"``).
        shape: numpy order, the last axis being the row (the reverse of ggml's ``ne``).
        type: its ggml type.
        nbytes: its data size in bytes.
        path: the file (the part of a split model) that holds it.
        offset: the absolute byte offset of its data in that file.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    nbytes: int
    path: pathlib.Path
    offset: int

    @property
    def n_rows(self) -> int:
        """Rows of ``shape[-1]`` values: every axis but the last, flattened."""
        return math.prod(self.shape[:-1])

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row in the tensor's type."""
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return self.shape[-1] // block_size * type_size


class GGUFModelFile:
    """An opened GGUF (every part of a split one): metadata in memory, tensor data memory-mapped.

    Use :func:`open_gguf` to open one. It is a context manager; :meth:`close` unmaps the files.

    Attributes:
        path: the file that was opened (the first part of a split model).
        paths: every file read, in part order (just ``path`` when it is not split).
        metadata: every KV in file order (of the first part), without the ``split.*`` keys.
        tensors: every tensor, in file order (part by part).
    """

    def __init__(self, paths: list[pathlib.Path], metadata: list[MetadataEntry], tensors: list[GGUFTensorInfo]) -> None:
        self.path = paths[0]
        self.paths = tuple(paths)
        self.metadata = tuple(metadata)
        self.tensors = tuple(tensors)
        self._kv = {entry.key: entry for entry in metadata}
        self._by_name = {t.name: t for t in tensors}
        self._maps = _ShardMaps()

    def __repr__(self) -> str:
        return f"GGUFModelFile({str(self.path)!r}, {len(self.metadata)} KVs, {len(self.tensors)} tensors)"

    def __enter__(self) -> GGUFModelFile:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory maps (views handed out before stay valid until dropped)."""
        self._maps.release()
        self._maps = _ShardMaps()

    # -- metadata ----------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def get(self, key: str, default: Any = None) -> Any:
        """The value of KV ``key`` (see :attr:`MetadataEntry.value`), or ``default`` when absent."""
        entry = self._kv.get(key)
        return default if entry is None else entry.value

    def require(self, key: str, why: str = "") -> Any:
        """The value of KV ``key``.

        Args:
            key: the KV's key.
            why: what needs it, for the error message (``"to plan the quantization"``).

        Raises:
            GGUFReadError: the file has no such key.
        """
        if key not in self._kv:
            needed = f" {why}" if why else ""
            raise GGUFReadError(f"{self.path}: the GGUF has no metadata key {key!r}, needed{needed}.")
        return self._kv[key].value

    def layer0_int(self, key: str, default: int | None = None, why: str = "") -> int:
        """An integer KV that may be per layer (an array, one value per layer): its layer-0 value.

        llama.cpp's hparams read head counts this way (``n_head()`` is ``n_head(0)``).

        Args:
            key: the KV's key.
            default: the value when the key is absent; ``None`` makes it required.
            why: what needs it, for the error message.

        Raises:
            GGUFReadError: the key is absent without a default, or its value is not an integer.
        """
        if key not in self._kv and default is not None:
            return default
        value = self.require(key, why)
        if isinstance(value, np.ndarray):
            value = value[0] if value.size else None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise GGUFReadError(f"{self.path}: metadata key {key!r} should hold an integer, not {value!r}.")
        return int(value)

    @property
    def architecture(self) -> str:
        """``general.architecture`` (``"llama"``, ``"gemma3"``...)."""
        arch = self.require(gguf.Keys.General.ARCHITECTURE, "to know the model architecture")
        if not isinstance(arch, str):
            raise GGUFReadError(f"{self.path}: general.architecture is not a string: {arch!r}.")
        return arch

    # -- tensors -----------------------------------------------------------------------------

    def tensor(self, name: str) -> GGUFTensorInfo:
        """The tensor called ``name``.

        Raises:
            GGUFReadError: there is no such tensor.
        """
        try:
            return self._by_name[name]
        except KeyError:
            raise GGUFReadError(f"{self.path}: no tensor {name!r} in the GGUF.") from None

    def raw_rows(self, tensor: GGUFTensorInfo, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``lo:hi`` of a tensor's stored bytes, shape ``(hi - lo, row_nbytes)``, uint8.

        A read-only view of the memory map, valid until the next call of :meth:`raw_rows` or
        :meth:`float_rows` (whose pages it then releases from the resident set); copy it to keep it.

        Args:
            tensor: one of :attr:`tensors`.
            lo: the first row (rows as in :attr:`GGUFTensorInfo.n_rows`).
            hi: one past the last row; default every row.
        """
        hi = tensor.n_rows if hi is None else hi
        if not 0 <= lo <= hi <= tensor.n_rows:
            raise ValueError(f"rows {lo}:{hi} out of range for {tensor.name!r} with {tensor.n_rows} rows")
        begin = tensor.offset + lo * tensor.row_nbytes
        view = self._maps.view(tensor.path, begin, begin + (hi - lo) * tensor.row_nbytes)
        view.flags.writeable = False
        return view.reshape(hi - lo, tensor.row_nbytes)

    def float_rows(
        self, tensor: GGUFTensorInfo, lo: int = 0, hi: int | None = None, *, threads: int | None = None
    ) -> np.ndarray:
        """Rows ``lo:hi`` of a tensor's values, shape ``(hi - lo, shape[-1])``.

        F32 and F16 tensors come as they are stored (a float32 / float16 view, valid as for
        :meth:`raw_rows`); every other type is decoded to a new float32 array exactly as ggml's
        ``to_float`` does (BF16 widened, block types by :func:`llmdeploy.quants.dequantize`).

        Args:
            tensor: one of :attr:`tensors`.
            lo: the first row.
            hi: one past the last row; default every row.
            threads: dequantization threads (default: every core).

        Raises:
            UnsupportedQuantTypeError: a type llmdeploy cannot decode (e.g. integer tensors).
        """
        raw = self.raw_rows(tensor, lo, hi)
        as_numpy = _NUMPY_FLOATS.get(tensor.type)
        if as_numpy is not None:
            return raw.view(np.dtype(as_numpy).newbyteorder("<"))
        if tensor.type == GGMLQuantizationType.BF16:
            # ggml_compute_bf16_to_fp32: the 16 bits become the high half of a float32 (exact).
            # (quants.dequantize gives the same values, but through gguf-py's per-block loop,
            # about 100x slower for a type whose blocks are one value.)
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return quants.dequantize(raw, tensor.type, threads=threads)


def open_gguf(path: str | os.PathLike[str]) -> GGUFModelFile:
    """Open a GGUF file, or every part of a split one given its first part.

    Args:
        path: a ``.gguf`` file; for a split model, its first part ``...-00001-of-0000N.gguf``.

    Raises:
        MissingFileError: the file, or a part of a split model, does not exist.
        GGUFReadError: not a GGUF (the message names the file), a truncated one, a part
            other than the first of a split model, or parts that do not belong together.
    """
    first = pathlib.Path(path)
    metadata, tensors = _read_one(first)
    split = {e.key: e.value for e in metadata if e.key in _SPLIT_KEYS}
    metadata = [e for e in metadata if e.key not in _SPLIT_KEYS]
    count = int(split.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1))
    if count <= 1:
        return GGUFModelFile([first], metadata, tensors)

    no = int(split.get(gguf.Keys.Split.LLM_KV_SPLIT_NO, 0))
    match = _SPLIT_NAME.match(first.name)
    if no != 0:
        hint = f" ({match['prefix']}-00001-of-{count:05d}.gguf)" if match else ""
        raise GGUFReadError(
            f"{first} is part {no + 1} of a model split into {count} files; open its first part{hint} instead."
        )
    if match is None or int(match["count"]) != count:
        raise GGUFReadError(
            f"{first} is the first of {count} parts of a split model, but its name does not end in "
            f"'-00001-of-{count:05d}.gguf', so the other parts cannot be found; rename the parts as gguf-split "
            "names them."
        )
    paths = [first]
    n_tensors = int(split.get(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, -1))
    for index in range(1, count):
        part = first.with_name(f"{match['prefix']}-{index + 1:05d}-of-{count:05d}.gguf")
        part_metadata, part_tensors = _read_one(part)
        part_no = next((e.value for e in part_metadata if e.key == gguf.Keys.Split.LLM_KV_SPLIT_NO), None)
        if part_no != index:
            raise GGUFReadError(
                f"{part}: expected part {index + 1} of {first.name}'s split model, its split.no says {part_no!r}."
            )
        paths.append(part)
        tensors += part_tensors
    if n_tensors >= 0 and len(tensors) != n_tensors:
        raise GGUFReadError(
            f"{first}: the split model declares {n_tensors} tensors, its {count} parts hold {len(tensors)}."
        )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise GGUFReadError(f"{first}: tensors repeated across the parts of the split model: {', '.join(repeated)}.")
    return GGUFModelFile(paths, metadata, tensors)


def _read_one(path: pathlib.Path) -> tuple[list[MetadataEntry], list[GGUFTensorInfo]]:
    """The KVs and tensor infos of one file."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (or is not a file); pass the path of a .gguf file.")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER.size:
            raise GGUFReadError(f"{path} is not a GGUF file: it holds only {size} bytes; pass a .gguf file.")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Parser(path, data).parse()


_HEADER = struct.Struct("<IIQQ")  # magic, version, n_tensors, n_kv
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALARS = {
    _V.UINT8: struct.Struct("<B"), _V.INT8: struct.Struct("<b"), _V.UINT16: struct.Struct("<H"),
    _V.INT16: struct.Struct("<h"), _V.UINT32: struct.Struct("<I"), _V.INT32: struct.Struct("<i"),
    _V.UINT64: struct.Struct("<Q"), _V.INT64: struct.Struct("<q"), _V.FLOAT32: struct.Struct("<f"),
    _V.FLOAT64: struct.Struct("<d"), _V.BOOL: struct.Struct("<?"),
}  # fmt: skip
_ARRAY_DTYPES = {vtype: np.dtype(fmt.format) for vtype, fmt in _SCALARS.items()}


class _Parser:
    """One pass over a GGUF's header, KVs and tensor infos (``ggml/src/gguf.cpp``'s layout).

    gguf-py's ``GGUFReader`` reads the same, but builds numpy views for every array element:
    about 9 s for the 262144-token vocabulary of Gemma 3, against a fraction of a second here.
    tests/gguf/test_reader.py checks that both read every field and tensor alike.
    """

    def __init__(self, path: pathlib.Path, data: mmap.mmap) -> None:
        self.path = path
        self.data = data
        self.pos = 0

    def parse(self) -> tuple[list[MetadataEntry], list[GGUFTensorInfo]]:
        try:
            return self._parse()
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, GGUFReadError):
                raise
            raise GGUFReadError(
                f"{self.path} is not a readable GGUF file: it is truncated or corrupt near byte {self.pos} "
                f"({type(exc).__name__}: {exc}); write it again, or download it again."
            ) from None

    def _parse(self) -> tuple[list[MetadataEntry], list[GGUFTensorInfo]]:
        magic, version, n_tensors, n_kv = self._unpack(_HEADER)
        if magic != gguf.GGUF_MAGIC:
            raise GGUFReadError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file.")
        if version & 0xFFFF == 0:
            raise GGUFReadError(f"{self.path} is a big-endian GGUF; llmdeploy reads little-endian GGUF files only.")
        if version not in (2, 3):
            raise GGUFReadError(f"{self.path} is a GGUF of version {version}; llmdeploy reads versions 2 and 3.")
        metadata = [self._entry() for _ in range(n_kv)]
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = next((e.value for e in metadata if e.key == gguf.Keys.General.ALIGNMENT), GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFReadError(f"{self.path}: general.alignment must be a power of two, not {alignment!r}.")
        start = self.pos + (-self.pos % alignment)
        tensors = []
        for name, shape, qtype, offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block_size:
                raise GGUFReadError(
                    f"{self.path}: tensor {name!r} has rows of {shape[-1]} values, which do not "
                    f"divide into {qtype.name} blocks of {block_size}."
                )
            nbytes = math.prod(shape) // block_size * type_size
            if start + offset + nbytes > len(self.data):
                raise GGUFReadError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte "
                    f"{start + offset + nbytes}, the file has {len(self.data)}."
                )
            tensors.append(GGUFTensorInfo(name, shape, qtype, nbytes, self.path, start + offset))
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise GGUFReadError(
                f"{self.path} holds tensors of the same name: "
                f"{', '.join(sorted({n for n in names if names.count(n) > 1}))}."
            )
        return metadata, tensors

    def _unpack(self, fmt: struct.Struct) -> Any:
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values if len(values) > 1 else values[0]

    def _bytes(self) -> bytes:
        n = self._unpack(_U64)
        if self.pos + n > len(self.data):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def _text(self) -> str | bytes:
        raw = self._bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # written back as the same bytes

    def _entry(self) -> MetadataEntry:
        key = self._bytes().decode("utf-8", errors="replace")
        vtype = GGUFValueType(self._unpack(_U32))
        if vtype == _V.STRING:
            return MetadataEntry(key, self._text(), vtype)
        if vtype != _V.ARRAY:
            return MetadataEntry(key, self._unpack(_SCALARS[vtype]), vtype)
        sub_type = GGUFValueType(self._unpack(_U32))
        count = self._unpack(_U64)
        if sub_type == _V.ARRAY:
            raise GGUFReadError(
                f"{self.path}: metadata key {key!r} holds arrays of arrays, which llama.cpp cannot read."
            )
        if sub_type == _V.STRING:
            return MetadataEntry(key, [self._text() for _ in range(count)], vtype, sub_type)
        dtype = _ARRAY_DTYPES[sub_type]
        if self.pos + count * dtype.itemsize > len(self.data):
            raise ValueError(f"an array of {count} values runs past the end of the file")
        values = np.frombuffer(self.data, dtype, count, self.pos).copy()
        self.pos += count * dtype.itemsize
        return MetadataEntry(key, values, vtype, sub_type)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._bytes().decode("utf-8", errors="replace")
        n_dims = self._unpack(_U32)
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise GGUFReadError(f"{self.path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to 4.")
        ne = struct.unpack_from(f"<{n_dims}Q", self.data, self.pos)
        self.pos += 8 * n_dims
        raw_type = self._unpack(_U32)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFReadError(
                f"{self.path}: tensor {name!r} has type {raw_type}, which gguf-py does not know; "
                "upgrade the gguf package."
            ) from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFReadError(
                f"{self.path}: tensor {name!r} has type {qtype.name}, whose block size gguf-py does not know."
            )
        offset = self._unpack(_U64)
        return name, tuple(int(d) for d in reversed(ne)), qtype, offset
