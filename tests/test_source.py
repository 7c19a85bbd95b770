"""llmdeploy.source: folders (single, sharded; bf16/fp16/fp32), in-memory models, and the errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmdeploy.errors import LLMDeployError, MissingFileError, QuantizedCheckpointError, UnexpectedTensorError
from llmdeploy.source import TensorInfo, open_source
from tests.models import model_folder

_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _stored(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_folder_tensors_are_the_safetensors_ones(dtype):
    """Names, shapes, dtype names and values are what safetensors stores, in sorted order."""
    folder = model_folder("LlamaForCausalLM", dtype=dtype)
    source = open_source(folder)
    stored = _stored(folder)
    assert source.names() == sorted(stored)
    assert source.folder == folder
    assert source.config["architectures"] == ["LlamaForCausalLM"]
    for name, ref in stored.items():
        assert source.info(name) == TensorInfo(tuple(ref.shape), _NAMES[getattr(torch, dtype)])
        t = source.load(name)
        assert t.dtype == ref.dtype and t.device.type == "cpu"
        assert torch.equal(t, ref), name


def test_config_has_class_defaults_like_the_converter():
    """config is AutoConfig's dict (defaults filled in), what convert_hf_to_gguf.py calls hparams."""
    folder = model_folder("Gemma2ForCausalLM")
    raw = json.loads((folder / "config.json").read_text())
    config = open_source(folder).config
    assert config["final_logit_softcapping"] == 30.0 and config["hidden_size"] == raw["hidden_size"]


def test_sharded_folder_order_follows_the_shards():
    """Sharded checkpoints: shards in file-name order, names sorted within each (the converter's order)."""
    folder = model_folder("MixtralForCausalLM", max_shard_size="300KB")
    single = open_source(model_folder("MixtralForCausalLM"))  # same seed, same weights
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    expected = [n for shard in shards for n in sorted(k for k, v in index.items() if v == shard)]
    source = open_source(folder)
    assert source.names() == expected
    assert source.names() != sorted(expected)  # the shard order is really being followed
    for name in expected:
        assert source.info(name) == single.info(name)
        assert torch.equal(source.load(name), single.load(name)), name


def _in_memory(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True}),  # tied lm_head left out
        ("MixtralForCausalLM", {}),  # transformers 5 fuses experts in memory: split back lazily
    ],
)
def test_in_memory_model_streams_what_save_pretrained_writes(arch, kwargs):
    """A loaded model gives the same names, infos and values as the folder it was saved to."""
    folder = model_folder(arch, **kwargs)
    model = _in_memory(folder)
    source = open_source(model)
    by_folder = open_source(folder)
    assert source.folder == folder  # name_or_path is a local folder: its tokenizer files are used
    assert source.names() == by_folder.names()
    for name in by_folder.names():
        assert source.info(name) == by_folder.info(name)
        assert torch.equal(source.load(name), by_folder.load(name)), name


def test_in_memory_tensors_are_not_copied():
    """Plain parameters are handed out as they are: same memory, no copy of the model."""
    model = _in_memory(model_folder("LlamaForCausalLM"))
    source = open_source(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert source.load("model.layers.0.self_attn.q_proj.weight").data_ptr() == weight.data_ptr()


def test_model_built_from_config_has_no_folder():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config)
    source = open_source(model)
    assert source.folder is None
    assert "model.embed_tokens.weight" in source.names()


# -- errors -------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(MissingFileError, match=re.escape(f"{tmp_path / 'nope'} is not a folder: pass the folder")):
        open_source(tmp_path / "nope")


def test_missing_config_names_the_file_and_what_to_pass(tmp_path):
    with pytest.raises(MissingFileError) as err:
        open_source(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'config.json'} not found: pass a folder that contains config.json (one written by "
        "save_pretrained), or pass the loaded PreTrainedModel object instead"
    )
    assert isinstance(err.value, (LLMDeployError, FileNotFoundError))


def test_adapter_folder_says_merge_first(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(MissingFileError, match="it looks like a PEFT adapter folder: merge the adapter"):
        open_source(tmp_path)


def _config_only(tmp_path):
    shutil.copy(model_folder("LlamaForCausalLM") / "config.json", tmp_path / "config.json")
    return tmp_path


def test_no_weights(tmp_path):
    folder = _config_only(tmp_path)
    with pytest.raises(MissingFileError) as err:
        open_source(folder)
    assert str(err.value) == (
        f"no model weights in {folder}: expected model.safetensors, or model-0000i-of-0000N.safetensors "
        "with model.safetensors.index.json, as save_pretrained writes them"
    )


def test_pytorch_bin_only_says_how_to_convert(tmp_path):
    folder = _config_only(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MissingFileError) as err:
        open_source(folder)
    assert str(err.value) == (
        f"{folder} holds only PyTorch .bin weights; GGUF export reads safetensors. Convert once with "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) (transformers writes "
        "safetensors), or pass the loaded model object instead of the folder"
    )


def test_index_naming_a_missing_shard(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_folder("MixtralForCausalLM", max_shard_size="300KB"), folder)
    (folder / "model-00002-of-00012.safetensors").unlink()
    with pytest.raises(MissingFileError, match="model.safetensors.index.json lists weight files that are not in .*: "
                       "model-00002-of-00012.safetensors; copy the missing shards"):  # fmt: skip
        open_source(folder)


@pytest.mark.parametrize(
    "extra",
    [
        {"model.layers.0.mlp.down_proj.weight": torch.zeros(256 * 512 // 2, 1, dtype=torch.uint8)},  # NF4 packed
        {"model.layers.0.mlp.down_proj.weight.absmax": torch.zeros(2048, dtype=torch.float32)},
        {"model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4": torch.zeros(80, dtype=torch.uint8)},
        {"model.layers.0.mlp.down_proj.SCB": torch.zeros(256, dtype=torch.float32)},
        {"model.layers.0.mlp.down_proj.weight.quant_map": torch.zeros(16, dtype=torch.float32)},
    ],
    ids=["uint8-weight", "absmax", "quant_state", "SCB", "quant_map"],
)
def test_bitsandbytes_leftovers_say_dequantize_first(tmp_path, extra):
    folder = tmp_path / "m"
    shutil.copytree(model_folder("LlamaForCausalLM"), folder)
    tensors = {**load_file(str(folder / "model.safetensors")), **extra}
    save_file(tensors, str(folder / "model.safetensors"))
    (name,) = extra
    dtype = "U8" if extra[name].dtype == torch.uint8 else "F32"
    with pytest.raises(QuantizedCheckpointError) as err:
        open_source(folder)
    assert str(err.value) == (
        f"tensor {name!r} ({dtype}) in m comes from a bitsandbytes-quantized checkpoint; GGUF export needs "
        "16- or 32-bit weights. Dequantize first (model.dequantize() in transformers), or merge the LoRA "
        "adapter into a 16-bit copy of the base model, then export that model"
    )
    assert isinstance(err.value, ValueError)


def test_quantized_model_object(tmp_path):
    """An in-memory model holding uint8 (bitsandbytes-packed) weights is refused the same way."""
    model = _in_memory(model_folder("LlamaForCausalLM"))
    layer = model.model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.zeros(256 * 512 // 2, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(
        QuantizedCheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' \(U8\) in the model"
    ):
        open_source(model)


def test_unmerged_lora_model_object():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_in_memory(model_folder("LlamaForCausalLM")), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UnexpectedTensorError, match=r"still holds LoRA adapter weights .*merge_and_unload"):
        open_source(model)


def test_not_a_model():
    with pytest.raises(TypeError, match="takes a model folder or a transformers PreTrainedModel, not int"):
        open_source(3)  # type: ignore[arg-type]


def test_unknown_tensor_name():
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        open_source(model_folder("LlamaForCausalLM")).load("nope")
