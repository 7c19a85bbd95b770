"""Shared helpers for the merge tests: tiny base folders, PEFT models with trained-looking adapters,
PEFT's own merge as the oracle, and ulp distances."""

from __future__ import annotations

import copy
import pathlib
import warnings
from typing import Any

import torch
from safetensors.torch import load_file

from tests.models import model_folder

# hidden 64, 2 layers: real architectures, a few hundred kB of weights
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def base(arch: str = "LlamaForCausalLM", **overrides: Any) -> pathlib.Path:
    """A cached tiny bf16 model folder (tiny-spm tokenizer, tokenizer.model included)."""
    extra = {"head_dim": 16} if arch in ("Qwen3ForCausalLM", "GemmaForCausalLM") else {}
    return model_folder(arch, **{**TINY, **extra, **overrides})


def gpt2_folder(tmp: pathlib.Path) -> pathlib.Path:
    """A tiny GPT-2 (Conv1D layers: LoRA needs fan_in_fan_out=True), saved in bf16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp / "gpt2-base"
    if not folder.exists():
        torch.manual_seed(0)
        m = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4))
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.05 if p.ndim > 1 else 0.2)
        m.to(torch.bfloat16).save_pretrained(str(folder))
    return folder


def load(folder: pathlib.Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def lora(model: Any, *, seed: int = 0, adapter_name: str = "default", **config: Any) -> Any:
    """``get_peft_model`` with adapter weights set to trained-looking values (not PEFT's zero B)."""
    from peft import LoraConfig, get_peft_model

    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(**config), adapter_name=adapter_name)
    randomize(pm, adapter_name, seed=seed)
    return pm


def randomize(pm: Any, adapter_name: str, *, seed: int) -> None:
    """Adapter weights like a fine-tune's: |ΔW| about a tenth of |W|, magnitudes near the norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if f".{adapter_name}" not in n and not n.endswith(adapter_name):
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * noise)
            elif "lora_A" in n or "lora_embedding_A" in n:
                p.copy_(0.05 * noise)
            elif "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(0.02 * noise)
            elif "trainable_tokens_delta" in n or "modules_to_save" in n:
                p.add_(0.05 * noise)


def peft_merged(pm: Any, adapter_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """PEFT's own merge (on a deep copy): the transformers model's state dict after ``merge_and_unload()``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(pm).merge_and_unload(adapter_names=adapter_names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place between two tensors of the same 16/32-bit float dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_type = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]

    def ordered(x: torch.Tensor) -> torch.Tensor:  # bit patterns mapped to a monotonic integer line
        i = x.view(int_type).to(torch.int64)
        top = 1 << (8 * x.element_size() - 1)
        return torch.where(i < 0, -(i + top), i)

    return (ordered(a) - ordered(b)).abs()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` (bf16/fp16/fp32) at ``|x|`` (float32 tensor out)."""
    bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, e = torch.frexp(x.float().abs())  # |x| = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 1 - bits)


def state(pm: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.state_dict().items()}


def logits(model: Any, seed: int = 0, vocab: int | None = None) -> torch.Tensor:
    vocab = vocab or model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
