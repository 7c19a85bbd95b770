"""Read an existing GGUF: its header, metadata in file order and tensor infos; tensor data on request.

This is llmdeploy's one GGUF reader: ``requantize``, ``gguf_to_hf``, ``estimate``, the CLI's
``inspect``, Ollama Modelfiles and model cards all read files through :func:`open_gguf`.

``open_gguf(path)`` parses the header in one pass over a memory map (gguf-py's ``GGUFReader``
reads the same but takes seconds over a large vocabulary, see :class:`_Parser`), touching only
the header's pages. It keeps every KV as a value the :class:`~llmdeploy.gguf.writer.GGUFFileWriter`
writes back byte for byte (same key order, value types and array element types), and every
tensor's name, shape, type and place in the file. Tensor data is read only when asked for, a
range of rows at a time, from a memory map whose pages leave the resident set once the next range
is read, so reading a model tensor by tensor never holds more than one tensor.

A split model (``<prefix>-00001-of-0000N.gguf``, as llama.cpp's gguf-split and
``save_pretrained_gguf(max_file_size=...)`` write it) is read whole from any of its parts: the KVs
come from the first part (without the ``split.*`` keys), as llama.cpp's loader takes them, and the
tensors from every part, in part order.

Big-endian GGUFs (gguf-py writes them on request; llama.cpp does not load them) have their header
read, converted to native values; their tensor data is refused with the command that converts them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import mmap
import os
import pathlib
import re
import struct
import types
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .._fsutil import ShardMaps
from ..errors import GGUFReadError, MissingFileError

__all__ = ["GGUFModelFile", "GGUFTensorInfo", "MetadataEntry", "open_gguf"]

_V = GGUFValueType
_SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO
_SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT
_SPLIT_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
_SPLIT_KEYS = frozenset((_SPLIT_NO, _SPLIT_COUNT, _SPLIT_TENSORS))
# llama.cpp's split file names (llama_split_path): the part number is 1-based.
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The float types a tensor can be read from without dequantizing (numpy has float16 and float32).
_NUMPY_FLOATS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
_HEADER_BYTES = 24  # magic, version (u32 each), tensor count, KV count (u64 each)


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

    def to_python(self) -> Any:
        """The value as plain Python, ready for JSON.

        Arrays become lists, and strings that are not valid UTF-8 become ``str`` with replacement characters.
        """
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        if isinstance(self.value, list):
            return [_as_str(item) for item in self.value]
        return _as_str(self.value)

    @property
    def nbytes(self) -> int:
        """The bytes this KV takes in a GGUF file: key, value type, value (``gguf.cpp``'s layout)."""
        size = 8 + len(self.key.encode("utf-8")) + 4
        if self.type != _V.ARRAY:
            return size + _value_nbytes(self.value, self.type)
        size += 4 + 8  # element type, count
        if self.sub_type == _V.STRING:
            return size + sum(_value_nbytes(item, _V.STRING) for item in self.value)
        return size + len(self.value) * _SCALAR_SIZES[self.sub_type]


def _as_str(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _value_nbytes(value: Any, vtype: GGUFValueType) -> int:
    if vtype == _V.STRING:
        return 8 + len(value if isinstance(value, bytes) else value.encode("utf-8"))
    return _SCALAR_SIZES[vtype]


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
    """An opened GGUF (every part of a split one): header and metadata in memory, tensor data on disk.

    Use :func:`open_gguf` to open one. It is a context manager; :meth:`close` unmaps the files
    that tensor data was read from.

    Attributes:
        path: the first file of the model (the first part of a split model).
        paths: every file read, in part order (just ``path`` when it is not split).
        metadata: every KV in file order (of the first part), without the ``split.*`` keys.
        tensors: every tensor, in file order (part by part).
        version: the GGUF version (2 or 3) of the first part.
        alignment: the data alignment of the first part (``general.alignment``, 32 by default).
        byte_order: ``"<"`` for a little-endian file (what llama.cpp reads), ``">"`` for a big-endian one.
    """

    def __init__(
        self,
        paths: list[pathlib.Path],
        metadata: list[MetadataEntry],
        tensors: list[GGUFTensorInfo],
        *,
        version: int = 3,
        alignment: int = GGUF_DEFAULT_ALIGNMENT,
        byte_order: str = "<",
    ) -> None:
        self.path = paths[0]
        self.paths = tuple(paths)
        self.metadata = tuple(metadata)
        self.tensors = tuple(tensors)
        self.version = version
        self.alignment = alignment
        self.byte_order = byte_order
        self._kv = {entry.key: entry for entry in metadata}
        self._values = types.MappingProxyType({entry.key: entry.value for entry in metadata})
        self._by_name = {t.name: t for t in tensors}
        self._maps = ShardMaps()

    def __repr__(self) -> str:
        return f"GGUFModelFile({str(self.path)!r}, {len(self.metadata)} KVs, {len(self.tensors)} tensors)"

    def __enter__(self) -> GGUFModelFile:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory maps (views handed out before stay valid until dropped)."""
        self._maps.release()
        self._maps = ShardMaps()

    # -- metadata ----------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    @property
    def kv(self) -> Mapping[str, Any]:
        """Every KV's value by key, in file order (read-only; values as :attr:`MetadataEntry.value`)."""
        return self._values

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

    @property
    def llama_file_type(self) -> gguf.LlamaFileType | None:
        """``general.file_type`` as llama.cpp's enum; ``None`` when absent or a value gguf-py does not know."""
        value = self.get(gguf.Keys.General.FILE_TYPE)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        try:
            return gguf.LlamaFileType(value)
        except ValueError:
            return None

    @property
    def file_type(self) -> str:
        """``general.file_type`` as a file type name: ``"q4_k_m"``, ``"f32"`` for ALL_F32.

        ``"unknown"`` when the file has no ``general.file_type``, ``"file_type N"`` for a value
        gguf-py does not know.
        """
        ftype = self.llama_file_type
        if ftype is not None:
            return "f32" if ftype == gguf.LlamaFileType.ALL_F32 else ftype.name.removeprefix("MOSTLY_").lower()
        value = self.get(gguf.Keys.General.FILE_TYPE)
        return "unknown" if value is None else f"file_type {value}"

    @property
    def metadata_bytes(self) -> int:
        """The bytes :attr:`metadata` takes in the file (the ``split.*`` keys left out)."""
        return sum(entry.nbytes for entry in self.metadata)

    @property
    def file_bytes(self) -> int:
        """The size on disk, every part together."""
        return sum(p.stat().st_size for p in self.paths)

    # -- tensors -----------------------------------------------------------------------------

    @property
    def tensor_bytes(self) -> int:
        """Tensor data bytes, all tensors, without alignment padding."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        """Elements of all tensors."""
        return sum(math.prod(t.shape) for t in self.tensors)

    def tensor(self, name: str) -> GGUFTensorInfo:
        """The tensor called ``name``.

        Raises:
            GGUFReadError: there is no such tensor.
        """
        try:
            return self._by_name[name]
        except KeyError:
            raise GGUFReadError(f"{self.path}: no tensor {name!r} in the GGUF.") from None

    def require_little_endian(self) -> None:
        """Check that tensor data can be read: the file is little-endian, as llama.cpp requires.

        Raises:
            GGUFReadError: a big-endian file; the message gives the command that converts it.
        """
        if self.byte_order != "<":
            raise GGUFReadError(
                f"{self.path} is a big-endian GGUF: llmdeploy reads its metadata but not its tensor data, and "
                f"llama.cpp loads neither; convert it first with gguf-py's `gguf-convert-endian {self.path} little`."
            )

    def raw_rows(self, tensor: GGUFTensorInfo, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``lo:hi`` of a tensor's stored bytes, shape ``(hi - lo, row_nbytes)``, uint8.

        A read-only view of the memory map, valid until the next call of :meth:`raw_rows` or
        :meth:`float_rows` (whose pages it then releases from the resident set); copy it to keep it.

        Args:
            tensor: one of :attr:`tensors`.
            lo: the first row (rows as in :attr:`GGUFTensorInfo.n_rows`).
            hi: one past the last row; default every row.

        Raises:
            GGUFReadError: a big-endian file (see :meth:`require_little_endian`).
        """
        self.require_little_endian()
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
            GGUFReadError: a big-endian file.
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
        from .. import quants  # the kernels load torch: only when a tensor needs decoding

        return quants.dequantize(raw, tensor.type, threads=threads)


def open_gguf(path: str | os.PathLike[str]) -> GGUFModelFile:
    """Open a GGUF file, or every part of a split one given any of its parts.

    Only the header is read; tensor data is read by :meth:`GGUFModelFile.raw_rows` and
    :meth:`GGUFModelFile.float_rows` when asked for.

    Args:
        path: a ``.gguf`` file; for a split model, any of its parts ``...-0000K-of-0000N.gguf``.

    Raises:
        MissingFileError: the file, or a part of a split model, does not exist.
        GGUFReadError: not a GGUF (the message names the file), a truncated or damaged one, or
            parts of a split model that are misnamed or do not belong together.
    """
    given = pathlib.Path(path)
    part = _read_part(given)
    count, no = part.split_count, part.split_no
    if count <= 1:
        return part.model_file([given], part.tensors)

    match = _SPLIT_NAME.match(given.name)
    if match is None or int(match["count"]) != count or int(match["no"]) != no + 1:
        raise GGUFReadError(
            f"{given} is part {no + 1} of a model split into {count} files, but its name does not end in "
            f"'-{no + 1:05d}-of-{count:05d}.gguf', so the other parts cannot be found; rename the parts as "
            "gguf-split names them."
        )
    paths = [given.with_name(f"{match['prefix']}-{index + 1:05d}-of-{count:05d}.gguf") for index in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(
            f"{given} is part {no + 1} of a model split into {count} files, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing beside it; put every part in the same folder."
        )
    parts = [part if index == no else _read_part(p) for index, p in enumerate(paths)]
    for index, (p, other) in enumerate(zip(paths, parts)):
        if (other.split_no, other.split_count) != (index, count):
            raise GGUFReadError(
                f"{p} should be part {index + 1} of {count} of the split model {paths[0].name}, but its split.no "
                f"and split.count say part {other.split_no + 1} of {other.split_count}: the parts do not belong "
                "together; export or download the parts again."
            )
    tensors = [t for other in parts for t in other.tensors]
    declared = parts[0].split_tensors
    if declared is not None and len(tensors) != declared:
        raise GGUFReadError(
            f"{paths[0]}: the split model declares {declared} tensors, its {count} parts hold {len(tensors)}."
        )
    repeated = _repeated(t.name for t in tensors)
    if repeated:
        raise GGUFReadError(f"{paths[0]}: tensors repeated across the parts of the split model: {repeated}.")
    return parts[0].model_file(paths, tensors)


def _repeated(names: Iterable[str]) -> str:
    """The names that occur more than once, sorted and joined; empty when none does."""
    return ", ".join(sorted(name for name, n in collections.Counter(names).items() if n > 1))


class _Part(NamedTuple):
    """What one file of a model holds."""

    path: pathlib.Path
    version: int
    byte_order: str
    alignment: int
    metadata: list[MetadataEntry]  # every KV, split.* included
    tensors: list[GGUFTensorInfo]

    def _split(self, key: str, default: int | None) -> int | None:
        value = next((e.value for e in self.metadata if e.key == key), default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise GGUFReadError(f"{self.path}: metadata key {key!r} should hold an integer, not {value!r}.")
        return value

    @property
    def split_count(self) -> int:
        return self._split(_SPLIT_COUNT, 1) or 1

    @property
    def split_no(self) -> int:
        return self._split(_SPLIT_NO, 0) or 0

    @property
    def split_tensors(self) -> int | None:
        return self._split(_SPLIT_TENSORS, None)

    def model_file(self, paths: list[pathlib.Path], tensors: list[GGUFTensorInfo]) -> GGUFModelFile:
        """The model whose KVs (and header facts) come from this part."""
        metadata = [e for e in self.metadata if e.key not in _SPLIT_KEYS]
        return GGUFModelFile(
            paths, metadata, tensors, version=self.version, alignment=self.alignment, byte_order=self.byte_order
        )


def _read_part(path: pathlib.Path) -> _Part:
    """The header, KVs and tensor infos of one file."""
    if path.is_dir():
        raise GGUFReadError(f"{path} is a folder, not a GGUF file; pass the path of a .gguf file.")
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; pass the path of a .gguf file.")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER_BYTES:
            raise GGUFReadError(f"{path} is not a GGUF file: it holds only {size} bytes; pass a .gguf file.")
        # Only the pages the header lies in are read from disk; the tensor data is not touched.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Parser(path, data).parse()


_SCALAR_CODES = {
    _V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I", _V.INT32: "i",
    _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT32: "f", _V.FLOAT64: "d", _V.BOOL: "?",
}  # fmt: skip
_SCALAR_SIZES = {vtype: struct.calcsize("<" + code) for vtype, code in _SCALAR_CODES.items()}


class _Layout:
    """The structs and dtypes of one byte order."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.counts = struct.Struct(order + "QQ")  # tensor count, KV count
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")
        self.scalars = {vtype: struct.Struct(order + code) for vtype, code in _SCALAR_CODES.items()}
        self.arrays = {vtype: np.dtype(order + code) for vtype, code in _SCALAR_CODES.items()}


_LAYOUTS = {"<": _Layout("<"), ">": _Layout(">")}


class _Parser:
    """One pass over a GGUF's header, KVs and tensor infos (``ggml/src/gguf.cpp``'s layout).

    gguf-py's ``GGUFReader`` reads the same, but builds numpy views for every array element:
    about 9 s for the 262144-token vocabulary of Gemma 3, against a tenth of a second here.
    tests/gguf/test_reader.py checks that both read every field and tensor alike.
    """

    def __init__(self, path: pathlib.Path, data: mmap.mmap) -> None:
        self.path = path
        self.data = data
        self.pos = 0
        self.layout = _LAYOUTS["<"]

    def parse(self) -> _Part:
        try:
            return self._parse()
        except GGUFReadError:
            raise
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            raise GGUFReadError(
                f"{self.path} is not a readable GGUF file: it is truncated or damaged near byte {self.pos} "
                f"({exc}); write it again, or download it again."
            ) from None

    def _parse(self) -> _Part:
        if self.data[:4] != b"GGUF":
            raise GGUFReadError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file.")
        (version,) = struct.unpack_from("<I", self.data, 4)
        byte_order = "<"
        if version & 0xFFFF == 0:  # written on (or for) a big-endian machine: the version reads byte-swapped
            byte_order, version = ">", struct.unpack_from(">I", self.data, 4)[0]
        if version not in (2, 3):
            raise GGUFReadError(f"{self.path} is a GGUF of version {version}; llmdeploy reads versions 2 and 3.")
        self.layout = _LAYOUTS[byte_order]
        self.pos = 8
        n_tensors, n_kv = self._unpack(self.layout.counts)
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
                    f"{start + offset + nbytes}, the file has {len(self.data)}; write it again, or download it again."
                )
            tensors.append(GGUFTensorInfo(name, shape, qtype, nbytes, self.path, start + offset))
        repeated = _repeated(t.name for t in tensors)
        if repeated:
            raise GGUFReadError(f"{self.path} holds tensors of the same name: {repeated}.")
        return _Part(self.path, version, byte_order, alignment, metadata, tensors)

    def _unpack(self, fmt: struct.Struct) -> Any:
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values if len(values) > 1 else values[0]

    def _bytes(self) -> bytes:
        n = self._unpack(self.layout.u64)
        if self.pos + n > len(self.data):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def _value_type(self) -> GGUFValueType:
        raw = self._unpack(self.layout.u32)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFReadError(
                f"{self.path}: unknown GGUF value type {raw} at byte {self.pos - 4}; the file is damaged, or "
                "newer than the gguf package (upgrade it)."
            ) from None

    def _entry(self) -> MetadataEntry:
        key = self._bytes().decode("utf-8", errors="replace")
        vtype = self._value_type()
        if vtype == _V.STRING:
            return MetadataEntry(key, _text(self._bytes()), vtype)
        if vtype != _V.ARRAY:
            return MetadataEntry(key, self._unpack(self.layout.scalars[vtype]), vtype)
        sub_type = self._value_type()
        count = self._unpack(self.layout.u64)
        if sub_type == _V.ARRAY:
            raise GGUFReadError(
                f"{self.path}: metadata key {key!r} holds arrays of arrays, which llama.cpp cannot read."
            )
        if sub_type == _V.STRING:
            return MetadataEntry(key, self._strings(count), vtype, sub_type)
        dtype = self.layout.arrays[sub_type]
        if self.pos + count * dtype.itemsize > len(self.data):
            raise ValueError(f"an array of {count} values runs past the end of the file")
        # a copy in little-endian order (the file's own order for any file llama.cpp reads)
        values = np.frombuffer(self.data, dtype, count, self.pos).astype(dtype.newbyteorder("<"))
        self.pos += count * dtype.itemsize
        return MetadataEntry(key, values, vtype, sub_type)

    def _strings(self, count: int) -> list[str | bytes]:
        """An array of ``count`` strings; a vocabulary's token list, so the loop is kept tight."""
        data, pos, end = self.data, self.pos, len(self.data)
        unpack_length = self.layout.u64.unpack_from
        strings: list[str | bytes] = []
        append = strings.append
        try:
            for _ in range(count):
                (n,) = unpack_length(data, pos)
                stop = pos + 8 + n
                if stop > end:
                    raise ValueError(f"a string of {n} bytes runs past the end of the file")
                raw = data[pos + 8 : stop]
                try:  # _text, inlined: this loop runs once per token of the vocabulary
                    append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    append(raw)
                pos = stop
        finally:
            self.pos = pos
        return strings

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._bytes().decode("utf-8", errors="replace")
        n_dims = self._unpack(self.layout.u32)
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise GGUFReadError(f"{self.path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to 4.")
        ne = struct.unpack_from(f"{self.layout.order}{n_dims}Q", self.data, self.pos)
        self.pos += 8 * n_dims
        raw_type = self._unpack(self.layout.u32)
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
        offset = self._unpack(self.layout.u64)
        return name, tuple(int(d) for d in reversed(ne)), qtype, offset


def _text(raw: bytes) -> str | bytes:
    """A GGUF string: ``str``, or its ``bytes`` when it is not valid UTF-8 (written back as the same bytes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
