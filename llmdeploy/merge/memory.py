"""Plan the merge of an in-memory ``peft.PeftModel``: walk its modules, never change them.

Each output tensor is the base layer's own parameter (no copy) plus the adapter terms that
apply to it; nothing is computed until the writer asks for it, one tensor at a time, so no
second copy of the model is held. Names are the ones ``save_pretrained`` would write for the
unwrapped model (PEFT's ``base_layer`` / ``modules_to_save`` / ``token_adapter`` wrappers
removed, transformers' in-memory weight conversions reverted).
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import AdapterShapeError, InvalidOptionError, NotSupportedYetError, UnmergedAdapterError, UnsupportedAdapterError
from .bnb import Quant4bit, dequantize_4bit
from .lora import DoraTerm, ExpertLoraTerm, LoraBiasTerm, LoraTerm, Term, TokenRowsTerm, apply_terms
from .plan import Entry, MergePlan, dominant_dtype, resolve_ties

__all__ = ["is_peft_model", "merge_adapter_names", "plan_from_model"]

logger = logging.getLogger("llmdeploy")

# LoraConfig fields that select a LoRA variant llmdeploy does not merge (value: what it is).
_VARIANTS = {
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow routing", "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "use_qalora": "QA-LoRA",
}  # fmt: skip
SUPPORTED = (
    "LoRA on Linear and Embedding layers (lora_alpha/r or rsLoRA scaling, fan_in_fan_out, lora_bias, DoRA), "
    "modules_to_save and trainable_token_indices"
)


def is_peft_model(model: Any) -> bool:
    if "peft" not in sys.modules:  # no PeftModel can exist; importing peft (and transformers) takes seconds
        return False
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def check_adapter_config(name: str, config: Any) -> None:
    """Raise for a non-LoRA adapter or a LoRA variant that cannot be merged.

    Args:
        name: the adapter's name (or folder), named in the message.
        config: a ``PeftConfig`` or the dict of ``adapter_config.json``.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    peft_type = get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"adapter {name!r} is a {peft_type} adapter; save_pretrained_merged merges {SUPPORTED}. Merge it with "
            "PEFT (model.merge_and_unload()) and save the result, or train a LoRA adapter"
        )
    for key, what in _VARIANTS.items():
        if get(key):
            raise UnsupportedAdapterError(
                f"adapter {name!r} uses {what} ({key}={get(key)!r}), which llmdeploy cannot merge yet; it merges "
                f"{SUPPORTED}. Merge with PEFT's merge_and_unload() instead"
            )
    if get("layer_replication"):
        raise NotSupportedYetError(
            f"adapter {name!r} uses layer_replication; merging it is not supported yet (the replicated layers share "
            "base weights). Merge with PEFT's merge_and_unload() instead"
        )


def merge_adapter_names(model: Any, adapter_names: Sequence[str] | None) -> list[str]:
    """The adapters to merge: ``adapter_names``, or the model's active adapters; each checked."""
    available = list(model.peft_config)
    if adapter_names is None:
        names = list(model.active_adapters)
    else:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = list(adapter_names)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise InvalidOptionError(
                f"adapter_names={names!r}: the model has no adapter {unknown[0]!r}; its adapters are {available}"
            )
    if not names:
        raise InvalidOptionError(f"no adapter to merge: none is active; pass adapter_names= (one of {available})")
    for n in names:
        check_adapter_config(n, model.peft_config[n])
    return names


def plan_from_model(model: Any, adapter_names: Sequence[str] | None = None) -> tuple[MergePlan, Any]:
    """The merge plan of an in-memory PEFT model, and its transformers model (for the config).

    Args:
        model: a ``peft.PeftModel`` wrapping a transformers model, with LoRA adapters; or a
            transformers model (no adapter: the plan writes its weights as they are).
        adapter_names: the adapters to merge, in order; default: the active ones.
    """
    if is_peft_model(model):
        names = merge_adapter_names(model, adapter_names)
        inner = model.get_base_model()
    else:  # a full fine-tune: nothing to merge, its weights are written as they are (4-bit ones dequantized)
        names, inner = [], model
    walker = _Walker(names)
    entries: list[Entry] = []
    for name, tensor, terms, module in walker.walk(inner, ""):
        entries.extend(_entries(inner, name, tensor, terms, module))
    _check_all_merged(inner, names, walker.merged)
    if walker.dequantized:
        logger.warning(
            "the base model is quantized with bitsandbytes 4-bit: its %d 4-bit weights are dequantized, so the merged "
            "weights carry the 4-bit rounding of the base. Pass base= the folder of the original 16-bit weights to "
            "merge onto those instead",
            walker.dequantized,
        )
    ignore = getattr(inner, "_keys_to_ignore_on_save", None) or ()
    if ignore:
        import re

        entries = [e for e in entries if not any(re.search(p, e.name) for p in ignore)]
    tied = dict(getattr(inner, "all_tied_weights_keys", None) or {})
    entries, untied = resolve_ties(entries, tied)
    vocab = _vocab_size(inner)
    plan = MergePlan(entries, untied=untied, vocab_size=vocab, lora_modules=walker.lora_modules)
    plan.base_dtype = dominant_dtype(entries)
    return plan, inner


def _check_all_merged(inner: Any, adapters: list[str], merged: set[int]) -> None:
    """Every LoRA layer that holds a merged adapter and is used by the model was merged (never a silent skip)."""
    from peft.tuners.lora.layer import LoraLayer

    for path, m in inner.named_modules():
        if not isinstance(m, LoraLayer) or id(m) in merged:
            continue
        if ".original_module" in f".{path}." or ".modules_to_save." in f".{path}.":
            continue  # inside a modules_to_save copy that the forward does not use
        held = [a for a in adapters if a in m.lora_A or a in getattr(m, "lora_embedding_A", {})]
        if held:
            raise UnmergedAdapterError(
                f"the LoRA layer {path!r} (adapters {held}) was not merged: llmdeploy found no tensor of the saved "
                "model for it. Nothing was written; please report this model"
            )


def _vocab_size(inner: Any) -> int | None:
    try:
        emb = inner.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


class _Walker:
    """Yields ``(name, base tensor, terms, module path)`` for every tensor save_pretrained writes."""

    def __init__(self, adapters: list[str]) -> None:
        self.adapters = adapters
        self.lora_modules = 0
        self.merged: set[int] = set()  # ids of the LoRA layers walked
        self.dequantized = 0  # bitsandbytes 4-bit weights met
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

        self.Linear, self.Embedding, self.LoraLayer = lora_layer.Linear, lora_layer.Embedding, lora_layer.LoraLayer
        self.ParamWrapper = getattr(lora_layer, "ParamWrapper", None)  # target_parameters (MoE experts), peft>=0.17
        self.BaseTunerLayer = BaseTunerLayer
        self.ModulesToSave, self.TrainableTokens = ModulesToSaveWrapper, TrainableTokensWrapper

    def walk(self, module: torch.nn.Module, prefix: str) -> Any:
        if isinstance(module, self.ModulesToSave):
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            chosen = (
                module.modules_to_save[active[0]] if active and active[0] in self.adapters else module.original_module
            )
            yield from self.walk(chosen, prefix)
            return
        if isinstance(module, self.TrainableTokens):
            yield from self._trainable_tokens(module, prefix)
            return
        if isinstance(module, self.LoraLayer):
            yield from self._lora(module, prefix)
            return
        if isinstance(module, self.BaseTunerLayer):
            raise UnsupportedAdapterError(
                f"module {prefix!r} holds a {type(module).__name__} adapter layer; save_pretrained_merged merges "
                f"{SUPPORTED}"
            )
        yield from self._own(module, prefix)
        for child_name, child in module.named_children():
            yield from self.walk(child, f"{prefix}{child_name}.")

    def _own(self, module: torch.nn.Module, prefix: str) -> Any:
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for n, p in module._parameters.items():
            if p is None:
                continue
            if type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None:
                self.dequantized += 1  # a bitsandbytes 4-bit weight: written dequantized
                yield f"{prefix}{n}", Packed4bit(p), (), prefix[:-1]
                continue
            if type(p).__name__ == "Int8Params" or hasattr(p, "SCB"):
                raise NotSupportedYetError(
                    f"module {prefix[:-1]!r} holds a bitsandbytes 8-bit weight; llmdeploy dequantizes 4-bit (NF4/FP4) "
                    "bases only. Pass base= the folder of the original 16-bit weights"
                )
            yield f"{prefix}{n}", p, (), prefix[:-1]
        for n, b in module._buffers.items():
            if b is not None and n not in skip:
                yield f"{prefix}{n}", b, (), prefix[:-1]

    def _lora(self, module: Any, prefix: str) -> Any:
        if self.ParamWrapper is not None and type(module) is self.ParamWrapper:
            yield from self._param_lora(module, prefix)
            return
        path = prefix[:-1]
        kind = type(module).__name__
        four_bit = kind == "Linear4bit" and type(module).__module__.startswith("peft.")
        if type(module) not in (self.Linear, self.Embedding) and not four_bit:
            if "8bit" in kind:
                raise NotSupportedYetError(
                    f"module {path!r} is a LoRA layer on a bitsandbytes 8-bit base ({kind}); llmdeploy dequantizes "
                    "4-bit (NF4/FP4) bases only. Pass base= the folder of the original 16-bit weights"
                )
            raise NotSupportedYetError(
                f"module {path!r} is a LoRA {kind} layer; llmdeploy merges LoRA on Linear and Embedding layers only. "
                "Merge with PEFT's merge_and_unload() instead"
            )
        self.merged.add(id(module))
        if module.merged_adapters:
            raise InvalidOptionError(
                f"module {path!r} already has adapters {module.merged_adapters} merged into its weights "
                "(merge_adapter() was called); call model.unmerge_adapter() first, then save"
            )
        base = module.get_base_layer()
        embedding = type(module) is self.Embedding
        weight_terms: list[Term] = []
        bias_terms: list[Term] = []
        merged_here = 0
        for ad in self.adapters:
            if embedding:
                if ad not in module.lora_embedding_A:
                    continue
                A, B = module.lora_embedding_A[ad], module.lora_embedding_B[ad]
            else:
                if ad not in module.lora_A:
                    continue
                A, B = module.lora_A[ad].weight, module.lora_B[ad].weight
            variant = module.lora_variant.get(ad)
            vname = None if variant is None else getattr(variant, "__name__", type(variant).__name__)
            scaling = float(module.scaling[ad])
            fifo = bool(getattr(module, "fan_in_fan_out", False)) and not embedding
            # the Parameters themselves (no copy; merge_tensor runs under no_grad): their ids key tied recipes
            if vname is None:
                weight_terms.append(LoraTerm(A, B, scaling, fan_in_fan_out=fifo, embedding=embedding))
            elif vname in ("DoraLinearVariant", "DoraEmbeddingVariant"):
                m = module.lora_magnitude_vector[ad].weight
                weight_terms.append(DoraTerm(A, B, scaling, fifo, embedding, magnitude=m))
            else:
                raise UnsupportedAdapterError(
                    f"module {path!r} uses the LoRA variant {vname} (adapter {ad!r}), which llmdeploy cannot merge; "
                    f"it merges {SUPPORTED}"
                )
            if not embedding and module.lora_bias.get(ad):
                if getattr(base, "bias", None) is None:
                    raise UnmergedAdapterError(
                        f"module {path!r} has lora_bias=True (adapter {ad!r}) but its base layer has no bias, so the "
                        "LoRA bias cannot be merged (PEFT cannot either); retrain without lora_bias"
                    )
                bias_terms.append(LoraBiasTerm(module.lora_B[ad].bias, scaling))
            merged_here += 1
        if merged_here:
            self.lora_modules += 1
        for n, tensor, terms, mod in self.walk(base, prefix):
            extra = weight_terms if n == f"{prefix}weight" else bias_terms if n == f"{prefix}bias" else []
            yield n, tensor, (*terms, *extra), mod

    def _param_lora(self, module: Any, prefix: str) -> Any:
        """A LoRA on one parameter (``target_parameters``): stacked MoE experts, or a 2-D weight."""
        path = prefix[:-1]
        self.merged.add(id(module))
        if module.merged_adapters:
            raise InvalidOptionError(
                f"module {path!r} already has adapters {module.merged_adapters} merged into its weights "
                "(merge_adapter() was called); call model.unmerge_adapter() first, then save"
            )
        terms: list[Term] = []
        for ad in self.adapters:
            if ad not in module.lora_A:
                continue
            A, B, scaling = module.lora_A[ad].weight, module.lora_B[ad].weight, float(module.scaling[ad])
            if module.num_experts == 1:  # a 2-D parameter: an ordinary Linear LoRA on it
                terms.append(LoraTerm(A, B, scaling))
            else:
                terms.append(ExpertLoraTerm(A, B, scaling, module.num_experts, bool(module._did_swap_in_out_features)))
        if terms:
            self.lora_modules += 1
        target = f"{prefix}{module.parameter_name}"
        # the wrapped module holds the parameter, or is another ParamWrapper (a second parameter of the same
        # module): base_layer, not get_base_layer(), which would skip straight past it
        for n, tensor, inner_terms, mod in self.walk(module.base_layer, prefix):
            yield n, tensor, (*inner_terms, *(terms if n == target else ())), mod

    def _trainable_tokens(self, module: Any, prefix: str) -> Any:
        layer = module.token_adapter
        terms: list[Term] = []
        for ad in self.adapters:
            if ad in layer.trainable_tokens_delta:
                rows = layer.trainable_tokens_delta[ad]
                terms.append(TokenRowsTerm(tuple(int(i) for i in layer.token_indices[ad]), rows))
        for n, tensor, inner_terms, mod in self.walk(layer.base_layer, prefix):
            extra = terms if n == f"{prefix}weight" else []
            yield n, tensor, (*inner_terms, *extra), mod


class Packed4bit:
    """A bitsandbytes ``Params4bit`` met by the walker: written as its dequantized weight."""

    def __init__(self, param: Any) -> None:
        self.param = param

    def plan(self, name: str) -> tuple[Quant4bit, Callable[[], torch.Tensor]]:
        state = Quant4bit.from_bnb(name, self.param.quant_state)  # the small state, copied to the CPU now
        data = self.param.data
        return state, lambda: dequantize_4bit(data.detach().to("cpu"), state)


def _entries(
    inner: Any, name: str, tensor: torch.Tensor | Packed4bit, terms: Sequence[Term], module: str
) -> list[Entry]:
    """The checkpoint tensor(s) for one in-memory tensor (transformers 5 may split fused ones on save)."""
    if isinstance(tensor, Packed4bit):
        state, load4 = tensor.plan(name)
        meta = torch.empty(state.shape, dtype=state.dtype, device="meta")
        if list(_revert(inner, {name: meta})) != [name]:
            raise NotSupportedYetError(
                f"the 4-bit weight {name!r} is stored under other names in the checkpoint; merging it is not supported "
                "yet. Pass base= the folder of the original 16-bit weights"
            )
        return [Entry(name, module, state.shape, state.dtype, load4, tuple(terms), source=("mem", id(tensor.param)))]
    t = tensor.detach()
    if t.device.type == "meta":
        raise NotSupportedYetError(
            f"tensor {name!r} is on the meta device (offloaded); save the adapter (save_method='lora') and merge the "
            "adapter folder onto the base folder instead"
        )
    names = _revert(inner, {name: t.to("meta")})
    if list(names) == [name]:
        load: Callable[[], torch.Tensor] = lambda: t.to("cpu")
        return [Entry(name, module, tuple(t.shape), t.dtype, load, tuple(terms), source=("mem", id(tensor)))]
    # A parameter that transformers fuses in memory (MoE experts stacked into one 3-D tensor) and
    # splits on save. Its LoRA terms act on the fused tensor: they are applied to it (in float32),
    # and the merged result is split as save_pretrained splits it; each piece is then rounded once.
    cache: dict[str, torch.Tensor] = {}
    term_keys = tuple(term.key for term in terms)

    def piece(out: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if out not in cache:
                cache.clear()
                with torch.no_grad():
                    fused = apply_terms(t.to("cpu"), terms) if terms else t.to("cpu")
                cache.update(_revert(inner, {name: fused}))
            return cache.pop(out)

        return load

    for term in terms:  # checked here: the pieces carry no terms for MergePlan.check_shapes to see
        if bad := term.problem(tuple(t.shape)):
            raise AdapterShapeError(f"the adapter does not fit the base model at {name!r} (module {module!r}): {bad}")
    return [
        Entry(out, module, tuple(m.shape), m.dtype, piece(out), (), source=("mem", id(tensor), out, term_keys))
        for out, m in names.items()
    ]


def _revert(inner: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps checkpoint names and layouts in memory
        return dict(state)
    return dict(revert_weight_conversion(inner, state))


def local_folder(inner: Any) -> pathlib.Path | None:
    """The local folder the base model was loaded from, if any (for tokenizer files)."""
    name = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
    if name and os.path.isdir(name):
        return pathlib.Path(name)
    return None
