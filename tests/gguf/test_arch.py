"""llmdeploy.gguf.arch against llama.cpp's own converter (convert_hf_to_gguf.py --outtype bf16).

For tiny models of every supported architecture (and the variants that take other code
paths: Llama 3 RoPE factors, tied embeddings with attention biases, untied Qwen2, fp16 and
fp32 checkpoints, a sharded MoE checkpoint, Phi-3 LongRoPE, Gemma 3 with a BPE tokenizer
smaller than its embeddings), the converter's GGUF and ours must agree on:
- the tensors: names, order, shapes; F32 tensors byte for byte with our float32 values,
  BF16 tensors byte for byte with our values rounded by llmdeploy.quants.quantize(v, "bf16");
- every KV that is not tokenizer.* (keys, order, types, values; general.name included, as
  both read the same folder).
"""

from __future__ import annotations

import functools
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from llmdeploy.errors import LLMDeployError, UnexpectedTensorError, UnsupportedArchitectureError
from llmdeploy.gguf.arch import ARCHITECTURES, architecture_for
from llmdeploy.gguf.plan import ModelHParams
from llmdeploy.quants import quantize
from llmdeploy.source import open_source
from tests.llamacpp import convert
from tests.models import edited_folder, model_folder

_LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
_LONGROPE = {
    "rope_type": "longrope", "rope_theta": 10000.0,
    "long_factor": [1.0 + i / 8 for i in range(32)], "short_factor": [1.0 + i / 64 for i in range(32)],
}  # fmt: skip

# case id -> (architecture, model_folder keyword arguments)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    # rope_type llama3: the generated rope_freqs.weight tensor, all three wavelength regions
    "llama-llama3-rope": ("LlamaForCausalLM", {"max_position_embeddings": 131072, "rope_parameters": _LLAMA3_ROPE}),
    # tied: no output.weight; biases: q/k bias permutation, F32 biases
    "llama-tied-bias": ("LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True}),
    "mistral": ("MistralForCausalLM", {}),
    "mixtral": ("MixtralForCausalLM", {}),
    # experts of one layer spread over shards: stacked tensors come where the last expert is
    "mixtral-sharded": ("MixtralForCausalLM", {"max_shard_size": "300KB"}),
    "qwen2": ("Qwen2ForCausalLM", {"tokenizer": "qwen2"}),
    "qwen2-untied": ("Qwen2ForCausalLM", {"tokenizer": "qwen2", "tie_word_embeddings": False}),
    "qwen3": ("Qwen3ForCausalLM", {"tokenizer": "qwen2"}),
    "qwen3moe": ("Qwen3MoeForCausalLM", {"tokenizer": "qwen2"}),
    "gemma": ("GemmaForCausalLM", {}),
    # fp16 checkpoint: the converter adds Gemma's + 1 in fp16, not fp32
    "gemma-f16": ("GemmaForCausalLM", {"dtype": "float16"}),
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", {}),
    "gemma3-f32": ("Gemma3ForCausalLM", {"dtype": "float32"}),
    # tokenizer.json path: embed_tokens cut to len(vocab) + len(added_tokens) = 50258 rows
    "gemma3-bpe-truncated": ("Gemma3ForCausalLM", {"tokenizer": "gpt-2", "vocab_size": 50304}),
    "phi3": ("Phi3ForCausalLM", {}),
    # long/short factor tensors, and rope.scaling.attn_factor written before general.type
    "phi3-longrope": ("Phi3ForCausalLM", {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                          "rope_parameters": _LONGROPE}),
}  # fmt: skip


@functools.cache
def _folder(case: str):
    arch, kwargs = CASES[case]
    return model_folder(arch, **kwargs)


@functools.cache
def _reference(folder) -> gguf.GGUFReader:
    """The converter's bf16 GGUF, parsed once per session (a 150k-token vocabulary takes seconds)."""
    return gguf.GGUFReader(convert(folder))


def _tensor_mismatches(folder, model=None) -> list[str]:
    ref = _reference(folder)
    source = open_source(folder if model is None else model)
    ours = architecture_for(source).tensors(source)
    problems = []
    ref_names, our_names = [t.name for t in ref.tensors], [t.name for t in ours]
    if ref_names != our_names:
        return [f"tensor order: converter {ref_names}, ours {our_names}"]
    for r, t in zip(ref.tensors, ours):
        shape = tuple(int(n) for n in reversed(r.shape))  # the reader lists ggml's reversed dims
        if shape != t.shape:
            problems.append(f"{t.name}: shape {shape} != {t.shape}")
            continue
        values = t.load()
        if values.dtype != torch.float32 or tuple(values.shape) != t.shape:
            problems.append(f"{t.name}: loaded {values.dtype} {tuple(values.shape)}")
            continue
        ref_bytes = np.asarray(r.data).tobytes()
        if r.tensor_type == gguf.GGMLQuantizationType.F32:
            ours_bytes, kind = values.numpy().tobytes(), "F32"
            if not t.keep_f32:
                problems.append(f"{t.name}: the converter keeps it F32, keep_f32 is False")
        elif r.tensor_type == gguf.GGMLQuantizationType.BF16:
            ours_bytes, kind = np.asarray(quantize(values.numpy(), "bf16")).tobytes(), "BF16"
            if t.keep_f32:
                problems.append(f"{t.name}: the converter writes BF16, keep_f32 is True")
        else:
            problems.append(f"{t.name}: unexpected converter type {r.tensor_type.name}")
            continue
        if ours_bytes != ref_bytes:
            problems.append(f"{t.name}: {kind} data differs")
    return problems


def _kv_mismatches(folder, model=None) -> list[str]:
    ref = _reference(folder)
    source = open_source(folder if model is None else model)
    ours = architecture_for(source).metadata(source)
    ref_kvs = [(k, f) for k, f in ref.fields.items() if not k.startswith(("GGUF.", "tokenizer."))]
    if [k for k, _ in ref_kvs] != [k for k, _, _ in ours]:
        return [f"keys: converter {[k for k, _ in ref_kvs]}, ours {[k for k, _, _ in ours]}"]
    problems = []
    for (key, field), (_, value, vtype) in zip(ref_kvs, ours):
        if field.types[0] != vtype:
            problems.append(f"{key}: type {gguf.GGUFValueType(field.types[0]).name} != {vtype.name}")
        expected = field.contents()
        if vtype == gguf.GGUFValueType.FLOAT32:
            same = np.float32(expected).tobytes() == np.float32(value).tobytes()
        else:
            same = expected == value
        if not same:
            problems.append(f"{key}: {expected!r} != {value!r}")
    return problems


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensors_match_converter(case):
    """Names, order, shapes, keep_f32 and data of every tensor, as convert_hf_to_gguf.py writes them."""
    assert _tensor_mismatches(_folder(case)) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_matches_converter(case):
    """Every non-tokenizer KV: key order, GGUF type, value (general.name and size label included)."""
    assert _kv_mismatches(_folder(case)) == []


@pytest.mark.parametrize("case", ["llama-tied-bias", "mixtral"])
def test_in_memory_model_matches_converter_of_its_folder(case):
    """A loaded model exports what the converter makes of the folder it came from (tied
    embeddings left out, transformers 5's fused in-memory experts split and stacked again)."""
    from transformers import AutoModelForCausalLM

    folder = _folder(case)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    assert _tensor_mismatches(folder, model) == []
    assert _kv_mismatches(folder, model) == []


def test_model_without_folder_is_named_after_its_architecture():
    """No folder to read a model card from: general.name falls back to the model's name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    source = open_source(LlamaForCausalLM(config))
    kvs = {k: v for k, v, _ in architecture_for(source).metadata(source)}
    assert kvs["general.name"] == "LlamaForCausalLM"
    assert kvs["general.size_label"] == "13K"  # 13,408 parameters
    assert kvs["llama.block_count"] == 1


def test_every_architecture_has_a_case():
    """A new table entry is not done until the converter comparison covers it."""
    covered = {arch for arch, _ in CASES.values()}
    supported = {hf for a in ARCHITECTURES for hf in a.hf_names}
    assert supported == covered


@pytest.mark.parametrize("case", ["llama", "mixtral", "qwen3moe", "gemma3"])
def test_hparams_are_the_written_kvs(case):
    """hparams() (what plan.py reads) states what the converter's GGUF says."""
    folder = _folder(case)
    source = open_source(folder)
    arch = architecture_for(source)
    fields = _reference(folder).fields
    prefix = arch.name

    def kv(key, default=None):
        return fields[f"{prefix}.{key}"].contents() if f"{prefix}.{key}" in fields else default

    n_head = kv("attention.head_count")
    expected = ModelHParams(
        arch.name, kv("block_count"), n_head, kv("attention.head_count_kv", n_head), kv("expert_count", 0)
    )
    assert arch.hparams(source) == expected


def test_file_type_hook_keeps_the_converter_position():
    """metadata(file_type=) writes general.file_type where the converter writes it."""
    source = open_source(_folder("llama"))
    arch = architecture_for(source)
    bf16 = arch.metadata(source)
    q4_k_m = arch.metadata(source, file_type=15)
    assert [k for k, _, _ in bf16] == [k for k, _, _ in q4_k_m]
    changed = [(a, b) for a, b in zip(bf16, q4_k_m) if a != b]
    assert changed == [
        (("general.file_type", 32, gguf.GGUFValueType.UINT32), ("general.file_type", 15, gguf.GGUFValueType.UINT32))
    ]


def _fuse_qwen_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-MoE experts as some checkpoints store them: mlp.experts.{gate_up_proj,down_proj}, 3-D."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    layers = sorted({int(k.split(".")[2]) for k in tensors if ".mlp.experts." in k})
    for i in layers:
        n = len(
            {k for k in tensors if k.startswith(f"model.layers.{i}.mlp.experts.") and k.endswith("down_proj.weight")}
        )

        def stack(proj, i=i, n=n):
            return torch.stack([tensors[f"model.layers.{i}.mlp.experts.{x}.{proj}.weight"] for x in range(n)])

        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = stack("down_proj")
    return out


def test_fused_qwen_experts_match_converter():
    """3-D gate_up_proj is split into ffn_gate_exps/ffn_up_exps, as the converter splits it."""
    folder = edited_folder(_folder("qwen3moe"), "fused-experts", _fuse_qwen_experts)
    assert _tensor_mismatches(folder) == []


def test_rotary_inv_freq_is_skipped_as_the_converter_skips_it():
    """Old checkpoints carry rotary_emb.inv_freq buffers; the converter drops them, so do we."""

    def add_inv_freq(tensors):
        return {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32, dtype=torch.float32)}

    folder = edited_folder(_folder("llama"), "inv-freq", add_inv_freq)
    assert _tensor_mismatches(folder) == []
    assert _kv_mismatches(folder) == []


def test_unexpected_tensor_is_named(tmp_path):
    """A tensor with no GGUF name (here a LoRA leftover) raises, naming it, never silently dropped."""
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    folder = edited_folder(
        _folder("llama"), "lora-leftover", lambda t: {**t, name: torch.zeros(8, 256, dtype=torch.bfloat16)}
    )
    source = open_source(folder)
    with pytest.raises(UnexpectedTensorError, match=f"tensor '{name}' has no place in a GGUF llama model"):
        architecture_for(source).tensors(source)


def test_incomplete_experts_are_named():
    """A layer missing one expert's weights raises instead of writing a short expert tensor."""
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    folder = edited_folder(_folder("mixtral"), "missing-expert", lambda t: {k: v for k, v in t.items() if k != gone})
    source = open_source(folder)
    with pytest.raises(UnexpectedTensorError, match=r"incomplete MoE experts: model\.layers\.1\.block_sparse_moe"):
        architecture_for(source).tensors(source)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    """GPT-2 is not in the table: the error says so and lists what is."""
    import json
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(_folder("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    source = open_source(folder)
    supported = ", ".join(sorted(hf for a in ARCHITECTURES for hf in a.hf_names))
    with pytest.raises(UnsupportedArchitectureError) as err:
        architecture_for(source)
    assert str(err.value) == f"GGUF export does not support GPT2LMHeadModel yet; supported architectures: {supported}"
    assert isinstance(err.value, (LLMDeployError, ValueError))
