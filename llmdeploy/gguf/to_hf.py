"""``gguf_to_hf``: a GGUF back to an HF folder (safetensors, config, tokenizer), through transformers.

transformers already reads GGUF files: ``from_pretrained(folder, gguf_file=name)`` maps the
``{arch}.*`` KVs to a config, undoes llama.cpp's tensor transforms (Q/K permutations, Gemma's
``1 + w`` norms...) while dequantizing, and rebuilds the tokenizer from the ``tokenizer.*`` KVs.
This module only wires that loader to a safe save: the model is loaded dequantized (in bf16 for
a quantized file, in the file's own float type otherwise), its config loses the
``quantization_config`` the loader adds, and ``save_pretrained`` writes into a hidden staging
folder that is renamed into place once complete, so a failed conversion leaves nothing behind.

The whole model is held in memory by transformers while it is converted.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .._fsutil import fsync_dir
from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..merge.folder import check_output_folder, stale_files
from .reader import GGUFModelFile, open_gguf
from .writer import GGUFFileWriter

__all__ = ["default_dtype", "gguf_to_hf", "llama_cpp_config_fixes", "transformers_gguf_architectures"]

_T = GGMLQuantizationType
_DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f16": "float16", "fp16": "float16", "float16": "float16", "half": "float16",
    "f32": "float32", "fp32": "float32", "float32": "float32", "float": "float32",
}  # fmt: skip
_FLOAT_DTYPES = {_T.F32: "float32", _T.F16: "float16", _T.BF16: "bfloat16"}


def gguf_to_hf(
    path: str | os.PathLike[str],
    save_directory: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: Any = None,
) -> pathlib.Path:
    """Convert a GGUF to an HF model folder that transformers, vLLM and PEFT load.

    The folder gets ``config.json``, ``generation_config.json``, the tokenizer files (when the
    GGUF has a vocabulary) and ``model.safetensors`` (in 5 GB shards when larger), all written
    by transformers' own ``save_pretrained``.

    Args:
        path: the ``.gguf`` file (for a split model, any of its parts ``...-0000K-of-0000N.gguf``;
            the parts are joined into one temporary file first, as transformers reads one file).
        save_directory: the output folder. It must be new or empty unless ``overwrite``.
        overwrite: replace the model in a non-empty folder: earlier weights, indexes and
            tokenizer files go, other files (a README, GGUF files) stay.
        dtype: the weights' dtype: a ``torch.dtype`` or ``"bfloat16"``/``"float16"``/``"float32"``
            (``"bf16"``, ``"f16"``, ``"f32"``). Default: bfloat16 for a quantized file, the file's
            float type (F32, F16 or BF16) otherwise.

    Returns:
        The output folder.

    Raises:
        MissingFileError: ``path`` (or a part of a split model) does not exist.
        GGUFReadError: ``path`` is not a readable (little-endian) GGUF.
        UnsupportedArchitectureError: transformers cannot read this architecture (the message
            lists the ones it can).
        OutputExistsError: ``save_directory`` is a file, or a non-empty folder and ``overwrite`` is False.
        InvalidOptionError: an unknown ``dtype``.
    """
    import torch

    target = pathlib.Path(save_directory)
    check_output_folder(target, overwrite=overwrite)
    torch_dtype = _torch_dtype(dtype)
    with open_gguf(path) as source:
        source.require_little_endian()
        _check_architecture(source)
        if torch_dtype is None:
            torch_dtype = getattr(torch, default_dtype(source))
        has_vocab = "tokenizer.ggml.model" in source
        staging = _new_staging_folder(target)
        try:
            with _single_file(source, staging) as gguf_path:
                model = _load_model(source, gguf_path, torch_dtype)
                tokenizer = _load_tokenizer(gguf_path) if has_vocab else None
            # safetensors is save_pretrained's only format in transformers 5 and its default before;
            # shards of 5 GB as save_pretrained_merged writes them
            model.save_pretrained(str(staging), max_shard_size="5GB")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            del model, tokenizer
            _commit(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def default_dtype(source: GGUFModelFile) -> str:
    """The torch dtype name ``gguf_to_hf`` saves ``source`` in when none is given.

    bfloat16 when any tensor of two or more dimensions is quantized (its values are not in any
    float type; bfloat16 keeps their range at half float32's size), else the float type most of
    those tensors are stored in (1-D tensors, norms and biases, are F32 in every GGUF).
    """
    matrices = [t.type for t in source.tensors if sum(d > 1 for d in t.shape) >= 2]
    if any(GGML_QUANT_SIZES[t][0] > 1 for t in matrices):
        return "bfloat16"
    floats = Counter(_FLOAT_DTYPES[t] for t in matrices if t in _FLOAT_DTYPES)
    return floats.most_common(1)[0][0] if floats else "float32"


def transformers_gguf_architectures() -> list[str]:
    """The GGUF architectures (``general.architecture``) the installed transformers can load.

    Both of its loaders count: the table of ``modeling_gguf_pytorch_utils`` and, in newer
    versions, ``integrations.gguf``'s. Empty when neither can be imported.
    """
    names: set[str] = set()
    with contextlib.suppress(ImportError):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf.utils import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return sorted(names)


def _normalized(arch: str) -> str:
    # transformers' tables spell some architectures with "_" where llama.cpp writes none or "-"
    # (qwen2_moe / qwen2moe, gpt_oss / gpt-oss); t5encoder files load as t5.
    name = re.sub(r"[-_]", "", arch.lower())
    return "t5" if name == "t5encoder" else name


def _unsupported_message(arch: str, supported: list[str]) -> str:
    return (
        f"transformers {_transformers_version()} cannot read GGUF files of architecture {arch!r}; it reads "
        f"{', '.join(supported)}. Convert from the original HF model instead, or upgrade transformers."
    )


def _check_architecture(source: GGUFModelFile) -> None:
    arch = source.architecture
    supported = transformers_gguf_architectures()
    if supported and _normalized(arch) not in {_normalized(name) for name in supported}:
        raise UnsupportedArchitectureError(f"{source.path}: {_unsupported_message(arch, supported)}")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise InvalidOptionError(
                f"dtype={dtype} is not a float type to save weights in; use bfloat16, float16 or float32."
            )
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).strip().lower().removeprefix("torch."))
    if name is None:
        raise InvalidOptionError(
            f"dtype={dtype!r} is not one of bfloat16, float16, float32 (or bf16, f16, f32, a torch.dtype)."
        )
    return getattr(torch, name)


@contextlib.contextmanager
def _single_file(source: GGUFModelFile, staging: pathlib.Path) -> Iterator[pathlib.Path]:
    """The GGUF as one file: the source itself, or its split parts joined (unchanged) beside the staging folder."""
    if len(source.paths) == 1:
        yield source.path
        return
    joined = staging.parent / f".{staging.name}.joined.gguf"
    try:
        with GGUFFileWriter(joined, overwrite=True) as writer:
            for entry in source.metadata:
                writer.add_metadata(entry.key, entry.value, entry.type, sub_type=entry.sub_type)
            for t in source.tensors:
                writer.add_tensor(t.name, t.shape, t.type, t.nbytes)
            for t in source.tensors:
                writer.write_tensor(t.name, source.raw_rows(t))
        yield joined
    finally:
        joined.unlink(missing_ok=True)


def _load_model(source: GGUFModelFile, gguf_path: pathlib.Path, torch_dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    # config attributes given to from_pretrained override what it reads from the GGUF
    kwargs: dict[str, Any] = dict(llama_cpp_config_fixes(source))
    with contextlib.suppress(ImportError):  # transformers >= 5.x keeps GGUF blocks packed unless told not to
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch_dtype, **kwargs
        )
    except ValueError as exc:
        if "not supported" in str(exc):
            raise UnsupportedArchitectureError(
                f"{source.path}: {_unsupported_message(source.architecture, transformers_gguf_architectures())} "
                f"(transformers: {exc})"
            ) from exc
        raise
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def llama_cpp_config_fixes(source: GGUFModelFile) -> dict[str, Any]:
    """Config values transformers' GGUF loader leaves at a class default that disagrees with llama.cpp.

    Gemma 2 and 3 scale attention scores by ``query_pre_attn_scalar ** -0.5``. The GGUF does not
    store it; llama.cpp uses the head size (``attention.key_length``), or ``embedding_length //
    head_count`` for the 27B models (46 / 62 layers), while transformers' config keeps its default
    of 256, right only where the head size is 256.

    Args:
        source: an opened GGUF.

    Returns:
        ``{config attribute: value}`` to set on the loaded config (empty for other architectures).
    """
    arch = source.architecture
    layers_27b = {"gemma2": 46, "gemma3": 62}.get(arch)
    if layers_27b is None:
        return {}
    why = "for the attention scale"
    n_embd = source.layer0_int(f"{arch}.embedding_length", why=why)
    n_head = source.layer0_int(f"{arch}.attention.head_count", why=why)
    if source.layer0_int(f"{arch}.block_count", why=why) == layers_27b:
        return {"query_pre_attn_scalar": n_embd // n_head}
    return {"query_pre_attn_scalar": source.layer0_int(f"{arch}.attention.key_length", n_embd // n_head)}


def _load_tokenizer(gguf_path: pathlib.Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _new_staging_folder(target: pathlib.Path) -> pathlib.Path:
    """A new hidden folder beside ``target`` (same file system, so it can be renamed into place).

    Created with the usual (umask) permissions, which the output folder keeps after the rename
    (``tempfile.mkdtemp`` would make it private to the user).
    """
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = parent / f".{target.resolve().name}.tmp-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging


def _commit(staging: pathlib.Path, target: pathlib.Path) -> None:
    """Move the complete staging folder into place: one rename when ``target`` is new or empty."""
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(staging, target)
        fsync_dir(target.parent)
        return
    # overwrite: the earlier model's weights and tokenizer go, the new files replace theirs
    # one by one, weights first and config.json last (a reader never sees a config without weights)
    new = {f.name for f in staging.iterdir()}
    for name in stale_files(target):
        if name not in new:
            (target / name).unlink()
    for name in sorted(new, key=lambda n: (n == "config.json", n.endswith(".json"), n)):
        os.replace(staging / name, target / name)
    staging.rmdir()
    fsync_dir(target)
