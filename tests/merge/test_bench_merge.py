"""benchmarks/bench_merge.py still runs end to end (a tiny model; no timing is asserted): every method
merges, llmdeploy's two paths write identical tensors, and they equal PEFT's."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.benchmarks import load_benchmark


def test_bench_merge_runs_and_agrees_with_peft(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_merge")
    raw = tmp_path / "results.json"
    args = ["--tiny", "--layers", "1", "--repeat", "1", "--workdir", str(tmp_path), "--json", str(raw), "--markdown"]
    bench.main(args)
    out = capsys.readouterr().out
    assert "| llmdeploy-dir |" in out and "| peft |" in out
    (result,) = json.loads(raw.read_text())
    assert set(result["methods"]) == {"peft", "llmdeploy-mem", "llmdeploy-dir"}
    check = result["check"]
    assert check["paths_identical"] and check["max_ulp_vs_peft"] <= 1 and check["tensors_changed"] == 7
