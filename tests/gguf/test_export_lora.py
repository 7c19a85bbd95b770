"""save_pretrained_gguf on a LoRA fine-tune: merged on the fly, tensor by tensor.

The oracle is the two-step path users take today: ``save_pretrained_merged`` (itself checked
against PEFT's ``merge_and_unload``), then ``save_pretrained_gguf`` on that folder (checked
against llama.cpp's convert + quantize). The one-pass export must write the same bytes, and
llama.cpp running the file must agree with PEFT's own forward pass.
"""

from __future__ import annotations

import copy
import pathlib

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from llmdeploy import plan_gguf, save_pretrained_gguf, save_pretrained_merged
from llmdeploy.errors import InvalidOptionError
from tests.merge.common import base, load, lora

llama_cpp = pytest.importorskip("llama_cpp")


def _tensors(path: pathlib.Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def _kvs(path: pathlib.Path) -> dict[str, object]:
    # gguf-py derives these from the folder name, which differs between the two routes
    skip = ("GGUF.", "general.name", "general.basename", "general.finetune", "general.version")
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith(skip)}


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, pathlib.Path, pathlib.Path]:
    """A PEFT model on a tiny Llama (LoRA on attention and MLP, embeddings too), its adapter folder and base."""
    folder = base("LlamaForCausalLM")
    pm = lora(load(folder, torch.bfloat16), target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    adapter = tmp_path_factory.mktemp("adapter")
    pm.save_pretrained(str(adapter))
    return pm, adapter, folder


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_peft_model_exports_like_its_merged_folder(fine_tune, tmp_path: pathlib.Path, quant: str) -> None:
    pm, _, _ = fine_tune
    merged = save_pretrained_merged(pm, tmp_path / "merged")
    (expected,) = save_pretrained_gguf(merged, tmp_path / "two-step", quantization=quant, progress=False)
    (ours,) = save_pretrained_gguf(pm, tmp_path / "one-pass", quantization=quant, progress=False)
    assert _tensors(ours) == _tensors(expected)
    assert _kvs(ours) == _kvs(expected)


def test_adapter_folder_with_base_exports_like_the_peft_model(fine_tune, tmp_path: pathlib.Path) -> None:
    pm, adapter, folder = fine_tune
    (from_model,) = save_pretrained_gguf(pm, tmp_path / "a", quantization="q8_0", progress=False)
    (from_folder,) = save_pretrained_gguf(adapter, tmp_path / "b", quantization="q8_0", base=folder, progress=False)
    assert from_folder.name == f"{adapter.name}-Q8_0.gguf"  # named after the adapter, not the base
    assert _tensors(from_folder) == _tensors(from_model)
    [plan] = plan_gguf(adapter, quantization="q8_0", base=folder)
    assert plan.total_bytes == sum(len(data) for _, data in _tensors(from_folder).values())


def test_user_model_is_left_unmerged(fine_tune, tmp_path: pathlib.Path) -> None:
    pm, _, _ = fine_tune
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    save_pretrained_gguf(pm, tmp_path, quantization="q8_0", progress=False)
    after = pm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in pm.modules())


def test_llama_cpp_runs_the_fine_tune_like_peft(fine_tune, tmp_path: pathlib.Path) -> None:
    pm, _, _ = fine_tune
    (path,) = save_pretrained_gguf(pm, tmp_path, quantization="f16", progress=False)
    tokens = [1, 15, 27, 99, 4, 250, 31, 8]
    with torch.no_grad():
        expected = copy.deepcopy(pm).float()(torch.tensor([tokens])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    # The merged weights are rounded once to bf16 (the merged model's dtype) and then to f16, while
    # PEFT's float32 forward keeps the adapter unrounded; plus llama.cpp's f16 activations. Same bound
    # as bf16 in tests/gguf/test_export.py (measured worst case there: 0.004).
    assert np.abs(got - expected).max() / np.abs(expected).max() < 0.01


def test_base_on_a_full_model_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidOptionError, match="base="):
        save_pretrained_gguf(base("LlamaForCausalLM"), tmp_path, base=base("LlamaForCausalLM"), progress=False)
    assert not any(tmp_path.iterdir())


def test_moe_expert_lora_exports_like_its_merged_folder(tmp_path: pathlib.Path) -> None:
    """LoRA on the stacked experts (target_parameters): merged on the fused tensor, split, stacked again for GGUF."""
    # llama.cpp converts Qwen3-MoE with a BPE vocabulary only: Qwen's real one
    model = load(base("Qwen3MoeForCausalLM", tokenizer="qwen2"), torch.bfloat16)
    pm = lora(model, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    merged = save_pretrained_merged(pm, tmp_path / "merged")
    (expected,) = save_pretrained_gguf(merged, tmp_path / "two-step", quantization="q8_0", progress=False)
    (ours,) = save_pretrained_gguf(pm, tmp_path / "one-pass", quantization="q8_0", progress=False)
    assert _tensors(ours) == _tensors(expected)
    pm.save_pretrained(str(tmp_path / "adapter"))  # and from the adapter folder onto the base folder
    folder = base("Qwen3MoeForCausalLM", tokenizer="qwen2")
    (from_folder,) = save_pretrained_gguf(tmp_path / "adapter", tmp_path / "dir", base=folder, progress=False)
    assert _tensors(from_folder) == _tensors(expected)
