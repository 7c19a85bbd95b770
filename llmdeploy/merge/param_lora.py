"""LoRA on parameters (PEFT ``target_parameters``) merged from an adapter folder onto a base folder.

transformers 5 stacks MoE experts into one parameter per projection in memory (``experts.gate_up_proj``
of shape ``(experts, 2·intermediate, hidden)``) and splits them back into per-expert tensors on save
(``experts.0.gate_proj.weight``, ...). A LoRA trained on the stacked parameter gives one stacked
update ΔW. The split is pure data movement (slices, transposes), so splitting ``W + ΔW`` gives the
same numbers as adding the split ΔW to each split W: each per-expert base tensor read from the
checkpoint gets its piece of ΔW, computed once per stacked parameter and split with transformers'
own ``revert_weight_conversion`` on a model built on the meta device (no weights are loaded).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AdapterShapeError
from .lora import ExpertLoraTerm, LoraTerm, Term, compute_dtype

__all__ = ["ParamLoraPieces", "param_lora_terms"]


@dataclass(frozen=True)
class _Wrapper:
    parameter: str  # the stacked parameter's name in the transformers model
    shape: tuple[int, ...]
    num_experts: int
    out_first: bool
    scaling: float


class ParamLoraPieces:
    """ΔW of one stacked parameter, split as the checkpoint stores it; the latest one cached."""

    def __init__(self, model: Any, wrapper: _Wrapper, term: Term) -> None:
        self.model, self.wrapper, self.term = model, wrapper, term
        self._cache: dict[str, torch.Tensor] = {}

    def piece(self, name: str) -> torch.Tensor:
        """The piece for checkpoint tensor ``name``. Each piece is handed out once and dropped, so the
        stacked update is freed when its last piece is written (and recomputed if asked again)."""
        if name not in self._cache:
            ct = compute_dtype(torch.float32)
            zero = torch.zeros(self.wrapper.shape, dtype=ct)
            with torch.no_grad():
                delta = self.term.apply(zero, zero)  # 0 + ΔW: exactly ΔW
            self._cache = {k: v.contiguous() for k, v in _revert(self.model, {self.wrapper.parameter: delta}).items()}
        return self._cache.pop(name)


@dataclass(frozen=True, eq=False)
class PieceTerm(Term):
    """``W + piece``: one per-expert slice of a stacked LoRA update."""

    pieces: ParamLoraPieces
    name: str
    shape: tuple[int, ...]
    kind = "param_lora_piece"

    def problem(self, shape: tuple[int, ...]) -> str | None:
        if tuple(shape) != self.shape:
            return f"the stacked LoRA update's piece for it has shape {self.shape}, the base tensor {tuple(shape)}"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return weight + self.pieces.piece(self.name)

    @property
    def key(self) -> Hashable:
        return (self.kind, id(self.pieces), self.name)


def param_lora_terms(
    adapter_config: dict[str, Any], base_folder: pathlib.Path, modules: dict[str, Any]
) -> tuple[dict[str, list[Term]], int]:
    """The terms for the checkpoint tensors of every ``target_parameters`` LoRA in ``modules``.

    Args:
        adapter_config: the adapter's ``adapter_config.json``.
        base_folder: the base model folder (its config.json builds the model on the meta device).
        modules: the adapter's LoRA modules by key (``model.layers.0.mlp.experts``, or
            ``...experts.base_layer`` for a second parameter of the same module), each with
            ``.parts``; the ones handled here are removed from it.

    Returns:
        ``({checkpoint tensor name: [terms]}, number of LoRA modules)``.
    """
    model, wrappers = _wrappers(adapter_config, base_folder)
    out: dict[str, list[Term]] = {}
    n = 0
    for key in [k for k in modules if k in wrappers]:
        parts = modules.pop(key).parts
        w = wrappers[key]
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        term: Term
        if w.num_experts == 1:
            term = LoraTerm(A, B, w.scaling)
        else:
            term = ExpertLoraTerm(A, B, w.scaling, w.num_experts, w.out_first)
        bad = term.problem(w.shape)
        if bad:
            raise AdapterShapeError(f"the adapter does not fit the base model at {w.parameter!r}: {bad}")
        pieces = ParamLoraPieces(model, w, term)
        for name, meta in _revert(model, {w.parameter: torch.empty(w.shape, device="meta")}).items():
            out.setdefault(name, []).append(PieceTerm(pieces, name, tuple(meta.shape)))
        n += 1
    return out, n


def _wrappers(adapter_config: dict[str, Any], base_folder: pathlib.Path) -> tuple[Any, dict[str, _Wrapper]]:
    """The base model on the meta device, and PEFT's parameter wrappers for this adapter config, by module key."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    fields = LoraConfig.__dataclass_fields__
    lora_config = LoraConfig(**{k: v for k, v in adapter_config.items() if k in fields and k != "peft_type"})
    lora_config.inference_mode = True
    peft_model = get_peft_model(model, lora_config)
    wrappers: dict[str, _Wrapper] = {}
    for path, module in peft_model.named_modules():
        if type(module) is not ParamWrapper:
            continue
        key = path.removeprefix("base_model.model.")
        owner = re.sub(r"(\.base_layer)+$", "", key)
        param = module.get_param()
        wrappers[key] = _Wrapper(
            parameter=f"{owner}.{module.parameter_name}",
            shape=tuple(param.shape),
            num_experts=int(module.num_experts),
            out_first=bool(module._did_swap_in_out_features),
            scaling=float(module.scaling["default"]),
        )
    return peft_model.get_base_model(), wrappers


def _revert(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, state))
