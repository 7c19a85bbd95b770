"""A planned merge seen as a checkpoint: GGUF export of a PEFT model without a merged copy on disk.

``save_pretrained_gguf`` reads its model through :class:`llmdeploy.source.Source`; this module
gives it one whose tensors are the merged ones, computed when the exporter asks for them, one
at a time. Each tensor is merged exactly as ``save_pretrained_merged`` merges it (float32, one
rounding to the merged model's 16-bit dtype), so exporting a PEFT model gives the same file as
exporting the folder ``save_pretrained_merged`` would write.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from ..source import Source, TensorInfo, dtype_name, read_model_config
from . import folder as fo
from .merge import PreparedMerge, _config_from_dict
from .plan import OutTensor, resolve_dtype

__all__ = ["merged_source"]


def merged_source(merge: PreparedMerge, *, dtype: str | torch.dtype | None = None) -> Source:
    """The merged model of ``merge`` as a :class:`Source` (tensors merged lazily; the latest one cached).

    Args:
        merge: a planned merge (:func:`llmdeploy.merge.merge.open_merge`); it must stay open while the
            source is read.
        dtype: the merged dtype (default: the base's 16-bit dtype, as ``save_pretrained_merged``).
    """
    merge.plan.check_shapes()
    out_dtype = resolve_dtype(dtype, merge.plan.base_dtype)
    tensors: dict[str, OutTensor] = {t.name: t for t in merge.plan.out_tensors(out_dtype)}
    infos = {name: TensorInfo(t.shape, dtype_name(t.dtype)) for name, t in tensors.items()}
    latest: dict[str, torch.Tensor] = {}

    def load(name: str) -> torch.Tensor:
        # The exporter may read a large tensor a few rows at a time: merge it once, keep only it.
        if name not in latest:
            latest.clear()
            latest[name] = tensors[name].produce()
        return latest[name]

    return Source(_export_config(merge, out_dtype), _tokenizer_folder(merge.sources), infos, load)


def _export_config(merge: PreparedMerge, dtype: torch.dtype) -> dict[str, Any]:
    """The merged model's config as the converter reads it (class defaults filled in)."""
    if merge.base_folder is not None:
        config = read_model_config(merge.base_folder.folder)
    else:
        config = merge.inner.config.to_dict()
        config["architectures"] = [type(merge.inner).__name__]
    return _config_from_dict(config, dtype, merge.plan)


def _tokenizer_folder(sources: list[pathlib.Path]) -> pathlib.Path | None:
    """The first input folder with tokenizer files (adapter folders come before the base)."""
    for folder in sources:
        if any((folder / name).is_file() for name in fo.TOKENIZER_FILES):
            return folder
    return sources[0] if sources else None
