"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_bench_quants_runs_and_reports_identical_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    bench = _load("bench_quants")
    assert bench.main(["--types", "q8_0", "q4_k", "--rows", "2", "--cols", "256", "--repeat", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| Q8_0 |" in out and "| Q4_K |" in out and "NO" not in out


def test_bench_export_runs_and_reports_identical_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """The end-to-end export benchmark on a tiny Llama: both sides run, and the tensor bytes agree."""
    pytest.importorskip("llama_cpp")
    from tests.models import model_folder

    bench = _load("bench_export")
    assert bench.main(["--models", str(model_folder("LlamaForCausalLM")), "--quant", "q4_k_m", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "llmdeploy" in out and "| yes |" in out.lower()
