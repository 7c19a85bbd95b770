"""save_pretrained_merged from an adapter folder onto a base folder, streamed disk to disk.

Oracle: PEFT itself — ``PeftModel.from_pretrained(base in float32, adapter folder).merge_and_unload()``
rounded once to the base's bf16 — and the in-memory path on the same adapter: all three agree
bit for bit.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from llmdeploy.merge import save_pretrained_merged
from tests.merge.common import base, gpt2_folder, load, logits, lora, peft_merged, read
from tests.merge.test_merge import ALL_LINEAR, VARIANTS


def _save_adapter(pm, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(folder))
    return folder


def _peft_from_folder(base_folder, adapter_folder):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load(base_folder), str(adapter_folder))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_folder_merge_equals_peft_and_in_memory(variant, tmp_path):
    folder_kw, cfg = VARIANTS[variant]
    base_folder = base(**folder_kw)
    pm = lora(load(base_folder), **cfg)
    adapter = _save_adapter(pm, tmp_path / "adapter")

    out = save_pretrained_merged(adapter, tmp_path / "out", base=base_folder)
    ours = read(out)
    ref = peft_merged(_peft_from_folder(base_folder, adapter))
    tied = json.loads((out / "config.json").read_text()).get("tie_word_embeddings")
    assert set(ours) == set(ref) - ({"lm_head.weight"} if tied else set())
    for k in ours:
        assert ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], ref[k].to(torch.bfloat16)), k

    mem = read(save_pretrained_merged(pm, tmp_path / "mem"))
    assert mem.keys() == ours.keys() and all(torch.equal(mem[k], ours[k]) for k in ours)
    assert not list(out.glob("adapter_*")) and (out / "tokenizer.model").is_file()


@pytest.mark.parametrize(
    "cfg",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["embed_tokens", "q_proj"]),
        dict(target_modules=["lm_head"]),
        dict(target_modules=["q_proj"], trainable_token_indices=[2, 3]),
        dict(target_modules=["q_proj", "v_proj"]),
    ],
    ids=["modules_to_save_head", "embedding_lora", "head_lora", "trainable_tokens", "attention"],
)
def test_tied_base_folder(cfg, tmp_path):
    """Qwen2 (tied; the base folder has no lm_head.weight): the output matches the in-memory path and
    the unmerged model's logits; the head is written only when it differs from the embeddings."""
    base_folder = base("Qwen2ForCausalLM")
    pm = lora(load(base_folder), **cfg)
    adapter = _save_adapter(pm, tmp_path / "adapter")
    out = save_pretrained_merged(adapter, tmp_path / "out", base=base_folder, dtype="float32")
    mem = save_pretrained_merged(pm, tmp_path / "mem", dtype="float32")
    a, b = read(out), read(mem)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["tie_word_embeddings"] == ("lm_head.weight" not in a)
    assert cfg_out["tie_word_embeddings"] == json.loads((mem / "config.json").read_text())["tie_word_embeddings"]
    torch.testing.assert_close(logits(load(out)), logits(pm), rtol=1e-4, atol=1e-4)


def test_base_model_name_or_path_is_used(tmp_path):
    """Without base=, the adapter's base_model_name_or_path (a local folder) is the base."""
    base_folder = base()
    pm = lora(load(base_folder), target_modules=ALL_LINEAR)
    adapter = _save_adapter(pm, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_folder)
    a = read(save_pretrained_merged(adapter, tmp_path / "a"))
    b = read(save_pretrained_merged(adapter, tmp_path / "b", base=base_folder))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_base_and_sharded_output(tmp_path):
    """A base saved in several shards, merged into several shards: same tensors as single files, loads."""
    single_base = base()
    sharded_base = base(max_shard_size="100KB")
    assert (sharded_base / "model.safetensors.index.json").is_file()
    pm = lora(load(single_base), target_modules=ALL_LINEAR, use_dora=True)
    adapter = _save_adapter(pm, tmp_path / "adapter")
    one = read(save_pretrained_merged(adapter, tmp_path / "one", base=single_base))
    out = save_pretrained_merged(adapter, tmp_path / "many", base=sharded_base, max_shard_size="120KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    many = read(out)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    torch.testing.assert_close(logits(load(out)), logits(load(tmp_path / "one")), rtol=0, atol=0)


def test_untouched_tensors_are_copied_byte_for_byte(tmp_path):
    """Tensors no adapter changes keep their stored bytes (bf16 base, bf16 output)."""
    from safetensors.torch import load_file

    base_folder = base()
    pm = lora(load(base_folder), target_modules=["q_proj"])
    adapter = _save_adapter(pm, tmp_path / "adapter")
    out = read(save_pretrained_merged(adapter, tmp_path / "out", base=base_folder))
    stored = load_file(str(base_folder / "model.safetensors"))
    for k, v in stored.items():
        if "q_proj" not in k:
            assert torch.equal(out[k], v), k
        else:
            assert not torch.equal(out[k], v), k


def test_fan_in_fan_out_folder(tmp_path):
    folder = gpt2_folder(tmp_path)
    pm = lora(load(folder), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)
    adapter = _save_adapter(pm, tmp_path / "adapter")
    out = read(save_pretrained_merged(adapter, tmp_path / "out", base=folder))
    mem = read(save_pretrained_merged(pm, tmp_path / "mem"))
    assert out.keys() == mem.keys() and all(torch.equal(out[k], mem[k]) for k in out)


def test_several_adapter_folders(tmp_path):
    """PEFT saves extra adapters in sub-folders; adapter_names picks and orders them."""
    from peft import LoraConfig

    from tests.merge.common import randomize

    base_folder = base()
    pm = lora(load(base_folder), target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    randomize(pm, "second", seed=3)
    adapter = _save_adapter(pm, tmp_path / "adapter")
    assert (adapter / "second" / "adapter_config.json").is_file()
    pm.base_model.set_adapter(["default", "second"])
    out = read(save_pretrained_merged(adapter, tmp_path / "out", base=base_folder, adapter_names=["default", "second"]))
    mem = read(save_pretrained_merged(pm, tmp_path / "mem"))
    assert all(torch.equal(out[k], mem[k]) for k in out)


def test_in_memory_model_with_base_folder(tmp_path):
    """An in-memory PEFT model merged onto base= (e.g. the 16-bit weights of a QLoRA run): the adapter
    comes from memory, the base tensors from the folder."""
    base_folder = base()
    pm = lora(load(base_folder), target_modules=ALL_LINEAR)
    a = read(save_pretrained_merged(pm, tmp_path / "a", base=base_folder))
    b = read(save_pretrained_merged(pm, tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resized_vocabulary_folder(tmp_path):
    """Added tokens: the adapter holds the resized embeddings; the output has the new vocab size."""
    base_folder = base()
    model = load(base_folder)
    old = model.config.vocab_size
    model.resize_token_embeddings(old + 8)
    pm = lora(model, target_modules=["q_proj", "embed_tokens", "lm_head"])
    adapter = _save_adapter(pm, tmp_path / "adapter")
    out = save_pretrained_merged(adapter, tmp_path / "out", base=base_folder, dtype="float32")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == old + 8
    mem = read(save_pretrained_merged(pm, tmp_path / "mem", dtype="float32"))
    ours = read(out)
    assert ours.keys() == mem.keys() and all(torch.equal(ours[k], mem[k]) for k in ours)
    torch.testing.assert_close(logits(load(out), vocab=old + 8), logits(pm, vocab=old + 8), rtol=1e-4, atol=1e-4)


def test_adapter_folder_tokenizer_wins(tmp_path):
    """Tokenizer files saved with the adapter (added tokens) are the ones copied; tokenizer.model comes
    from the base when the adapter folder lacks it."""
    from transformers import AutoTokenizer

    base_folder = base()
    pm = lora(load(base_folder))
    adapter = _save_adapter(pm, tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(str(base_folder))
    tok.add_tokens(["<extra_tok>"])
    tok.save_pretrained(str(adapter))
    (adapter / "tokenizer.model").unlink(missing_ok=True)
    out = save_pretrained_merged(adapter, tmp_path / "out", base=base_folder)
    assert "<extra_tok>" in AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert (out / "tokenizer.model").read_bytes() == (base_folder / "tokenizer.model").read_bytes()
    shutil.rmtree(out)


@pytest.mark.parametrize(
    ("cfg", "needs_model_class"),
    [
        (dict(target_modules=["q_proj", "v_proj", "up_proj"]), False),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
        (dict(target_modules=["embed_tokens", "q_proj"]), True),
        (dict(target_modules=["lm_head"]), True),
        (dict(target_modules=["q_proj"], trainable_token_indices=[2, 3]), True),
    ],
    ids=["projections", "modules_to_save_head", "embedding_lora", "head_lora", "trainable_tokens"],
)
def test_model_class_is_built_only_when_embeddings_change(cfg, needs_model_class, tmp_path, monkeypatch):
    """The tie map comes from the model class (importing transformers: seconds and ~100 MB) only when
    the adapters change a vocabulary-sized tensor; LoRA on the projections alone of a tied model
    (Qwen2) merges to the same folder without it."""
    from llmdeploy.merge import stream

    base_folder = base("Qwen2ForCausalLM")
    pm = lora(load(base_folder), **cfg)
    adapter = _save_adapter(pm, tmp_path / "adapter")
    calls = []
    real = stream._model_facts
    monkeypatch.setattr(stream, "_model_facts", lambda folder: calls.append(folder) or real(folder))
    out = save_pretrained_merged(adapter, tmp_path / "out", base=base_folder)
    assert bool(calls) == needs_model_class
    mem = read(save_pretrained_merged(pm, tmp_path / "mem"))
    ours = read(out)
    assert ours.keys() == mem.keys() and all(torch.equal(ours[k], mem[k]) for k in ours)
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["tie_word_embeddings"] == json.loads((tmp_path / "mem" / "config.json").read_text())[
        "tie_word_embeddings"
    ]
