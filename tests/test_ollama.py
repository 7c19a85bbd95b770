"""llmdeploy.ollama: Modelfiles whose TEMPLATE gives Ollama the prompt the model's chat template gives.

The oracle for a prompt is transformers' ``apply_chat_template`` on the real Jinja chat templates
that llama.cpp ships (``models/templates/*.jinja`` and those inside
``tests/test-chat-template.cpp``); the TEMPLATE is rendered the way Ollama renders it by
tests/gotemplate.py. Vocabularies are real ones (llama.cpp's vocab GGUFs, the real Gemma 3 270M),
read by llama.cpp itself. Two conventions of llama.cpp (and so of Ollama, which runs GGUF models
through it) are applied to the oracle where they matter, each stated where it is used:

- llama.cpp puts the BOS token before the prompt itself when the vocabulary says so
  (``add_bos_token``), so the TEMPLATE leaves out the BOS text the chat template writes first.
- A system message the chat template cannot show (it raises, or drops it) is prepended to the
  next message with a newline.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import pytest

from llmdeploy.errors import GGUFReadError, InvalidOptionError, MissingFileError, OutputExistsError
from llmdeploy.ollama import _adds_bos, metadata_from_gguf, modelfile_for, write_modelfile

from .gotemplate import GoTemplateError, collate, execute, parse_modelfile, render_ollama
from .llamacpp import source_dir
from .models import gemma3_gguf, model_folder, tokenizer_folder

SYSTEM = "You are a terse assistant."
WITH_SYSTEM = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is GGUF?"},
    {"role": "assistant", "content": "A file format for llama.cpp models."},
    {"role": "user", "content": "Who reads it?"},
]
WITHOUT_SYSTEM = WITH_SYSTEM[1:]
ONE_TURN = WITH_SYSTEM[1:2]

# A tiny vocabulary for templates checked on their own (BOS and EOS as in Llama 2 / Mistral).
PLAIN_VOCABULARY = {
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.add_bos_token": False,
}


# --------------------------------------------------------------------------- helpers


def _models() -> pathlib.Path:
    return source_dir() / "models"


def _template(name: str) -> str:
    return (_models() / "templates" / name).read_text(encoding="utf-8")


def _vocab_path(name: str) -> pathlib.Path:
    return gemma3_gguf() if name == "gemma-3" else _models() / f"ggml-vocab-{name}.gguf"


@functools.cache
def _llamacpp_view(path: pathlib.Path) -> tuple[dict[str, Any], frozenset[str], bool]:
    """A GGUF's vocabulary as llama.cpp loads it.

    Returns its tokenizer KVs in the exporter's form (only those the file has), the texts of the
    tokens llama.cpp ends generation on, and whether llama.cpp puts BOS before a prompt.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp cannot load {path}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
        tokens = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace") for i in range(n_tokens)]
        metadata: dict[str, Any] = {"tokenizer.ggml.tokens": tokens}
        conversions = {
            "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.ggml.bos_token_id": int,
            "tokenizer.ggml.eos_token_id": int, "tokenizer.ggml.eot_token_id": int,
            "tokenizer.ggml.add_bos_token": lambda text: text == "true",
        }  # fmt: skip
        for key, convert in conversions.items():
            buffer = ctypes.create_string_buffer(256)
            if llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer)) >= 0:
                metadata[key] = convert(buffer.value.decode())
        template = llama_cpp.llama_model_chat_template(model, None)
        if template:
            metadata["tokenizer.chat_template"] = template.decode("utf-8")
        end_of_generation = frozenset(t for i, t in enumerate(tokens) if llama_cpp.llama_vocab_is_eog(vocab, i))
        return metadata, end_of_generation, bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    finally:
        llama_cpp.llama_model_free(model)


def _hf_prompt(chat_template: str, messages: Sequence[dict[str, str]], bos: str, eos: str) -> str:
    """transformers' rendering, on a real tokenizer carrying ``chat_template`` and these BOS/EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_folder("tiny-spm")), chat_template=chat_template, bos_token=bos, eos_token=eos
    )
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def _expected_prompt(chat_template: str, messages: Sequence[dict[str, str]], bos: str, eos: str) -> str:
    """The chat template's prompt for ``messages`` as llama.cpp sends them.

    When the template cannot show a leading system message (rendering it raises, or the system
    text is not in the prompt), llama.cpp prepends that text and a newline to the next message.
    """
    messages = [dict(m) for m in messages]
    if messages[0]["role"] == "system" and len(messages) > 1:
        try:
            shows_system = SYSTEM in _hf_prompt(chat_template, messages, bos, eos)
        except Exception:  # noqa: BLE001 - the template refuses a system role (raise_exception)
            shows_system = False
        if not shows_system:
            system, first = messages[:2]
            messages[:2] = [{**first, "content": system["content"] + "\n" + first["content"]}]
    return _hf_prompt(chat_template, messages, bos, eos)


def _ollama_prompt(modelfile_text: str, messages: Sequence[dict[str, str]]) -> str:
    """What Ollama renders from the Modelfile's TEMPLATE for a chat request with ``messages``."""
    templates = [value for name, value in parse_modelfile(modelfile_text) if name == "template"]
    assert len(templates) == 1, modelfile_text
    return render_ollama(templates[0], messages)


def _llamacpp_chat_templates() -> list[tuple[str, str]]:
    """(name, Jinja source) of the chat templates inside llama.cpp's tests/test-chat-template.cpp."""
    source = (source_dir() / "tests" / "test-chat-template.cpp").read_text(encoding="utf-8")
    literal = r'"(?:[^"\\]|\\.)*"'
    pattern = re.compile(rf"/\* \.name= \*/\s*({literal})\s*,\s*/\* \.template_str= \*/\s*(?:U8C\()?({literal})")
    return [(ast.literal_eval(name), ast.literal_eval(text)) for name, text in pattern.findall(source)]


# --------------------------------------------------------------------------- the five families

# (case, chat template: a file of llama.cpp's models/templates or None for the vocab GGUF's own,
#  the vocabulary it goes with, the family)
FAMILY_CASES = [
    ("llama-3.1", "meta-llama-Llama-3.1-8B-Instruct.jinja", "llama-bpe", "llama3"),
    ("llama-3.3", "meta-llama-Llama-3.3-70B-Instruct.jinja", "llama-bpe", "llama3"),
    ("qwen-2", None, "qwen2", "chatml"),
    ("qwen-2.5", "Qwen-Qwen2.5-7B-Instruct.jinja", "qwen2", "chatml"),
    ("qwen-3", "Qwen-Qwen3-0.6B.jinja", "qwen2", "chatml"),
    ("gemma-2", "google-gemma-2-2b-it.jinja", "gemma-3", "gemma"),
    ("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "llama-spm", "mistral"),
    ("phi-3-mini", None, "phi-3", "phi3"),
    ("phi-3.5", "microsoft-Phi-3.5-mini-instruct.jinja", "phi-3", "phi3"),
]


def _family_metadata(template_file: str | None, vocab: str) -> tuple[dict[str, Any], bool]:
    metadata, _, adds_bos = _llamacpp_view(_vocab_path(vocab))
    metadata = dict(metadata)
    if template_file is not None:
        metadata["tokenizer.chat_template"] = _template(template_file)
    return metadata, adds_bos


@pytest.mark.parametrize("messages", [WITH_SYSTEM, WITHOUT_SYSTEM, ONE_TURN], ids=["system", "no-system", "one-turn"])
@pytest.mark.parametrize("case, template_file, vocab, family", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_template_gives_the_chat_templates_prompt(case, template_file, vocab, family, messages):
    metadata, adds_bos = _family_metadata(template_file, vocab)
    modelfile = modelfile_for("model.gguf", metadata)
    assert modelfile.family == family

    tokens = metadata["tokenizer.ggml.tokens"]
    bos, eos = tokens[metadata["tokenizer.ggml.bos_token_id"]], tokens[metadata["tokenizer.ggml.eos_token_id"]]
    expected = _expected_prompt(metadata["tokenizer.chat_template"], messages, bos, eos)
    if adds_bos and expected.startswith(bos):
        expected = expected[len(bos) :]  # llama.cpp writes this BOS itself: the TEMPLATE must not
    assert _ollama_prompt(modelfile.text, messages) == expected


def test_template_writes_bos_when_llamacpp_does_not_add_it():
    metadata, _ = _family_metadata("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama-bpe")
    metadata["tokenizer.ggml.add_bos_token"] = False
    modelfile = modelfile_for("model.gguf", metadata)
    expected = _expected_prompt(
        metadata["tokenizer.chat_template"], WITH_SYSTEM, "<|begin_of_text|>", "<|end_of_text|>"
    )
    assert expected.startswith("<|begin_of_text|>")
    assert _ollama_prompt(modelfile.text, WITH_SYSTEM) == expected


def test_gemma3_real_chat_template():
    metadata, _, adds_bos = _llamacpp_view(gemma3_gguf())
    if "tokenizer.chat_template" not in metadata:
        pytest.skip("the packaged Gemma 3 270M is the pretrained model: its GGUF carries no tokenizer.chat_template")
    modelfile = modelfile_for("gemma-3.gguf", metadata)
    assert modelfile.family == "gemma"
    for messages in (WITH_SYSTEM, WITHOUT_SYSTEM):
        expected = _expected_prompt(metadata["tokenizer.chat_template"], messages, "<bos>", "<eos>")
        assert _ollama_prompt(modelfile.text, messages) == expected.removeprefix("<bos>" if adds_bos else "")


# Written for this test after Gemma 3's format (its real template is not available offline: see
# test_gemma3_real_chat_template): the system prompt opens the first user turn, then a blank line.
GEMMA_3_STYLE = (
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    r"{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
    r"{% endif %}{% for message in loop_messages %}"
    r"{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim }}"
    r"{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.mark.parametrize("messages", [WITH_SYSTEM, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_gemma3_style_system_prompt_opens_the_first_user_turn(messages):
    metadata, adds_bos = _family_metadata(None, "gemma-3")
    metadata["tokenizer.chat_template"] = GEMMA_3_STYLE
    modelfile = modelfile_for("gemma-3.gguf", metadata)
    assert modelfile.family == "gemma"
    assert "prepended to the first user message" in modelfile.text
    expected = _hf_prompt(GEMMA_3_STYLE, messages, "<bos>", "<eos>")
    assert adds_bos  # the real Gemma 3 vocabulary: llama.cpp writes <bos> itself
    assert _ollama_prompt(modelfile.text, messages) == expected.removeprefix("<bos>")
    if messages is WITH_SYSTEM:
        assert f"<start_of_turn>user\n{SYSTEM}\n\nWhat is GGUF?" in expected


def test_every_template_llamacpp_ships_is_reproduced_or_left_alone(caplog):
    """Every chat template of llama.cpp that gets a TEMPLATE gets one that reproduces it exactly."""
    templates = [
        (path.name, path.read_text(encoding="utf-8")) for path in sorted((_models() / "templates").glob("*.jinja"))
    ]
    templates += _llamacpp_chat_templates()
    recognised, wrong = {}, []
    with caplog.at_level(logging.ERROR, logger="llmdeploy"):
        for name, template in templates:
            modelfile = modelfile_for("model.gguf", {**PLAIN_VOCABULARY, "tokenizer.chat_template": template})
            if modelfile.family is None:
                assert "template" not in dict(parse_modelfile(modelfile.text)), name
                continue
            recognised[name] = modelfile.family
            for messages in (WITH_SYSTEM, WITHOUT_SYSTEM, ONE_TURN):
                try:
                    expected = _expected_prompt(template, messages, "<s>", "</s>")
                except Exception as e:  # noqa: BLE001 - transformers cannot render it: nothing can reproduce it
                    expected = f"transformers fails: {e}"
                ours = _ollama_prompt(modelfile.text, messages)
                if ours != expected:
                    wrong.append((name, len(messages), ours, expected))
    assert not wrong, wrong[:3]
    # The formats each family is named after: all recognised, as that family.
    assert (
        recognised.items()
        >= {
            "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
            "meta-llama-Llama-3.3-70B-Instruct.jinja": "llama3",
            "Llama-3": "llama3",
            "Qwen-Qwen2.5-7B-Instruct.jinja": "chatml",
            "Qwen-Qwen3-0.6B.jinja": "chatml",
            "teknium/OpenHermes-2.5-Mistral-7B": "chatml",
            "google-gemma-2-2b-it.jinja": "gemma",
            "google/gemma-7b-it": "gemma",
            "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
            "mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)": "mistral",
            "mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)": "mistral",
            "Mistral-Large-Instruct-2407 (mistralai 'v3' template; modified to have system prompt at start)": "mistral",
            "Mistral-Nemo-Instruct-2407 (mistralai 'v3-tekken' template; modified to have system prompt at start)": "mistral",
            "mistralai/Mistral-Large-Instruct-2411 (mistralai 'v7' template)": "mistral",
            "microsoft-Phi-3.5-mini-instruct.jinja": "phi3",
            "Phi-3-mini": "phi3",
            "Phi-3-small": "phi3",
            "Phi-3-medium": "phi3",
            "Phi-3-vision": "phi3",
        }.items()
    )
    # Markers alone do not make a family: today's date (Llama 3.2, Mistral Small 3.2) cannot be written
    # by a Go template, and Phi-4 uses ChatML's tokens in another layout.
    for name in ("meta-llama-Llama-3.2-3B-Instruct.jinja", "Mistral-Small-3.2-24B-Instruct-2506.jinja", "phi-4"):
        assert name not in recognised


# --------------------------------------------------------------------------- stop strings, BOS


@pytest.mark.parametrize(
    "vocab, template_file, expected",
    [
        ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct.jinja", ["<|eot_id|>", "<|end_of_text|>"]),
        ("qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", ["<|im_end|>", "<|endoftext|>"]),
        ("gemma-3", "google-gemma-2-2b-it.jinja", ["<end_of_turn>", "<eos>"]),
        ("phi-3", "microsoft-Phi-3.5-mini-instruct.jinja", ["<|end|>", "<|endoftext|>"]),
        ("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407.jinja", ["</s>"]),
    ],
)
def test_stop_strings_are_the_end_of_turn_and_eos_tokens(vocab, template_file, expected):
    metadata, _ = _family_metadata(template_file, vocab)
    modelfile = modelfile_for("model.gguf", metadata)
    assert list(modelfile.stop) == expected
    assert [value for name, value in parse_modelfile(modelfile.text) if name == "stop"] == expected
    # each is a token llama.cpp itself ends generation on
    assert set(expected) <= _llamacpp_view(_vocab_path(vocab))[1]


def test_stop_strings_only_name_tokens_of_the_vocabulary():
    # Llama 3's template with a vocabulary that has none of its special tokens (Llama 2's), and an
    # EOT id out of range: only the EOS token is left. (Llama 3.0's own vocabulary has no <|eom_id|>
    # either: see the test above.)
    metadata, _ = _family_metadata("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama-spm")
    metadata["tokenizer.ggml.eot_token_id"] = 10**9
    assert list(modelfile_for("model.gguf", metadata).stop) == ["</s>"]


def test_add_bos_default_is_llamacpps():
    # Each vocabulary llama.cpp ships, with and without its add_bos_token KV: the same answer as llama.cpp.
    paths = sorted(_models().glob("ggml-vocab-*.gguf"))
    assert len(paths) > 10
    for path in paths:
        metadata, _, adds_bos = _llamacpp_view(path)
        assert _adds_bos(metadata) == adds_bos, path.name
    assert _adds_bos({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}) is False
    assert _adds_bos({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}) is True
    assert _adds_bos({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.add_bos_token": False}) is True


# --------------------------------------------------------------------------- no TEMPLATE


def _comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


@pytest.mark.parametrize(
    "template, why",
    [
        # no known family's markers
        ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:", "none of"),
        # Gemma's markers, but the assistant's turn is <start_of_turn>assistant (Gemma writes "model")
        (
            (
                "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
            ),
            "Gemma",
        ),
        # Llama 3.2 writes today's date
        (None, "current date"),
    ],
    ids=["unknown", "gemma-markers", "llama-3.2"],
)
def test_unrecognised_template_gives_no_template_and_a_warning(template, why, caplog):
    if template is None:
        metadata, _ = _family_metadata("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama-bpe")
    else:
        metadata = {**PLAIN_VOCABULARY, "tokenizer.chat_template": template}
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        modelfile = modelfile_for("model.gguf", metadata)
    assert modelfile.family is None and modelfile.template is None
    assert [name for name, _ in parse_modelfile(modelfile.text)] == ["model"] + ["stop"] * len(modelfile.stop)
    (comment,) = [line for line in _comment_lines(modelfile.text) if line.startswith("# No TEMPLATE")]
    assert why in comment and "tokenizer.chat_template embedded in the GGUF" in comment
    assert "Ollama will use the tokenizer.chat_template embedded in the GGUF" in caplog.text
    assert why in caplog.text


def test_llama32_without_template_still_stops_at_end_of_turn():
    metadata, _ = _family_metadata("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama-bpe")
    assert list(modelfile_for("model.gguf", metadata).stop) == ["<|eot_id|>", "<|end_of_text|>"]


def test_missing_chat_template_gives_no_template_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        modelfile = modelfile_for("base.gguf", PLAIN_VOCABULARY)
    assert modelfile.family is None
    assert parse_modelfile(modelfile.text) == [("model", "./base.gguf"), ("stop", "</s>")]
    assert any("no tokenizer.chat_template" in line for line in _comment_lines(modelfile.text))
    assert "no tokenizer.chat_template" in caplog.text and "unformatted" in caplog.text


def test_template_that_does_not_compile_gives_no_template(caplog):
    metadata = {**PLAIN_VOCABULARY, "tokenizer.chat_template": "<|im_start|><|im_end|>{% for %}"}
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        assert modelfile_for("model.gguf", metadata).family is None
    assert "does not compile" in caplog.text


def test_from_line_and_bad_names():
    assert parse_modelfile(modelfile_for("m-Q4_K_M.gguf", PLAIN_VOCABULARY).text)[0] == ("model", "./m-Q4_K_M.gguf")
    assert parse_modelfile(modelfile_for("../out/m.gguf", PLAIN_VOCABULARY).text)[0] == ("model", "../out/m.gguf")
    for bad in ("", "a\nFROM b"):
        with pytest.raises(InvalidOptionError, match="gguf_name"):
            modelfile_for(bad, PLAIN_VOCABULARY)


# --------------------------------------------------------------------------- writing


@pytest.fixture()
def gguf_file(tmp_path):
    path = tmp_path / "model-Q8_0.gguf"
    path.write_bytes(b"GGUF placeholder")
    return path


def _qwen_metadata() -> dict[str, Any]:
    return {**PLAIN_VOCABULARY, "tokenizer.chat_template": _template("Qwen-Qwen2.5-7B-Instruct.jinja")}


def test_write_modelfile_beside_the_gguf(gguf_file):
    path = write_modelfile(gguf_file, _qwen_metadata())
    assert path == gguf_file.parent / "Modelfile"
    assert path.read_text(encoding="utf-8") == modelfile_for("model-Q8_0.gguf", _qwen_metadata()).text
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["Modelfile", "model-Q8_0.gguf"]


def test_write_modelfile_elsewhere_names_the_gguf_relative_to_it(gguf_file):
    path = write_modelfile(gguf_file, _qwen_metadata(), path=gguf_file.parent / "ollama" / "Modelfile.qwen")
    (model,) = [value for name, value in parse_modelfile(path.read_text(encoding="utf-8")) if name == "model"]
    assert model == "../model-Q8_0.gguf"
    assert (path.parent / model).resolve() == gguf_file.resolve()
    folder = gguf_file.parent / "folder"
    folder.mkdir()
    assert write_modelfile(gguf_file, _qwen_metadata(), path=folder) == folder / "Modelfile"


def test_write_modelfile_refuses_to_overwrite(gguf_file):
    path = write_modelfile(gguf_file, PLAIN_VOCABULARY)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_modelfile(gguf_file, _qwen_metadata())
    assert path.read_bytes() == before
    write_modelfile(gguf_file, _qwen_metadata(), overwrite=True)
    assert path.read_text(encoding="utf-8") == modelfile_for("model-Q8_0.gguf", _qwen_metadata()).text


def test_write_modelfile_is_atomic(gguf_file, monkeypatch):
    path = write_modelfile(gguf_file, PLAIN_VOCABULARY)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_modelfile(gguf_file, _qwen_metadata(), overwrite=True)
    assert path.read_bytes() == before  # the old file is untouched and no temporary file is left
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["Modelfile", "model-Q8_0.gguf"]
    path.unlink()
    with pytest.raises(OSError, match="disk full"):
        write_modelfile(gguf_file, _qwen_metadata())
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["model-Q8_0.gguf"]


# --------------------------------------------------------------------------- reading a GGUF


def test_metadata_from_gguf_round_trip(tmp_path):
    from llmdeploy import save_pretrained_gguf
    from llmdeploy.gguf.tokenizer import tokenizer_metadata
    from llmdeploy.source import open_source

    folder = model_folder("LlamaForCausalLM")
    (path,) = save_pretrained_gguf(folder, tmp_path, quantization="f16", progress=False, modelfile=False)
    metadata = metadata_from_gguf(path)

    assert metadata == {key: value for key, value, _ in tokenizer_metadata(open_source(folder))}
    assert all(isinstance(token, str) for token in metadata["tokenizer.ggml.tokens"])
    llamacpp_metadata = _llamacpp_view(path)[0]  # llama.cpp reads the same file the same way
    assert metadata["tokenizer.ggml.tokens"] == llamacpp_metadata["tokenizer.ggml.tokens"]
    assert metadata["tokenizer.chat_template"] == llamacpp_metadata["tokenizer.chat_template"]

    # A Modelfile straight from the file. tiny-spm's template has Gemma's turn markers but writes
    # "<start_of_turn>assistant" (Gemma writes "model"): no TEMPLATE, yet its end-of-turn token stops,
    # as does EOS; llama.cpp ends generation on both too.
    modelfile = parse_modelfile(write_modelfile(path, metadata).read_text(encoding="utf-8"))
    assert modelfile == [("model", f"./{path.name}"), ("stop", "<end_of_turn>"), ("stop", "</s>")]
    assert {"<end_of_turn>", "</s>"} <= _llamacpp_view(path)[1]


def test_metadata_from_gguf_errors(tmp_path):
    with pytest.raises(MissingFileError, match="missing.gguf does not exist"):
        metadata_from_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf at all" * 4)
    with pytest.raises(GGUFReadError, match="model.gguf is not a GGUF file"):
        metadata_from_gguf(not_gguf)


# --------------------------------------------------------------------------- the test renderer itself


def test_renderer_on_ollamas_documented_chatml_example():
    # docs/template.mdx's ChatML example, with the output Go's rules give by hand
    template = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "?"},
    ]
    assert render_ollama(template, messages) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_renderer_follows_go_semantics():
    assert execute("a  {{- 1 -}}  b {{/* gone */}}c", {}) == "a1b c"
    assert execute('{{ if eq .X "a" }}A{{ else if eq .X "b" }}B{{ else }}C{{ end }}', {"X": "b"}) == "B"
    assert execute('{{ if eq .X "a" }}A{{ else if eq .X "b" }}B{{ else }}C{{ end }}', {"X": "z"}) == "C"
    assert execute("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}) == "2"
    with pytest.raises(GoTemplateError, match="undefined variable"):
        execute("{{ if true }}{{ $y := 1 }}{{ end }}{{ $y }}", {})
    # and/or stop at the deciding argument: no index error on an empty list
    assert execute('{{ if and .M (eq (index .M 0) "s") }}yes{{ else }}no{{ end }}', {"M": []}) == "no"
    with pytest.raises(GoTemplateError, match="out of range"):
        execute("{{ index .M 0 }}", {"M": []})
    with pytest.raises(GoTemplateError, match="incompatible types"):
        execute('{{ eq 1 "1" }}', {})
    assert execute("{{ range $i, $v := .L }}{{ $i }}{{ $v }}{{ if eq (len (slice $.L $i)) 1 }}!{{ end }}{{ end }}",
                   {"L": ["a", "b"]}) == "0a1b!"  # fmt: skip
    assert execute("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}) == "empty"
    assert execute('{{ "{{" }}{{ .Missing }}', {}) == "{{<no value>"


# Go's own text/template, fed as Ollama feeds it (render_ollama's data), for the check below.
_GO_RENDERER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role, Content, Thinking, ToolName string
	ToolCalls, Images                 []any
}

func main() {
	var cases []struct {
		Template string
		System   string
		Messages []*Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var outs []string
	for _, c := range cases {
		var b strings.Builder
		t, err := template.New("").Option("missingkey=zero").Parse(c.Template)
		if err == nil {
			err = t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages, "Tools": []any{}, "Response": ""})
		}
		if err != nil {
			b.Reset()
			b.WriteString("error: " + err.Error())
		}
		outs = append(outs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
"""


def test_renderer_agrees_with_go(tmp_path):
    """tests/gotemplate.py against Go's text/template itself, on every TEMPLATE the family tests write."""
    import json
    import shutil
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to check the test renderer against")
    (tmp_path / "go.mod").write_text("module render\ngo 1.18\n")
    (tmp_path / "main.go").write_text(_GO_RENDERER)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off"}
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, env=env, check=True, capture_output=True)

    conversations = [
        WITH_SYSTEM, WITHOUT_SYSTEM, ONE_TURN, [],
        [*WITH_SYSTEM, {"role": "assistant", "content": "Prefill"}],  # a final assistant message stays open
        [*WITH_SYSTEM[:2], {"role": "system", "content": "Later."}, {"role": "user", "content": "x {{ y }}"}],
    ]  # fmt: skip
    cases, ours = [], []
    for _, template_file, vocab, _ in FAMILY_CASES:
        if vocab == "gemma-3":
            continue  # needs the Gemma 3 package; gemma-7b-it below covers the family
        template = modelfile_for("m.gguf", _family_metadata(template_file, vocab)[0]).template
        for messages in conversations:
            system, merged = collate(messages)
            cases.append({"Template": template, "System": system, "Messages": [vars(m) for m in merged]})
            ours.append(render_ollama(template, messages))
    gemma = dict(_llamacpp_chat_templates())["google/gemma-7b-it"]
    template = modelfile_for("m.gguf", {**PLAIN_VOCABULARY, "tokenizer.chat_template": gemma}).template
    for messages in conversations:
        system, merged = collate(messages)
        cases.append({"Template": template, "System": system, "Messages": [vars(m) for m in merged]})
        ours.append(render_ollama(template, messages))
    go = subprocess.run([tmp_path / "render"], input=json.dumps(cases), capture_output=True, text=True, check=True)
    assert json.loads(go.stdout) == ours


def test_ollama_merges_consecutive_messages_of_one_role():
    system, merged = collate(
        [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"},
         {"role": "tool", "content": "d"}, {"role": "tool", "content": "e"}]
    )  # fmt: skip
    assert system == "a\n\nb"
    assert [(m.Role, m.Content) for m in merged] == [("system", "a\n\nb"), ("user", "c"), ("tool", "d"), ("tool", "e")]
