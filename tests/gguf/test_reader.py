"""open_gguf against gguf-py's GGUFReader (the oracle for what a GGUF holds) and GGUFFileWriter.

- every KV (key order, value type, element type, value) and tensor (name, shape, type, offset,
  size, bytes) reads as gguf-py reads it, on files of llama.cpp's converter, of llama_model_quantize
  and of llmdeploy;
- the metadata entries written back through GGUFFileWriter give the same file, byte for byte;
- decoded rows equal gguf-py's dequantization; split models read whole from their first part;
- files that are not GGUFs, truncated ones and misnamed parts fail with the file named.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from llmdeploy.errors import GGUFReadError, MissingFileError
from llmdeploy.gguf.export import save_pretrained_gguf
from llmdeploy.gguf.reader import GGUFModelFile, MetadataEntry, open_gguf
from llmdeploy.gguf.writer import GGUFFileWriter

from .. import llamacpp, models


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """GGUFs of a tiny Llama: llama.cpp's converter (bf16) and quantizer (q4_k_m), llmdeploy's f16 and q8_0."""
    folder = models.model_folder("LlamaForCausalLM")
    converted = llamacpp.convert(folder, "bf16")
    ours = save_pretrained_gguf(folder, tmp_path_factory.mktemp("ours"), quantization=["f16", "q8_0"], progress=False)
    return {
        "converter-bf16": converted,
        "llama-quantize-q4_k_m": llamacpp.quantize(converted, "q4_k_m"),
        "llmdeploy-f16": ours[0],
        "llmdeploy-q8_0": ours[1],
    }


def assert_reads_like_gguf_py(path: pathlib.Path) -> None:
    reader = gguf.GGUFReader(path)
    with open_gguf(path) as ours:
        fields = [(key, field) for key, field in reader.fields.items() if not key.startswith("GGUF.")]
        assert [e.key for e in ours.metadata] == [key for key, _ in fields]
        for entry, (key, field) in zip(ours.metadata, fields):
            assert entry.type == field.types[0], key
            if entry.type == V.ARRAY and field.types[1:]:
                assert entry.sub_type == field.types[1], key
            value = entry.value.tolist() if isinstance(entry.value, np.ndarray) else entry.value
            assert value == field.contents(), key
        assert len(ours.tensors) == len(reader.tensors)
        for mine, theirs in zip(ours.tensors, reader.tensors):
            assert mine.name == theirs.name
            assert mine.shape == tuple(reversed(theirs.shape.tolist())), mine.name
            assert (mine.type, mine.offset, mine.nbytes) == (theirs.tensor_type, theirs.data_offset, theirs.n_bytes)
            expected = np.asarray(theirs.data).reshape(-1).view(np.uint8)
            assert np.array_equal(ours.raw_rows(mine).reshape(-1), expected), mine.name


@pytest.mark.parametrize("name", ["converter-bf16", "llama-quantize-q4_k_m", "llmdeploy-f16", "llmdeploy-q8_0"])
def test_reads_every_field_and_tensor_as_gguf_py(files: dict, name: str) -> None:
    assert_reads_like_gguf_py(files[name])


def test_reads_the_real_gemma_3_vocabulary_as_gguf_py() -> None:
    # 262144 tokens with scores and types: the reason open_gguf parses the header itself
    # (gguf-py's reader takes ~9 s over it)
    assert_reads_like_gguf_py(models.gemma3_gguf())


@pytest.mark.parametrize("name", ["converter-bf16", "llama-quantize-q4_k_m"])
def test_metadata_written_back_gives_the_same_file(files: dict, name: str, tmp_path: pathlib.Path) -> None:
    # Each entry carries what GGUFFileWriter needs to write the KV byte for byte (types,
    # element types, string bytes); with the tensors copied in file order the whole file matches.
    source = files[name]
    copy = tmp_path / "copy.gguf"
    with open_gguf(source) as f, GGUFFileWriter(copy) as w:
        for e in f.metadata:
            w.add_metadata(e.key, e.value, e.type, sub_type=e.sub_type)
        for t in f.tensors:
            w.add_tensor(t.name, t.shape, t.type, t.nbytes)
        for t in f.tensors:
            w.write_tensor(t.name, f.raw_rows(t))
    assert copy.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("name", ["converter-bf16", "llama-quantize-q4_k_m", "llmdeploy-f16", "llmdeploy-q8_0"])
def test_float_rows_decode_as_gguf_py(files: dict, name: str) -> None:
    reader = gguf.GGUFReader(files[name])
    with open_gguf(files[name]) as f:
        for t, theirs in zip(f.tensors, reader.tensors):
            expected = gguf.quants.dequantize(theirs.data, theirs.tensor_type).reshape(t.n_rows, t.shape[-1])
            values = f.float_rows(t)
            assert values.dtype == (np.float16 if t.type == Q.F16 else np.float32), t.name
            assert np.array_equal(values.astype(np.float32), expected.astype(np.float32)), t.name
            lo, hi = t.n_rows // 3, t.n_rows // 3 + 2  # a range of rows reads those rows only
            if t.n_rows > 2:
                assert np.array_equal(f.float_rows(t, lo, hi).astype(np.float32), expected[lo:hi]), t.name


def test_lookups(files: dict) -> None:
    with open_gguf(files["llmdeploy-q8_0"]) as f:
        assert f.architecture == "llama"
        assert "llama.block_count" in f and "llama.no_such_key" not in f
        assert f.layer0_int("llama.block_count") == 2
        assert f.layer0_int("llama.expert_count", 0) == 0
        assert f.get("llama.no_such_key", "default") == "default"
        assert f.tensor("output.weight").type == Q.Q8_0
        with pytest.raises(GGUFReadError, match=r"no metadata key 'llama.no_such_key', needed to test"):
            f.require("llama.no_such_key", "to test")
        with pytest.raises(GGUFReadError, match="no tensor 'nope'"):
            f.tensor("nope")


def test_layer0_int_reads_per_layer_arrays_as_llama_cpp() -> None:
    # Some architectures store head counts per layer; llama.cpp's n_head() is layer 0's.
    path = pathlib.Path("per-layer.gguf")
    entries = [
        MetadataEntry("x.attention.head_count", np.array([8, 4, 4], np.int32), V.ARRAY, V.INT32),
        MetadataEntry("x.name", "text", V.STRING),
    ]
    f = GGUFModelFile([path], entries, [])
    assert f.layer0_int("x.attention.head_count") == 8
    with pytest.raises(GGUFReadError, match=r"per-layer.gguf: metadata key 'x.name' should hold an integer"):
        f.layer0_int("x.name")


def test_split_model_is_read_whole_from_its_first_part(tmp_path: pathlib.Path) -> None:
    folder = models.model_folder("LlamaForCausalLM")
    (whole,) = save_pretrained_gguf(folder, tmp_path / "whole", quantization="q8_0", progress=False)
    parts = save_pretrained_gguf(
        folder, tmp_path / "split", quantization="q8_0", max_file_size=whole.stat().st_size // 3, progress=False
    )
    assert len(parts) >= 3
    with open_gguf(whole) as a, open_gguf(parts[0]) as b:
        assert b.paths == tuple(parts)
        assert [(e.key, e.type) for e in a.metadata] == [(e.key, e.type) for e in b.metadata]  # no split.* keys
        assert [(t.name, t.shape, t.type) for t in a.tensors] == [(t.name, t.shape, t.type) for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors):
            assert np.array_equal(a.raw_rows(ta).copy(), b.raw_rows(tb)), ta.name

    with pytest.raises(GGUFReadError, match=r"is part 2 of a model split into .* open its first part .*-00001-of-"):
        open_gguf(parts[1])
    parts[-1].unlink()
    with pytest.raises(MissingFileError, match=parts[-1].name):
        open_gguf(parts[0])
    renamed = parts[0].with_name("renamed.gguf")
    parts[0].rename(renamed)
    with pytest.raises(GGUFReadError, match="its name does not end in '-00001-of-"):
        open_gguf(renamed)


def test_not_a_gguf(tmp_path: pathlib.Path) -> None:
    text = tmp_path / "config.json"
    text.write_text('{"model_type": "llama", "hidden_size": 256}')
    with pytest.raises(GGUFReadError, match=r"config.json is not a GGUF file \(it does not start with 'GGUF'\)"):
        open_gguf(text)
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGUF")
    with pytest.raises(GGUFReadError, match=r"tiny.gguf is not a GGUF file: it holds only 4 bytes"):
        open_gguf(tiny)
    with pytest.raises(MissingFileError, match=r"missing.gguf does not exist"):
        open_gguf(tmp_path / "missing.gguf")


def test_truncated_files(files: dict, tmp_path: pathlib.Path) -> None:
    data = files["llmdeploy-q8_0"].read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[: len(data) - 1000])  # the last tensor's data is incomplete
    with pytest.raises(GGUFReadError, match=r"cut-data.gguf is truncated: tensor '.+' ends at byte"):
        open_gguf(cut_data)
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:2000])  # inside the tokenizer's KVs
    with pytest.raises(GGUFReadError, match=r"cut-header.gguf is not a readable GGUF file: it is truncated"):
        open_gguf(cut_header)
