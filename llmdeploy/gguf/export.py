"""``save_pretrained_gguf``: one streaming pass from an HF checkpoint to GGUF files.

Everything that can fail on the input (architecture, tokenizer, quantization names,
row sizes, existing outputs) is checked before the first byte is written. Then each
tensor is loaded once, transformed, quantized for every requested file type, written
to every file and released, so memory stays bounded by one tensor's encodings: a large
tensor is read and quantized a chunk of rows at a time (when its architecture can load
rows on their own), and its checkpoint pages leave the resident set once read (see
:mod:`llmdeploy.source`). Peak memory does not grow with the model, only with its
largest tensor.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from .. import quants
from .._memory import gc_paused, return_free_heap
from ..errors import InvalidOptionError, NonFiniteValueError, OutputExistsError
from ..merge.as_source import merged_source
from ..merge.memory import is_peft_model
from ..merge.merge import is_adapter_folder, open_merge
from ..ollama import Modelfile, modelfile_for, save_modelfile
from ..source import Source, open_source
from .arch import ExportTensor, architecture_for
from .plan import FileType, PlanInput, QuantPlan, file_type, plan_quantization
from .tokenizer import tokenizer_json_cache, tokenizer_metadata
from .writer import GGUFFileWriter

_F32, _BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.BF16
_SPLIT_OR_PLAN_KEYS = (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)
# Tensors larger than this many values are loaded and encoded in chunks of about this size,
# when their architecture can load a range of rows on its own. 4 MB of float32: small enough
# that the allocator reuses the same heap pages for every chunk (allocations of 32 MB and
# more get fresh pages from the kernel each time, and faulting them in costs more than
# widening bf16 to float32).
CHUNK_VALUES = 1 << 20


def save_pretrained_gguf(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    quantization: str | Sequence[str] = "q8_0",
    model_name: str | None = None,
    overwrite: bool = False,
    max_file_size: int | str | None = None,
    threads: int | None = None,
    progress: bool = True,
    base: str | os.PathLike[str] | None = None,
    adapter_names: Sequence[str] | None = None,
    modelfile: bool = True,
) -> list[pathlib.Path]:
    """Export a model to GGUF files, one per quantization, reading the model once.

    Args:
        model: a folder with an HF checkpoint (``config.json`` + safetensors, sharded or
            not; bf16, fp16 or fp32), an in-memory ``transformers.PreTrainedModel``, or a
            LoRA fine-tune: a ``peft.PeftModel`` or the folder of a saved adapter. A LoRA is
            merged on the fly, tensor by tensor, exactly as ``save_pretrained_merged`` merges
            it (no merged copy is written or held).
        save_directory: the folder for the ``.gguf`` files (created if missing).
        tokenizer: an HF tokenizer, when the model folder has no tokenizer files (or to
            override them).
        quantization: one name or a list: ``f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k
            q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k iq4_nl iq4_xs tq1_0
            tq2_0`` (any case).
        model_name: the file name stem; default the model folder's name.
        overwrite: replace existing output files (they stay intact until the new ones
            are complete).
        max_file_size: split each file into ``-0000i-of-0000N.gguf`` parts of at most this
            many bytes (an int, or a string such as ``"2GB"``), as llama.cpp's gguf-split does.
        threads: quantization threads (default: every core).
        progress: show a progress bar and one summary line per file.
        base: for a LoRA: the base model folder to merge onto (see ``save_pretrained_merged``;
            for an adapter folder the default is its ``base_model_name_or_path``).
        adapter_names: for a LoRA: the adapters to merge (default: the active ones).
        modelfile: also write an Ollama ``Modelfile`` beside the file (``Modelfile``, or
            ``Modelfile-<QUANT>`` for each of several quantizations): ``FROM`` the file, the chat
            template in Ollama's syntax when its family is recognised, and the stop tokens (see
            :mod:`llmdeploy.ollama`). Not for split output, which Ollama cannot import.

    Returns:
        The GGUF paths written: one per quantization, or all parts of each when split (the
        Modelfiles are beside them).

    Raises:
        UnsupportedArchitectureError, MissingFileError, QuantizedCheckpointError,
        UnexpectedTensorError: the input cannot be exported (nothing is written).
        UnsupportedQuantTypeError: an unknown quantization name (nothing is written).
        OutputExistsError: an output file exists and ``overwrite`` is False.
        NonFiniteValueError: a weight holds NaN/inf (the error names the tensor; no
            output is left behind).
    """
    file_types = _file_types(quantization)
    with contextlib.ExitStack() as inputs:
        source = inputs.enter_context(open_model(model, base, adapter_names))
        if model_name is None and is_adapter_folder(model):
            model_name = _safe_name(pathlib.Path(model).resolve().name)
        return _export(
            source, save_directory, file_types, tokenizer, model_name, overwrite, max_file_size, threads, progress,
            modelfile,
        )  # fmt: skip


def _export(
    source: Source,
    save_directory: str | os.PathLike[str],
    file_types: list[FileType],
    tokenizer: Any,
    model_name: str | None,
    overwrite: bool,
    max_file_size: int | str | None,
    threads: int | None,
    progress: bool,
    modelfile: bool,
) -> list[pathlib.Path]:
    arch = architecture_for(source)
    # The tokenizer and the architecture (Gemma 3 cuts its embeddings to the vocabulary) both read
    # tokenizer.json: parse it once. The tokenizer goes first, as it loads (and frees) the Rust
    # tokenizer before it parses the JSON, so the two large structures never overlap.
    with gc_paused(), tokenizer_json_cache():
        token_kvs = tokenizer_metadata(source, tokenizer)
        tensors = arch.tensors(source)
        plans = quant_plans(tensors, file_types, arch.hparams(source))
        model_kvs = [
            [kv for kv in arch.metadata(source, file_type=int(plan.llama_ftype)) if kv[0] not in _SPLIT_OR_PLAN_KEYS]
            for plan in plans
        ]

    out_dir = pathlib.Path(save_directory)
    stem = model_name or _model_name(source)
    paths = [out_dir / f"{stem}-{ft.name.upper()}.gguf" for ft in file_types]
    split = _parse_size(max_file_size) if max_file_size is not None else None
    modelfiles = _modelfiles(paths, file_types, token_kvs) if modelfile and split is None else []
    if not overwrite:
        for target, _ in modelfiles:
            if target.exists():
                raise OutputExistsError(f"{target} exists; pass overwrite=True to replace it (or modelfile=False).")
        for path in paths:
            # split output is named <stem>-0000i-of-0000N.gguf: any such part of an earlier export counts
            parts = sorted(path.parent.glob(f"{glob.escape(path.stem)}-[0-9][0-9][0-9][0-9][0-9]-of-*.gguf"))
            existing = ([path] if path.exists() else []) + parts
            if existing:
                raise OutputExistsError(f"{existing[0]} exists; pass overwrite=True to replace it.")
    out_dir.mkdir(parents=True, exist_ok=True)

    by_name = {t.name: t for t in tensors}
    order = [tp.name for tp in plans[0].tensors]  # llama-quantize's order, the same for every plan
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = []
        for plan, kvs, path in zip(plans, model_kvs, paths):
            writer = stack.enter_context(GGUFFileWriter(path, overwrite=overwrite, max_file_bytes=split))
            for key, value, value_type in [*kvs, *token_kvs, *plan.metadata()]:
                writer.add_metadata(key, value, value_type)
            for tp in plan.tensors:
                writer.add_tensor(tp.name, tp.shape, tp.type, tp.nbytes)
            writers.append(writer)
        del token_kvs, model_kvs  # the writers hold the packed bytes
        return_free_heap()
        bar = _progress(order, progress)
        buffer = _Buffer()
        with _torch_single_threaded():
            for name in bar:
                _write_tensor(by_name[name], plans, writers, threads, buffer)
        del buffer
        written = [part.path for writer in writers for part in writer.parts()]
        # leaving the stack commits every file (fsync + atomic rename)
    for target, prepared in modelfiles:
        save_modelfile(prepared, target, overwrite=overwrite)
    if progress:
        elapsed = time.perf_counter() - started
        for plan, path in zip(plans, paths):
            print(f"llmdeploy: wrote {path.name}: {plan.summary()} ({elapsed:.1f} s for the pass)")
    return written


def _modelfiles(
    paths: list[pathlib.Path], file_types: list[FileType], token_kvs: list[Any]
) -> list[tuple[pathlib.Path, Modelfile]]:
    """The Ollama Modelfile for each GGUF file, prepared before the pass (it needs the tokenizer KVs)."""
    metadata = {key: value for key, value, _ in token_kvs}
    out = []
    for path, ft in zip(paths, file_types):
        target = path.with_name("Modelfile")
        # one Modelfile per folder when it can be: several files, or a Modelfile of another file
        # already there (an earlier export to the same folder), get one named after their type
        if len(paths) > 1 or _modelfile_of_another(target, path.name):
            target = path.with_name(f"Modelfile-{ft.name.upper()}")
        out.append((target, modelfile_for(path.name, metadata)))
    return out


def _modelfile_of_another(modelfile: pathlib.Path, gguf_name: str) -> bool:
    if not modelfile.is_file():
        return False
    with open(modelfile, encoding="utf-8", errors="replace") as f:
        first = next((line.split() for line in f if line.strip().upper().startswith("FROM ")), None)
    return first is None or len(first) < 2 or pathlib.PurePosixPath(first[1]).name != gguf_name


@contextlib.contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """Run torch's own ops (bf16 -> float32, transforms) on the calling thread only.

    They are memory-bound and see one chunk at a time; the cores belong to the
    quantization threads. Left at its default, torch's OpenMP pool spins between the
    small ops and takes the cores from the kernels (the pass took 2-3x longer on two
    cores). ``torch.set_num_threads`` is process-wide; the setting is restored after.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Buffer:
    """One reusable output buffer, grown to the largest encoded tensor.

    Each fresh allocation of hundreds of MB comes from the kernel as untouched pages, and
    faulting them in again for every tensor costs about 0.5 s per GB of output.
    """

    def __init__(self) -> None:
        self._data = np.empty(0, np.uint8)

    def take(self, sizes: list[int]) -> list[np.ndarray]:
        """Consecutive, non-overlapping byte arrays of ``sizes``, valid until the next call."""
        total = sum(sizes)
        if total > self._data.size:
            self._data = np.empty(0, np.uint8)  # let the old one go first
            self._data = np.empty(total, np.uint8)
        bounds = np.cumsum([0, *sizes])
        return [self._data[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def plan_gguf(
    model: Any,
    *,
    quantization: str | Sequence[str] = "q8_0",
    base: str | os.PathLike[str] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> list[QuantPlan]:
    """The quantization plans ``save_pretrained_gguf`` would follow, without writing anything.

    Each plan lists every tensor with its GGUF type and exact byte size, and gives the
    total size and bits per weight (``plan.summary()``, ``plan.table()``).

    Args:
        model: a model folder, an in-memory ``transformers.PreTrainedModel``, or a LoRA
            fine-tune (``peft.PeftModel`` or adapter folder), as for ``save_pretrained_gguf``.
        quantization: one file-type name or a list (as for ``save_pretrained_gguf``).
        base: for a LoRA: the base model folder (as for ``save_pretrained_gguf``).
        adapter_names: for a LoRA: the adapters to merge.
    """
    with open_model(model, base, adapter_names) as source:
        arch = architecture_for(source)
        return quant_plans(arch.tensors(source), _file_types(quantization), arch.hparams(source))


@contextlib.contextmanager
def open_model(model: Any, base: Any = None, adapter_names: Sequence[str] | None = None) -> Iterator[Source]:
    """The model as a :class:`Source`: a checkpoint, or a LoRA fine-tune merged on the fly (a context manager)."""
    if is_peft_model(model) or is_adapter_folder(model):
        with open_merge(model, base=base, adapter_names=adapter_names) as merge:
            yield merged_source(merge)
        return
    if base is not None or adapter_names is not None:
        raise InvalidOptionError(
            "base= and adapter_names= apply to a LoRA fine-tune (a peft.PeftModel or an adapter folder with "
            f"adapter_config.json); {model!r} is a full model: drop them"
        )
    yield open_source(model)


def quant_plans(tensors: list[ExportTensor], file_types: list[FileType], hparams: Any) -> list[QuantPlan]:
    """llama-quantize's plan of each file type for the tensors the converter would write (bf16, or f32 where kept)."""
    inputs = [PlanInput(t.name, t.shape, _F32 if t.keep_f32 else _BF16) for t in tensors]
    return [plan_quantization(inputs, ft, hparams) for ft in file_types]


def _write_tensor(
    tensor: ExportTensor,
    plans: list[QuantPlan],
    writers: list[GGUFFileWriter],
    threads: int | None,
    buffer: _Buffer | None = None,
) -> None:
    """Load one tensor, encode it once per distinct type, and write it to every file."""
    qtypes = list(dict.fromkeys(plan[tensor.name].type for plan in plans))
    load_rows = getattr(tensor, "load_rows", None)  # None: the transforms need the whole tensor
    n_values = math.prod(tensor.shape)
    if load_rows is not None and len(tensor.shape) >= 2 and n_values > CHUNK_VALUES:
        encoded = _encode_by_rows(tensor, load_rows, qtypes, plans, threads, buffer or _Buffer())
    else:
        values = tensor.load().to(torch.float32).reshape(tensor.shape)
        encoded = {qtype: _quantize(tensor, values, qtype, threads) for qtype in qtypes}
        del values
    for plan, writer in zip(plans, writers):
        writer.write_tensor(tensor.name, encoded[plan[tensor.name].type])


def _encode_by_rows(
    tensor: ExportTensor,
    load_rows: Callable[[int, int], torch.Tensor],
    qtypes: list[GGMLQuantizationType],
    plans: list[QuantPlan],
    threads: int | None,
    buffer: _Buffer,
) -> dict[GGMLQuantizationType, np.ndarray]:
    """Encode a large tensor a few rows (of its first axis) at a time.

    Only the encoded bytes are ever whole; the float32 values exist one chunk at a time
    (the checkpoint pages and the widened copy of a bf16 tensor would otherwise cost up to
    three times its bf16 size). Every block type quantizes rows independently, so the
    bytes are those of the whole tensor at once.
    """
    n_rows = tensor.shape[0]
    per_row = math.prod(tensor.shape[1:])
    step = max(1, CHUNK_VALUES // per_row)
    nbytes = {qtype: next(p[tensor.name].nbytes for p in plans if p[tensor.name].type == qtype) for qtype in qtypes}
    out = dict(zip(qtypes, buffer.take([nbytes[qtype] for qtype in qtypes])))
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        values = load_rows(lo, hi).to(torch.float32).reshape(hi - lo, *tensor.shape[1:])
        for qtype in qtypes:
            row_bytes = nbytes[qtype] // n_rows
            try:
                encoded = quants.quantize(values, qtype, threads=threads)
            except NonFiniteValueError:
                del values
                # report it as for the whole tensor (counts and the first position over all rows)
                _quantize(tensor, tensor.load().to(torch.float32).reshape(tensor.shape), qtype, threads)
                raise
            out[qtype][lo * row_bytes : hi * row_bytes] = encoded.reshape(-1)
        del values
    return out


def _quantize(
    tensor: ExportTensor, values: torch.Tensor, qtype: GGMLQuantizationType, threads: int | None
) -> np.ndarray:
    try:
        return quants.quantize(values, qtype, threads=threads)
    except NonFiniteValueError as exc:
        raise NonFiniteValueError(f"Tensor {tensor.name!r}: {exc}") from None


def _file_types(quantization: str | Sequence[str]) -> list[FileType]:
    names = [quantization] if isinstance(quantization, str) else list(quantization)
    result: list[FileType] = []
    for name in names:
        ft = file_type(name)
        if ft not in result:
            result.append(ft)
    return result


def _model_name(source: Source) -> str:
    if source.folder is not None:
        name = source.folder.name
    else:
        name = str(source.config.get("_name_or_path") or source.config.get("model_type") or "model")
        name = name.rstrip("/").rsplit("/", 1)[-1]
    return _safe_name(name)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise InvalidOptionError(f"max_file_size must be bytes or a size like '2GB' or '500MiB', got {size!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _progress(names: list[str], enabled: bool) -> Any:
    if not enabled:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc="llmdeploy gguf", unit="tensor")
