"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import pytest

from tests.benchmarks import load_benchmark


def test_bench_quants_runs_and_reports_identical_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    bench = load_benchmark("bench_quants")
    assert bench.main(["--types", "q8_0", "q4_k", "--rows", "2", "--cols", "256", "--repeat", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| Q8_0 |" in out and "| Q4_K |" in out and "NO" not in out


def test_bench_export_runs_and_reports_identical_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """The end-to-end export benchmark on a tiny Llama: both sides run, and the tensor bytes agree."""
    pytest.importorskip("llama_cpp")
    from tests.models import model_folder

    bench = load_benchmark("bench_export")
    assert bench.main(["--models", str(model_folder("LlamaForCausalLM")), "--quant", "q4_k_m", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "llmdeploy" in out and "| yes |" in out.lower()
