"""The model methods users call: ``model.save_pretrained_gguf(...)`` and friends.

A thin skin over the public functions (:func:`llmdeploy.save_pretrained_gguf`,
:func:`llmdeploy.save_pretrained_merged`, :func:`llmdeploy.push_to_hub_gguf`,
:func:`llmdeploy.push_to_hub_merged`): each method passes ``self`` as the model. Three ways in:

- ``llmdeploy.patch(model)``: the methods on one model object (returned, for chaining);
- ``llmdeploy.patch()``: on every transformers ``PreTrainedModel`` and PEFT ``PeftModel``;
- subclassing: ``class MyModel(llmdeploy.DeployMixin, LlamaForCausalLM): ...``.

Patching only adds these four names: it never replaces an attribute the class or object already
has (a method of transformers, PEFT or another library keeps working as before).
"""

from __future__ import annotations

import logging
import os
import pathlib
import types
from collections.abc import Sequence
from typing import Any, TypeVar

from .errors import InvalidOptionError

__all__ = ["DeployMixin", "METHODS", "patch"]

logger = logging.getLogger("llmdeploy")

#: The methods :func:`patch` adds.
METHODS = ("save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf")

# Options of Unsloth's methods that llmdeploy does not need: dropped with a note, so that code
# written for Unsloth runs unchanged.
_UNSLOTH_ONLY = {
    "maximum_memory_usage": "llmdeploy streams one tensor at a time, so memory needs no cap",
    "temporary_location": "llmdeploy writes no temporary merged copy",
    "safe_serialization": "llmdeploy always writes safetensors",
    "save_peft_format": "adapters are always saved in PEFT's format",
    "is_main_process": "call the method on the main process only",
}


# Options of Unsloth's methods that mean something llmdeploy does differently: refused with the way to do it.
_UNSLOTH_REFUSED = {
    "push_to_hub": "call push_to_hub_gguf / push_to_hub_merged instead of passing push_to_hub=True",
    "first_conversion": "drop it: llmdeploy writes no intermediate 16-bit GGUF to choose a type for",
    "imatrix_file": "importance-matrix quantization is not supported yet; drop it (types are quantized without one)",
    "use_temp_dir": "drop it: llmdeploy always uploads from a temporary folder it removes afterwards",
}
_GGUF_REFUSED = {
    "max_shard_size": "GGUF files are split with max_file_size= (e.g. max_file_size='50GB')",
    "save_method": "a GGUF is always the merged model; save the adapter with save_pretrained_merged(..., "
    "save_method='lora')",
}


def _drop_unsloth_options(kwargs: dict[str, Any], *, gguf: bool = False) -> dict[str, Any]:
    refused = {**_UNSLOTH_REFUSED, **(_GGUF_REFUSED if gguf else {})}
    for name in kwargs:
        if name in refused:
            raise InvalidOptionError(f"{name}= is an Unsloth option llmdeploy does not take: {refused[name]}")
    for name in [k for k in kwargs if k in _UNSLOTH_ONLY]:
        logger.warning("ignoring %s=%r: %s", name, kwargs.pop(name), _UNSLOTH_ONLY[name])
    return kwargs


class DeployMixin:
    """Adds ``save_pretrained_merged``, ``save_pretrained_gguf``, ``push_to_hub_merged`` and
    ``push_to_hub_gguf`` to a transformers or PEFT model class."""

    def save_pretrained_merged(
        self,
        save_directory: str | os.PathLike[str],
        tokenizer: Any = None,
        save_method: str = "merged_16bit",
        **kwargs: Any,
    ) -> pathlib.Path:
        """Save the model as a merged 16-bit folder (or its LoRA adapter); see :func:`llmdeploy.save_pretrained_merged`."""
        from .merge import save_pretrained_merged

        return save_pretrained_merged(
            self, save_directory, tokenizer=tokenizer, save_method=save_method, **_drop_unsloth_options(kwargs)
        )

    def save_pretrained_gguf(
        self,
        save_directory: str | os.PathLike[str],
        tokenizer: Any = None,
        quantization: str | Sequence[str] = "q8_0",
        **kwargs: Any,
    ) -> list[pathlib.Path]:
        """Export the model (a LoRA merged on the fly) to GGUF; see :func:`llmdeploy.save_pretrained_gguf`."""
        from .gguf.export import save_pretrained_gguf

        kwargs = _drop_unsloth_options(kwargs, gguf=True)
        if "quantization_method" in kwargs:  # Unsloth's name for it
            quantization = kwargs.pop("quantization_method")
        return save_pretrained_gguf(self, save_directory, tokenizer=tokenizer, quantization=quantization, **kwargs)

    def push_to_hub_merged(
        self,
        repo_id: str,
        tokenizer: Any = None,
        save_method: str = "merged_16bit",
        token: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Save merged (or the adapter) and upload with a model card; see :func:`llmdeploy.push_to_hub_merged`."""
        from .hub import push_to_hub_merged

        return push_to_hub_merged(
            self,
            repo_id,
            tokenizer=tokenizer,
            save_method=save_method,
            token=token,
            private=private,
            **_drop_unsloth_options(kwargs),
        )

    def push_to_hub_gguf(
        self,
        repo_id: str,
        tokenizer: Any = None,
        quantization: str | Sequence[str] = "q8_0",
        token: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Export to GGUF and upload with a model card; see :func:`llmdeploy.push_to_hub_gguf`."""
        from .hub import push_to_hub_gguf

        kwargs = _drop_unsloth_options(kwargs, gguf=True)
        if "quantization_method" in kwargs:
            quantization = kwargs.pop("quantization_method")
        return push_to_hub_gguf(
            self, repo_id, tokenizer=tokenizer, quantization=quantization, token=token, private=private, **kwargs
        )


_Model = TypeVar("_Model")


def patch(model: _Model | None = None) -> _Model | None:
    """Add the deployment methods to one model, or (without argument) to every HF and PEFT model.

    Args:
        model: a transformers ``PreTrainedModel`` or a ``peft.PeftModel``. Omit it to add the methods
            to the ``PreTrainedModel`` and ``PeftModel`` classes, so every model has them.

    Returns:
        ``model`` (the same object) when given, else None.

    Raises:
        TypeError: ``model`` is not a transformers or PEFT model.
    """
    if model is None:
        for cls in _model_classes():
            for name in METHODS:
                if not hasattr(cls, name):
                    setattr(cls, name, getattr(DeployMixin, name))
        return None
    if not isinstance(model, tuple(_model_classes())):
        raise TypeError(
            f"llmdeploy.patch() takes a transformers PreTrainedModel or a peft.PeftModel, not {type(model).__name__}"
        )
    for name in METHODS:
        if not hasattr(model, name):
            # an instance attribute: this object only; nn.Module keeps plain attributes in __dict__
            object.__setattr__(model, name, types.MethodType(getattr(DeployMixin, name), model))
    return model


def _model_classes() -> list[type]:
    from transformers import PreTrainedModel

    classes: list[type] = [PreTrainedModel]
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return classes
    return [*classes, PeftModel]
