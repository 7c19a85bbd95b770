"""GGUFFileWriter against llama.cpp's own files and loader, and gguf-py's writer.

- Rewriting a GGUF written by llama.cpp's converter (gguf-py) or by llama_model_quantize (ggml's
  C writer) through GGUFFileWriter gives the same bytes.
- A split output loads in llama.cpp through its first part with the unsplit file's logits.
- Atomicity: nothing appears under the final name(s) before every tensor is written; an
  exception, KeyboardInterrupt or a failing disk leaves no file behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from hypothesis import event, given
from hypothesis import strategies as st

from llmdeploy.errors import BlockSizeError, GGUFWriteError, OutputExistsError
from llmdeploy.gguf.writer import GGUFFileWriter, split_path

from .. import llamacpp, models

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted() -> pathlib.Path:
    """llama.cpp's convert_hf_to_gguf.py --outtype bf16 of a tiny Llama."""
    return llamacpp.convert(models.model_folder("LlamaForCausalLM"), "bf16")


def declare_copy(w: GGUFFileWriter, reader: gguf.GGUFReader) -> None:
    """Declare every KV (with its exact type) and tensor info of ``reader`` on ``w``."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):  # the reader's view of the header, not KVs
            continue
        sub = field.types[-1] if field.types[0] == V.ARRAY else None
        w.add_metadata(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, tuple(reversed(t.shape.tolist())), t.tensor_type, int(t.n_bytes))


def copy_gguf(src: pathlib.Path, dst: pathlib.Path, **options) -> GGUFFileWriter:
    reader = gguf.GGUFReader(src)
    with GGUFFileWriter(dst, **options) as w:
        declare_copy(w, reader)
        for t in reader.tensors:
            w.write_tensor(t.name, t.data)
    return w


def small_writer(path: pathlib.Path, **options) -> tuple[GGUFFileWriter, dict[str, np.ndarray]]:
    """A writer with three declared F32 tensors, and their data."""
    w = GGUFFileWriter(path, **options)
    w.add_metadata("general.architecture", "llama")
    data = {f"t{i}": np.full((2, 8 * (i + 1)), i, dtype=np.float32) for i in range(3)}
    for name, a in data.items():
        w.add_tensor(name, a.shape, Q.F32, a.nbytes)
    return w, data


def files(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- byte-exact against llama.cpp's writers -----------------------------------------------------


@pytest.mark.parametrize("ftype", ["bf16", "q4_k_m"])
def test_rewrite_is_byte_identical(converted, tmp_path, ftype):
    """Guards the layout: header, KV packing, tensor infos, offsets, 32-byte padding (incl. after the last tensor)."""
    # bf16: written by gguf-py (the converter); q4_k_m: written by ggml's gguf.cpp (llama_model_quantize).
    src = converted if ftype == "bf16" else llamacpp.quantize(converted, ftype)
    w = copy_gguf(src, tmp_path / "copy.gguf")
    assert (tmp_path / "copy.gguf").read_bytes() == src.read_bytes()
    assert [p.nbytes for p in w.parts()] == [src.stat().st_size]
    assert files(tmp_path) == ["copy.gguf"]


KV_CASES = [  # (key, value, type, sub_type); None: inferred as the converter's gguf-py add_array/get_type does
    ("u8", 255, V.UINT8, None), ("i8", -128, V.INT8, None), ("u16", 65535, V.UINT16, None),
    ("i16", -32768, V.INT16, None), ("u32", 2**32 - 1, V.UINT32, None), ("i32", -(2**31), V.INT32, None),
    ("u64", 2**64 - 1, V.UINT64, None), ("i64", -(2**63), V.INT64, None), ("f32", 0.1, V.FLOAT32, None),
    ("f64", 0.1, V.FLOAT64, None), ("bool", True, V.BOOL, None), ("str", "Ünïcödé 漢字", V.STRING, None),
    ("arr.int", [1, -2, 3], V.ARRAY, None), ("arr.float", [0.5, -1e-5], V.ARRAY, None),
    ("arr.bool", [True, False], V.ARRAY, None), ("arr.str", ["a", "", "▁b"], V.ARRAY, None),
    ("arr.u32", [1, 2**32 - 1], V.ARRAY, V.UINT32), ("arr.f64", [0.1, 0.2], V.ARRAY, V.FLOAT64),
    ("arr.i8", [-1, 1], V.ARRAY, V.INT8),
]  # fmt: skip


@pytest.mark.parametrize("alignment", [None, 64])
def test_same_bytes_as_gguf_py_writer(tmp_path, alignment):
    """Guards every value type, gguf-py's type inference, and a non-default general.alignment."""
    tensors = [("a", np.arange(5, dtype=np.float32)), ("b", np.arange(6, dtype=np.float16).reshape(2, 3))]
    ref = gguf.GGUFWriter(tmp_path / "ref.gguf", arch="llama")
    if alignment:
        ref.add_custom_alignment(alignment)
    for key, value, vtype, sub in KV_CASES:
        ref.add_key_value(key, value, vtype, sub_type=sub)
    for name, a in tensors:
        ref.add_tensor(name, a)
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()

    with GGUFFileWriter(tmp_path / "ours.gguf") as w:
        w.add_metadata("general.architecture", "llama")
        if alignment:
            w.add_metadata("general.alignment", alignment)
        for key, value, vtype, sub in KV_CASES:
            w.add_metadata(key, value, None if sub is None and vtype == V.ARRAY else vtype, sub_type=sub)
        for name, a in tensors:
            w.add_tensor(name, a.shape, Q.F32 if a.dtype == np.float32 else Q.F16, a.nbytes)
        for name, a in tensors:
            w.write_tensor(name, a)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_tensorless_file_same_as_gguf_py(tmp_path):
    """Guards a metadata-only (vocab-only) file: header, KVs, padding, nothing else."""
    ref = gguf.GGUFWriter(tmp_path / "ref.gguf", arch="llama")
    ref.add_array("tokenizer.ggml.tokens", ["<s>", "a"])
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()
    with GGUFFileWriter(tmp_path / "ours.gguf") as w:
        w.add_metadata("general.architecture", "llama")
        w.add_metadata("tokenizer.ggml.tokens", ["<s>", "a"])
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


# -- splitting ------------------------------------------------------------------------------------


def test_split_loads_in_llama_cpp_with_unsplit_logits(converted, tmp_path):
    """Guards gguf-split's conventions: part names, split.* keys (types, order, values), KVs in part 1 only."""
    llama_cpp = pytest.importorskip("llama_cpp")
    reader = gguf.GGUFReader(converted)
    whole = converted.stat().st_size
    for limit in range(whole // 3, whole, 4096):  # the smallest limit (in 4 KiB steps) that gives 3 parts
        sizing = GGUFFileWriter(tmp_path / "model.gguf", max_file_bytes=limit, dry_run=True)
        declare_copy(sizing, reader)
        if len(sizing.parts()) == 3:
            break
    w = copy_gguf(converted, tmp_path / "model.gguf", max_file_bytes=limit)
    names = [f"model-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert files(tmp_path) == names
    assert [p.path.name for p in w.parts()] == names
    assert (
        [p.nbytes for p in w.parts()]
        == [(tmp_path / n).stat().st_size for n in names]
        == [p.nbytes for p in sizing.parts()]
    )
    assert all(p.nbytes <= limit for p in w.parts())

    parts = [gguf.GGUFReader(tmp_path / n) for n in names]
    kvs = [[k for k in r.fields if not k.startswith("GGUF.")] for r in parts]
    originals = [k for k in reader.fields if not k.startswith("GGUF.")]
    split_keys = ["split.no", "split.count", "split.tensors.count"]
    assert kvs == [originals + split_keys, split_keys, split_keys]
    for no, r in enumerate(parts):
        assert [r.fields[k].types for k in split_keys] == [[V.UINT16], [V.UINT16], [V.INT32]]
        assert [r.fields[k].contents() for k in split_keys] == [no, 3, len(reader.tensors)]
    for key in originals:
        assert parts[0].fields[key].contents() == reader.fields[key].contents()
    written = [t for r in parts for t in r.tensors]
    assert [t.name for t in written] == [t.name for t in reader.tensors]
    for ours, theirs in zip(written, reader.tensors):
        assert (ours.tensor_type, ours.shape.tolist()) == (theirs.tensor_type, theirs.shape.tolist())
        assert ours.data.tobytes() == theirs.data.tobytes(), ours.name

    logits = []
    for path in (converted, tmp_path / names[0]):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
        tokens = [t % llm.n_vocab() for t in (1, 17, 300, 42, 99, 5)]
        llm.eval(tokens)
        logits.append(np.array(llm.scores[: len(tokens)]))
        del llm
    assert np.abs(logits[0]).max() > 0
    np.testing.assert_array_equal(logits[1], logits[0])


def test_split_path_is_llama_cpp_naming():
    assert split_path("out/m.gguf", 0, 3) == pathlib.Path("out/m-00001-of-00003.gguf")
    assert split_path("m", 11, 12) == pathlib.Path("m-00012-of-00012.gguf")


def test_no_split_when_it_fits(tmp_path):
    """One file under the plain name and without split.* keys when it fits max_file_bytes (as gguf-py)."""
    w, data = small_writer(tmp_path / "m.gguf", max_file_bytes=10**6)
    with w:
        for name, a in data.items():
            w.write_tensor(name, a)
    assert files(tmp_path) == ["m.gguf"]
    assert "split.count" not in gguf.GGUFReader(tmp_path / "m.gguf").fields


def test_tensor_larger_than_max_file_bytes_is_an_error(tmp_path):
    w, _ = small_writer(tmp_path / "m.gguf", max_file_bytes=200)
    with pytest.raises(GGUFWriteError, match="tensor 't0' .* does not fit in a file of max_file_bytes=200"):
        w.parts()
    w = GGUFFileWriter(tmp_path / "m.gguf", max_file_bytes=100)
    w.add_metadata("tokenizer.chat_template", "x" * 100)
    with pytest.raises(GGUFWriteError, match="the metadata alone takes 192 bytes, more than max_file_bytes=100"):
        w.parts()


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_K, Q.Q6_K]


@st.composite
def gguf_contents(draw):
    kvs = draw(st.lists(st.text(max_size=40), max_size=3))
    tensors = []
    for i in range(draw(st.integers(2, 8))):
        qtype = draw(st.sampled_from(TYPES))
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        shape = (*draw(st.lists(st.integers(1, 3), max_size=2)), block * draw(st.integers(1, 3)))
        tensors.append((f"blk.{i}.w" * draw(st.integers(1, 3)), shape, qtype))
    # max_file_bytes as a fraction of the unsplit size, so that most examples split
    return kvs, tensors, draw(st.floats(0.2, 1.1) | st.none())


@given(gguf_contents())
def test_planned_sizes_are_exact(contents):
    """Guards dry_run/parts(): the sizes the planner is told are the sizes written, within max_file_bytes."""
    kvs, tensors, fraction = contents
    rng = np.random.default_rng(0)
    data = {}
    for name, shape, qtype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data[name] = rng.integers(0, 256, int(np.prod(shape)) // block * size, dtype=np.uint8)

    def declare(w: GGUFFileWriter) -> GGUFFileWriter:
        for i, value in enumerate(kvs):
            w.add_metadata(f"k{i}", value)
        for name, shape, qtype in tensors:
            w.add_tensor(name, shape, qtype, data[name].nbytes)
        return w

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.gguf"
        (whole,) = declare(GGUFFileWriter(path, dry_run=True)).parts()
        limit = None if fraction is None else int(whole.nbytes * fraction)
        while True:
            w = declare(GGUFFileWriter(path, max_file_bytes=limit))
            try:
                planned = w.parts()
                break
            except GGUFWriteError:  # a tensor that cannot fit: a larger limit, up to the unsplit size
                limit = (limit + whole.nbytes + 1) // 2
        event(f"{len(planned)} part(s)")
        with w:
            for name, a in data.items():
                w.write_tensor(name, a)
        assert files(pathlib.Path(tmp)) == sorted(p.path.name for p in planned)
        assert [os.path.getsize(p.path) for p in planned] == [p.nbytes for p in planned]
        if limit is not None:
            assert all(p.nbytes <= limit for p in planned)
        read = [t for p in planned for t in gguf.GGUFReader(p.path).tensors]
        assert [t.name for t in read] == list(data)
        assert all(t.data.tobytes() == data[t.name].tobytes() for t in read)


# -- atomicity and overwrite ------------------------------------------------------------------------


def test_nothing_under_final_name_until_complete(tmp_path):
    w, data = small_writer(tmp_path / "m.gguf")
    with w:
        w.write_tensor("t0", data["t0"])
        (tmp,) = files(tmp_path)
        assert tmp.startswith(".m.gguf.tmp-")
        for name in ("t1", "t2"):
            w.write_tensor(name, data[name])
        assert files(tmp_path) == [tmp]
    assert files(tmp_path) == ["m.gguf"]
    assert [t.data.tobytes() for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors] == [
        a.tobytes() for a in data.values()
    ]


def test_existing_output_needs_overwrite(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="m.gguf exists; pass overwrite=True"):
        GGUFFileWriter(target)
    w, data = small_writer(target, overwrite=True)
    with w:
        for name, a in data.items():
            w.write_tensor(name, a)
            assert target.read_bytes() == b"old"  # intact until the rename
    assert len(gguf.GGUFReader(target).tensors) == 3


def test_existing_split_part_needs_overwrite(tmp_path):
    w, data = small_writer(tmp_path / "m.gguf", max_file_bytes=400)
    assert len(w.parts()) == 3
    (tmp_path / "m-00002-of-00003.gguf").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="m-00002-of-00003.gguf exists"), w:
        w.write_tensor("t0", data["t0"])
    assert files(tmp_path) == ["m-00002-of-00003.gguf"]


def test_dry_run_writes_nothing(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    w, data = small_writer(tmp_path / "m.gguf", dry_run=True)
    with w:
        for name, a in data.items():
            w.write_tensor(name, a)
    assert files(tmp_path) == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("limit", [None, 400])
def test_error_mid_stream_leaves_nothing(tmp_path, error, limit):
    (tmp_path / "m.gguf").write_bytes(b"old")
    w, data = small_writer(tmp_path / "m.gguf", overwrite=True, max_file_bytes=limit)
    with pytest.raises(error), w:
        w.write_tensor("t0", data["t0"])
        w.write_tensor("t1", data["t1"])
        raise error()
    assert files(tmp_path) == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


def test_wrong_size_names_the_tensor_and_leaves_nothing(tmp_path):
    w, data = small_writer(tmp_path / "m.gguf", max_file_bytes=400)
    message = r"tensor 't1': got 32 bytes \(float32, shape \(8,\)\), declared 128"
    with pytest.raises(GGUFWriteError, match=message), w:
        w.write_tensor("t0", data["t0"])
        w.write_tensor("t1", data["t1"][0, :8])
    assert files(tmp_path) == []


def test_out_of_order_and_missing_tensors(tmp_path):
    w, data = small_writer(tmp_path / "m.gguf")
    with pytest.raises(GGUFWriteError, match="tensor 't1' is out of order: the next tensor to write is 't0'"):
        w.write_tensor("t1", data["t1"])
    w, data = small_writer(tmp_path / "m.gguf")
    with pytest.raises(GGUFWriteError, match="tensor 't2' was declared but never written"), w:
        w.write_tensor("t0", data["t0"])
        w.write_tensor("t1", data["t1"])
    assert files(tmp_path) == []


def test_declaration_errors(tmp_path):
    w = GGUFFileWriter(tmp_path / "m.gguf")
    w.add_metadata("a", 1)
    with pytest.raises(GGUFWriteError, match="'a' given twice"):
        w.add_metadata("a", 2)
    with pytest.raises(GGUFWriteError, match="'split.count' is written by the writer"):
        w.add_metadata("split.count", 2)
    with pytest.raises(GGUFWriteError, match="key 'b'.*cannot write"):
        w.add_metadata("b", 300, V.UINT8)
    with pytest.raises(GGUFWriteError, match="general.alignment must be a power of two"):
        w.add_metadata("general.alignment", 48)
    with pytest.raises(BlockSizeError, match="tensor 'w': row length 100 .* Q4_K's block size 256"):
        w.add_tensor("w", (2, 100), Q.Q4_K, 0)
    with pytest.raises(GGUFWriteError, match=r"tensor 'w': declared 100 bytes, but shape \(2, 256\) in Q4_K takes 288"):
        w.add_tensor("w", (2, 256), Q.Q4_K, 100)
    with pytest.raises(GGUFWriteError, match="longer than llama.cpp's 63 bytes"):
        w.add_tensor("x" * 64, (32,), Q.F32, 128)
    w.add_tensor("w", (32,), Q.F32, 128)
    w.write_tensor("w", np.zeros(32, np.float32))
    with pytest.raises(GGUFWriteError, match="before the first tensor is written"):
        w.add_tensor("v", (32,), Q.F32, 128)
    w.abort()
    assert files(tmp_path) == []


def test_big_endian_input_is_written_little_endian(tmp_path):
    with GGUFFileWriter(tmp_path / "m.gguf") as w:
        w.add_tensor("w", (4,), Q.F32, 16)
        w.write_tensor("w", np.arange(4, dtype=">f4"))
    (t,) = gguf.GGUFReader(tmp_path / "m.gguf").tensors
    assert t.data.tolist() == [0.0, 1.0, 2.0, 3.0]


# -- a failing disk ---------------------------------------------------------------------------------

_FAILING_WRITE = """
import json, os, sys, numpy as np
from llmdeploy.gguf.writer import GGUFFileWriter
folder = sys.argv[1]
a = np.zeros(64 * 1024, np.float32)
try:
    with GGUFFileWriter(os.path.join(folder, "m.gguf"), overwrite=True) as w:
        for i in range(4):
            w.add_tensor(f"t{i}", a.shape, 0, a.nbytes)
        for i in range(4):
            w.write_tensor(f"t{i}", a)
    error = None
except OSError as e:
    error = e.errno
print(json.dumps({"errno": error, "files": sorted(os.listdir(folder))}))
"""


def _run_failing_write(argv: list[str], folder: pathlib.Path, **kwargs) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, **kwargs).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_os_error_mid_write_leaves_nothing(tmp_path):
    """A write that fails in the kernel (EFBIG past RLIMIT_FSIZE) after the first tensors."""
    import resource

    def limit_file_size():
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    (tmp_path / "m.gguf").write_bytes(b"old")
    result = _run_failing_write([sys.executable, "-c", _FAILING_WRITE, str(tmp_path)], tmp_path,
                                preexec_fn=limit_file_size)  # fmt: skip
    assert result == {"errno": 27, "files": ["m.gguf"]}  # EFBIG
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


def test_full_disk_leaves_nothing(tmp_path):
    """ENOSPC on a real 512 KiB tmpfs, mounted in a private user+mount namespace (skipped where not allowed)."""
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-rm", "true"], check=False, capture_output=True).returncode == 0
    if not probe:
        pytest.skip("unprivileged user namespaces (unshare -rm) are not available")
    folder = tmp_path / "disk"
    folder.mkdir()
    script = f'mount -t tmpfs -o size=512k tmpfs "$1" && echo old > "$1/m.gguf" && "{sys.executable}" -c "$2" "$1"'
    result = _run_failing_write([unshare, "-rm", "sh", "-c", script, "sh", str(folder), _FAILING_WRITE], folder)
    assert result == {"errno": 28, "files": ["m.gguf"]}  # ENOSPC
