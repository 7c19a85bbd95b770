"""The Ollama Modelfile that save_pretrained_gguf writes beside its files.

What the Modelfile holds (template, stops) is tested against the real chat templates in
tests/test_ollama.py; here: that the export writes one, names it, points it at its file, and
follows the export's rules for existing output.
"""

from __future__ import annotations

import pathlib

import pytest

from llmdeploy import save_pretrained_gguf
from llmdeploy.errors import OutputExistsError
from tests.gotemplate import parse_modelfile
from tests.models import model_folder

GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _from(modelfile: pathlib.Path) -> str:
    return next(line.split(None, 1)[1] for line in modelfile.read_text().splitlines() if line.startswith("FROM "))


@pytest.fixture(scope="module")
def folder() -> pathlib.Path:
    return model_folder("LlamaForCausalLM")


def test_one_file_gets_a_modelfile_from_it(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (path,) = save_pretrained_gguf(folder, tmp_path, quantization="q8_0", progress=False)
    assert _from(tmp_path / "Modelfile") == f"./{path.name}"
    # a second export to the same folder gets its own, named after its type; the first stays
    (other,) = save_pretrained_gguf(folder, tmp_path, quantization="q4_k_m", progress=False)
    assert _from(tmp_path / "Modelfile") == f"./{path.name}"
    assert _from(tmp_path / "Modelfile-Q4_K_M") == f"./{other.name}"


def test_several_files_get_one_each(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    paths = save_pretrained_gguf(folder, tmp_path, quantization=["q8_0", "f16"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("Modelfile")) == [
        "Modelfile-F16",
        "Modelfile-Q8_0",
    ]
    assert {_from(tmp_path / "Modelfile-F16"), _from(tmp_path / "Modelfile-Q8_0")} == {f"./{p.name}" for p in paths}


def test_no_modelfile_when_split_or_not_wanted(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    save_pretrained_gguf(folder, tmp_path / "split", quantization="f32", max_file_size=1_000_000, progress=False)
    save_pretrained_gguf(folder, tmp_path / "off", quantization="q8_0", modelfile=False, progress=False)
    assert not list(tmp_path.rglob("Modelfile*"))


def test_an_existing_modelfile_of_the_same_file_needs_overwrite(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    save_pretrained_gguf(folder, tmp_path, quantization="q8_0", progress=False)
    (tmp_path / "Modelfile").write_text(_mine := f"FROM ./{folder.name}-Q8_0.gguf\n# my edits\n")
    (tmp_path / f"{folder.name}-Q8_0.gguf").unlink()
    with pytest.raises(OutputExistsError, match="Modelfile exists; pass overwrite=True"):
        save_pretrained_gguf(folder, tmp_path, quantization="q8_0", progress=False)
    assert (tmp_path / "Modelfile").read_text() == _mine
    save_pretrained_gguf(folder, tmp_path, quantization="q8_0", overwrite=True, progress=False)
    assert "# my edits" not in (tmp_path / "Modelfile").read_text()


def test_a_recognised_template_becomes_ollamas(tmp_path: pathlib.Path) -> None:
    """A Gemma-style chat template (the demo's) gives a TEMPLATE and the end-of-turn stop."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder("Gemma3ForCausalLM")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_TURNS
    folder = model_folder("Gemma3ForCausalLM", vocab_size=len(tokenizer))
    save_pretrained_gguf(folder, tmp_path, tokenizer=tokenizer, quantization="q8_0", progress=False)
    commands = parse_modelfile((tmp_path / "Modelfile").read_text())
    template = [value for name, value in commands if name == "template"]
    assert template and "<start_of_turn>" in template[0]
    assert ("stop", "<end_of_turn>") in commands
