"""save_pretrained_merged's errors: each one's class, built-in base, and message; nothing written."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmdeploy.errors import (
    AdapterShapeError,
    InvalidOptionError,
    LLMDeployError,
    MissingFileError,
    NonFiniteValueError,
    OutputExistsError,
    QuantizedCheckpointError,
    UnmergedAdapterError,
    UnsupportedAdapterError,
)
from llmdeploy.merge import save_pretrained_merged
from tests.merge.common import base, load, lora, read


def _files(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def _adapter(tmp_path, name="adapter", **cfg):
    pm = lora(load(base()), **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / name))
    return pm, tmp_path / name


def _edit_adapter(folder, edit):
    f = folder / "adapter_model.safetensors"
    save_file(edit(load_file(str(f))), str(f))


@pytest.mark.parametrize(
    ("method", "words"),
    [
        ("merged_4bit", ["'merged_16bit'", "'lora'", "4-bit", "accuracy"]),
        ("merged_4bit_forced", ["'merged_16bit'", "4-bit"]),
        ("q4_k_m", ["GGUF", "save_pretrained_gguf"]),
        ("16bit", ["Did you mean 'merged_16bit'"]),
        ("banana", ["'merged_16bit'", "'lora'", "merged_4bit"]),
    ],
)
def test_unknown_save_method_lists_the_valid_ones(method, words, tmp_path):
    with pytest.raises(InvalidOptionError) as e:
        save_pretrained_merged(str(tmp_path), tmp_path / "out", save_method=method)
    assert isinstance(e.value, ValueError) and isinstance(e.value, LLMDeployError)
    assert f"save_method={method!r}" in str(e.value)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["IA3", "LOHA"])
def test_non_lora_adapters_are_refused(kind, tmp_path):
    from peft import IA3Config, LoHaConfig, get_peft_model

    cfg = (
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
        if kind == "IA3"
        else LoHaConfig(target_modules=["q_proj"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(load(base()), cfg)
        pm.save_pretrained(str(tmp_path / "adapter"))
    for model in (pm, tmp_path / "adapter"):
        with pytest.raises(UnsupportedAdapterError, match=rf"is a {kind} adapter; save_pretrained_merged merges LoRA"):
            save_pretrained_merged(model, tmp_path / "out", base=base())
    assert not (tmp_path / "out").exists()


def test_unsupported_lora_variant_is_named(tmp_path):
    _, adapter = _adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_bdlora"] = {"target_modules_bd_a": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match=r"uses BD-LoRA \(use_bdlora="):
        save_pretrained_merged(adapter, tmp_path / "out")


def test_shape_mismatch_names_the_first_tensor_and_writes_nothing(tmp_path):
    """An adapter trained on another base (intermediate size 128) merged onto one with 96."""
    _, adapter = _adapter(tmp_path, target_modules=["q_proj", "up_proj"])
    other = base(intermediate_size=96)
    out = tmp_path / "out"
    with pytest.raises(AdapterShapeError) as e:
        save_pretrained_merged(adapter, out, base=other)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(
        "the adapter does not fit the base model at 'model.layers.0.mlp.up_proj.weight' (module "
        "'model.layers.0.mlp.up_proj'): lora_A (8, 64) @ lora_B (128, 8) gives a (128, 64) update for a base "
        "weight of shape (96, 64)."
    )
    assert not out.exists()


def test_module_without_base_tensor_is_an_error_never_a_skip(tmp_path):
    _, adapter = _adapter(tmp_path)
    _edit_adapter(
        adapter, lambda t: {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq"): v for k, v in t.items()}
    )
    with pytest.raises(
        UnmergedAdapterError,
        match=r"1 module\(s\) with no weight in the base model, e\.g\. 'model\.layers\.1\.self_attn\.qq'",
    ):
        save_pretrained_merged(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_bias_without_base_bias(tmp_path):
    pm = lora(load(base()), target_modules=["q_proj"], lora_bias=True)  # Llama attention has no bias
    with pytest.raises(UnmergedAdapterError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has lora_bias=True"):
        save_pretrained_merged(pm, tmp_path / "out")


def test_nan_names_the_module_and_leaves_the_old_folder_intact(tmp_path):
    """NaN in the last layer's adapter: the error comes mid-write (earlier shards already in temp files);
    the folder from an earlier save is untouched and no temporary file is left."""
    pm = lora(load(base()), target_modules=["q_proj", "down_proj"])
    out = save_pretrained_merged(pm, tmp_path / "out", max_shard_size="100KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        pm.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteValueError) as e:
        save_pretrained_merged(pm, out, max_shard_size="100KB", overwrite=True)
    assert str(e.value).startswith(
        "merging the adapter into module 'model.layers.1.mlp.down_proj' (model.layers.1.mlp.down_proj.weight) gives "
        "NaN or infinity"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(NonFiniteValueError):  # a new folder: not even the folder stays
        save_pretrained_merged(pm, tmp_path / "new", max_shard_size="100KB")
    assert not (tmp_path / "new").exists()


def test_float16_overflow_names_the_module(tmp_path):
    pm = lora(load(base()), target_modules=["v_proj"])
    with torch.no_grad():
        pm.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.mul_(1e8)
    with pytest.raises(NonFiniteValueError, match=r"module 'model\.layers\.0\.self_attn\.v_proj' .* overflows float16"):
        save_pretrained_merged(pm, tmp_path / "out", dtype="float16")
    save_pretrained_merged(pm, tmp_path / "out", dtype="float32")  # fits in float32


def test_existing_folder_needs_overwrite(tmp_path):
    pm = lora(load(base()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"stale")
    (out / "stale-model.safetensors").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as e:
        save_pretrained_merged(pm, out)
    assert isinstance(e.value, FileExistsError)
    assert str(e.value) == (
        f"{out} exists and is not empty; pass overwrite=True to replace the model in it, or choose an empty or "
        "new folder"
    )
    save_pretrained_merged(pm, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "model.safetensors" in names
    assert not {"adapter_config.json", "adapter_model.safetensors", "stale-model.safetensors"} & names
    load(out)  # no stray adapter gets attached, no stray weights


def test_output_folder_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        save_pretrained_merged(lora(load(base())), tmp_path / "out")


def test_output_folder_is_the_base_folder(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(base(), copy)
    pm = lora(load(copy))
    with pytest.raises(InvalidOptionError, match="is the folder the model is read from"):
        save_pretrained_merged(pm, copy, overwrite=True)
    assert read(copy).keys() == load_file(str(base() / "model.safetensors")).keys()


def test_base_not_local(tmp_path):
    _, adapter = _adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        MissingFileError,
        match=r"names its base model 'meta-llama/Llama-3.2-1B', which is not a local folder; pass base=",
    ):
        save_pretrained_merged(adapter, tmp_path / "out")
    with pytest.raises(MissingFileError, match="base model folder .* not found"):
        save_pretrained_merged(adapter, tmp_path / "out", base=tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match=r"nowhere is not a folder; pass a PEFT adapter folder"):
        save_pretrained_merged(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(
        MissingFileError, match=r"adapter_config.json not found \(it holds config.json: it is a full model"
    ):
        save_pretrained_merged(base(), tmp_path / "out")


@pytest.mark.parametrize(
    ("extra", "config", "match"),
    [
        ({"model.layers.0.mlp.up_proj.weight.absmax": torch.ones(4)}, None,
         r"state tensors for 'model.layers.0.mlp.up_proj.weight' \(absmax\) but no quant_state.bitsandbytes__nf4 .*"
         r"incomplete. Pass base= a folder of the original 16-bit weights"),
        ({"model.layers.0.mlp.up_proj.weight.SCB": torch.ones(4)}, None,
         r"is quantized \(tensor 'model.layers.0.mlp.up_proj.weight.SCB'\); llmdeploy dequantizes bitsandbytes 4-bit"),
        ({}, {"quant_method": "gptq", "bits": 4},
         r"is quantized \(its config.json \(quantization_config: gptq\)\); .*original 16-bit weights"),
    ],
    ids=["incomplete_4bit_state", "int8", "gptq"],
)  # fmt: skip
def test_quantized_base_folder(extra, config, match, tmp_path):
    """A base llmdeploy cannot dequantize (8-bit, GPTQ, a 4-bit state with parts missing): a clear error."""
    q = tmp_path / "q"
    shutil.copytree(base(), q)
    tensors = load_file(str(q / "model.safetensors"))
    save_file({**tensors, **extra}, str(q / "model.safetensors"))
    if config:
        cfg = json.loads((q / "config.json").read_text())
        (q / "config.json").write_text(json.dumps({**cfg, "quantization_config": config}))
    _, adapter = _adapter(tmp_path)
    with pytest.raises(QuantizedCheckpointError, match=match):
        save_pretrained_merged(adapter, tmp_path / "out", base=q)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(dtype="int8"), r"dtype='int8' is not a dtype a merged model can be saved in"),
        (dict(max_shard_size="big"), r"max_shard_size='big' is not a size"),
        (dict(adapter_names=["nope"]), r"the model has no adapter 'nope'; its adapters are \['default'\]"),
    ],
)
def test_bad_options(kw, match, tmp_path):
    with pytest.raises(InvalidOptionError, match=match):
        save_pretrained_merged(lora(load(base())), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_already_merged_adapter(tmp_path):
    pm = lora(load(base()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    with pytest.raises(
        InvalidOptionError, match=r"already has adapters \['default'\] merged .* model\.unmerge_adapter\(\) first"
    ):
        save_pretrained_merged(pm, tmp_path / "out")


def test_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="takes a peft.PeftModel, a transformers model .* not dict"):
        save_pretrained_merged({"weight": 1}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_method_on_a_full_model(tmp_path):
    with pytest.raises(InvalidOptionError, match="has none .* use save_method='merged_16bit'"):
        save_pretrained_merged(load(base()), tmp_path / "out", save_method="lora")
    assert not (tmp_path / "out").exists()
