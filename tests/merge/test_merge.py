"""save_pretrained_merged on in-memory PEFT models: PEFT-exact weights, a folder transformers loads.

Oracles:
- weights: PEFT's own ``merge_and_unload()``. On a float32 model llmdeploy computes the same
  float32 expressions in the same order, so the float32 output is bit-identical and the bf16
  output equals PEFT's float32 merge rounded once to bf16. Against PEFT's merge of a *bf16*
  model (which rounds the delta to bf16, then the sum) the difference is at most one bf16 ulp.
- behaviour: transformers loads the folder; its logits equal the unmerged PEFT model's within
  rtol/atol 1e-4 in float32 (the merged layer computes x·(W+ΔW) instead of x·W + (x·A)·B: the
  same real number, float32 sums in another order).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from llmdeploy.merge import save_pretrained_merged
from tests.merge.common import base, gpt2_folder, load, logits, lora, peft_merged, read, state, ulp, ulps

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (base folder builder args, LoraConfig kwargs)
VARIANTS = {
    "lora": ({}, dict(target_modules=ALL_LINEAR)),
    "rslora": ({}, dict(target_modules=ALL_LINEAR, use_rslora=True, lora_alpha=32)),
    "rank_alpha_pattern": (
        {},
        dict(target_modules=ALL_LINEAR, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 4}),
    ),
    "dora": ({}, dict(target_modules=ALL_LINEAR, use_dora=True)),
    "lora_bias": ({"attention_bias": True}, dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "embedding": ({}, dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_dora": ({}, dict(target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    "lm_head_lora": ({}, dict(target_modules=["lm_head", "v_proj"])),
    "modules_to_save": ({}, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "trainable_tokens": ({}, dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
}


def _merge(pm, tmp_path, name="out", **kw):
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pretrained_merged(pm, out, **kw)
    return out


def _check_equal_to_peft(ours, ref, dtype):
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == dtype, k
        assert torch.equal(ours[k], v.to(dtype)), (k, ulps(ours[k], v.to(dtype)).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_equal_peft_and_logits_equal_unmerged(variant, tmp_path):
    """Each LoRA variant: float32 output bit-identical to merge_and_unload(), bf16 output equal to it
    rounded once; transformers loads the folder and its logits are the unmerged model's."""
    folder_kw, cfg = VARIANTS[variant]
    pm = lora(load(base(**folder_kw)), **cfg)
    before = state(pm)
    ref = peft_merged(pm)

    f32 = _merge(pm, tmp_path, "f32", dtype="float32")
    _check_equal_to_peft(read(f32), ref, torch.float32)
    bf16 = _merge(pm, tmp_path, "bf16")  # default: bf16 for a float32 model
    _check_equal_to_peft(read(bf16), ref, torch.bfloat16)

    after = state(pm)  # the user's model is untouched: no merge left applied, same tensors
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in pm.modules())

    merged = load(f32)
    torch.testing.assert_close(logits(merged), logits(pm), rtol=1e-4, atol=1e-4)
    assert not list(f32.glob("adapter_*"))


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2 stores Conv1D weights (in, out): LoRA with fan_in_fan_out=True, plain and DoRA."""
    folder = gpt2_folder(tmp_path)
    for dora in (False, True):
        pm = lora(load(folder), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_dora=dora)
        ref = peft_merged(pm)
        out = _merge(pm, tmp_path, f"gpt2-{dora}", dtype="float32")
        _check_equal_to_peft(read(out), {k: v for k, v in ref.items() if k != "lm_head.weight"}, torch.float32)
        torch.testing.assert_close(logits(load(out)), logits(pm), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["lora", "dora", "embedding"])
def test_bf16_model_within_one_ulp_of_peft(variant, tmp_path):
    """A bf16 PEFT model: llmdeploy rounds once, so its output is exactly PEFT's float32 merge of the same
    values rounded to bf16. PEFT's own bf16 merge rounds ΔW to bf16, then the sum: it differs by at most
    one bf16 ulp of the largest of |W|, |ΔW|, |W + ΔW| (where ΔW cancels W, PEFT's rounding of ΔW is many
    ulps of the tiny result, so "one ulp of the result" would not hold for PEFT itself)."""
    _, cfg = VARIANTS[variant]
    pm = lora(load(base(), torch.bfloat16), **cfg)
    ours = read(_merge(pm, tmp_path))
    oracle = peft_merged(copy.deepcopy(pm).float())  # the same values, merged in float32 by PEFT
    _check_equal_to_peft(ours, oracle, torch.bfloat16)
    if variant != "dora":  # PEFT's bf16 DoRA also rounds the norm, the factor and the product
        w0 = {k: v.float() for k, v in load(base(), torch.bfloat16).state_dict().items()}
        for k, v in peft_merged(pm).items():
            delta = oracle[k].float() - w0[k]
            scale = torch.maximum(torch.maximum(w0[k].abs(), delta.abs()), ours[k].float().abs())
            assert bool(((ours[k].float() - v.float()).abs() <= ulp(scale, torch.bfloat16)).all()), k


def test_tied_embeddings_stay_tied_without_head_changes(tmp_path):
    """Qwen2 ties lm_head to embed_tokens: with LoRA on attention only, lm_head is not saved and
    tie_word_embeddings stays True."""
    pm = lora(load(base("Qwen2ForCausalLM")), target_modules=["q_proj", "v_proj"])
    out = _merge(pm, tmp_path, dtype="float32")
    assert "lm_head.weight" not in read(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(logits(load(out)), logits(pm), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["embed_tokens", "q_proj"]),
        dict(target_modules=["lm_head", "q_proj"]),
    ],
    ids=["modules_to_save_head", "embedding_lora", "head_lora"],
)
def test_tied_embeddings_trained_head_is_kept(cfg, tmp_path):
    """Regression (unsloth #3416, PR #9331): on a tied model, a trained head (modules_to_save) or a LoRA on
    one side makes head and embeddings differ; both are saved and tie_word_embeddings becomes False, so the
    merged model computes what the unmerged one does (PEFT's merge_and_unload puts one side's change on both)."""
    pm = lora(load(base("Qwen2ForCausalLM")), **cfg)
    out = _merge(pm, tmp_path, dtype="float32")
    tensors = read(out)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(tensors)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(load(out)), logits(pm), rtol=1e-4, atol=1e-4)


def test_tied_trainable_tokens_stay_tied(tmp_path):
    """trainable_token_indices on a tied model: PEFT ties the token rows of head and embeddings, so they stay tied."""
    pm = lora(load(base("Qwen2ForCausalLM")), target_modules=["q_proj"], trainable_token_indices=[1, 4, 9])
    out = _merge(pm, tmp_path, dtype="float32")
    assert "lm_head.weight" not in read(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    _check_equal_to_peft(read(out), {k: v for k, v in peft_merged(pm).items() if k != "lm_head.weight"}, torch.float32)
    torch.testing.assert_close(logits(load(out)), logits(pm), rtol=1e-4, atol=1e-4)


def test_several_adapters_active_and_named_subset(tmp_path):
    """Two adapters (LoRA, then DoRA on the same modules): both active, or a named subset, as PEFT merges them."""
    from peft import LoraConfig

    pm = lora(load(base()), adapter_name="a", target_modules=["q_proj", "v_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True))
    from tests.merge.common import randomize

    randomize(pm, "b", seed=1)
    pm.base_model.set_adapter(["a", "b"])

    both = read(_merge(pm, tmp_path, "both", dtype="float32"))
    ref = peft_merged(pm)
    # PEFT recovers W0 for the DoRA norm by unmerging "a" again (W0 + Δa - Δa), a float32 rounding of its own
    for k, v in ref.items():
        assert int(ulps(both[k], v).max()) <= 4, k
    torch.testing.assert_close(logits(load(tmp_path / "both")), logits(pm), rtol=1e-4, atol=1e-4)

    only_b = read(_merge(pm, tmp_path, "b", dtype="float32", adapter_names=["b"]))
    _check_equal_to_peft(only_b, peft_merged(pm, adapter_names=["b"]), torch.float32)


def test_folder_contents_for_engines(tmp_path):
    """config.json (dtype, no quantization_config), generation_config.json, tokenizer files with
    tokenizer.model and the chat template, one model.safetensors, nothing adapter_*."""
    pm = lora(load(base()), target_modules=ALL_LINEAR)
    out = _merge(pm, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(("adapter_", "."))]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and len(tok) == config["vocab_size"]


def test_tokenizer_argument_is_saved(tmp_path):
    from transformers import AutoTokenizer

    folder = base()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": ["<|my_tool|>"]})
    pm = lora(load(folder))
    out = _merge(pm, tmp_path, tokenizer=tok)
    saved = AutoTokenizer.from_pretrained(str(out))
    assert "<|my_tool|>" in saved.get_vocab()
    assert (out / "tokenizer.model").is_file()  # the SentencePiece model, for GGUF converters


def test_resized_vocabulary(tmp_path):
    """Added tokens: resize_token_embeddings before LoRA; the merged folder has the new vocab size."""
    model = load(base())
    old = model.config.vocab_size
    model.resize_token_embeddings(old + 8)
    pm = lora(model, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    out = _merge(pm, tmp_path, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == old + 8
    assert read(out)["model.embed_tokens.weight"].shape[0] == old + 8
    torch.testing.assert_close(logits(load(out), vocab=old + 8), logits(pm, vocab=old + 8), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dtype_option(dtype, tmp_path):
    pm = lora(load(base()))
    out = _merge(pm, tmp_path, dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert {v.dtype for v in read(out).values()} == {getattr(torch, dtype)}


def test_several_shards_load_identically(tmp_path):
    """max_shard_size small enough for several shards: an index, every shard within the limit,
    the same tensors and logits as the single-file folder."""
    pm = lora(load(base()), target_modules=ALL_LINEAR)
    single = _merge(pm, tmp_path, "single", dtype="float32")
    sharded = _merge(pm, tmp_path, "sharded", dtype="float32", max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    a, b = read(single), read(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(logits(load(sharded)), logits(load(single)), rtol=0, atol=0)
    for p in shards:  # each shard's data within the limit, unless one tensor alone is bigger
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118 - safe_open is no dict
        data = sum(torch.Size(s).numel() * 4 for s in sizes)
        assert data <= 100_000 or len(sizes) == 1


def test_save_method_lora_writes_the_adapter(tmp_path):
    from peft import PeftModel

    folder = base()
    pm = lora(load(folder), target_modules=ALL_LINEAR)
    out = _merge(pm, tmp_path, save_method="lora")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "config.json").exists() and not list(out.glob("model*.safetensors"))
    again = PeftModel.from_pretrained(load(folder), str(out))
    torch.testing.assert_close(logits(again), logits(pm), rtol=0, atol=0)
    copy = _merge(str(out), tmp_path, "copy", save_method="lora")
    assert (copy / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_full_fine_tune_is_saved_as_its_16bit_weights(tmp_path):
    """A transformers model without adapter (a full fine-tune): the folder holds its weights, rounded
    once to bf16, and loads to the same logits as transformers' own save_pretrained of the bf16 model."""
    model = load(base())  # float32 in memory
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.01)  # "fine-tuned": differs from the base folder
    out = _merge(model, tmp_path)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # untied head: all saved
    _check_equal_to_peft(read(out), expected, torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ref = tmp_path / "ref"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(ref))
    assert torch.equal(logits(load(out)), logits(load(ref)))


# transformers 5 stacks MoE experts into one parameter per projection in memory (split again on
# save); PEFT trains them with target_parameters. (Mixtral's experts sit under
# block_sparse_moe or mlp depending on the transformers version: the name is looked up.)
@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_moe_expert_lora_equals_peft(arch, tmp_path):
    model = load(base(arch))
    params = sorted({n.split("layers.0.", 1)[1] for n, p in model.named_parameters() if p.ndim == 3 and "layers.0." in n})
    assert params, "no stacked expert parameters: the test needs transformers 5"
    pm = lora(model, target_modules=["q_proj"], target_parameters=params, r=4)
    ref_dir = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.deepcopy(pm).merge_and_unload().save_pretrained(str(ref_dir))
    ref = read(ref_dir)
    # float32: PEFT's float32 merge bit for bit
    _check_equal_to_peft(read(_merge(pm, tmp_path, "f32", dtype="float32")), ref, torch.float32)
    # bf16: PEFT's float32 merge rounded once; and the experts did change
    _check_equal_to_peft(read(_merge(pm, tmp_path, "bf16")), ref, torch.bfloat16)
    before = read(base(arch))
    changed = [k for k in before if ".experts." in k and not torch.equal(before[k], ref[k].to(torch.bfloat16))]
    assert len(changed) == len([k for k in before if ".experts." in k])
    torch.testing.assert_close(logits(load(tmp_path / "f32")), logits(pm), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_moe_expert_lora_from_a_folder_equals_the_in_memory_merge(arch, tmp_path):
    """Adapter folder + base folder: the stacked update is split onto the per-expert checkpoint tensors."""
    model = load(base(arch))
    params = sorted({n.split("layers.0.", 1)[1] for n, p in model.named_parameters() if p.ndim == 3 and "layers.0." in n})
    pm = lora(model, target_modules=["q_proj"], target_parameters=params, r=4)
    pm.save_pretrained(str(tmp_path / "adapter"))
    in_memory = read(_merge(pm, tmp_path, "mem", dtype="float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pretrained_merged(tmp_path / "adapter", tmp_path / "dir", base=base(arch), dtype="float32")
    from_folder = read(tmp_path / "dir")
    assert from_folder.keys() == in_memory.keys()
    assert all(torch.equal(from_folder[k], in_memory[k]) for k in in_memory)
