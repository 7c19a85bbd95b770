"""requantize against llama.cpp's own llama_model_quantize on the same source file.

- from a BF16 GGUF (llmdeploy's or llama.cpp's converter's), every file type is byte-identical,
  the whole file, to llama_model_quantize's, and to llmdeploy's direct export of the same weights;
- Q8_0 sources are requantized freely, sources below Q8_0 only with allow_requantize (then the
  bytes equal llama_model_quantize with allow_requantize, and llama.cpp runs the file);
- split sources, output names, existing outputs, the source itself as output, NaN weights,
  non-GGUF input: clear errors and no partial output.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from llmdeploy.errors import (
    GGUFReadError,
    InvalidOptionError,
    NonFiniteValueError,
    OutputExistsError,
    QuantizedCheckpointError,
    UnsupportedQuantTypeError,
)
from llmdeploy.gguf.export import save_pretrained_gguf
from llmdeploy.gguf.reader import open_gguf
from llmdeploy.gguf.requant import _default_stem, requantize
from llmdeploy.gguf.writer import GGUFFileWriter

from .. import llamacpp, models

llama_cpp = pytest.importorskip("llama_cpp")

FILE_TYPES = ("q4_k_m", "q8_0", "q6_k")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A tiny Llama exported by llmdeploy to bf16 and every file type compared here, in one pass."""
    names = ("bf16", *FILE_TYPES)
    out = tmp_path_factory.mktemp("exported")
    paths = save_pretrained_gguf(models.model_folder("LlamaForCausalLM"), out, quantization=names, progress=False)
    return dict(zip(names, paths))


def llama_quantize_requant(source: pathlib.Path, ftype: str) -> pathlib.Path:
    """llama_model_quantize(source, ftype) with allow_requantize, cached like llamacpp.quantize."""
    stat = source.stat()
    key = llamacpp._key(source.name, stat.st_size, stat.st_mtime_ns)
    path = source.parent / f"{source.stem}-requant-{ftype}-{key}.gguf"
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {llamacpp.FTYPES[ftype]}\n"
        "p.nthread = 2\n"
        "p.allow_requantize = True\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )

    def run(target: pathlib.Path) -> None:
        subprocess.run([sys.executable, "-c", code, str(source), str(target)], check=True, capture_output=True)

    return llamacpp.build_once(path, run)


def assert_same_file(ours: pathlib.Path, theirs: pathlib.Path) -> None:
    """Byte-identical files; on a difference, name the first KV or tensor that differs."""
    if ours.read_bytes() == theirs.read_bytes():
        return
    with open_gguf(ours) as a, open_gguf(theirs) as b:
        assert [(e.key, e.type, e.sub_type) for e in a.metadata] == [(e.key, e.type, e.sub_type) for e in b.metadata]
        for ea, eb in zip(a.metadata, b.metadata):
            same = np.array_equal(ea.value, eb.value) if isinstance(ea.value, np.ndarray) else ea.value == eb.value
            assert same, f"KV {ea.key} differs"
        assert [(t.name, t.shape, t.type) for t in a.tensors] == [(t.name, t.shape, t.type) for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors):
            assert np.array_equal(a.raw_rows(ta).copy(), b.raw_rows(tb)), f"tensor {ta.name} differs"
    pytest.fail(f"{ours} and {theirs} differ outside their KVs and tensor data (layout or padding)")


def test_bf16_source_matches_llama_cpp_and_the_direct_export(exported: dict, tmp_path: pathlib.Path) -> None:
    paths = requantize(exported["bf16"], tmp_path, quantization=list(FILE_TYPES), progress=False)
    for ftype, path in zip(FILE_TYPES, paths):
        assert path.name == f"{exported['bf16'].name.removesuffix('-BF16.gguf')}-{ftype.upper()}.gguf"
        assert_same_file(path, llamacpp.quantize(exported["bf16"], ftype))
        assert_same_file(path, exported[ftype])


@pytest.mark.parametrize(
    ("arch", "tokenizer", "ftype"),
    [
        ("LlamaForCausalLM", "tiny-spm", "q3_k_m"),  # the converter's tensor order and KVs
        ("Gemma3ForCausalLM", "tiny-spm", "q4_k_m"),  # tied embeddings: token_embd follows output's rule
        ("Qwen3MoeForCausalLM", "qwen2", "q4_k_m"),  # 3-D expert tensors, MoE layer rules
        ("Qwen3MoeForCausalLM", "qwen2", "iq4_xs"),
    ],
)
def test_converter_source_matches_llama_cpp(arch: str, tokenizer: str, ftype: str, tmp_path: pathlib.Path) -> None:
    converted = llamacpp.convert(models.model_folder(arch, tokenizer=tokenizer), "bf16")
    (path,) = requantize(converted, tmp_path, quantization=ftype, progress=False)
    assert_same_file(path, llamacpp.quantize(converted, ftype))


def test_q8_0_source_is_requantized_without_the_option(exported: dict, tmp_path: pathlib.Path) -> None:
    paths = requantize(exported["q8_0"], tmp_path, quantization=["q4_k_m", "bf16"], progress=False)
    for ftype, path in zip(["q4_k_m", "bf16"], paths):
        assert_same_file(path, llama_quantize_requant(exported["q8_0"], ftype))


def test_source_below_q8_0_needs_allow_requantize(exported: dict, tmp_path: pathlib.Path) -> None:
    source = exported["q4_k_m"]
    with pytest.raises(QuantizedCheckpointError) as info:
        requantize(source, tmp_path / "out", quantization="q4_0", progress=False)
    message = str(info.value)
    assert str(source) in message and "Q4_K" in message and "Q6_K" in message
    assert "allow_requantize=True" in message and "--allow-requantize" in message
    assert "re-export from the HF model" in message
    assert not (tmp_path / "out").exists()

    (path,) = requantize(source, tmp_path / "out", quantization="q4_0", allow_requantize=True, progress=False)
    assert_same_file(path, llama_quantize_requant(source, "q4_0"))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval([1, 5, 17, 42, 99])
        assert np.isfinite(np.asarray(llm.scores[:5])).all()
    finally:
        llm.close()


def test_split_source_is_read_whole(exported: dict, tmp_path: pathlib.Path) -> None:
    folder = models.model_folder("LlamaForCausalLM")
    size = exported["bf16"].stat().st_size
    parts = save_pretrained_gguf(
        folder, tmp_path / "split", quantization="bf16", max_file_size=size // 3, progress=False
    )
    assert len(parts) >= 3
    (path,) = requantize(parts[0], tmp_path / "out", quantization="q4_k_m", progress=False)
    assert path.name == f"{exported['bf16'].name.removesuffix('-BF16.gguf')}-Q4_K_M.gguf"
    assert_same_file(path, exported["q4_k_m"])
    (from_second,) = requantize(parts[1], tmp_path / "out2", quantization="q4_k_m", progress=False)  # any part will do
    assert from_second.name == path.name
    assert_same_file(from_second, exported["q4_k_m"])


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("model-BF16.gguf", "model"),
        ("llama-2-7b.Q4_K_M.gguf", "llama-2-7b"),
        ("model-q8_0-00001-of-00003.gguf", "model"),
        ("gemma-3-270m-it-UD-Q4_K_XL.gguf", "gemma-3-270m-it"),
        ("qwen2.5-0.5b-instruct-iq4_xs.gguf", "qwen2.5-0.5b-instruct"),
        ("phi-3-mini.gguf", "phi-3-mini"),
        ("Q8_0.gguf", "Q8_0"),
    ],
)
def test_default_output_name_drops_the_old_file_type(name: str, stem: str) -> None:
    assert _default_stem(pathlib.Path(name)) == stem


def test_model_name_and_existing_outputs(exported: dict, tmp_path: pathlib.Path) -> None:
    (path,) = requantize(exported["bf16"], tmp_path, quantization="Q8_0", model_name="mine", progress=False)
    assert path == tmp_path / "mine-Q8_0.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match=r"mine-Q8_0.gguf exists; pass overwrite=True"):
        requantize(exported["bf16"], tmp_path, quantization=["q4_k_m", "q8_0"], model_name="mine", progress=False)
    assert path.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine-Q8_0.gguf"]  # q4_k_m not written either
    requantize(exported["bf16"], tmp_path, quantization="q8_0", model_name="mine", overwrite=True, progress=False)
    assert_same_file(path, exported["q8_0"])


def test_refuses_to_write_over_its_source(exported: dict, tmp_path: pathlib.Path) -> None:
    source = tmp_path / "m-Q8_0.gguf"
    source.write_bytes(exported["q8_0"].read_bytes())
    with pytest.raises(InvalidOptionError, match=r"m-Q8_0.gguf is the source file itself"):
        requantize(source, tmp_path, quantization="q8_0", overwrite=True, progress=False)
    assert source.read_bytes() == exported["q8_0"].read_bytes()


def test_bad_options_and_input_fail_before_output(exported: dict, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UnsupportedQuantTypeError, match="Unknown GGUF file type 'q9_k'"):
        requantize(exported["bf16"], out, quantization="q9_k", progress=False)
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GGUFReadError, match=r"model.safetensors is not a GGUF file"):
        requantize(not_gguf, out, progress=False)
    big = tmp_path / "big.gguf"  # a big-endian GGUF (gguf-py writes them on request; llama.cpp loads none): empty
    big.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))  # version 3, no tensors, no KVs
    with pytest.raises(GGUFReadError, match=r"big.gguf is a big-endian GGUF: .*`gguf-convert-endian "):
        requantize(big, out, progress=False)
    assert not out.exists()


def test_nan_weight_names_the_tensor_and_leaves_no_file(exported: dict, tmp_path: pathlib.Path) -> None:
    source = tmp_path / "nan-BF16.gguf"
    target = "blk.1.ffn_down.weight"
    with open_gguf(exported["bf16"]) as f, GGUFFileWriter(source) as w:
        for e in f.metadata:
            w.add_metadata(e.key, e.value, e.type, sub_type=e.sub_type)
        for t in f.tensors:
            w.add_tensor(t.name, t.shape, t.type, t.nbytes)
        for t in f.tensors:
            data = f.raw_rows(t).copy()
            if t.name == target:
                assert t.type == Q.BF16
                data.view(np.uint16)[3, 7] = 0x7FC0  # a bfloat16 NaN in row 3
            w.write_tensor(t.name, data)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteValueError, match=rf"Tensor '{target}' \(rows 0 to \d+\)"):
        requantize(source, out, quantization=["q8_0", "q4_k_m"], progress=False)
    assert list(out.iterdir()) == []  # no output, no temporary file
