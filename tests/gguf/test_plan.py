"""llmdeploy.gguf.plan against llama-quantize itself.

For tiny real models of several architectures, llama.cpp's converter writes the bf16
GGUF, ``llama_model_quantize`` turns it into every file type, and the plan built from
the bf16 file's tensors and KVs must give every tensor the same type, size and
position, and the same ``general.file_type``.  Hand-written bf16 GGUFs cover what the
converted models cannot reach cheaply (Falcon, shared experts, 70B detection).
"""

from __future__ import annotations

import functools
import pathlib
import random

import gguf
import numpy as np
import pytest

from llmdeploy.errors import UnexpectedTensorError, UnsupportedQuantTypeError
from llmdeploy.gguf.plan import (
    FILE_TYPES,
    QUANTIZATION_VERSION,
    ModelHParams,
    PlanInput,
    file_type,
    llama_quantize_order,
    plan_quantization,
    tensor_nbytes,
)

from .. import llamacpp, models

_T = gguf.GGMLQuantizationType

# Each model exercises some of llama-quantize's rules (see the comments).
MODELS = {
    # GQA 4 (q2_k/iq4 attn_v bumps), 16 layers: use_more_bits, n/8 and n/16 layer rules.
    "llama-gqa4": ("LlamaForCausalLM", {"num_hidden_layers": 16, "num_attention_heads": 8, "num_key_value_heads": 2}),
    # 80 layers with GQA: llama.cpp types it LLM_TYPE_70B (attn_v Q3_K/Q4_K -> Q5_K).
    # Thin heads and FFN keep it small; ffn_down rows of 32 take 32-block fallbacks.
    "llama-70b-shape": (
        "LlamaForCausalLM",
        {"num_hidden_layers": 80, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
         "intermediate_size": 32},
    ),  # fmt: skip
    # Tied embeddings (token_embd follows output's rules), GQA 2; ffn_down rows of 336,
    # not a multiple of 32: F16 even for 32-block types.
    "qwen2-tied": ("Qwen2ForCausalLM", {"num_hidden_layers": 8, "intermediate_size": 336}),
    # Gemma 3 270M's row width 640: most K-quant tensors fall back (Q4_K -> Q5_0 ...).
    "gemma3-640": ("Gemma3ForCausalLM", {"hidden_size": 640, "num_hidden_layers": 8, "num_key_value_heads": 1}),
    # Fused attn_qkv (counted with attn_v) and fused gate_up.  Phi3's converter needs
    # config vocab_size >= the SentencePiece vocab.
    "phi3-qkv": ("Phi3ForCausalLM", {"num_hidden_layers": 8, "vocab_size": 640}),
    # 8 experts: attn_v/attn_k -> Q8_0, attn_output -> Q5_K; ffn_down layer from the name.
    "mixtral-8x": ("MixtralForCausalLM", {"num_local_experts": 8, "num_hidden_layers": 8, "intermediate_size": 256}),
    # 4 experts: MoE tensors, but none of the 8-expert rules.
    "mixtral-4x": ("MixtralForCausalLM", {"num_local_experts": 4, "num_hidden_layers": 8, "intermediate_size": 128}),
}


@functools.cache
def _bf16_gguf(model: str) -> pathlib.Path:
    arch, overrides = MODELS[model]
    return llamacpp.convert(models.model_folder(arch, **overrides), "bf16")


@functools.cache
def _reader(path: pathlib.Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _hparams(reader: gguf.GGUFReader) -> ModelHParams:
    """ModelHParams from a GGUF's KVs, as llama.cpp's loader reads them."""

    def kv(key: str, default: object = None) -> object:
        field = reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        return value[0] if isinstance(value, list) else value  # per-layer arrays: layer 0

    arch = str(kv(gguf.Keys.General.ARCHITECTURE))
    n_head = int(kv(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)))
    return ModelHParams(
        arch=arch,
        n_layer=int(kv(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))),
        n_head=n_head,
        n_head_kv=int(kv(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)),
        n_expert=int(kv(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch), 0)),
    )


def _inputs(reader: gguf.GGUFReader) -> list[PlanInput]:
    return [PlanInput(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors]


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_plan_matches_llama_quantize(model: str, ftype: str) -> None:
    """Every tensor's type, size and position, and general.file_type, as llama-quantize writes them."""
    source = _bf16_gguf(model)
    bf16 = _reader(source)
    out = _reader(llamacpp.quantize(source, ftype))
    plan = plan_quantization(_inputs(bf16), ftype, _hparams(bf16))

    got = [(t.name, t.tensor_type.name, int(t.n_bytes)) for t in out.tensors]
    want = [(t.name, t.type.name, t.nbytes) for t in plan.tensors]
    assert got == want

    # nbytes is the tensor's whole data span in the file (plus padding to 32 bytes).
    offsets = [int(t.data_offset) for t in out.tensors] + [len(out.data)]
    for t, start, end in zip(plan.tensors, offsets, offsets[1:]):
        assert end - start == -(-t.nbytes // 32) * 32, t.name

    # llama-quantize re-appends the two KVs at the end, in this order.
    fields = list(out.fields.values())[-2:]
    assert [(f.name, f.contents(), f.types) for f in fields] == [
        (key, value, [vtype]) for key, value, vtype in plan.metadata()
    ]
    assert plan.llama_ftype == llamacpp.FTYPES[ftype]
    assert plan.total_bytes == sum(int(t.n_bytes) for t in out.tensors)
    assert plan.n_params == sum(int(t.n_elements) for t in bf16.tensors)


# Hand-written bf16 GGUFs (zeros, a few rows per tensor) for rules the converted models
# cannot reach cheaply.  llama-quantize reads only KVs, names and shapes to choose types,
# so the shapes need not make a working model.
def _blocks(
    n_layer: int, names: dict[str, tuple[int, ...]], skip: frozenset[tuple[int, str]] = frozenset()
) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"blk.{i}.{n}", s) for i in range(n_layer) for n, s in names.items() if (i, n) not in skip]


_DENSE = {"attn_norm.weight": (256,), "attn_q.weight": (8, 256), "attn_k.weight": (8, 256), "attn_v.weight": (8, 256),
          "attn_output.weight": (8, 256), "ffn_up.weight": (8, 256), "ffn_down.weight": (8, 256)}  # fmt: skip
_MOE_SHEXP = {
    **_DENSE, "ffn_gate_inp.weight": (4, 256), "ffn_gate_inp_shexp.weight": (1, 256), "ffn_up_exps.weight": (4, 8, 256),
    "ffn_down_exps.weight": (4, 8, 256), "ffn_up_shexp.weight": (8, 256), "ffn_down_shexp.weight": (8, 256),
}  # fmt: skip
_HEAD = [("token_embd.weight", (16, 256)), ("output_norm.weight", (256,)), ("output.weight", (16, 256))]

SYNTHETIC = {
    # Falcon's own rules: output Q8_0, ffn_down and attn_output variants; fused attn_qkv.
    "falcon": ("falcon", {"n_layer": 16, "n_head": 8, "n_head_kv": 1}, _HEAD + _blocks(16, {
        "attn_norm.weight": (256,), "attn_qkv.weight": (8, 256), "attn_output.weight": (8, 256),
        "ffn_up.weight": (8, 256), "ffn_down.weight": (8, 256)})),  # fmt: skip
    # Shared experts: two ffn_down tensors per layer, so the MoE rule must read the layer
    # from the name, not count.  Router tensors stay F32.
    "qwen2moe-shexp": (
        "qwen2moe", {"n_layer": 16, "n_head": 4, "n_head_kv": 4, "n_expert": 4}, _HEAD + _blocks(16, _MOE_SHEXP),
    ),
    "qwen2moe-shexp-8x": (
        "qwen2moe", {"n_layer": 16, "n_head": 4, "n_head_kv": 4, "n_expert": 8}, _HEAD + _blocks(16, _MOE_SHEXP),
    ),
    # Dense layers without ffn_down: the dense rule counts tensors, it does not read the layer.
    "llama-sparse-ffn": (
        "llama", {"n_layer": 16, "n_head": 4, "n_head_kv": 4},
        _HEAD + _blocks(16, _DENSE, frozenset((i, "ffn_down.weight") for i in range(0, 16, 3))),
    ),
    # LLM_TYPE_70B per architecture: qwen2 at 80 layers even without GQA; llama only with GQA.
    "qwen2-80": ("qwen2", {"n_layer": 80, "n_head": 4, "n_head_kv": 4}, _HEAD[:2] + _blocks(80, _DENSE)),
    "llama-80-mha": ("llama", {"n_layer": 80, "n_head": 4, "n_head_kv": 4}, _HEAD + _blocks(80, _DENSE)),
}


@functools.cache
def _synthetic_gguf(model: str) -> pathlib.Path:
    arch, hp, tensors = SYNTHETIC[model]
    path = llamacpp.cache_dir() / "plan-synthetic" / f"{model}-{llamacpp._key(SYNTHETIC[model])}.gguf"

    def build(target: pathlib.Path) -> None:
        w = gguf.GGUFWriter(str(target), arch)
        w.add_context_length(1024)
        w.add_embedding_length(256)
        w.add_feed_forward_length(256)
        w.add_block_count(hp["n_layer"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_head_kv"])
        w.add_layer_norm_eps(1e-5)
        w.add_layer_norm_rms_eps(1e-5)
        if hp.get("n_expert"):
            w.add_expert_count(hp["n_expert"])
            w.add_expert_used_count(2)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
        for name, shape in tensors:
            if len(shape) == 1 or "ffn_gate_inp" in name:  # what the converter keeps in F32
                w.add_tensor(name, np.zeros(shape, np.float32))
            else:
                w.add_tensor(name, np.zeros(shape, np.uint16), raw_dtype=_T.BF16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return llamacpp.build_once(path, build)


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
@pytest.mark.parametrize("model", list(SYNTHETIC))
def test_plan_matches_llama_quantize_synthetic(model: str, ftype: str) -> None:
    """Falcon, shared-expert MoE, sparse ffn_down and 70B detection, as llama-quantize decides them."""
    source = _synthetic_gguf(model)
    bf16 = _reader(source)
    out = _reader(llamacpp.quantize(source, ftype))
    plan = plan_quantization(_inputs(bf16), ftype, _hparams(bf16))
    assert [(t.name, t.tensor_type.name, int(t.n_bytes)) for t in out.tensors] == [
        (t.name, t.type.name, t.nbytes) for t in plan.tensors
    ]


def test_models_exercise_the_rules() -> None:
    """Guards the test matrices themselves: the rules the models are there for do fire."""
    types: dict[tuple[str, str, str], set[_T]] = {}
    sources = {**{m: _bf16_gguf(m) for m in MODELS}, **{m: _synthetic_gguf(m) for m in SYNTHETIC}}
    for model, source in sources.items():
        bf16 = _reader(source)
        for ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_m", "q4_0", "iq4_xs"):
            for t in plan_quantization(_inputs(bf16), ftype, _hparams(bf16)).tensors:
                kind = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
                types.setdefault((model, ftype, kind), set()).add(t.type)
    assert types["llama-gqa4", "q4_k_m", "ffn_down.weight"] == {_T.Q4_K, _T.Q6_K}  # use_more_bits
    assert types["llama-gqa4", "q2_k", "attn_v.weight"] == {_T.Q4_K}  # n_gqa >= 4
    assert types["qwen2-tied", "q2_k", "attn_v.weight"] == {_T.Q3_K}  # n_gqa < 4
    assert types["llama-70b-shape", "q3_k_m", "attn_v.weight"] == {_T.Q5_K}  # 70B
    assert types["qwen2-tied", "q4_0", "token_embd.weight"] == {_T.Q6_K}  # tied: output's rule
    assert types["qwen2-tied", "q4_0", "ffn_down.weight"] == {_T.F16}  # rows of 336
    assert types["gemma3-640", "q4_k_m", "attn_q.weight"] == {_T.Q5_0}  # Q4_K fallback
    assert types["gemma3-640", "iq4_xs", "attn_q.weight"] == {_T.IQ4_NL}
    assert types["phi3-qkv", "q4_k_m", "attn_qkv.weight"] == {_T.Q4_K, _T.Q6_K}  # counted as attn_v
    assert types["mixtral-8x", "q4_k_m", "attn_v.weight"] == {_T.Q8_0}
    assert types["mixtral-8x", "q4_k_m", "attn_output.weight"] == {_T.Q5_K}
    assert types["mixtral-4x", "q4_k_m", "attn_output.weight"] == {_T.Q4_K}
    # use_more_bits by the name's layer; rows of 128: Q6_K -> Q8_0, Q4_K -> Q5_0
    assert types["mixtral-4x", "q4_k_m", "ffn_down_exps.weight"] == {_T.Q5_0, _T.Q8_0}
    assert types["falcon", "q4_k_m", "output.weight"] == {_T.Q8_0}
    assert types["falcon", "q4_k_m", "ffn_down.weight"] == {_T.Q4_K, _T.Q5_K, _T.Q6_K}
    assert types["qwen2moe-shexp", "q4_k_m", "ffn_gate_inp.weight"] == {_T.F32}
    assert types["qwen2-80", "q3_k_s", "attn_v.weight"] == {_T.Q5_K}  # qwen2: 70B without GQA
    assert types["llama-80-mha", "q3_k_s", "attn_v.weight"] == {_T.Q3_K}  # llama: 65B


# --- without llama.cpp ---------------------------------------------------------------------


def _toy_model(n_layer: int = 4, *, hidden: int = 256) -> list[PlanInput]:
    tensors = [
        PlanInput("token_embd.weight", (512, hidden), _T.BF16),
        PlanInput("output_norm.weight", (hidden,), _T.F32),
        PlanInput("output.weight", (512, hidden), _T.BF16),
    ]
    for i in range(n_layer):
        for name, shape in [
            ("attn_norm.weight", (hidden,)), ("attn_q.weight", (hidden, hidden)), ("attn_k.weight", (64, hidden)),
            ("attn_v.weight", (64, hidden)), ("attn_output.weight", (hidden, hidden)), ("ffn_norm.weight", (hidden,)),
            ("ffn_gate.weight", (512, hidden)), ("ffn_up.weight", (512, hidden)), ("ffn_down.weight", (hidden, 512)),
        ]:  # fmt: skip
            tensors.append(PlanInput(f"blk.{i}.{name}", shape, _T.F32 if len(shape) == 1 else _T.BF16))
    return tensors


def test_file_types_are_llama_cpp_ftypes() -> None:
    """The names llmdeploy accepts and their llama_ftype values (llama.h)."""
    assert {name: int(ft.llama_ftype) for name, ft in FILE_TYPES.items()} == llamacpp.FTYPES


def test_file_type_lookup_ignores_case() -> None:
    assert file_type("Q4_K_M") is FILE_TYPES["q4_k_m"]
    assert file_type(FILE_TYPES["bf16"]) is FILE_TYPES["bf16"]
    assert plan_quantization(_toy_model(), "IQ4_XS", ModelHParams("llama", 4, 4, 1)).file_type == "iq4_xs"


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("not_quantized", "f16"), ("fast_quantized", "q8_0"), ("Quantized", "q4_k_m"), ("q4_k", "q4_k_m"), ("Q5_K", "q5_k_m")],
)
def test_unsloth_names_are_accepted(alias: str, canonical: str) -> None:
    assert file_type(alias) is FILE_TYPES[canonical]


def test_unknown_file_type_lists_the_valid_ones() -> None:
    with pytest.raises(UnsupportedQuantTypeError) as err:
        file_type("q4_k_xl")
    message = str(err.value)
    assert "'q4_k_xl'" in message and all(name in message for name in FILE_TYPES)
    with pytest.raises(ValueError):
        plan_quantization(_toy_model(), "iq2_xxs", ModelHParams("llama", 4, 4, 1))


def test_order_is_layer_then_name() -> None:
    """llama-quantize's loader order: tensors outside blocks first, then blk.0, blk.1, ..., blk.10."""
    names = ["blk.10.attn_q.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_k.weight", "output.weight"]
    assert llama_quantize_order(names) == [
        "output.weight", "token_embd.weight", "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight",
    ]  # fmt: skip


def test_plan_does_not_depend_on_input_order() -> None:
    """The counters run in llama-quantize's order, whatever order the tensors come in."""
    tensors = _toy_model(16)
    hp = ModelHParams("llama", 16, 4, 1)
    shuffled = list(tensors)
    random.Random(0).shuffle(shuffled)
    for ftype in ("q3_k_m", "q4_k_m", "q5_k_m"):
        assert plan_quantization(shuffled, ftype, hp) == plan_quantization(tensors, ftype, hp)


def test_float_file_types_convert_only_quantizable_tensors() -> None:
    """f32/f16/bf16: every 2-D weight takes the file type; norms keep the converter's F32."""
    for ftype, qtype in (("f32", _T.F32), ("f16", _T.F16), ("bf16", _T.BF16)):
        plan = plan_quantization(_toy_model(2), ftype, ModelHParams("llama", 2, 4, 1))
        for t in plan.tensors:
            assert t.type == (_T.F32 if t.name.endswith("norm.weight") else qtype), t.name


def test_moe_tensor_outside_a_block_is_an_error() -> None:
    """llama-quantize reads the layer of MoE ffn tensors from the name and fails without one."""
    tensors = [*_toy_model(2), PlanInput("ffn_down_exps.weight", (8, 256, 512), _T.BF16)]
    with pytest.raises(UnexpectedTensorError, match="ffn_down_exps"):
        plan_quantization(tensors, "q4_k_m", ModelHParams("llama", 2, 4, 1, n_expert=8))


def test_duplicate_names_are_an_error() -> None:
    tensors = _toy_model(1)
    with pytest.raises(UnexpectedTensorError, match="blk.0.attn_q.weight"):
        plan_quantization([*tensors, tensors[4]], "q8_0", ModelHParams("llama", 1, 4, 1))


def test_sizes_and_summary() -> None:
    plan = plan_quantization(_toy_model(2, hidden=320), "q4_k_m", ModelHParams("llama", 2, 4, 1))
    assert plan.total_bytes == sum(tensor_nbytes(t.shape, t.type) for t in plan.tensors)
    assert plan.bits_per_weight == pytest.approx(8 * plan.total_bytes / plan.n_params)
    assert plan["blk.0.attn_q.weight"].type == _T.Q5_0  # rows of 320: Q4_K -> Q5_0
    # Rows of 320 make Q4_K and Q6_K fall back (output.weight goes to Q8_0 by its own rule).
    fallbacks = [t for t in plan.tensors if t.type in (_T.Q5_0, _T.Q8_0) and t.name != "output.weight"]
    assert plan.n_fallback == len(fallbacks) > 0
    summary = plan.summary()
    assert summary.startswith("Q4_K_M:") and "bits per weight" in summary and "fallback" in summary
    table = plan.table().splitlines()
    assert len(table) == len(plan.tensors) + 2
    assert table[1].split() == ["output.weight", "512x320", "Q8_0", f"{plan['output.weight'].nbytes:,}"]
    assert plan.metadata() == [
        (gguf.Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION, gguf.GGUFValueType.UINT32),
        (gguf.Keys.General.FILE_TYPE, 15, gguf.GGUFValueType.UINT32),
    ]
