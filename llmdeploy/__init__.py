"""llmdeploy: make fine-tuned HuggingFace/PEFT models deployable.

Merged 16-bit safetensors for vLLM/SGLang/transformers, and GGUF files for
llama.cpp/Ollama, written in one streaming pass by llmdeploy's own
quantization kernels (byte-identical to llama.cpp's).

The public names are imported on first use, so ``import llmdeploy`` stays light (the
kernels, torch and transformers load only when a function that needs them is called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import LLMDeployError

__version__ = "0.1.0.dev0"

# public name -> the module that defines it
_LAZY = {
    "save_pretrained_gguf": "llmdeploy.gguf.export",
    "plan_gguf": "llmdeploy.gguf.export",
    "save_pretrained_merged": "llmdeploy.merge.merge",
    "push_to_hub_gguf": "llmdeploy.hub",
    "push_to_hub_merged": "llmdeploy.hub",
    "push_folder": "llmdeploy.hub",
    "requantize": "llmdeploy.gguf.requant",
    "gguf_to_hf": "llmdeploy.gguf.to_hf",
    "DeployMixin": "llmdeploy.mixins",
    "patch": "llmdeploy.mixins",
}
_SUBMODULES = ("quants", "gguf", "merge", "hub", "mixins", "ollama", "estimate", "recommend", "cli")

__all__ = [
    "DeployMixin", "LLMDeployError", "errors", "gguf_to_hf", "patch", "plan_gguf", "push_folder", "push_to_hub_gguf",
    "push_to_hub_merged", "quants", "requantize", "save_pretrained_gguf", "save_pretrained_merged",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'llmdeploy' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


if TYPE_CHECKING:
    from . import quants
    from .gguf.export import plan_gguf, save_pretrained_gguf
    from .gguf.requant import requantize
    from .gguf.to_hf import gguf_to_hf
    from .hub import push_folder, push_to_hub_gguf, push_to_hub_merged
    from .merge.merge import save_pretrained_merged
    from .mixins import DeployMixin, patch
