"""open_gguf against gguf-py's GGUFReader (the oracle for what a GGUF holds) and GGUFFileWriter.

- every KV (key order, value type, element type, value, bytes in the file) and tensor (name, shape,
  type, offset, size, bytes) reads as gguf-py reads it, on files of llama.cpp's converter, of
  llama_model_quantize and of llmdeploy, and on a big-endian file gguf-py wrote; so do the header
  facts (version, alignment, file type, parameters);
- the metadata entries written back through GGUFFileWriter give the same file, byte for byte;
- decoded rows equal gguf-py's dequantization; split models read whole from any of their parts;
- files that are not GGUFs, truncated or damaged ones and misnamed parts fail with the file named;
- reading a header does not import torch.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

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


def assert_reads_like_gguf_py(path: pathlib.Path, *, data: bool = True) -> None:
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
            assert entry.to_python() == field.contents(), key
            assert ours.kv[key] is entry.value
            assert entry.nbytes == sum(part.nbytes for part in field.parts), key  # its bytes in the file
        assert ours.metadata_bytes == sum(part.nbytes for _, field in fields for part in field.parts)
        assert ours.version == reader.fields["GGUF.version"].contents()
        assert ours.alignment == reader.alignment
        assert ours.file_bytes == path.stat().st_size
        file_type = reader.fields.get("general.file_type")
        assert ours.llama_file_type == (None if file_type is None else gguf.LlamaFileType(file_type.contents()))
        assert len(ours.tensors) == len(reader.tensors)
        assert ours.n_params == sum(int(t.n_elements) for t in reader.tensors)
        assert ours.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
        for mine, theirs in zip(ours.tensors, reader.tensors):
            assert mine.name == theirs.name
            assert mine.shape == tuple(reversed(theirs.shape.tolist())), mine.name
            assert (mine.type, mine.offset, mine.nbytes) == (theirs.tensor_type, theirs.data_offset, theirs.n_bytes)
            if data:
                expected = np.asarray(theirs.data).reshape(-1).view(np.uint8)
                assert np.array_equal(ours.raw_rows(mine).reshape(-1), expected), mine.name


@pytest.mark.parametrize("name", ["converter-bf16", "llama-quantize-q4_k_m", "llmdeploy-f16", "llmdeploy-q8_0"])
def test_reads_every_field_and_tensor_as_gguf_py(files: dict, name: str) -> None:
    assert_reads_like_gguf_py(files[name])


def test_reads_the_real_gemma_3_vocabulary_as_gguf_py() -> None:
    # 262144 tokens with scores and types: the reason open_gguf parses the header itself
    # (gguf-py's reader takes ~9 s over it)
    path = models.gemma3_gguf()
    assert_reads_like_gguf_py(path)
    with open_gguf(path) as f:
        assert (f.architecture, f.file_type) == ("gemma3", "q4_k_m")  # as llama.cpp's converter named it


def test_file_type_names() -> None:
    def named(value: object) -> GGUFModelFile:
        return GGUFModelFile([pathlib.Path("m.gguf")], [MetadataEntry("general.file_type", value, V.UINT32)], [])

    assert named(int(gguf.LlamaFileType.MOSTLY_Q4_K_M)).file_type == "q4_k_m"
    assert named(int(gguf.LlamaFileType.MOSTLY_BF16)).file_type == "bf16"
    assert named(int(gguf.LlamaFileType.ALL_F32)).file_type == "f32"  # llama.cpp's "all F32"
    assert named(9999).file_type == "file_type 9999" and named(9999).llama_file_type is None
    assert GGUFModelFile([pathlib.Path("m.gguf")], [], []).file_type == "unknown"


def test_reading_a_header_does_not_import_torch() -> None:
    # inspect, estimate and model cards read headers only; torch takes seconds to import
    code = "import sys, llmdeploy.gguf.reader, llmdeploy.estimate; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def convert_endian(path: pathlib.Path, order: str) -> None:
    """gguf-py's gguf-convert-endian, in place (the command the reader's message gives)."""
    script = pathlib.Path(sys.executable).with_name("gguf-convert-endian")
    subprocess.run([script, str(path), order], input="YES\n", text=True, check=True, capture_output=True)


def test_big_endian_header_reads_as_gguf_py_and_its_data_is_refused(files: dict, tmp_path: pathlib.Path) -> None:
    # llama.cpp loads no big-endian file, but gguf-py writes them; their header still reads, as native values
    original = files["llmdeploy-q8_0"]
    path = tmp_path / "big.gguf"
    path.write_bytes(original.read_bytes())
    convert_endian(path, "big")
    assert_reads_like_gguf_py(path, data=False)
    with open_gguf(path) as big, open_gguf(original) as little:
        assert (big.byte_order, little.byte_order) == (">", "<")
        assert [(e.key, e.type, e.sub_type) for e in big.metadata] == [
            (e.key, e.type, e.sub_type) for e in little.metadata
        ]
        assert [e.to_python() for e in big.metadata] == [e.to_python() for e in little.metadata]
        assert [dataclasses.replace(t, path=original) for t in big.tensors] == list(little.tensors)
        with pytest.raises(GGUFReadError, match=r"big.gguf is a big-endian GGUF: .*`gguf-convert-endian .* little`"):
            big.raw_rows(big.tensor("output.weight"))
    convert_endian(path, "little")  # as the message says: back to the original, byte for byte
    assert path.read_bytes() == original.read_bytes()


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


def test_split_model_is_read_whole_from_any_part(tmp_path: pathlib.Path) -> None:
    folder = models.model_folder("LlamaForCausalLM")
    (whole,) = save_pretrained_gguf(folder, tmp_path / "whole", quantization="q8_0", progress=False)
    parts = save_pretrained_gguf(
        folder, tmp_path / "split", quantization="q8_0", max_file_size=whole.stat().st_size // 3, progress=False
    )
    assert len(parts) >= 3
    with open_gguf(whole) as a, open_gguf(parts[0]) as b:
        assert b.paths == tuple(parts) and b.path == parts[0]
        assert [(e.key, e.type) for e in a.metadata] == [(e.key, e.type) for e in b.metadata]  # no split.* keys
        assert a.metadata_bytes == b.metadata_bytes
        assert b.file_bytes == sum(p.stat().st_size for p in parts)
        assert [(t.name, t.shape, t.type) for t in a.tensors] == [(t.name, t.shape, t.type) for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors):
            assert np.array_equal(a.raw_rows(ta).copy(), b.raw_rows(tb)), ta.name
        for later in parts[1:]:  # any part brings in all of them, in order
            with open_gguf(later) as c:
                assert (c.path, c.paths) == (parts[0], tuple(parts))
                assert [t.name for t in c.tensors] == [t.name for t in b.tensors]

    renamed = parts[1].with_name("renamed.gguf")
    parts[1].rename(renamed)
    with pytest.raises(MissingFileError, match=rf"is part 1 of a model split into {len(parts)} files, but "
                                               rf"{parts[1].name} is missing beside it"):  # fmt: skip
        open_gguf(parts[0])
    with pytest.raises(GGUFReadError, match=r"renamed.gguf is part 2 of .* its name does not end in '-00002-of-"):
        open_gguf(renamed)
    renamed.rename(parts[1])
    parts[0].rename(tmp_path / "first.gguf")
    with pytest.raises(GGUFReadError, match=r"first.gguf is part 1 of .* its name does not end in '-00001-of-"):
        open_gguf(tmp_path / "first.gguf")
    (tmp_path / "first.gguf").rename(parts[0])
    parts[2].write_bytes(parts[1].read_bytes())  # part 2's contents under part 3's name
    with pytest.raises(GGUFReadError, match=rf"{parts[2].name} should be part 3 of {len(parts)} .* say part 2 of"):
        open_gguf(parts[0])


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
    with pytest.raises(GGUFReadError, match=r"is a folder, not a GGUF file"):
        open_gguf(tmp_path)
    v4 = tmp_path / "v4.gguf"
    v4.write_bytes(b"GGUF" + (4).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFReadError, match=r"v4.gguf is a GGUF of version 4; llmdeploy reads versions 2 and 3"):
        open_gguf(v4)


def test_truncated_and_damaged_files(files: dict, tmp_path: pathlib.Path) -> None:
    data = files["llmdeploy-q8_0"].read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[: len(data) - 1000])  # the last tensor's data is incomplete
    with pytest.raises(GGUFReadError, match=r"cut-data.gguf is truncated: tensor '.+' ends at byte"):
        open_gguf(cut_data)
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:2000])  # inside the tokenizer's KVs
    with pytest.raises(GGUFReadError, match=r"cut-header.gguf is not a readable GGUF file: it is truncated or dam"):
        open_gguf(cut_header)
    # one KV "a" of value type 99, which GGUF does not have
    odd = tmp_path / "odd-type.gguf"
    kv = (1).to_bytes(8, "little") + b"a" + (99).to_bytes(4, "little")
    odd.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + kv)
    with pytest.raises(GGUFReadError, match=r"odd-type.gguf: unknown GGUF value type 99 at byte 33"):
        open_gguf(odd)
