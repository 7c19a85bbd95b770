"""``save_pretrained_merged``: a LoRA-merged 16-bit model folder that vLLM, SGLang and transformers load.

The pass: plan (every output tensor, its base tensor and adapter terms; shapes checked) →
stream (one tensor merged, written, dropped) → commit (temp files renamed into place).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidOptionError, MissingFileError
from . import folder as fo
from .memory import is_peft_model, local_folder, merge_adapter_names, plan_from_model
from .plan import MergePlan, resolve_dtype
from .stream import Adapter, BaseFolder, adapter_from_model, load_adapter_folder, plan_from_folders

__all__ = ["SAVE_METHODS", "PreparedMerge", "check_save_method", "is_adapter_folder", "is_transformers_model", "open_merge", "save_pretrained_merged"]

logger = logging.getLogger("llmdeploy")

SAVE_METHODS = ("merged_16bit", "lora")

_GGUF_NAMES = {
    "q8_0", "q4_k_m", "q5_k_m", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q6_k", "f16", "bf16", "f32",
    "gguf", "not_quantized", "fast_quantized", "quantized",
}  # fmt: skip
_EXPLAIN = {
    "merged_4bit": (
        "Unsloth's 'merged_4bit' stores the merged model in bitsandbytes 4-bit, which loses the accuracy the merge "
        "kept and which llama.cpp and most engines cannot load as is; save 'merged_16bit' and quantize that "
        "(save_pretrained_gguf, or the engine's own quantization)"
    ),
    "mxfp4": "MXFP4 export is not supported; save 'merged_16bit' and quantize it with the serving engine",
    "fp8": "FP8 export is not supported; save 'merged_16bit' and quantize it with llm-compressor or the engine",
    "torchao": "torchao export is not supported; save 'merged_16bit' and quantize it with torchao",
}
_ALIASES = {"merged_4bit_forced": "merged_4bit", "forced_merged_4bit": "merged_4bit", "torchao_fp8": "torchao",
            "torchao_int8": "torchao", "fp8_static": "fp8", "nvfp4": "fp8", "int4": "fp8", "w4a16": "fp8"}  # fmt: skip


def check_save_method(save_method: str) -> str:
    """``save_method`` if it is one of :data:`SAVE_METHODS`; else an error that says what was meant."""
    if save_method in SAVE_METHODS:
        return save_method
    valid = "valid: 'merged_16bit' (the default: LoRA merged into 16-bit weights) and 'lora' (the adapter alone)"
    key = str(save_method).lower()
    key = _ALIASES.get(key, key)
    if key in _EXPLAIN:
        raise InvalidOptionError(f"save_method={save_method!r} is not supported; {valid}. {_EXPLAIN[key]}")
    if key in _GGUF_NAMES:
        raise InvalidOptionError(
            f"save_method={save_method!r} is a GGUF quantization; {valid}. For GGUF files use save_pretrained_gguf"
        )
    if key in ("merged_16", "16bit", "merged", "merged16bit"):
        raise InvalidOptionError(
            f"save_method={save_method!r} is not a save method; {valid}. Did you mean 'merged_16bit'?"
        )
    raise InvalidOptionError(
        f"save_method={save_method!r} is not a save method; {valid}. Unsloth's 'merged_4bit' and "
        "'merged_4bit_forced' are not supported (a 4-bit merge loses accuracy): save 'merged_16bit' and quantize it"
    )


def save_pretrained_merged(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    base: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    adapter_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Save a LoRA fine-tune as a merged model folder (or as the adapter alone).

    The merged weights equal PEFT's ``merge_and_unload()`` (computed in float32, rounded once
    to the saved dtype); the folder holds safetensors shards (+ index), ``config.json`` without
    ``quantization_config``, ``generation_config.json`` and the tokenizer files, and no
    ``adapter_*`` file. The user's model is never modified, and no second copy of it is held:
    tensors are merged and written one at a time; with a path, the base is read shard by shard
    from memory maps. Nothing is written under a final name before every file is complete.

    Args:
        model: a ``peft.PeftModel`` with LoRA adapter(s), or the folder of a saved LoRA adapter
            (``adapter_config.json`` + ``adapter_model.safetensors``). A transformers model (a full
            fine-tune) has nothing to merge: its weights are saved in the 16-bit dtype, bitsandbytes
            4-bit ones dequantized.
        save_directory: the output folder; it must be new or empty unless ``overwrite``.
        tokenizer: a tokenizer or processor to save with the model; by default the tokenizer files
            are copied from the adapter folder, else from the base model's folder.
        save_method: ``"merged_16bit"`` (default) or ``"lora"`` (the adapter alone, PEFT format).
        base: the base model folder (safetensors). For an adapter folder, defaults to its
            ``base_model_name_or_path``, which must then be a local folder. For an in-memory model,
            the merge reads the base weights from here instead of the model (e.g. the original
            16-bit weights of a QLoRA fine-tune). A bitsandbytes 4-bit base (NF4/FP4, in memory or
            saved) is dequantized in pure torch, with a warning: the merged weights then carry the
            4-bit rounding; pass the original 16-bit weights here to avoid it.
        dtype: the saved dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``; default: the base
            weights' 16-bit dtype, or bfloat16 when they are float32. Float32 tensors of a 16-bit
            checkpoint (kept in float32 on purpose) stay float32.
        max_shard_size: the largest shard, as bytes or "5GB"/"500MB"/"2GiB" (a bigger tensor gets a
            shard of its own).
        adapter_names: the adapters to merge, in order; default: the active adapter(s). For an
            adapter folder: ``"default"`` is the folder itself, other names its sub-folders.
        overwrite: replace the model in an existing non-empty ``save_directory`` (stale weights,
            index, adapter and tokenizer files there are removed).

    Returns:
        The output folder.

    Raises:
        InvalidOptionError: an unknown ``save_method``, ``dtype``, ``max_shard_size`` or adapter name.
        OutputExistsError: ``save_directory`` is not empty and ``overwrite`` is False.
        UnsupportedAdapterError: not a LoRA adapter (IA3, LoHa, ...) or an unsupported LoRA variant.
        AdapterShapeError: the adapter does not fit the base (names the first tensor; nothing written).
        UnmergedAdapterError: a LoRA module with no base tensor to merge into.
        NonFiniteValueError: the merge gives NaN/Inf (names the module; nothing written).
        MissingFileError: the adapter or base folder is incomplete.
    """
    method = check_save_method(save_method)
    out = pathlib.Path(save_directory)
    max_bytes = fo.parse_shard_size(max_shard_size)
    if not (is_peft_model(model) or is_transformers_model(model) or isinstance(model, (str, os.PathLike))):
        raise TypeError(
            f"save_pretrained_merged() takes a peft.PeftModel, a transformers model or the folder of a saved LoRA "
            f"adapter, not {type(model).__name__}"
        )

    if method == "lora":
        if not is_peft_model(model) and not isinstance(model, (str, os.PathLike)):
            raise InvalidOptionError(
                f"save_method='lora' saves a LoRA adapter, and this {type(model).__name__} has none (a full "
                "fine-tune); use save_method='merged_16bit'"
            )
        return _save_lora(model, out, tokenizer=tokenizer, adapter_names=adapter_names, overwrite=overwrite)

    with open_merge(model, base=base, adapter_names=adapter_names) as merge:
        fo.check_output_folder(out, overwrite=overwrite, inputs=merge.sources)
        merge.plan.check_shapes()
        out_dtype = resolve_dtype(dtype, merge.plan.base_dtype)
        config = merge.config(out_dtype)
        gen_json = merge.generation()
        if merge.plan.untied:
            logger.warning(
                "the merged %s differs from the tied %s (trained separately), so both are saved and "
                "tie_word_embeddings is set to False",
                ", ".join(merge.plan.untied),
                ", ".join(sorted(set(merge.plan.untied.values()))),
            )
        stale = fo.stale_files(out) + ["generation_config.json"]
        with fo.Staging(out) as staging:
            fo.write_shards(staging, list(merge.plan.out_tensors(out_dtype)), max_bytes)
            staging.write_json("config.json", config)
            if gen_json is not None:
                staging.write_json("generation_config.json", gen_json)
            _stage_tokenizer(staging, tokenizer, merge.sources)
            staging.commit(remove=stale)
    return out


@dataclasses.dataclass
class PreparedMerge:
    """A merge planned and ready to run: what ``save_pretrained_merged`` writes, before it is written.

    Attributes:
        plan: every output tensor with its base tensor and adapter terms.
        sources: the input folders, in the order their tokenizer files are preferred (adapter
            folders, then the base folder or the in-memory base model's folder).
        base_folder: the base checkpoint when the base weights are read from a folder.
        inner: the in-memory transformers model when they are read from it.
    """

    plan: MergePlan
    sources: list[pathlib.Path]
    base_folder: BaseFolder | None = None
    inner: Any = None

    def config(self, dtype: torch.dtype) -> dict[str, Any]:
        """config.json of the merged model (no quantization_config; vocabulary and ties as merged)."""
        if self.base_folder is not None:
            return _config_from_dict(self.base_folder.config, dtype, self.plan)
        return _config_from_model(self.inner, dtype, self.plan)

    def generation(self) -> dict[str, Any] | None:
        """generation_config.json of the merged model, if the base has one."""
        if self.base_folder is not None:
            path = self.base_folder.folder / "generation_config.json"
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        return _generation_from_model(self.inner)

    def close(self) -> None:
        if self.base_folder is not None:
            self.base_folder.close()

    def __enter__(self) -> PreparedMerge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (not wrapped by PEFT)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def is_adapter_folder(model: Any) -> bool:
    """Whether ``model`` is the path of a saved PEFT adapter (a folder with ``adapter_config.json``)."""
    return isinstance(model, (str, os.PathLike)) and (pathlib.Path(model) / "adapter_config.json").is_file()


def open_merge(
    model: Any, *, base: str | os.PathLike[str] | None = None, adapter_names: Sequence[str] | None = None
) -> PreparedMerge:
    """Plan the merge of ``model`` (a ``peft.PeftModel``, a saved adapter folder, or a transformers model with
    nothing to merge); see ``save_pretrained_merged``.

    The result holds memory maps of the base checkpoint when it reads one: close it (or use it
    as a context manager).
    """
    base_folder: BaseFolder | None = None
    try:
        if is_transformers_model(model):
            if base is not None or adapter_names is not None:
                raise InvalidOptionError(
                    f"base= and adapter_names= apply to a LoRA fine-tune; this {type(model).__name__} has no adapter "
                    "(a full fine-tune): drop them"
                )
            plan, inner = plan_from_model(model)
            return PreparedMerge(plan, [p for p in [local_folder(inner)] if p], None, inner)
        if is_peft_model(model):
            names = merge_adapter_names(model, adapter_names)
            inner = model.get_base_model()
            if base is not None:
                base_folder = BaseFolder.open(pathlib.Path(base))
                plan = plan_from_folders([adapter_from_model(model, n) for n in names], base_folder)
                inner = None
            else:
                plan, inner = plan_from_model(model, names)
            folders = [base_folder.folder if base_folder else None, local_folder(model.get_base_model())]
            return PreparedMerge(plan, [p for p in folders if p], base_folder, inner)
        adapters = _adapter_folders(pathlib.Path(model), adapter_names)
        base_folder = BaseFolder.open(_base_path(adapters[0], base))
        plan = plan_from_folders(adapters, base_folder)
        sources = [*(a.folder for a in adapters if a.folder), base_folder.folder]
        return PreparedMerge(plan, sources, base_folder)
    except BaseException:
        if base_folder is not None:
            base_folder.close()
        raise


# -- sources ---------------------------------------------------------------------------------------


def _adapter_folders(folder: pathlib.Path, adapter_names: Sequence[str] | None) -> list[Adapter]:
    if adapter_names is None:
        return [load_adapter_folder(folder)]
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    out = []
    for name in adapter_names:
        sub = folder if name == "default" else folder / name
        if not (sub / "adapter_config.json").is_file():
            raise InvalidOptionError(
                f"adapter_names: no adapter {name!r} in {folder} (expected {sub / 'adapter_config.json'}); PEFT saves "
                "the 'default' adapter in the folder itself and each other adapter in a sub-folder of its name"
            )
        out.append(load_adapter_folder(sub))
    return out


def _base_path(adapter: Adapter, base: str | os.PathLike[str] | None) -> pathlib.Path:
    if base is not None:
        return pathlib.Path(base)
    name = adapter.config.get("base_model_name_or_path")
    if name and os.path.isdir(name):
        return pathlib.Path(name)
    raise MissingFileError(
        f"the adapter in {adapter.name} names its base model {name!r}, which is not a local folder; pass base= the "
        "folder of the base model's safetensors (download it first, e.g. huggingface_hub.snapshot_download)"
    )


# -- config files ------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_from_dict(config: dict[str, Any], dtype: torch.dtype, plan: MergePlan) -> dict[str, Any]:
    d = copy.deepcopy(config)
    d.pop("quantization_config", None)
    d["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in d:
        d["torch_dtype"] = _dtype_name(dtype)
    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else None
    if plan.untied:
        d["tie_word_embeddings"] = False
        if text is not None and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    if plan.vocab_size is not None:
        if "vocab_size" in d or text is None:
            d["vocab_size"] = plan.vocab_size
        else:
            text["vocab_size"] = plan.vocab_size
    return d


def _config_from_model(inner: Any, dtype: torch.dtype, plan: MergePlan) -> dict[str, Any]:
    cfg = copy.deepcopy(inner.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if attr in cfg.__dict__:
            delattr(cfg, attr)
    cfg.architectures = [type(inner).__name__]
    cfg.dtype = dtype
    if plan.untied:
        cfg.tie_word_embeddings = False
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if text is not None and text is not cfg and hasattr(text, "tie_word_embeddings"):
            text.tie_word_embeddings = False
    if plan.vocab_size is not None and getattr(cfg, "vocab_size", None) not in (None, plan.vocab_size):
        cfg.vocab_size = plan.vocab_size
    d = json.loads(cfg.to_json_string(use_diff=True))
    d.pop("quantization_config", None)
    return d


def _generation_from_model(inner: Any) -> dict[str, Any] | None:
    gen = getattr(inner, "generation_config", None)
    can = getattr(inner, "can_generate", None)
    if gen is None or (callable(can) and not can()):
        return None
    return json.loads(gen.to_json_string(use_diff=True))


def _stage_tokenizer(staging: fo.Staging, tokenizer: Any, sources: Sequence[pathlib.Path]) -> None:
    """The tokenizer files: ``tokenizer.save_pretrained``, else the first source folder that has them.

    ``tokenizer.model`` (SentencePiece, needed by GGUF converters) is taken from a source folder
    when the saved tokenizer lacks it.
    """
    written: set[str] = set()
    if tokenizer is not None:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".llmdeploy-tokenizer-", dir=staging.folder))
        try:
            tokenizer.save_pretrained(str(tmp))
            for p in sorted(tmp.iterdir()):
                if p.is_file():
                    staging.copy(p.name, p)
                    written.add(p.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        for src in sources:
            have = [n for n in fo.TOKENIZER_FILES if (src / n).is_file()]
            if any(n in have for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                for n in have:
                    staging.copy(n, src / n)
                written.update(have)
                break
    if written and "tokenizer.model" not in written:
        for src in sources:
            if (src / "tokenizer.model").is_file():
                staging.copy("tokenizer.model", src / "tokenizer.model")
                break


# -- save_method="lora" ---------------------------------------------------------------------------------


def _save_lora(
    model: Any, out: pathlib.Path, *, tokenizer: Any, adapter_names: Sequence[str] | None, overwrite: bool
) -> pathlib.Path:
    """The adapter alone, in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    stale = [n for n in fo.stale_files(out)] + ["config.json", "generation_config.json"]
    if is_peft_model(model):
        names = merge_adapter_names(model, adapter_names)
        fo.check_output_folder(out, overwrite=overwrite)
        with fo.Staging(out) as staging:
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=".llmdeploy-adapter-", dir=out))
            try:
                model.save_pretrained(str(tmp), selected_adapters=names)
                for p in sorted(tmp.rglob("*")):
                    if p.is_file():
                        staging.copy(str(p.relative_to(tmp)), p)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _stage_tokenizer(staging, tokenizer, [p for p in [local_folder(model.get_base_model())] if p])
            staging.commit(remove=stale)
        return out
    src = pathlib.Path(model)
    load_adapter_folder(src)  # checks it is a LoRA adapter
    fo.check_output_folder(out, overwrite=overwrite, inputs=[src])
    with fo.Staging(out) as staging:
        for p in sorted(src.iterdir()):
            if p.is_file() and (p.name.startswith("adapter_") or p.name == "README.md"):
                staging.copy(p.name, p)
        _stage_tokenizer(staging, tokenizer, [src])
        staging.commit(remove=stale)
    return out
