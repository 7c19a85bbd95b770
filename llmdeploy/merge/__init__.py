"""Merge LoRA adapters into their base model and save a folder engines load.

``save_pretrained_merged(model, save_directory, ...)``: see :mod:`llmdeploy.merge.merge`.
The pieces follow the pass: :mod:`.lora` (the math, pure functions), :mod:`.memory` /
:mod:`.stream` (plan from an in-memory PEFT model / from adapter + base folders),
:mod:`.plan` (checks, dtypes, tied embeddings), :mod:`.folder` (atomic, sharded writing),
:mod:`.bnb` (bitsandbytes 4-bit bases dequantized in pure torch).
"""

from .merge import SAVE_METHODS, save_pretrained_merged

__all__ = ["SAVE_METHODS", "save_pretrained_merged"]
