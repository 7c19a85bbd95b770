"""A model as a stream of tensors: HF safetensors folders (memory-mapped) or an in-memory model.

``open_source(model)`` gives a :class:`Source`: the config the converter sees, the folder
that holds the tokenizer files, the tensor names in checkpoint order, and each tensor on
demand (one at a time, no copy of the whole model).

Checkpoint order is what llama.cpp's converter iterates: the shards in file-name order,
and within a shard the tensor names sorted (the order ``safetensors`` lists them in).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._fsutil import ShardMaps
from .errors import MissingFileError, NotSupportedYetError, QuantizedCheckpointError, UnexpectedTensorError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["Source", "TensorInfo", "dtype_name", "open_source", "read_model_config"]

#: safetensors dtype names and their torch dtypes, the ones every supported torch has (the merge
#: reads base checkpoints in these; export also reads the optional ones added below).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPES: dict[str, torch.dtype] = dict(SAFETENSORS_DTYPES)
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):  # fmt: skip
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16", "F32", ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))

# Tensor names that only a quantized checkpoint holds: bitsandbytes 4-bit (absmax, quant_map,
# quant_state...), bitsandbytes 8-bit (SCB, weight_format), GPTQ/AWQ (qweight, qzeros, scales,
# g_idx) and FP8 (weight_scale, weight_scale_inv).
_QUANT_SUFFIX = re.compile(
    r"\.(absmax|nested_absmax|quant_map|nested_quant_map|quant_state(\.[\w.]+)?|SCB|weight_format"
    r"|qweight|qzeros|scales|g_idx|weight_scale|weight_scale_inv)$"
)
#: Names of the extra tensors a bitsandbytes checkpoint stores beside its packed weights.
BNB_SUFFIX = re.compile(
    r"\.(absmax|nested_absmax|quant_map|nested_quant_map|quant_state(\.[\w.]+)?|SCB|weight_format)$"
)


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is before it is loaded.

    Args:
        shape: the shape as stored (torch order).
        dtype: the safetensors dtype name: "BF16", "F16", "F32", "U8", ...
    """

    shape: tuple[int, ...]
    dtype: str


class Source:
    """A checkpoint as named tensors, loaded one at a time.

    Attributes:
        config: the model config as the converter reads it (``AutoConfig.from_pretrained(folder)
            .to_dict()``, so class defaults are filled in; the raw config.json if transformers
            cannot build the config), or ``model.config.to_dict()``.
        folder: the folder that holds config.json and the tokenizer files, or None.
    """

    config: dict[str, Any]
    folder: pathlib.Path | None

    def __init__(
        self,
        config: dict[str, Any],
        folder: pathlib.Path | None,
        infos: dict[str, TensorInfo],
        loader: Callable[[str], torch.Tensor],
    ) -> None:
        self.config = config
        self.folder = folder
        self._infos = infos
        self._loader = loader

    def names(self) -> list[str]:
        """The HF tensor names, in checkpoint order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of tensor ``name``, without loading it.

        Args:
            name: an HF tensor name from :meth:`names`.
        """
        return self._infos[name]

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU, in its stored dtype (a view of a memory map for folders).

        For folders, only the latest loaded tensor's pages count in the process's RSS: loading
        the next one releases them (an older view still reads the same bytes, from the page cache).

        Args:
            name: an HF tensor name from :meth:`names`.
        """
        if name not in self._infos:
            raise KeyError(f"no tensor {name!r} in this checkpoint")
        return self._loader(name)

    def __repr__(self) -> str:
        where = self.folder if self.folder is not None else "in-memory model"
        return f"Source({where}, {len(self._infos)} tensors)"


def open_source(model: str | os.PathLike[str] | PreTrainedModel) -> Source:
    """Open a model for streaming export.

    Args:
        model: a folder saved by ``save_pretrained`` (config.json and ``model.safetensors`` or
            ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``; bf16, fp16
            or fp32), or a loaded ``PreTrainedModel`` (its tensors are used in place).

    Returns:
        A :class:`Source`.

    Raises:
        MissingFileError: no such folder, no config.json, or no safetensors weights in it.
        QuantizedCheckpointError: the weights are still quantized (bitsandbytes, GPTQ, AWQ, FP8).
    """
    if isinstance(model, (str, os.PathLike)):
        return _open_folder(pathlib.Path(model))
    if hasattr(model, "state_dict") and hasattr(getattr(model, "config", None), "to_dict"):
        return _open_model(model)
    raise TypeError(f"open_source() takes a model folder or a transformers PreTrainedModel, not {type(model).__name__}")


# -- folders -----------------------------------------------------------------------------------


def _open_folder(folder: pathlib.Path) -> Source:
    if not folder.is_dir():
        raise MissingFileError(
            f"{folder} is not a folder: pass the folder a model was saved to with save_pretrained "
            "(it holds config.json and *.safetensors), or the loaded model object itself"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = (
            " (it looks like a PEFT adapter folder: merge the adapter into its base model first)"
            if (folder / "adapter_config.json").is_file()
            else ""
        )
        raise MissingFileError(
            f"{config_file} not found{hint}: pass a folder that contains config.json (one written by "
            "save_pretrained), or pass the loaded PreTrainedModel object instead"
        )
    config = read_model_config(folder)
    shards = _shard_files(folder)

    infos: dict[str, TensorInfo] = {}
    where: dict[str, tuple[pathlib.Path, int, int]] = {}
    for shard in shards:
        header, data_start = read_safetensors_header(shard)
        for name in sorted(header):
            meta = header[name]
            begin, end = meta["data_offsets"]
            infos[name] = TensorInfo(shape=tuple(meta["shape"]), dtype=meta["dtype"])
            where[name] = (shard, data_start + begin, data_start + end)
    _check_index(folder, infos)
    _check_not_quantized(infos, config, folder.name)
    for name, info in infos.items():
        if info.dtype not in _DTYPES:
            raise NotSupportedYetError(
                f"tensor {name!r} in {where[name][0].name} has dtype {info.dtype}, which llmdeploy cannot read; "
                "save the model in bf16, fp16 or fp32"
            )

    maps = ShardMaps()

    def load(name: str) -> torch.Tensor:
        shard, begin, end = where[name]
        info = infos[name]
        raw = torch.from_numpy(maps.view(shard, begin, end))
        return raw.view(_DTYPES[info.dtype]).reshape(info.shape)

    return Source(config, folder, infos, load)


def read_model_config(folder: pathlib.Path) -> dict[str, Any]:
    """config.json as the converter's hparams see it.

    transformers' config with class defaults filled in, falling back to the raw JSON when
    transformers cannot build it (remote code, unknown type).
    """
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001 - any failure means: use the JSON as it is
        with open(folder / "config.json", encoding="utf-8") as f:
            return json.load(f)


def _shard_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MissingFileError(f"{index} has no 'weight_map': save the model again with save_pretrained")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MissingFileError(
                f"{index.name} lists weight files that are not in {folder}: {', '.join(missing)}; "
                "copy the missing shards or save the model again"
            )
        return [folder / n for n in names]
    shards = sorted(p for p in folder.iterdir() if p.name.startswith("model") and p.name.endswith(".safetensors"))
    if shards:
        return shards
    if any(p.name.startswith("pytorch_model") and p.name.endswith(".bin") for p in folder.iterdir()):
        raise MissingFileError(
            f"{folder} holds only PyTorch .bin weights; GGUF export reads safetensors. Convert once with "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) (transformers writes "
            "safetensors), or pass the loaded model object instead of the folder"
        )
    hint = (
        " (it holds a PEFT adapter: merge it into its base model first)"
        if (folder / "adapter_model.safetensors").is_file()
        else ""
    )
    raise MissingFileError(
        f"no model weights in {folder}{hint}: expected model.safetensors, or model-0000i-of-0000N.safetensors "
        "with model.safetensors.index.json, as save_pretrained writes them"
    )


def read_safetensors_header(shard: pathlib.Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header (without ``__metadata__``) and where its data starts."""
    with open(shard, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MissingFileError(f"{shard} is not a safetensors file (too short); save the model again")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MissingFileError(f"{shard} is not a valid safetensors file ({e}); save the model again") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _check_index(folder: pathlib.Path, infos: dict[str, TensorInfo]) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    with open(index, encoding="utf-8") as f:
        listed = set(json.load(f)["weight_map"])
    missing = sorted(listed - set(infos))
    extra = sorted(set(infos) - listed)
    if missing or extra:
        raise MissingFileError(
            f"{index.name} and the shards in {folder} disagree: tensors listed but not stored: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; stored but not listed: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}. Save the model again"
        )


def _check_not_quantized(infos: dict[str, TensorInfo], config: dict[str, Any], where: str) -> None:
    method = (config.get("quantization_config") or {}).get("quant_method")
    for name, info in infos.items():
        bnb = bool(BNB_SUFFIX.search(name)) or info.dtype in ("U8", "I8")
        if bnb or _QUANT_SUFFIX.search(name) or info.dtype.startswith("F8"):
            kind = "bitsandbytes" if bnb else (method or "a quantization method")
            raise QuantizedCheckpointError(
                f"tensor {name!r} ({info.dtype}) in {where} comes from a {kind}-quantized checkpoint; "
                "GGUF export needs 16- or 32-bit weights. Dequantize first (model.dequantize() in "
                "transformers), or merge the LoRA adapter into a 16-bit copy of the base model, then "
                "export that model"
            )


# -- in-memory models --------------------------------------------------------------------------


def _open_model(model: Any) -> Source:
    config = model.config.to_dict()
    if not config.get("architectures"):  # save_pretrained records the class, so do we
        config["architectures"] = [type(model).__name__]
    name_or_path = getattr(model, "name_or_path", None) or config.get("_name_or_path") or ""
    folder = pathlib.Path(name_or_path) if name_or_path and os.path.isdir(name_or_path) else None

    state = model.state_dict()
    adapter = next((k for k in state if ".lora_A." in k or ".lora_B." in k or ".lora_magnitude_vector" in k), None)
    if adapter is not None:
        raise UnexpectedTensorError(
            f"the model still holds LoRA adapter weights ({adapter!r}): merge the adapter first "
            "(model = model.merge_and_unload()), then export the merged model"
        )
    state = _without_tied(model, state)
    infos_raw = {k: TensorInfo(tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items()}
    _check_not_quantized(infos_raw, config, "the model")
    for k, v in state.items():
        if v.device.type == "meta":
            raise NotSupportedYetError(
                f"tensor {k!r} of the model is on the meta device (offloaded): save the model with "
                "save_pretrained and export the folder instead"
            )

    groups = _checkpoint_names(model, state)
    infos: dict[str, TensorInfo] = {}
    origin: dict[str, str] = {}
    for key, outs in groups.items():
        for out, info in outs.items():
            infos[out] = info
            origin[out] = key
    infos = dict(sorted(infos.items()))

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(name: str) -> torch.Tensor:
        key = origin[name]
        if key == name:
            return state[key].detach().to("cpu")
        if key not in cache:  # a fused parameter: split it once, keep only the latest one
            cache.clear()
            cache[key] = _revert(model, {key: state[key].detach()})
        return cache[key][name].to("cpu")

    return Source(config, folder, infos, load)


def _without_tied(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict that ``save_pretrained`` would write: tied copies (lm_head = embeddings) dropped."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: drop the tensors that share storage with an earlier one
        seen: dict[tuple[int, tuple[int, ...]], str] = {}
        kept: dict[str, torch.Tensor] = {}
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
        for k in sorted(state, key=lambda k: (k in tied, k)):
            v = state[k]
            ident = (v.data_ptr(), tuple(v.shape))
            if v.device.type != "meta" and ident in seen:
                continue
            seen[ident] = k
            kept[k] = v
        return kept
    return remove_tied_weights_from_state_dict(dict(state), model)


def _revert(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps checkpoint names and layouts in memory
        return dict(state)
    return dict(revert_weight_conversion(model, state))


def _checkpoint_names(model: Any, state: dict[str, torch.Tensor]) -> dict[str, dict[str, TensorInfo]]:
    """For each parameter, the checkpoint tensors ``save_pretrained`` would write for it.

    transformers 5 fuses some checkpoint tensors in memory (MoE experts become one 3-D
    parameter) and splits them back on save; the split is found on meta tensors, so nothing
    is copied here.
    """
    out: dict[str, dict[str, TensorInfo]] = {}
    for key, value in state.items():
        meta = _revert(model, {key: value.detach().to("meta")})
        out[key] = {n: TensorInfo(tuple(t.shape), dtype_name(t.dtype)) for n, t in meta.items()}
    return out
