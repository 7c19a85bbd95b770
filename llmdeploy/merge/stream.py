"""Plan the merge of saved LoRA adapter(s) onto a base model folder, disk to disk.

The base safetensors are memory-mapped shard by shard; each base tensor is read when the
writer reaches it, merged, written, and its pages are given back (``MADV_DONTNEED``), so
peak memory is about the largest tensor plus the adapter. Tensors no adapter touches are
copied byte for byte (in the kernel where it can).

Adapter files name PEFT modules relative to the transformers model
(``base_model.model.<module>.lora_A.weight``); the base tensor a module's LoRA applies to is
``<module>.weight`` in the base checkpoint.
"""

from __future__ import annotations

import json
import logging
import mmap
import pathlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import (
    AdapterShapeError,
    MissingFileError,
    NotSupportedYetError,
    QuantizedCheckpointError,
    UnmergedAdapterError,
    UnsupportedAdapterError,
)
from ..source import BNB_SUFFIX, SAFETENSORS_DTYPES, read_safetensors_header
from .bnb import COMPONENTS, Quant4bit, dequantize_4bit
from .lora import DoraTerm, LoraBiasTerm, LoraTerm, Term, TokenRowsTerm, lora_scaling
from .memory import check_adapter_config
from .param_lora import param_lora_terms
from .plan import Entry, MergePlan, dominant_dtype, resolve_ties

__all__ = ["Adapter", "BaseFolder", "adapter_from_model", "load_adapter_folder", "plan_from_folders"]

logger = logging.getLogger("llmdeploy")

_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """One LoRA adapter: its ``adapter_config.json`` and its tensors (PEFT's saved names).

    Args:
        name: the adapter's name or folder, for messages.
        config: the adapter config as a dict.
        tensors: the saved tensors, ``base_model.model.`` prefix included or not.
        folder: the folder it was read from, if any.
    """

    name: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    folder: pathlib.Path | None = None


def load_adapter_folder(folder: pathlib.Path) -> Adapter:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) from ``folder``."""
    if not folder.is_dir():
        raise MissingFileError(
            f"{folder} is not a folder; pass a PEFT adapter folder (adapter_config.json and weights)"
        )
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        hint = (
            " (it holds config.json: it is a full model, not an adapter)" if (folder / "config.json").is_file() else ""
        )
        raise MissingFileError(
            f"{cfg_file} not found{hint}: pass the folder an adapter was saved to with PeftModel.save_pretrained"
        )
    with open(cfg_file, encoding="utf-8") as f:
        config = json.load(f)
    check_adapter_config(str(folder), config)
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(st))
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise MissingFileError(f"no adapter weights in {folder}: expected adapter_model.safetensors")
    return Adapter(str(folder), config, dict(tensors), folder)


def adapter_from_model(model: Any, adapter_name: str) -> Adapter:
    """Adapter ``adapter_name`` of an in-memory PEFT model, as it would be saved."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter_name].to_dict()
    check_adapter_config(adapter_name, config)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return Adapter(adapter_name, config, {k: v.detach() for k, v in state.items()})


# -- the base folder -------------------------------------------------------------------------------


@dataclass
class _Stored:
    file: pathlib.Path
    offset: int  # absolute, in the file
    nbytes: int
    shape: tuple[int, ...]  # a 4-bit weight's: the dequantized shape and dtype
    dtype: torch.dtype
    quant: dict[str, _Stored] | None = None  # a bitsandbytes 4-bit weight's state tensors, by suffix


@dataclass
class BaseFolder:
    """A base model folder: config.json and safetensors shards, read lazily through memory maps."""

    folder: pathlib.Path
    config: dict[str, Any]
    tensors: dict[str, _Stored]  # in checkpoint order
    _maps: dict[pathlib.Path, mmap.mmap] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: pathlib.Path) -> BaseFolder:
        if not folder.is_dir():
            raise MissingFileError(
                f"base model folder {folder} not found; pass base= the folder of the model the adapter was trained on"
            )
        if not (folder / "config.json").is_file():
            raise MissingFileError(
                f"{folder / 'config.json'} not found; base= must be a folder saved by save_pretrained"
            )
        with open(folder / "config.json", encoding="utf-8") as f:
            config = json.load(f)
        tensors: dict[str, _Stored] = {}
        for shard in _shards(folder):
            header, start = read_safetensors_header(shard)
            for name in sorted(header):
                meta = header[name]
                b, e = meta["data_offsets"]
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise NotSupportedYetError(
                        f"tensor {name!r} in {shard.name} has dtype {meta['dtype']}; merging needs a base in bf16, "
                        "fp16 or fp32"
                    )
                tensors[name] = _Stored(shard, start + b, e - b, tuple(meta["shape"]), SAFETENSORS_DTYPES[meta["dtype"]])
        base = cls(folder, config, tensors)
        four_bit = base._find_4bit()
        quant = next((n for n, t in tensors.items() if BNB_SUFFIX.search(n) or t.dtype in (torch.uint8, torch.int8)), None)
        qc = config.get("quantization_config")
        is_bnb_4bit = isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")
        if quant is not None or (qc and not is_bnb_4bit):
            what = f"tensor {quant!r}" if quant else f"its config.json (quantization_config: {qc.get('quant_method')})"
            raise QuantizedCheckpointError(
                f"the base folder {folder} is quantized ({what}); llmdeploy dequantizes bitsandbytes 4-bit (NF4/FP4) "
                "bases only. Pass base= a folder of the original 16-bit weights"
            )
        if four_bit:
            kinds = sorted({f"{q['type']}{', double quantization' if q['nested'] else ''}" for q in four_bit.values()})
            logger.warning(
                "the base model in %s is quantized with bitsandbytes 4-bit (%s): its %d 4-bit weights are dequantized, "
                "so the merged weights carry the 4-bit rounding of the base. Pass base= the folder of the original "
                "16-bit weights to merge onto those instead",
                folder, "; ".join(kinds), len(four_bit),
            )  # fmt: skip
        return base

    def _find_4bit(self) -> dict[str, dict[str, Any]]:
        """Gather each bitsandbytes 4-bit weight's state tensors under it; ``{weight: summary}``."""
        groups: dict[str, dict[str, _Stored]] = {}
        for name in list(self.tensors):
            suffix = next((c for c in COMPONENTS if name.endswith("." + c)), None)
            if suffix is not None:
                groups.setdefault(name[: -len(suffix) - 1], {})[suffix] = self.tensors.pop(name)
        found: dict[str, dict[str, Any]] = {}
        for weight, parts in groups.items():
            s = self.tensors.get(weight)
            meta_key = next((k for k in parts if k.startswith("quant_state.")), None)
            if s is None or meta_key is None:
                what = "no such weight" if s is None else "no quant_state.bitsandbytes__nf4 (or __fp4)"
                raise QuantizedCheckpointError(
                    f"the base folder {self.folder} has bitsandbytes state tensors for {weight!r} "
                    f"({', '.join(sorted(parts))}) but {what}; the checkpoint is incomplete. Pass base= a folder of "
                    "the original 16-bit weights"
                )
            meta = json.loads(bytes(self._read(parts[meta_key]).tolist()).decode("utf-8"))
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
                str(meta.get("dtype")), torch.bfloat16
            )
            shape = tuple(int(d) for d in meta.get("shape") or ())
            self.tensors[weight] = _Stored(s.file, s.offset, s.nbytes, shape, dtype, quant=parts)
            kind = meta.get("quant_type", meta_key.rsplit("__", 1)[-1])
            found[weight] = {"type": kind, "nested": "nested_absmax" in parts}
        return found

    def _map(self, file: pathlib.Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mm
        return mm

    def _read(self, s: _Stored) -> torch.Tensor:
        if s.nbytes == 0:
            return torch.empty(s.shape, dtype=s.dtype)
        raw = torch.frombuffer(self._map(s.file), dtype=torch.uint8, count=s.nbytes, offset=s.offset)
        return raw.view(s.dtype).reshape(s.shape)

    def raw_range(self, name: str) -> tuple[str, int, int] | None:
        """``(file, offset, nbytes)`` of a tensor stored as it is loaded (None for a 4-bit weight)."""
        s = self.tensors[name]
        return None if s.quant else (str(s.file), s.offset, s.nbytes)

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name``: a view of the shard's memory map (copy-on-write; never written), or
        for a bitsandbytes 4-bit weight, a new tensor with its dequantized values."""
        s = self.tensors[name]
        if s.quant is None:
            return self._read(s)
        packed = _Stored(s.file, s.offset, s.nbytes, (s.nbytes,), torch.uint8)
        parts = {k: self._read(p).clone() for k, p in s.quant.items()}
        return dequantize_4bit(self._read(packed), Quant4bit.from_checkpoint(name, parts))

    def release(self, name: str) -> None:
        """Give the pages of tensor ``name`` back to the OS (they are re-read if touched again)."""
        s = self.tensors[name]  # a 4-bit weight's: its packed bytes (its state is small)
        mm = self._maps.get(s.file)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = s.offset - s.offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, s.offset + s.nbytes - start)
        except (OSError, ValueError):  # pragma: no cover - an advice, never needed for correctness
            pass

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it; the map goes when the tensor does
                pass
        self._maps.clear()


def _shards(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing or not names:
            raise MissingFileError(
                f"{index} lists weight files that are not in {folder}: {missing}; copy them or save the base again"
            )
        return [folder / n for n in names]
    shards = sorted(p for p in folder.glob("model*.safetensors"))
    if not shards:
        raise MissingFileError(
            f"no safetensors weights in {folder}: expected model.safetensors (or shards with "
            "model.safetensors.index.json); save the base model with save_pretrained"
        )
    return shards


def _model_facts(folder: pathlib.Path) -> tuple[dict[str, str], str | None, str | None]:
    """``(tied {target: source}, input embedding weight name, output embedding weight name)``.

    Read from the model class built on the meta device (no memory, no weights).
    """
    try:
        import transformers
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(folder))
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            return {}, None, None
        with torch.device("meta"):
            model = cls(cfg)
    except Exception:  # noqa: BLE001 - an unknown model: no tie information, names from the adapter only
        return {}, None, None
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    names = {id(m): n for n, m in model.named_modules()}

    def weight_of(get: Callable[[], Any]) -> str | None:
        try:
            m = get()
        except (AttributeError, NotImplementedError):
            return None
        n = names.get(id(m)) if m is not None else None
        return f"{n}.weight" if n else None

    return tied, weight_of(model.get_input_embeddings), weight_of(model.get_output_embeddings)


# -- adapter tensors -> terms ----------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?|token_adapter\.trainable_tokens_delta)$"
)


@dataclass
class _Module:
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _parse(adapter: Adapter) -> tuple[dict[str, _Module], dict[str, torch.Tensor]]:
    """``({module: its LoRA tensors}, {base tensor name: replacement})`` of one adapter."""
    modules: dict[str, _Module] = {}
    replace: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        k = key.removeprefix(_PREFIX)
        m = _LORA_KEY.match(k)
        if m:
            kind = m["kind"].removesuffix(".weight") if m["kind"].startswith("lora_magnitude") else m["kind"]
            modules.setdefault(m["mod"], _Module()).parts[kind] = t
            continue
        if ".lora_" in k or k.startswith("lora_"):
            raise UnsupportedAdapterError(
                f"adapter {adapter.name!r} holds {key!r}, which is not a LoRA tensor llmdeploy knows how to merge"
            )
        # modules_to_save copies, embeddings saved with the adapter (resized vocabulary), trained biases
        name = k.replace(".base_layer.", ".").replace(".modules_to_save.", ".").replace(".original_module.", ".")
        replace[name] = t
    return modules, replace


def _terms(adapter: Adapter, mod: str, parts: dict[str, torch.Tensor]) -> tuple[list[Term], list[Term], list[Term]]:
    """``(weight terms, bias terms, token terms)`` of one module of one adapter."""
    cfg = adapter.config
    tokens: list[Term] = []
    if "token_adapter.trainable_tokens_delta" in parts:
        tokens.append(TokenRowsTerm(_token_indices(adapter, mod), parts["token_adapter.trainable_tokens_delta"]))
    emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
    if a_key not in parts and b_key not in parts:
        if set(parts) - {"token_adapter.trainable_tokens_delta"}:
            raise UnmergedAdapterError(
                f"adapter {adapter.name!r} has {sorted(parts)} for module {mod!r} but no {a_key}/{b_key}; the adapter "
                "file is incomplete"
            )
        return [], [], tokens
    if a_key not in parts or b_key not in parts:
        raise UnmergedAdapterError(
            f"adapter {adapter.name!r} has only one of {a_key}/{b_key} for module {mod!r}; the adapter file is incomplete"
        )
    A, B = parts[a_key], parts[b_key]
    r = _pattern_value(cfg, "rank_pattern", mod, cfg.get("r", 8))
    alpha = _pattern_value(cfg, "alpha_pattern", mod, cfg.get("lora_alpha", 8))
    if A.ndim != 2 or A.shape[0] != r:
        raise AdapterShapeError(
            f"adapter {adapter.name!r}: {mod}.{a_key} has shape {tuple(A.shape)}, but its config says rank r={r} "
            "for this module; the adapter_config.json does not belong to these weights"
        )
    scaling = lora_scaling(alpha, r, use_rslora=bool(cfg.get("use_rslora")))
    fifo = bool(cfg.get("fan_in_fan_out")) and not emb
    weight: list[Term]
    if "lora_magnitude_vector" in parts:
        weight = [DoraTerm(A, B, scaling, fifo, emb, magnitude=parts["lora_magnitude_vector"])]
    else:
        weight = [LoraTerm(A, B, scaling, fan_in_fan_out=fifo, embedding=emb)]
    bias = [LoraBiasTerm(parts["lora_B.bias"], scaling)] if "lora_B.bias" in parts else []
    return weight, bias, tokens


def _pattern_value(cfg: dict[str, Any], key: str, mod: str, default: Any) -> Any:
    """``cfg[key]``'s value for module ``mod`` (PEFT's ``get_pattern_key``), else ``default``."""
    pattern = cfg.get(key) or {}
    if not pattern:
        return default  # the usual case: no need to import peft (and transformers) for it
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), mod), default)


def _token_indices(adapter: Adapter, mod: str) -> tuple[int, ...]:
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, dict):
        for key, idx in spec.items():
            if mod == key or mod.endswith("." + key):
                return tuple(int(i) for i in idx)
        raise UnmergedAdapterError(
            f"adapter {adapter.name!r} has trainable tokens for module {mod!r}, but trainable_token_indices "
            f"{spec!r} names no such module"
        )
    if isinstance(spec, (list, tuple)):
        return tuple(int(i) for i in spec)
    raise UnmergedAdapterError(
        f"adapter {adapter.name!r} has trainable tokens for module {mod!r} but no trainable_token_indices in its config"
    )


# -- the plan ----------------------------------------------------------------------------------------


def _vocab_sizes(config: dict[str, Any]) -> set[int]:
    sizes = set()
    for cfg in (config, *(v for v in config.values() if isinstance(v, dict))):  # text_config, ...
        v = cfg.get("vocab_size")
        if isinstance(v, int) and v > 0:
            sizes.add(v)
    return sizes


def _touches_embeddings(base: BaseFolder, parsed: Sequence[tuple[Adapter, dict[str, _Module], dict[str, Any]]]) -> bool:
    """Whether the adapters change a tensor that tied weights or a resized vocabulary could involve.

    Ties (``lm_head`` ↔ ``embed_tokens``, encoder ↔ decoder embeddings) and vocabulary resizing
    only concern vocabulary-sized tensors. When every tensor the adapters change is stored in
    the base checkpoint and has no dimension of the vocabulary size (LoRA on the attention and
    MLP projections: the usual fine-tune), the merged checkpoint is the stored one tensor for
    tensor and the model class is not needed. Otherwise (or with no ``vocab_size`` in the config)
    the tie map comes from the model class (:func:`_model_facts`, which imports transformers).
    """
    vocab = _vocab_sizes(base.config)
    if not vocab:
        return True
    for _, modules, replace in parsed:
        names = [*replace, *(f"{m}.{w}" for m in modules for w in ("weight", "bias"))]
        for name in names:
            s = base.tensors.get(name)
            if s is None:
                if name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in base.tensors:
                    continue  # a Linear without bias: only a lora_bias term would need one (checked later)
                return True
            if any(d in vocab for d in s.shape):
                return True
        if any("token_adapter.trainable_tokens_delta" in m.parts for m in modules.values()):
            return True
    return False


def plan_from_folders(adapters: Sequence[Adapter], base: BaseFolder) -> MergePlan:
    """The merge plan of ``adapters`` (applied in order) onto ``base``.

    Raises:
        UnmergedAdapterError: a LoRA module or adapter tensor with no base tensor to go to.
        AdapterShapeError: an adapter tensor whose shape does not fit its base tensor.
    """
    parsed = [(adapter, *_parse(adapter)) for adapter in adapters]
    if _touches_embeddings(base, parsed):
        tied, in_emb, out_emb = _model_facts(base.folder)
    else:  # nothing tied or vocabulary-sized changes: the checkpoint's tensors, as stored, are the answer
        tied, in_emb, out_emb = {}, None, None
    stored = base.tensors
    known = set(stored) | set(tied)

    weight_terms: dict[str, list[Term]] = {}
    token_terms: dict[str, list[Term]] = {}
    replaced: dict[str, tuple[torch.Tensor, str]] = {}
    n_modules = 0
    for adapter, modules, replace in parsed:
        for name, t in replace.items():
            if name not in known:
                raise UnmergedAdapterError(
                    f"adapter {adapter.name!r} holds a trained {name!r}, but the base model has no such tensor; "
                    f"it does not belong to the base in {base.folder}"
                )
            if name in replaced:
                raise UnmergedAdapterError(
                    f"adapters {replaced[name][1]!r} and {adapter.name!r} both hold a trained copy of {name!r} "
                    "(modules_to_save); merge only one of them"
                )
            replaced[name] = (t, adapter.name)
        if adapter.config.get("target_parameters"):  # LoRA on stacked MoE experts: split onto their tensors
            param_terms, n_param = param_lora_terms(adapter.config, base.folder, modules)
            for name, terms in param_terms.items():
                weight_terms.setdefault(name, []).extend(terms)
            n_modules += n_param
        unmatched = [m for m in modules if f"{m}.weight" not in known]
        if unmatched:
            raise UnmergedAdapterError(
                f"adapter {adapter.name!r} has LoRA weights for {len(unmatched)} module(s) with no weight in the base "
                f"model, e.g. {unmatched[0]!r} (no {unmatched[0]}.weight in {base.folder}); the adapter was trained on "
                "another model, or the model stores these weights under other names. Nothing was written"
            )
        for mod, m in modules.items():
            w, b, tok = _terms(adapter, mod, m.parts)
            if w:
                n_modules += 1
            weight_terms.setdefault(f"{mod}.weight", []).extend(w)
            token_terms.setdefault(f"{mod}.weight", []).extend(tok)
            if b:
                if f"{mod}.bias" not in known:
                    raise UnmergedAdapterError(
                        f"module {mod!r} has lora_bias=True (adapter {adapter.name!r}) but its base layer has no bias, "
                        "so the LoRA bias cannot be merged (PEFT cannot either); retrain without lora_bias"
                    )
                weight_terms.setdefault(f"{mod}.bias", []).extend(b)

    def base_of(name: str) -> tuple[Callable[[], torch.Tensor], tuple[int, ...], torch.dtype, Any, Any, Any]:
        """(load, shape, dtype, source key, raw range, release) of the tensor ``name`` starts from."""
        if name in replaced:
            t = replaced[name][0]
            # saved in the training dtype (often float32): it is saved as the checkpoint's tensor would be
            ref = stored.get(name) or stored.get(tied.get(name, ""))
            dtype = ref.dtype if ref is not None else t.dtype
            return (lambda: t), tuple(t.shape), dtype, ("adapter", id(t)), None, None
        if name in tied and name not in replaced and tied[name] in known:
            return base_of(tied[name])  # a tied target is its source, whatever the checkpoint stores
        s = stored[name]
        return (
            lambda: base.load(name),
            s.shape,
            s.dtype,
            ("file", name),
            base.raw_range(name),
            lambda: base.release(name),
        )

    names = list(stored) + [t for t in tied if t not in stored and tied[t] in known]
    entries: list[Entry] = []
    for name in names:
        load, shape, dtype, source, raw, release = base_of(name)
        terms = [*token_terms.get(name, []), *weight_terms.get(name, [])]
        if name in tied and not token_terms.get(name):  # PEFT ties the trainable tokens of tied embeddings
            terms = [*token_terms.get(tied[name], []), *weight_terms.get(name, [])]
        module = name.rsplit(".", 1)[0]
        entries.append(Entry(name, module, shape, dtype, load, tuple(terms), source=source, raw=raw, release=release))

    base_shapes = {n: s.shape for n, s in stored.items()}
    vocab = _check_replacements(replaced, base_shapes, tied, in_emb, out_emb, entries)
    entries, untied = resolve_ties(entries, tied)
    plan = MergePlan(entries, untied=untied, vocab_size=vocab, lora_modules=n_modules)
    plan.base_dtype = dominant_dtype([e for e in entries if e.source[0] == "file"])
    return plan


def _check_replacements(
    replaced: dict[str, tuple[torch.Tensor, str]],
    base_shapes: dict[str, tuple[int, ...]],
    tied: dict[str, str],
    in_emb: str | None,
    out_emb: str | None,
    entries: list[Entry],
) -> int | None:
    """Shapes of trained copies: only the embeddings may grow (resized vocabulary). Returns the new vocab size."""
    vocab: int | None = None
    for name, (t, who) in replaced.items():
        ref = base_shapes.get(name) or base_shapes.get(tied.get(name, ""))
        if ref is None or tuple(t.shape) == tuple(ref):
            continue
        if name in (in_emb, out_emb) and t.ndim == 2 and t.shape[1] == ref[1]:
            vocab = int(t.shape[0])
            continue
        raise AdapterShapeError(
            f"adapter {who!r} holds {name!r} with shape {tuple(t.shape)}, but the base model's is {tuple(ref)}; the "
            "adapter belongs to another base model. Nothing was written"
        )
    if vocab is not None:
        for e in entries:
            if e.name in (in_emb, out_emb) and e.shape[0] != vocab:
                raise AdapterShapeError(
                    f"the adapter resized the vocabulary to {vocab} tokens but {e.name!r} still has {e.shape[0]} rows; "
                    "save the adapter with save_embedding_layers=True (or lm_head in modules_to_save) so both "
                    "embeddings are in it"
                )
    return vocab
