"""``requantize``: an existing GGUF to other file types, as ``llama-quantize`` does it.

The pass is llama-quantize's (llama-cpp-python 0.3.36, no imatrix):

- every tensor gets the type :func:`~llmdeploy.gguf.plan.plan_quantization` gives it, from the
  tensor set and the ``{arch}.*`` KVs of the source (the same rules as for an export);
- a tensor whose type does not change is copied byte for byte; any other one is decoded to
  float32 (F32 and F16 are read as they are) and encoded with :func:`llmdeploy.quants.quantize`,
  a range of rows at a time, so memory holds one tensor's output and a small float buffer;
- the output holds the source's KVs in order, minus ``general.file_type`` and
  ``general.quantization_version``, which come last (``QuantPlan.metadata()``), and its tensors
  in llama-quantize's order (by layer, then name).

From a BF16 (or F32/F16) GGUF the files are therefore byte-identical to llama-quantize's, and
to ``save_pretrained_gguf``'s direct export of the same weights. Sources already quantized
below Q8_0 are refused unless ``allow_requantize=True``: their rounding error would be
quantized a second time.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import (
    InvalidOptionError,
    NonFiniteValueError,
    OutputExistsError,
    QuantizedCheckpointError,
    UnsupportedQuantTypeError,
)
from .plan import FileType, ModelHParams, PlanInput, QuantPlan, file_type, plan_quantization
from .reader import GGUFModelFile, GGUFTensorInfo, open_gguf
from .writer import GGUFFileWriter

__all__ = ["requantize", "source_hparams"]

_T = GGMLQuantizationType
# Types a source may hold without allow_requantize: the floats, and Q8_0, whose rounding error
# is small next to that of any type it is requantized to.
_REQUANTIZE_FREELY = frozenset({_T.F32, _T.F16, _T.BF16, _T.Q8_0})
_PLAN_KEYS = (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)
# Values decoded and encoded per step: 4 MB of float32, as the export's chunks.
CHUNK_VALUES = 1 << 20
# A trailing file type in a GGUF name ("-Q4_K_M", ".q8_0", "-BF16", "-IQ4_XS", "-UD-Q4_K_XL").
_QUANT_SUFFIX = re.compile(r"[-._](?:UD[-_])?(?:[IT]?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)$", re.IGNORECASE)
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def requantize(
    path: str | os.PathLike[str],
    save_directory: str | os.PathLike[str],
    *,
    quantization: str | Sequence[str] = "q4_k_m",
    allow_requantize: bool = False,
    overwrite: bool = False,
    model_name: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> list[pathlib.Path]:
    """Quantize an existing GGUF to other file types, reading it once, as llama-quantize would.

    Args:
        path: the source ``.gguf`` (for a split model, any of its parts ``...-0000K-of-0000N.gguf``;
            every part is read).
        save_directory: the folder for the new files (created if missing).
        quantization: one file-type name or a list, as for ``save_pretrained_gguf`` (``f32 f16 bf16
            q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k
            iq4_nl iq4_xs tq1_0 tq2_0``, any case, or Unsloth's names).
        allow_requantize: accept a source whose tensors are already quantized below Q8_0
            (Q4_K, Q6_K, IQ4_XS...). Off by default: the result carries both rounding errors.
        overwrite: replace existing output files (they stay intact until the new ones are complete).
        model_name: the file name stem; default the source's name without its file-type suffix
            (``model-BF16.gguf`` -> ``model``).
        threads: quantization threads (default: every core).
        progress: show a progress bar and one summary line per file.

    Returns:
        The paths written, one per quantization: ``<save_directory>/<model_name>-<QUANT>.gguf``.

    Raises:
        MissingFileError: ``path`` (or a part of a split model) does not exist.
        GGUFReadError: ``path`` is not a readable (little-endian) GGUF, or lacks the KVs the plan needs.
        QuantizedCheckpointError: the source is quantized below Q8_0 and ``allow_requantize`` is False.
        UnsupportedQuantTypeError: an unknown quantization name, or a tensor type llmdeploy cannot decode.
        OutputExistsError: an output file exists and ``overwrite`` is False.
        InvalidOptionError: an output would replace the source file.
        NonFiniteValueError: a tensor holds NaN/inf (no output is left behind).
    """
    file_types = _file_types(quantization)
    with open_gguf(path) as source:
        source.require_little_endian()
        _check_requantizable(source, allow_requantize)
        hparams = source_hparams(source)
        # The plan reads an input's type only for the tensors it leaves alone (norms, 1-D tensors...),
        # which keep it: their type in this file, as llama-quantize keeps them.
        inputs = [PlanInput(t.name, t.shape, t.type) for t in source.tensors]
        plans = [plan_quantization(inputs, ft, hparams) for ft in file_types]
        _check_decodable(source, plans)

        out_dir = pathlib.Path(save_directory)
        stem = model_name or _default_stem(source.path)
        paths = [out_dir / f"{stem}-{ft.name.upper()}.gguf" for ft in file_types]
        _check_outputs(paths, source, overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)

        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            writers = []
            for plan, out in zip(plans, paths):
                writer = stack.enter_context(GGUFFileWriter(out, overwrite=overwrite))
                for entry in source.metadata:
                    if entry.key not in _PLAN_KEYS:
                        writer.add_metadata(entry.key, entry.value, entry.type, sub_type=entry.sub_type)
                for key, value, value_type in plan.metadata():
                    writer.add_metadata(key, value, value_type)
                for tp in plan.tensors:
                    writer.add_tensor(tp.name, tp.shape, tp.type, tp.nbytes)
                writers.append(writer)
            order = [tp.name for tp in plans[0].tensors]  # llama-quantize's order, the same in every plan
            for name in _progress(order, progress):
                _write_tensor(source, source.tensor(name), plans, writers, threads)
            # leaving the stack commits every file (fsync + atomic rename)
    if progress:
        elapsed = time.perf_counter() - started
        for plan, out in zip(plans, paths):
            print(f"llmdeploy: wrote {out.name}: {plan.summary()} ({elapsed:.1f} s for the pass)")
    return paths


def source_hparams(source: GGUFModelFile) -> ModelHParams:
    """The model facts llama-quantize's rules read, from a GGUF's ``{arch}.*`` KVs.

    As llama.cpp reads them: a per-layer head count counts by its layer 0, ``head_count_kv``
    defaults to ``head_count``, ``expert_count`` to 0.

    Args:
        source: an opened GGUF.

    Raises:
        GGUFReadError: ``general.architecture``, ``{arch}.block_count`` or
            ``{arch}.attention.head_count`` is missing.
    """
    arch = source.architecture
    why = "to choose the per-tensor types as llama-quantize does"
    n_head = source.layer0_int(f"{arch}.attention.head_count", why=why)
    return ModelHParams(
        arch=arch,
        n_layer=source.layer0_int(f"{arch}.block_count", why=why),
        n_head=n_head,
        n_head_kv=source.layer0_int(f"{arch}.attention.head_count_kv", n_head),
        n_expert=source.layer0_int(f"{arch}.expert_count", 0),
    )


def _check_requantizable(source: GGUFModelFile, allow_requantize: bool) -> None:
    quantized = [t for t in source.tensors if t.type not in _REQUANTIZE_FREELY and GGML_QUANT_SIZES[t.type][0] > 1]
    if not quantized or allow_requantize:
        return
    counts = ", ".join(f"{n} {name}" for name, n in Counter(t.type.name for t in quantized).most_common())
    raise QuantizedCheckpointError(
        f"{source.path} is already quantized below Q8_0 ({counts} tensors, e.g. {quantized[0].name!r}). "
        "Quantizing those weights again rounds their rounding error a second time, so the result is worse than "
        "quantizing the original weights once: re-export from the HF model with save_pretrained_gguf(..., "
        "quantization=...) instead, or start from a BF16/F16/Q8_0 GGUF. To requantize this file anyway, pass "
        "allow_requantize=True (CLI: --allow-requantize)."
    )


def _check_decodable(source: GGUFModelFile, plans: list[QuantPlan]) -> None:
    """Every tensor whose type changes must be decodable, checked before anything is written."""
    from .. import quants  # the kernels load torch: imported only when a file is requantized (not to estimate one)

    for t in source.tensors:
        if all(plan[t.name].type == t.type for plan in plans):
            continue
        try:
            quants.quant_type(t.type)
        except UnsupportedQuantTypeError:
            raise UnsupportedQuantTypeError(
                f"{source.path}: tensor {t.name!r} is stored as {t.type.name}, which llmdeploy cannot decode to "
                "quantize it again; requantize a file whose tensors are float or Q8_0."
            ) from None


def _check_outputs(paths: list[pathlib.Path], source: GGUFModelFile, overwrite: bool) -> None:
    inputs = {p.resolve() for p in source.paths}
    for out in paths:
        if out.resolve() in inputs:
            raise InvalidOptionError(f"{out} is the source file itself; choose another save_directory or model_name.")
        if not overwrite and out.exists():
            raise OutputExistsError(f"{out} exists; pass overwrite=True to replace it.")


def _write_tensor(
    source: GGUFModelFile,
    tensor: GGUFTensorInfo,
    plans: list[QuantPlan],
    writers: list[GGUFFileWriter],
    threads: int | None,
) -> None:
    """Encode one tensor once per new type, then write it to every file."""
    targets = [plan[tensor.name].type for plan in plans]
    new_types = [qtype for qtype in dict.fromkeys(targets) if qtype != tensor.type]
    encoded: dict[GGMLQuantizationType, np.ndarray] = {}
    if new_types:
        from .. import quants

        nbytes = {p[tensor.name].type: p[tensor.name].nbytes for p in plans}
        encoded = {qtype: np.empty((tensor.n_rows, nbytes[qtype] // tensor.n_rows), np.uint8) for qtype in new_types}
        step = max(1, CHUNK_VALUES // tensor.shape[-1])
        # Every block type encodes each row on its own (no imatrix), so rows can go a few at a time.
        for lo in range(0, tensor.n_rows, step):
            hi = min(lo + step, tensor.n_rows)
            values = source.float_rows(tensor, lo, hi, threads=threads)
            for qtype in new_types:
                try:
                    encoded[qtype][lo:hi] = quants.quantize(values, qtype, threads=threads)
                except NonFiniteValueError as exc:
                    raise NonFiniteValueError(f"Tensor {tensor.name!r} (rows {lo} to {hi - 1}): {exc}") from None
            del values
    if tensor.type in targets:
        encoded[tensor.type] = source.raw_rows(tensor)  # unchanged: the stored bytes, as they are
    for qtype, writer in zip(targets, writers):
        writer.write_tensor(tensor.name, encoded[qtype])


def _file_types(quantization: str | Sequence[str]) -> list[FileType]:
    names = [quantization] if isinstance(quantization, str) else list(quantization)
    if not names:
        raise InvalidOptionError("quantization is empty; give a file type such as 'q4_k_m' or a list of them.")
    return list(dict.fromkeys(file_type(name) for name in names))


def _default_stem(path: pathlib.Path) -> str:
    """The source's name without ``.gguf``, a split suffix and a file-type suffix."""
    stem = _SPLIT_SUFFIX.sub("", path.name.removesuffix(".gguf"))
    return _QUANT_SUFFIX.sub("", stem) or stem


def _progress(names: list[str], enabled: bool) -> Any:
    if not enabled:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc="llmdeploy requantize", unit="tensor")
