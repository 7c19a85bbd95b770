"""benchmarks/bench_quality.py: its metrics against hand-computed values, and a tiny end-to-end run (no timing asserted)."""

from __future__ import annotations

import math
import pathlib
import tempfile

import numpy as np
import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_benchmark("bench_quality")


def test_compare_gives_the_hand_computed_perplexity_kl_and_agreement(bench) -> None:  # type: ignore[no-untyped-def]
    # Two positions over a two-token vocabulary. Row i predicts tokens[i + 1].
    reference = np.log(np.array([[0.6, 0.4], [0.9, 0.1]]))
    ours = np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))
    ours[0] += 3.0  # logits are defined up to a constant per row: the metrics must not see it
    tokens = [0, 1, 0]

    q = bench.compare(reference.astype(np.float32), ours.astype(np.float32), tokens)

    kl_row0 = 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75)
    # float32 logits carry ~1e-7 relative rounding into the log-probabilities
    assert q.mean_kl == pytest.approx(kl_row0 / 2, rel=1e-5)
    assert q.perplexity == pytest.approx(math.exp(-(math.log(0.75) + math.log(0.9)) / 2), rel=1e-6)
    assert q.top1 == 0.5  # position 0 disagrees (token 0 vs 1), position 1 agrees
    assert q.n_positions == 2
    same = bench.compare(reference, reference, tokens)
    assert same.mean_kl == 0.0 and same.top1 == 1.0


def test_compare_refuses_logits_that_do_not_cover_the_text(bench) -> None:  # type: ignore[no-untyped-def]
    logits = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        bench.compare(logits, logits, [1, 2, 3, 4])


def test_llama_8b_plan_has_llama_3_8b_parameters_and_q8_0_block_cost(bench) -> None:  # type: ignore[no-untyped-def]
    bpw = bench.llama_8b_bits_per_weight(["q8_0", "f16", "q4_k_m"])
    # Llama 3 8B has 8,030,261,248 parameters (its model card's count); 1-D norms stay F32 in every file.
    n_norm = 4096 * (1 + 2 * 32)
    n_matrix = 8_030_261_248 - n_norm
    assert bpw["q8_0"] == pytest.approx((n_matrix * 34 / 32 * 8 + n_norm * 32) / 8_030_261_248, rel=1e-12)
    assert bpw["f16"] == pytest.approx((n_matrix * 16 + n_norm * 32) / 8_030_261_248, rel=1e-12)
    # Q4_K_M mixes Q4_K (4.5 bits) with Q6_K (6.5625) tensors: strictly between them
    assert 4.5 < bpw["q4_k_m"] < 6.5625


def test_tiny_run_scores_every_file_against_bf16(bench) -> None:  # type: ignore[no-untyped-def]
    """The whole pass on a tiny Llama: one export, llama.cpp on each file, the metrics and the table."""
    pytest.importorskip("llama_cpp")
    from tests.models import model_folder

    types = ["f32", "bf16", "q8_0", "q4_k_m", "q2_k"]
    folder = model_folder("LlamaForCausalLM")
    with tempfile.TemporaryDirectory() as tmp:
        results, n_tokens, _ = bench.bench_model(str(folder), types, pathlib.Path(tmp), threads=2, max_tokens=96)
        assert list(pathlib.Path(tmp).iterdir()) == []  # every file is removed once scored
    by_type = {r.file_type: r for r in results}
    assert list(by_type) == types and n_tokens == 96

    assert by_type["f32"].bits_per_weight == 32.0  # every tensor of an F32 file is F32
    sizes = [by_type[t].file_bytes for t in ("f32", "bf16", "q8_0", "q4_k_m", "q2_k")]
    assert sizes == sorted(sizes, reverse=True)
    ref = by_type["bf16"].quality
    assert ref.mean_kl == 0.0 and ref.top1 == 1.0
    for r in results:
        assert math.isfinite(r.quality.perplexity) and r.quality.perplexity > 1
        assert r.quality.mean_kl >= 0 and r.prompt_tokens_per_s > 0
    # 2-bit weights move the output distribution far more than 8-bit ones
    assert by_type["q8_0"].quality.mean_kl < by_type["q4_k_m"].quality.mean_kl < by_type["q2_k"].quality.mean_kl

    table = bench.table(results)
    assert table.count("\n") == len(types) + 1  # header, rule, one row per type
    assert "| BF16 |" in table and "(reference)" in table and "| Q2_K |" in table


def test_main_prints_machine_and_table(bench, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("llama_cpp")
    from tests.models import model_folder

    folder = str(model_folder("LlamaForCausalLM"))
    argv = ["--models", folder, "--types", "q8_0", "--max-tokens", "32", "--threads", "1", "--repeat", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Machine: ") and "llama-cpp-python" in out
    assert "| Q8_0 |" in out and "| BF16 |" not in out  # bf16 is exported as the reference, not reported
