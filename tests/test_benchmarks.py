"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_bench_quants_runs_and_reports_identical_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    bench = _load("bench_quants")
    assert bench.main(["--types", "q8_0", "q4_k", "--rows", "2", "--cols", "256", "--repeat", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| Q8_0 |" in out and "| Q4_K |" in out and "NO" not in out
