"""Write a model folder that vLLM, SGLang and transformers load: safetensors shards + index,
config.json, generation_config.json and the tokenizer files, all atomically.

Every file is written under a hidden temporary name in the output folder (``.<name>.tmp-XXXXXXXX``)
and renamed into place only when all of them are complete, so an interrupted save leaves no
half-written file under a final name. Shards are streamed: one tensor is produced, written
and dropped before the next.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

import torch

from .._fsutil import fsync_dir
from ..errors import InvalidOptionError, OutputExistsError
from .plan import OutTensor

__all__ = ["TOKENIZER_FILES", "Staging", "check_output_folder", "parse_shard_size", "plan_shards", "write_shards"]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# Files a tokenizer or processor is saved as (transformers 4 and 5, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)  # fmt: skip

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
for _attr, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[getattr(torch, _attr)] = _st
# safetensors' Dtype enum order (safetensors/src/tensor.rs), which its writer sorts by
_ST_RANK = {n: i for i, n in enumerate((
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "C64", "F64", "I64", "U64",
))}  # fmt: skip


def parse_shard_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or "5GB" / "500MB" / "2GiB" as transformers reads it."""
    try:
        n = _file_size(size)
    except (ValueError, TypeError, AttributeError):
        n = -1
    if not isinstance(n, int) or n <= 0:
        raise InvalidOptionError(
            f"max_shard_size={size!r} is not a size; use bytes (an int) or a string such as '5GB', '500MB' or '2GiB'"
        )
    return n


def _file_size(size: int | str) -> int:
    # transformers.utils.hub.convert_file_size_to_int, rule for rule (importing transformers for
    # it would add a second and 100 MB to a merge that otherwise never needs transformers)
    if isinstance(size, int):
        return size
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
    for unit, scale in units:
        if size.upper().endswith(unit):
            n = int(size[: -len(unit)]) * scale
            return n // 8 if not unit.endswith("IB") and size.endswith("b") else n  # "5Gb": gigabits
    raise ValueError(size)


def check_output_folder(folder: pathlib.Path, *, overwrite: bool, inputs: Sequence[pathlib.Path] = ()) -> None:
    """Refuse an output folder that is a file, one of the inputs, or not empty (unless ``overwrite``)."""
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} exists and is not a folder; choose another save_directory")
    for src in inputs:
        if folder.exists() and src.exists() and folder.resolve() == src.resolve():
            raise InvalidOptionError(
                f"save_directory {folder} is the folder the model is read from; save to another folder"
            )
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{folder} exists and is not empty; pass overwrite=True to replace the model in it, or choose an "
            "empty or new folder"
        )


class Staging:
    """Files written under temporary names in ``folder``, renamed into place by :meth:`commit`.

    Use it as a context manager: leaving by an exception removes every temporary file.
    """

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._staged: dict[str, pathlib.Path] = {}  # final name -> temporary path

    def __enter__(self) -> Staging:  # noqa: PYI034
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    def names(self) -> list[str]:
        return list(self._staged)

    def open(self, name: str) -> BinaryIO:
        """A new temporary file that becomes ``name`` on commit."""
        if name in self._staged:
            raise ValueError(f"{name} is already staged")
        final = self.folder / name
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            except FileExistsError:
                continue
            self._staged[name] = tmp
            return os.fdopen(fd, "wb")

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def copy(self, name: str, src: pathlib.Path) -> None:
        with open(src, "rb") as fin, self.open(name) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())

    def commit(self, *, remove: Iterable[str] = ()) -> None:
        """Delete ``remove`` (stale files of an earlier save) and rename every staged file into place.

        Weights go first and config.json last, so a reader never sees a config whose weights are
        not there yet.
        """
        for name in remove:
            if name not in self._staged:
                p = self.folder / name
                if p.is_file() or p.is_symlink():
                    p.unlink()
        order = sorted(self._staged, key=lambda n: (n == "config.json", n.endswith(".json"), n))
        for name in order:
            os.replace(self._staged[name], self.folder / name)
        self._staged.clear()
        fsync_dir(self.folder)

    def abort(self) -> None:
        """Remove every temporary file (and the output folder, if this save created it and it is empty)."""
        for tmp in self._staged.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._staged.clear()
        if getattr(self, "_created", False):
            for d in sorted((p for p in self.folder.rglob("*") if p.is_dir()), reverse=True):
                _rmdir_if_empty(d)
            _rmdir_if_empty(self.folder)


def _rmdir_if_empty(folder: pathlib.Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def stale_files(folder: pathlib.Path) -> list[str]:
    """Files of an earlier save that must not survive next to the new weights.

    Any ``*.safetensors`` (vLLM loads every one when there is no index), indexes, ``.bin``
    weights, ``adapter_*`` files (transformers would attach the adapter again) and tokenizer
    files (the new tokenizer replaces the old one as a whole).
    """
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        n = p.name
        if not p.is_file() or n.startswith("."):
            continue
        if (
            n.endswith((".safetensors", ".index.json"))
            or (n.startswith("pytorch_model") and n.endswith(".bin"))
            or n.startswith("adapter_")
            or n in TOKENIZER_FILES
        ):
            out.append(n)
    return out


# -- safetensors shards ------------------------------------------------------------------------


def plan_shards(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` of tensor data.

    As huggingface_hub's ``split_state_dict_into_shards``: a tensor that does not fit in the
    current shard starts a new one; a tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for t in tensors:
        n = t.nbytes
        if n > max_shard_bytes:
            if current:
                shards.append(current)
            shards.append([t])
            current, size = [], 0
            continue
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _header(tensors: Sequence[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = t.nbytes
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def write_shards(staging: Staging, tensors: Sequence[OutTensor], max_shard_bytes: int) -> dict[str, str]:
    """Stream ``tensors`` into safetensors shards (and ``model.safetensors.index.json`` when several).

    Returns:
        The weight map ``{tensor name: file name}``.
    """
    if sys.byteorder != "little":  # pragma: no cover
        raise InvalidOptionError(
            "safetensors files are little-endian; merging on a big-endian machine is not supported"
        )
    for t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise InvalidOptionError(f"tensor {t.name!r} has dtype {t.dtype}, which safetensors cannot store")
    shards = plan_shards(tensors, max_shard_bytes)
    count = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = SAFE_WEIGHTS if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        # safetensors' own order (its Dtype enum descending, then by name): the shard is byte-identical
        # to safetensors.torch.save_file of the same tensors
        shard = sorted(shard, key=lambda t: (-_ST_RANK[_ST_DTYPES[t.dtype]], t.name))
        with staging.open(name) as f:
            head = _header(shard)
            f.write(head)
            writeback = _Writeback(f, len(head))
            try:
                for t in shard:
                    _write_tensor(f, t)
                    writeback.wrote(t.nbytes)
                    weight_map[t.name] = name
            finally:
                writeback.close()
            f.flush()
            os.fsync(f.fileno())
    if count > 1:
        total = sum(t.nbytes for t in tensors)
        params = sum(t.nbytes // _itemsize(t.dtype) for t in tensors)
        staging.write_json(
            SAFE_INDEX,
            {
                "metadata": {"total_parameters": params, "total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )
    return weight_map


class _Writeback:
    """Start writing a shard's pages to disk while the next tensors are merged.

    Left alone, the kernel keeps a whole multi-GB shard dirty in memory until the final fsync,
    which then waits for all of it. Every 64 MiB written, a helper thread asks for the range to
    be written back (``POSIX_FADV_DONTNEED`` starts writeback of dirty pages and drops clean
    ones), so the disk works while the merge goes on, the fsync finds little left, and the
    output does not crowd the page cache. Call :meth:`close` before the file is closed.
    """

    STEP = 64 << 20

    def __init__(self, f: BinaryIO, start: int) -> None:
        self.f, self.end, self.advised = f, start, 0
        self.ok = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
        self._thread: threading.Thread | None = None

    def wrote(self, nbytes: int) -> None:
        self.end += nbytes
        if not self.ok or self.end - self.advised < self.STEP:
            return
        self.f.flush()
        self.close()  # one request in flight at a time
        self._thread = threading.Thread(
            target=_advise, args=(self.f.fileno(), self.advised, self.end - self.advised), daemon=True
        )
        self._thread.start()
        self.advised = self.end

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _advise(fd: int, offset: int, length: int) -> None:
    try:  # an advice, never needed for correctness
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:  # pragma: no cover
        pass


def _write_tensor(f: BinaryIO, t: OutTensor) -> None:
    if t.raw is not None:
        _copy_range(t.raw, f, t.nbytes)
        return
    data = t.produce()
    if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
        raise AssertionError(f"{t.name}: produced {tuple(data.shape)} {data.dtype}, planned {t.shape} {t.dtype}")
    flat = data.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def _copy_range(raw: tuple[str, int, int], f: BinaryIO, nbytes: int) -> None:
    path, offset, n = raw
    if n != nbytes:
        raise AssertionError(f"{path}: {n} bytes at {offset}, planned {nbytes}")
    f.flush()
    out_fd = f.fileno()
    with open(path, "rb") as src:
        in_fd = src.fileno()
        done = 0
        if hasattr(os, "copy_file_range"):
            try:  # in-kernel copy: the bytes never enter this process
                while done < n:
                    k = os.copy_file_range(in_fd, out_fd, n - done, offset + done)
                    if k == 0:
                        break
                    done += k
            except OSError:
                pass
        while done < n:
            chunk = os.pread(in_fd, min(1 << 24, n - done), offset + done)
            if not chunk:
                raise OSError(f"{path} ended at byte {offset + done}, expected {offset + n}")
            f.write(chunk)
            f.flush()
            done += len(chunk)
