"""llmdeploy.merge.folder: safetensors shards byte-identical to safetensors' own writer, shard
planning, atomic commit, stale files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from llmdeploy.errors import InvalidOptionError
from llmdeploy.merge.folder import Staging, parse_shard_size, plan_shards, stale_files, write_shards
from llmdeploy.merge.plan import OutTensor


def _out(tensors):
    return [OutTensor(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in tensors.items()]


TENSORS = {
    "model.embed.weight": torch.randn(5, 3).bfloat16(),
    "model.norm.weight": torch.randn(3),
    "model.scale": torch.tensor(2.5, dtype=torch.float16),  # 0-dim
    "model.ids": torch.arange(7, dtype=torch.int64),
    "model.mask": torch.tensor([True, False, True]),
    "model.empty": torch.zeros(0, 4),
    "model.f64": torch.randn(2, dtype=torch.float64),
}


def test_single_shard_is_byte_identical_to_safetensors(tmp_path):
    with Staging(tmp_path / "o") as s:
        weight_map = write_shards(s, _out(TENSORS), 10**9)
        s.commit()
    data = (tmp_path / "o" / "model.safetensors").read_bytes()
    assert data == save(TENSORS, metadata={"format": "pt"})
    assert (
        set(weight_map.values()) == {"model.safetensors"}
        and not (tmp_path / "o" / "model.safetensors.index.json").exists()
    )


def test_each_shard_is_byte_identical_and_indexed(tmp_path):
    tensors = {f"layers.{i}.weight": torch.randn(10, 10) for i in range(7)}  # 400 bytes each
    with Staging(tmp_path / "o") as s:
        write_shards(s, _out(tensors), 1000)
        s.commit()
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 700, "total_size": 2800}
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    for f in files:
        names = sorted(k for k, v in index["weight_map"].items() if v == f)
        assert len(names) <= 2
        assert (tmp_path / "o" / f).read_bytes() == save({n: tensors[n] for n in names}, metadata={"format": "pt"})


def test_plan_shards_greedy_and_big_tensors_alone():
    sizes = [300, 300, 500, 2000, 100, 100]
    out = [OutTensor(f"t{i}", (n // 4,), torch.float32, lambda: None) for i, n in enumerate(sizes)]
    groups = [[t.name for t in g] for g in plan_shards(out, 1000)]
    assert groups == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [[t.name for t in g] for g in plan_shards([], 1000)] == [[]]


@pytest.mark.parametrize(("size", "n"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (1234, 1234)])
def test_parse_shard_size(size, n):
    assert parse_shard_size(size) == n


@pytest.mark.parametrize("size", ["5GB", "5Gb", "5gb", "3MiB", "10KB", "7kib", "12MB", "1mb", " 2GB", 0, 17])
def test_parse_shard_size_matches_transformers(size):
    """llmdeploy parses sizes itself (no transformers import) by transformers' rules."""
    from transformers.utils.hub import convert_file_size_to_int

    want = convert_file_size_to_int(size)
    if want > 0:
        assert parse_shard_size(size) == want
    else:
        with pytest.raises(InvalidOptionError):
            parse_shard_size(size)


@pytest.mark.parametrize("size", ["5 apples", "", 0, -3])
def test_parse_shard_size_rejects(size):
    with pytest.raises(InvalidOptionError, match="is not a size; use bytes"):
        parse_shard_size(size)


def test_interrupted_write_leaves_nothing_under_final_names(tmp_path):
    """An exception (here Ctrl-C) while the third tensor is produced: earlier shards were complete in
    temporary files, yet nothing is renamed into place and the temporary files are gone."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old model")

    def interrupted():
        raise KeyboardInterrupt

    tensors = _out({f"t{i}": torch.randn(10, 10) for i in range(2)})
    tensors.append(OutTensor("t9", (10, 10), torch.float32, interrupted))
    with pytest.raises(KeyboardInterrupt), Staging(out) as s:
        write_shards(s, tensors, 500)
        s.commit(remove=stale_files(out))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"old model"


def test_raw_ranges_are_copied(tmp_path):
    """A tensor no adapter touches is copied from its byte range in the base file."""
    src = tmp_path / "src.safetensors"
    t = {"a": torch.randn(3, 4), "b": torch.randn(1000)}
    save_file(t, str(src))
    n = int.from_bytes(src.read_bytes()[:8], "little")
    header = json.loads(src.read_bytes()[8 : 8 + n])
    b0, b1 = header["b"]["data_offsets"]
    raw = OutTensor("b", (1000,), torch.float32, lambda: None, raw=(str(src), 8 + n + b0, b1 - b0))
    with Staging(tmp_path / "o") as s:
        write_shards(s, [raw], 10**9)
        s.commit()
    assert torch.equal(load_file(str(tmp_path / "o" / "model.safetensors"))["b"], t["b"])


def test_stale_files(tmp_path):
    for n in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "adapter_config.json",
              "adapter_model.safetensors", "pytorch_model.bin", "tokenizer.model", "README.md", "notes.txt",
              "x.safetensors"):  # fmt: skip
        (tmp_path / n).write_text("x")
    assert sorted(stale_files(tmp_path)) == [
        "adapter_config.json", "adapter_model.safetensors", "model-00001-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.model", "x.safetensors",
    ]  # fmt: skip
