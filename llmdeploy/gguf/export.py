"""``save_pretrained_gguf``: one streaming pass from an HF checkpoint to GGUF files.

Everything that can fail on the input (architecture, tokenizer, quantization names,
row sizes, existing outputs) is checked before the first byte is written. Then each
tensor is loaded once, transformed, quantized for every requested file type, written
to every file and released, so memory stays bounded by one tensor (and its encodings).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from .. import quants
from ..errors import InvalidOptionError, NonFiniteValueError, OutputExistsError
from ..source import Source, open_source
from .arch import ExportTensor, architecture_for
from .plan import FileType, PlanInput, QuantPlan, file_type, plan_quantization
from .tokenizer import tokenizer_metadata
from .writer import GGUFFileWriter

_F32, _BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.BF16
_SPLIT_OR_PLAN_KEYS = (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)


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
) -> list[pathlib.Path]:
    """Export a model to GGUF files, one per quantization, reading the model once.

    Args:
        model: a folder with an HF checkpoint (``config.json`` + safetensors, sharded or
            not; bf16, fp16 or fp32) or an in-memory ``transformers.PreTrainedModel``.
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

    Returns:
        The paths written: one per quantization, or all parts of each when split.

    Raises:
        UnsupportedArchitectureError, MissingFileError, QuantizedCheckpointError,
        UnexpectedTensorError: the input cannot be exported (nothing is written).
        UnsupportedQuantTypeError: an unknown quantization name (nothing is written).
        OutputExistsError: an output file exists and ``overwrite`` is False.
        NonFiniteValueError: a weight holds NaN/inf (the error names the tensor; no
            output is left behind).
    """
    file_types = _file_types(quantization)
    source = open_source(model)
    arch = architecture_for(source)
    tensors = arch.tensors(source)
    hparams = arch.hparams(source)
    token_kvs = tokenizer_metadata(source, tokenizer)
    inputs = [PlanInput(t.name, t.shape, _F32 if t.keep_f32 else _BF16) for t in tensors]
    plans = [plan_quantization(inputs, ft, hparams) for ft in file_types]

    out_dir = pathlib.Path(save_directory)
    stem = model_name or _model_name(source)
    paths = [out_dir / f"{stem}-{ft.name.upper()}.gguf" for ft in file_types]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it.")
    out_dir.mkdir(parents=True, exist_ok=True)

    by_name = {t.name: t for t in tensors}
    order = [tp.name for tp in plans[0].tensors]  # llama-quantize's order, the same for every plan
    split = _parse_size(max_file_size) if max_file_size is not None else None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = []
        for ft, plan, path in zip(file_types, plans, paths):
            writer = stack.enter_context(GGUFFileWriter(path, overwrite=overwrite, max_file_bytes=split))
            kvs = [kv for kv in arch.metadata(source, file_type=int(plan.llama_ftype)) if kv[0] not in _SPLIT_OR_PLAN_KEYS]
            for key, value, value_type in [*kvs, *token_kvs, *plan.metadata()]:
                writer.add_metadata(key, value, value_type)
            for tp in plan.tensors:
                writer.add_tensor(tp.name, tp.shape, tp.type, tp.nbytes)
            writers.append(writer)
        bar = _progress(order, progress)
        for name in bar:
            _write_tensor(by_name[name], plans, writers, threads)
        written = [part.path for writer in writers for part in writer.parts()]
        # leaving the stack commits every file (fsync + atomic rename)
    if progress:
        elapsed = time.perf_counter() - started
        for plan, path in zip(plans, paths):
            print(f"llmdeploy: wrote {path.name}: {plan.summary()} ({elapsed:.1f} s for the pass)")
    return written


def _write_tensor(tensor: ExportTensor, plans: list[QuantPlan], writers: list[GGUFFileWriter], threads: int | None) -> None:
    """Load one tensor, encode it once per distinct type, and write it to every file."""
    values = tensor.load().to(torch.float32).reshape(tensor.shape)
    encoded: dict[GGMLQuantizationType, np.ndarray] = {}
    for plan, writer in zip(plans, writers):
        qtype = plan[tensor.name].type
        if qtype not in encoded:
            try:
                encoded[qtype] = quants.quantize(values, qtype, threads=threads)
            except NonFiniteValueError as exc:
                raise NonFiniteValueError(f"Tensor {tensor.name!r}: {exc}") from None
        writer.write_tensor(tensor.name, encoded[qtype])


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
