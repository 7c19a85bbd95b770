"""The ``llmdeploy`` command line: run in-process (``cli.main([...])`` returns the exit code) and once
as ``python -m llmdeploy`` in a subprocess.

Export, merge, inspect, estimate and recommend run for real on tiny models. push, requant and to-hf
are checked for the call they make (their modules are replaced by recorders): their own tests cover
what the functions do.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import types
from collections import Counter
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

import llmdeploy
from llmdeploy import cli
from llmdeploy.errors import UnsupportedQuantTypeError

from . import models


@pytest.fixture(scope="module")
def folder() -> pathlib.Path:
    return models.model_folder("LlamaForCausalLM")


@pytest.fixture(scope="module")
def exported(folder: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """The CLI's own export: q4_k_m and q8_0 in one pass."""
    out = tmp_path_factory.mktemp("cli-gguf")
    assert cli.main(["gguf", str(folder), "--quant", "q4_k_m,q8_0", "--out", str(out), "--name", "tiny", "-q"]) == 0
    return {"q4_k_m": out / "tiny-Q4_K_M.gguf", "q8_0": out / "tiny-Q8_0.gguf"}


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("llmdeploy: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# --- gguf ----------------------------------------------------------------------------------------


def test_gguf_writes_what_the_library_writes(folder: pathlib.Path, exported: dict, tmp_path: pathlib.Path) -> None:
    library = llmdeploy.save_pretrained_gguf(folder, tmp_path, quantization=["q4_k_m", "q8_0"], model_name="tiny",
                                             progress=False)  # fmt: skip
    assert [p.name for p in library] == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    for path in library:
        assert exported[path.stem.rsplit("-", 1)[1].lower()].read_bytes() == path.read_bytes()


def test_gguf_split_quiet_and_overwrite(folder: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    code, out, err = run(capsys, "--quiet", "gguf", folder, "--quant", "q8_0", "--out", tmp_path,
                         "--max-file-size", "600KB", "--threads", 1)  # fmt: skip
    assert (code, out) == (0, "")
    parts = sorted(tmp_path.glob("*.gguf"))
    assert len(parts) > 1 and all(re.search(r"-Q8_0-\d{5}-of-\d{5}\.gguf$", p.name) for p in parts)
    assert all(p.stat().st_size <= 600_000 for p in parts)
    code, out, err = run(capsys, "gguf", folder, "--quant", "q8_0", "--out", tmp_path, "--max-file-size", "600KB", "-q")
    assert_one_line_error(code, err, "exists", "--overwrite")
    code, out, err = run(capsys, "gguf", folder, "--quant", "q8_0", "--out", tmp_path, "--max-file-size", "600KB",
                         "--overwrite")  # fmt: skip
    assert code == 0 and "Q8_0" in out  # not quiet: the library's summary line


def test_gguf_errors_are_one_line(folder: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    code, _, err = run(capsys, "gguf", folder, "--quant", "q9_9", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "'q9_9'", "q4_k_m")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    code, _, err = run(capsys, "gguf", tmp_path / "no-such-model", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "no-such-model")


def test_debug_shows_the_traceback(folder: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMDEPLOY_DEBUG", "1")
    with pytest.raises(UnsupportedQuantTypeError):
        cli.main(["gguf", str(folder), "--quant", "q9_9", "--out", str(tmp_path)])


def test_usage_errors_exit_2(capsys) -> None:
    code, _, err = run(capsys, "gguf", "model-folder")
    assert code == 2 and "--out" in err
    code, _, err = run(capsys, "recommend", "--context", "4096")
    assert code == 2 and "--gpu" in err
    code, _, err = run(capsys, "estimate", "model", "--context", "-5")
    assert code == 2 and "positive" in err
    code, _, err = run(capsys, "merge", "adapter", "--out", "x", "--method", "gguf")
    assert code == 2 and "merged_16bit" in err
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


def test_version(capsys) -> None:
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, f"llmdeploy {llmdeploy.__version__}")


def test_ctrl_c_exits_130(folder: pathlib.Path, monkeypatch, capsys) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("llmdeploy.estimate.estimate", interrupted)
    code, _, err = run(capsys, "estimate", folder)
    assert (code, err) == (130, "llmdeploy: interrupted\n")


# --- inspect -------------------------------------------------------------------------------------


def _type_rows(text: str) -> dict[str, tuple[int, int, int]]:
    block = text.split("tensors by type\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    rows = {}
    for line in block:
        name, count, params, nbytes, _ = line.split()
        rows[name] = (int(count.replace(",", "")), int(params.replace(",", "")), int(nbytes.replace(",", "")))
    return rows


def test_inspect_counts_match_gguf_reader_and_the_plan(folder: pathlib.Path, exported: dict, capsys) -> None:
    path = exported["q4_k_m"]
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0
    reader = gguf.GGUFReader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    rows = _type_rows(out)
    assert {name: row[0] for name, row in rows.items() if name != "total"} == dict(counts)
    for name in counts:
        tensors = [t for t in reader.tensors if t.tensor_type.name == name]
        assert rows[name][1:] == (sum(int(t.n_elements) for t in tensors), sum(int(t.n_bytes) for t in tensors))
    (plan,) = llmdeploy.plan_gguf(folder, quantization="q4_k_m")
    assert dict(Counter(t.type.name for t in plan.tensors)) == dict(counts)
    assert rows["total"] == (len(plan.tensors), plan.n_params, plan.total_bytes)
    assert f"{plan.bits_per_weight:.2f} bits per weight" in out
    assert "file_type             15 (Q4_K_M)" in out
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    bos = int(reader.fields["tokenizer.ggml.bos_token_id"].contents())
    assert f"vocabulary      {len(tokens):,} tokens" in out
    assert f"bos {bos} {tokens[bos]!r}" in out
    assert "chat template   yes" in out
    assert tokens[100] not in out.split("tokenizer\n", 1)[1]  # a summary, not the token list


def test_inspect_json_and_tensor_table(exported: dict, capsys) -> None:
    path = exported["q8_0"]
    code, out, _ = run(capsys, "inspect", path, "--json", "--tensors")
    assert code == 0
    report = json.loads(out)
    reader = gguf.GGUFReader(path)
    assert report["file_bytes"] == path.stat().st_size
    assert report["file_type"] == "q8_0"
    assert report["metadata"]["llama.block_count"] == int(reader.fields["llama.block_count"].contents())
    assert "tokenizer.ggml.tokens" not in report["metadata"]
    assert report["tokenizer"]["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert report["tokenizer"]["chat_template"] is True
    assert {row["type"]: row["tensors"] for row in report["types"]} == dict(
        Counter(t.tensor_type.name for t in reader.tensors)
    )
    assert [(t["name"], t["type"], t["bytes"]) for t in report["tensors"]] == [
        (t.name, t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors
    ]
    code, out, _ = run(capsys, "inspect", path, "--tensors")
    assert all(t.name in out for t in reader.tensors)


def test_inspect_lists_short_arrays_and_sizes_long_ones(tmp_path: pathlib.Path, capsys) -> None:
    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("llama.attention.head_count", [8, 4, 4])
    writer.add_array("llama.long_table", list(range(100)))
    writer.add_string("general.name", "caf\u00e9")
    writer.add_tensor("w", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, out, _ = run(capsys, "inspect", path, "--json")
    assert code == 0
    metadata = json.loads(out)["metadata"]
    assert metadata["llama.attention.head_count"] == [8, 4, 4]
    assert metadata["llama.long_table"] == {"array_of": "INT32", "length": 100}  # more than 64 items: not listed
    assert metadata["general.name"] == "caf\u00e9"
    code, out, _ = run(capsys, "inspect", path)
    assert "long_table" in out and "[100 x INT32]" in out


def test_inspect_errors(tmp_path: pathlib.Path, capsys) -> None:
    code, _, err = run(capsys, "inspect", tmp_path / "missing.gguf")
    assert_one_line_error(code, err, "missing.gguf")
    other = tmp_path / "config.json"
    other.write_text("{}")
    code, _, err = run(capsys, "inspect", other)
    assert_one_line_error(code, err, "config.json is not a GGUF file")


# --- estimate and recommend -----------------------------------------------------------------------


def test_estimate_json_and_table(folder: pathlib.Path, exported: dict, capsys) -> None:
    code, out, _ = run(capsys, "estimate", folder, "--quant", "q4_k_m", "--quant", "q8_0", "--context", 2048, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["quantization"] for r in rows] == ["q4_k_m", "q8_0"]
    for row in rows:
        assert row["file_bytes"] == exported[row["quantization"]].stat().st_size
        assert row["total_bytes"] == row["tensor_bytes"] + row["kv_cache_bytes"] + row["compute_bytes"]
        assert row["kv_cache"]["cells"] == 2048
    code, out, _ = run(capsys, "estimate", exported["q8_0"], "--context", 2048)
    assert code == 0
    table = out.split("\n\n")[1].splitlines()
    assert table[0].split()[:3] == ["quant", "file", "size"] and table[1].startswith("Q8_0")
    assert "KV cache: 2 layers x 2,048 cells" in out
    assert "exceed the model's trained context" in out  # the tiny model was made with 1024


def test_estimate_unknown_quant(folder: pathlib.Path, capsys) -> None:
    code, _, err = run(capsys, "estimate", folder, "--quant", "q4_k_x")
    assert_one_line_error(code, err, "'q4_k_x'")


def test_recommend_with_and_without_a_model(folder: pathlib.Path, capsys) -> None:
    code, out, _ = run(capsys, "recommend", "--gpu", "RTX 4090", "--model", folder, "--context", 4096)
    assert code == 0
    assert "Recommended: vLLM with merged 16-bit safetensors" in out and "vllm serve" in out
    code, out, _ = run(capsys, "recommend", "--cpu-only", "--ram", 16, "--model", folder, "--json")
    report = json.loads(out)
    assert report["choice"]["engine"] == "llama.cpp / Ollama" and report["choice"]["quantization"] == "q8_0"
    assert report["device"] == {"name": "CPU", "memory_gib": 16.0, "kind": "cpu"}
    code, out, _ = run(capsys, "recommend", "--vram", 24)
    assert code == 0
    assert re.search(r"70B  does not fit", out) and re.search(r"8B  16-bit \(vLLM\)", out)


def test_recommend_unknown_gpu(capsys) -> None:
    code, _, err = run(capsys, "recommend", "--gpu", "GTX 9999")
    assert_one_line_error(code, err, "'GTX 9999'", "RTX 4090", "--vram")


# --- merge ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A saved LoRA adapter with trained-looking weights, and its base model folder."""
    from tests.merge import common

    base = common.base()
    folder = tmp_path_factory.mktemp("adapter") / "my-lora"
    common.lora(common.load(base)).save_pretrained(str(folder))
    return folder, base


def test_merge_writes_what_the_library_writes(adapter: tuple, tmp_path: pathlib.Path, capsys) -> None:
    folder, base = adapter
    code, out, _ = run(capsys, "merge", folder, "--base", base, "--out", tmp_path / "cli", "--dtype", "bf16")
    assert code == 0 and str(tmp_path / "cli") in out
    llmdeploy.save_pretrained_merged(folder, tmp_path / "library", base=base, dtype="bf16")
    ours = load_file(tmp_path / "cli" / "model.safetensors")
    theirs = load_file(tmp_path / "library" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    code, _, err = run(capsys, "merge", folder, "--base", base, "--out", tmp_path / "cli")
    assert_one_line_error(code, err, "overwrite")


def test_gguf_and_estimate_of_an_adapter(adapter: tuple, tmp_path: pathlib.Path, capsys) -> None:
    folder, base = adapter
    code, _, _ = run(capsys, "gguf", folder, "--base", base, "--quant", "q8_0", "--out", tmp_path / "cli", "-q")
    assert code == 0
    (path,) = (tmp_path / "cli").glob("*.gguf")
    assert path.name == "my-lora-Q8_0.gguf"  # named after the adapter folder
    (library,) = llmdeploy.save_pretrained_gguf(folder, tmp_path / "library", base=base, quantization="q8_0",
                                                progress=False)  # fmt: skip
    assert path.read_bytes() == library.read_bytes()
    code, out, _ = run(capsys, "estimate", folder, "--base", base, "--quant", "q8_0", "--json")
    assert code == 0 and json.loads(out)[0]["file_bytes"] == path.stat().st_size


# --- push, requant, to-hf: the calls they make ----------------------------------------------------


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Replace a module's function by one that records its calls."""

    def install(module: str, name: str, result: Any = None) -> list[tuple[tuple, dict]]:
        calls: list[tuple[tuple, dict]] = []

        def record(*args: Any, **kwargs: Any) -> Any:
            calls.append((args, kwargs))
            return result

        fake = types.ModuleType(module)
        setattr(fake, name, record)
        monkeypatch.setitem(sys.modules, module, fake)
        return calls

    return install


def test_push_passes_its_options_and_never_prints_the_token(recorder: Any, capsys, tmp_path: pathlib.Path) -> None:
    calls = recorder("llmdeploy.hub", "push_folder", "https://huggingface.co/me/tiny/commit/abc")
    code, out, err = run(capsys, "push", tmp_path, tmp_path / "extra.gguf", "--repo", "me/tiny", "--private",
                         "--token", "hf_secret_value", "--message", "first upload")  # fmt: skip
    assert code == 0
    assert calls == [((([str(tmp_path), str(tmp_path / "extra.gguf")]),),
                      {"repo_id": "me/tiny", "token": "hf_secret_value", "private": True,
                       "commit_message": "first upload"})]  # fmt: skip
    assert "hf_secret_value" not in out + err
    assert "https://huggingface.co/me/tiny/commit/abc" in out
    code, out, err = run(capsys, "push", tmp_path, "--repo", "me/tiny")
    assert calls[-1][1] == {"repo_id": "me/tiny", "token": None, "private": False, "commit_message": None}


def test_requant_passes_its_options(recorder: Any, capsys) -> None:
    calls = recorder("llmdeploy.gguf.requant", "requantize")
    code, _, _ = run(capsys, "requant", "in.gguf", "--quant", "q4_k_m,q5_k_m", "--quant", "q6_k", "--out", "dir",
                     "--allow-requantize", "--overwrite", "-q")  # fmt: skip
    assert code == 0
    assert calls == [(("in.gguf", "dir"), {"quantization": ["q4_k_m", "q5_k_m", "q6_k"], "allow_requantize": True,
                                           "overwrite": True, "progress": False})]  # fmt: skip
    run(capsys, "requant", "in.gguf", "--quant", "q8_0", "--out", "dir", "--name", "x", "--threads", 3)
    assert calls[-1][1] == {"quantization": ["q8_0"], "allow_requantize": False, "overwrite": False, "progress": True,
                            "model_name": "x", "threads": 3}  # fmt: skip
    code, _, err = run(capsys, "requant", "in.gguf", "--out", "dir")
    assert code == 2 and "--quant" in err


def test_to_hf_passes_its_options(recorder: Any, capsys) -> None:
    calls = recorder("llmdeploy.gguf.to_hf", "gguf_to_hf", pathlib.Path("dir"))
    code, out, _ = run(capsys, "to-hf", "in.gguf", "--out", "dir", "--overwrite")
    assert code == 0 and calls == [(("in.gguf", "dir"), {"overwrite": True})]
    assert "wrote dir" in out


def test_missing_module_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "llmdeploy.hub", None)  # an import of it now fails
    code, _, err = run(capsys, "push", ".", "--repo", "me/x")
    assert_one_line_error(code, err, "llmdeploy.hub")


# --- as a program -----------------------------------------------------------------------------------


def test_python_dash_m(exported: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmdeploy", "inspect", str(exported["q8_0"]), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_tensors"] == len(gguf.GGUFReader(exported["q8_0"]).tensors)
    result = subprocess.run(
        [sys.executable, "-m", "llmdeploy", "inspect", "nothing.gguf"], capture_output=True, text=True, check=False
    )
    expected = "llmdeploy: error: nothing.gguf does not exist; pass the path of a .gguf file.\n"
    assert (result.returncode, result.stderr) == (1, expected)
