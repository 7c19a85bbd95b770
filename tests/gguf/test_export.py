"""save_pretrained_gguf end to end, judged by llama.cpp and transformers.

- byte-identical tensor data (and the same names, types and KVs) as llama.cpp's
  ``convert_hf_to_gguf.py --outtype bf16`` + ``llama_model_quantize``;
- llama.cpp loads every file and its logits match transformers' for the same weights;
- transformers' GGUF loader reads our files back to the original weights;
- bad input fails before any output, and nothing partial is left behind.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType

from llmdeploy import errors
from llmdeploy.gguf import export
from llmdeploy.gguf.export import save_pretrained_gguf
from llmdeploy.gguf.plan import FILE_TYPES
from llmdeploy.quants import dequantize

from .. import llamacpp, models

llama_cpp = pytest.importorskip("llama_cpp")

ARCHS = models.ARCHITECTURES
# Compared with llama.cpp for every architecture; all file types are compared on Llama.
ARCH_FILE_TYPES = ("bf16", "q8_0", "q4_k_m")


def _folder(arch: str) -> pathlib.Path:
    # llama.cpp converts Qwen3-MoE with a BPE vocabulary only: give it Qwen's real one.
    return models.model_folder(arch, tokenizer="qwen2" if arch == "Qwen3MoeForCausalLM" else "tiny-spm")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, pathlib.Path]]:
    """Each architecture exported once to f32, f16 and ARCH_FILE_TYPES in one pass."""
    out: dict[str, dict[str, pathlib.Path]] = {}
    for arch in ARCHS:
        names = ("f32", "f16", *ARCH_FILE_TYPES)
        paths = save_pretrained_gguf(_folder(arch), tmp_path_factory.mktemp(arch), quantization=names, progress=False)
        out[arch] = dict(zip(names, paths))
    return out


def _fields(reader: GGUFReader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def assert_same_as_llama_cpp(ours: pathlib.Path, theirs: pathlib.Path) -> None:
    a, b = GGUFReader(ours), GGUFReader(theirs)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type, f"{ta.name}: {ta.tensor_type.name} != {tb.tensor_type.name}"
        assert list(ta.shape) == list(tb.shape), ta.name
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)), ta.name
    fa, fb = _fields(a), _fields(b)
    # Deviation 2: where the converter wrote LlamaHfVocab's flat scores, our rebuilt vocabulary may add
    # add_bos_token=False (its post-processor adds nothing; llama.cpp's default would).
    rebuilt = set(fb.get("tokenizer.ggml.scores") or [0.0]) == {-1000.0}
    extra = [key for key in fa if key not in fb]
    assert extra == (["tokenizer.ggml.add_bos_token"] if rebuilt and extra else []), extra
    if extra:
        assert fa["tokenizer.ggml.add_bos_token"] is False
    assert [key for key in fa if key not in extra] == list(fb)
    for key in fb:
        if key not in _TOKEN_ARRAYS:
            assert fa[key] == fb[key], key
    _assert_token_deviations(fa, fb, rebuilt)


# The tokenizer KVs llmdeploy writes differently from llama.cpp's converter on purpose: deviations 1-3 of
# llmdeploy/gguf/tokenizer.py's docstring (4 is where the converter writes no file), each checked against
# llama.cpp's tokenization by tests/gguf/test_tokenizer.py. Nothing else may differ.
_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def _assert_token_deviations(fa: dict[str, Any], fb: dict[str, Any], rebuilt: bool) -> None:
    if "tokenizer.ggml.scores" not in fb:  # BPE: no deviation
        assert all(fa.get(key) == fb.get(key) for key in _TOKEN_ARRAYS)
        return
    tokens, scores, types = (fa[key] for key in _TOKEN_ARRAYS)
    their_tokens, their_scores, their_types = (fb[key] for key in _TOKEN_ARRAYS)
    if rebuilt:  # 2: padded to the embeddings' vocab_size, scores from the merges
        n = len(their_tokens)
        assert tokens[n:] == [f"[PAD{i}]" for i in range(n, len(tokens))]
        assert set(types[n:]) <= {TokenType.UNUSED}
        tokens, scores, types = tokens[:n], their_scores, types[:n]
    assert len(tokens) == len(their_tokens) == len(scores) == len(types)
    for i, token in enumerate(tokens):
        theirs = (their_tokens[i], their_scores[i], their_types[i])
        if (token, scores[i], types[i]) == theirs:
            continue
        spelled = token in (their_tokens[i], their_tokens[i].replace("\u2581", " "))
        user_defined = spelled and types[i] == TokenType.USER_DEFINED
        # 3: an added token (tokenizer.json's added_tokens) typed by the converter's own added-token rule
        added = types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED) and scores[i] == -1000.0
        added = added and (token == their_tokens[i] or user_defined)
        # 1: a SentencePiece user-defined piece, NORMAL for the converter
        piece = user_defined and their_types[i] == TokenType.NORMAL and scores[i] == their_scores[i]
        assert added or piece, f"token {i}: ours {(token, scores[i], types[i])}, llama.cpp's {theirs}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ftype", ARCH_FILE_TYPES)
def test_every_architecture_matches_llama_cpp(exported: dict, arch: str, ftype: str) -> None:
    reference = llamacpp.quantize(llamacpp.convert(_folder(arch), "bf16"), ftype)
    assert_same_as_llama_cpp(exported[arch][ftype], reference)


def test_every_file_type_matches_llama_cpp_in_one_pass(tmp_path: pathlib.Path) -> None:
    folder = _folder("LlamaForCausalLM")
    names = sorted(FILE_TYPES)
    paths = save_pretrained_gguf(folder, tmp_path, quantization=names, progress=False)
    bf16 = llamacpp.convert(folder, "bf16")
    for name, path in zip(names, paths):
        assert path.name.endswith(f"-{name.upper()}.gguf")
        assert_same_as_llama_cpp(path, llamacpp.quantize(bf16, name))


def test_source_is_read_once_for_several_quantizations(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmdeploy import source as source_module

    loads: list[str] = []
    real_open = source_module.open_source

    def counting_open(model: Any) -> Any:
        src = real_open(model)
        real_load = src.load

        def load(name: str) -> torch.Tensor:
            loads.append(name)
            return real_load(name)

        src.load = load  # type: ignore[method-assign]
        return src

    monkeypatch.setattr(export, "open_source", counting_open)
    save_pretrained_gguf(_folder("MistralForCausalLM"), tmp_path, quantization=["q8_0", "q4_k_m", "f16"], progress=False)
    assert loads and len(loads) == len(set(loads)), "a tensor was read twice"


def _logits_llama_cpp(path: pathlib.Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def _logits_transformers(folder: pathlib.Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


# Relative tolerance on logits, max |llama.cpp - transformers| / max |transformers|, with
# the measured worst case over the ten architectures (tiny random models, 12 tokens):
# - f32 (0.0004): the same weights; float32 accumulation order and llama.cpp's f16 KV cache.
# - f16 (0.0005), bf16 (0.004): llama.cpp also rounds the activations to the weight type
#   inside its matmuls (11- and 8-bit mantissas).
# - q8_0 (0.019), q4_k_m (0.15): the weights' quantization error on top, plus activations
#   quantized to Q8 in the dot products; random weights make these worst cases (no outlier
#   structure for the K-quant scales to exploit). The q4_k_m data itself is checked tightly
#   by test_llama_cpp_and_transformers_agree_on_our_quantized_weights.
LOGIT_TOLERANCE = {"f32": 0.002, "f16": 0.002, "bf16": 0.01, "q8_0": 0.04, "q4_k_m": 0.25}


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_logits_match_transformers(exported: dict, arch: str) -> None:
    folder = _folder(arch)
    tokens = [1, 5, 17, 42, 99, 256, 300, 7, 64, 128, 400, 2]
    expected = _logits_transformers(folder, tokens)
    scale = np.abs(expected).max()
    for ftype, tolerance in LOGIT_TOLERANCE.items():
        ours = _logits_llama_cpp(exported[arch][ftype], tokens)
        error = np.abs(ours - expected).max() / scale
        assert error < tolerance, f"{arch} {ftype}: relative logit error {error:.4f} >= {tolerance}"


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"])
def test_llama_cpp_and_transformers_agree_on_our_quantized_weights(exported: dict, arch: str) -> None:
    # transformers' GGUF loader dequantizes our Q4_K_M file (gguf-py); those weights go into
    # the original model (its own config, so no config mapping is involved) and llama.cpp
    # runs the same bytes. Only llama.cpp's Q8 activation quantization and float order
    # separate them, so the tolerance is Q8_0's (above), far tighter than against the
    # unquantized model.
    from transformers import AutoModelForCausalLM

    path = exported[arch]["q4_k_m"]
    dequantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(_folder(arch)), dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    tokens = [1, 5, 17, 42, 99, 256, 300, 7, 64, 128, 400, 2]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    error = np.abs(_logits_llama_cpp(path, tokens) - expected).max() / np.abs(expected).max()
    assert error < LOGIT_TOLERANCE["q8_0"], f"{arch}: relative logit error {error:.4f}"


def test_gguf_reader_reads_every_file_and_nothing_dequantizes_to_nan(exported: dict) -> None:
    for files in exported.values():
        for path in files.values():
            for tensor in GGUFReader(path).tensors:
                values = dequantize(np.asarray(tensor.data).view(np.uint8).reshape(-1), tensor.tensor_type)
                assert np.isfinite(values).all(), f"{path.name}: {tensor.name}"


def test_plan_is_inspectable_before_writing_and_matches_the_file(exported: dict) -> None:
    from llmdeploy import plan_gguf

    (plan,) = plan_gguf(_folder("LlamaForCausalLM"), quantization="Q4_K_M")
    reader = GGUFReader(exported["LlamaForCausalLM"]["q4_k_m"])
    assert [(t.name, t.type) for t in plan.tensors] == [(t.name, t.tensor_type) for t in reader.tensors]
    assert plan.total_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert 4.0 < plan.bits_per_weight < 7.0 and "Q4_K" in plan.table()


# ------------------------------------------------------------------ bad input


def test_existing_output_is_refused_before_any_work(tmp_path: pathlib.Path) -> None:
    folder = _folder("LlamaForCausalLM")
    (path,) = save_pretrained_gguf(folder, tmp_path, quantization="q8_0", progress=False)
    before = path.read_bytes()
    with pytest.raises(errors.OutputExistsError, match="overwrite=True"):
        save_pretrained_gguf(folder, tmp_path, quantization=["q4_k_m", "q8_0"], progress=False)
    assert path.read_bytes() == before
    assert not (tmp_path / path.name.replace("Q8_0", "Q4_K_M")).exists()
    save_pretrained_gguf(folder, tmp_path, quantization="q8_0", overwrite=True, progress=False)


def test_existing_split_parts_are_refused_before_any_work(tmp_path: pathlib.Path) -> None:
    folder = _folder("LlamaForCausalLM")
    parts = save_pretrained_gguf(folder, tmp_path, quantization="f32", max_file_size=1_000_000, progress=False)
    assert len(parts) > 1
    for max_size in (1_000_000, None):  # split again, or not: an earlier split export is in the way either way
        with pytest.raises(errors.OutputExistsError, match=f"{parts[0].name} exists; pass overwrite=True"):
            save_pretrained_gguf(folder, tmp_path, quantization="f32", max_file_size=max_size, progress=False)


def test_nan_weight_names_the_tensor_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(_folder("LlamaForCausalLM")), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = float("nan")
    with pytest.raises(errors.NonFiniteValueError, match=r"blk\.1\.ffn_down\.weight.*1 NaN"):
        save_pretrained_gguf(model, tmp_path / "out", quantization=["q8_0", "f16"], progress=False)
    assert not list((tmp_path / "out").glob("*")), "partial output left behind"


def test_unknown_quantization_lists_valid_names(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.UnsupportedQuantTypeError, match="q4_k_m"):
        save_pretrained_gguf(_folder("LlamaForCausalLM"), tmp_path, quantization="q4_k_x", progress=False)
    assert not list(tmp_path.iterdir())


def test_split_output_loads_in_llama_cpp(tmp_path: pathlib.Path, exported: dict) -> None:
    folder = _folder("LlamaForCausalLM")
    whole = exported["LlamaForCausalLM"]["q8_0"]
    parts = save_pretrained_gguf(folder, tmp_path, quantization="q8_0", max_file_size=whole.stat().st_size // 3, progress=False)
    assert len(parts) >= 3 and parts[0].name.endswith("-00001-of-%05d.gguf" % len(parts))
    tokens = [1, 5, 17, 42]
    np.testing.assert_array_equal(_logits_llama_cpp(parts[0], tokens), _logits_llama_cpp(whole, tokens))


def test_in_memory_model_exports_like_its_folder(tmp_path: pathlib.Path, exported: dict) -> None:
    from transformers import AutoModelForCausalLM

    folder = _folder("Qwen2ForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    (path,) = save_pretrained_gguf(model, tmp_path, quantization="q4_k_m", model_name=folder.name, progress=False)
    a, b = GGUFReader(path), GGUFReader(exported["Qwen2ForCausalLM"]["q4_k_m"])
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


# ------------------------------------------------------------------ transformers reads our files back

# transformers' GGUF loader supports these GGUF architectures (not gemma v1, not llama-MoE).
# Phi3 is left out: the loader keeps Phi3Config's default pad_token_id (32000), which needs
# a vocabulary of 32001+ tokens; the tiny test model has 512 (a transformers limitation).
TRANSFORMERS_READS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM")  # fmt: skip
# Largest |difference| allowed, relative to the weight's max |value|, per file type: F32
# holds the bf16 values exactly; F16 rounds values below its normal range (< 6.1e-5,
# i.e. <= 2**-24 absolute); Q8_0 rounds to 1/127 of each block's max |x| (half a step).
READBACK_TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 1 / 127}


@pytest.mark.parametrize("arch", TRANSFORMERS_READS)
def test_transformers_reads_our_files_back(exported: dict, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(_folder(arch)), dtype=torch.float32).state_dict()
    for ftype, tolerance in READBACK_TOLERANCE.items():
        path = exported[arch][ftype]
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        state = loaded.state_dict()
        for name, want in original.items():
            got = state[name]
            limit = tolerance * float(want.abs().max())
            assert float((got - want).abs().max()) <= limit, f"{arch} {ftype} {name}"
