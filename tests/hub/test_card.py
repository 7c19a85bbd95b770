"""Model cards: metadata the Hub indexes, and a body that describes the real files (llmdeploy/hub/card.py)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import llmdeploy
from llmdeploy.errors import GGUFReadError, InvalidOptionError, MissingFileError
from llmdeploy.hub import build_model_card
from llmdeploy.hub.card import collect_files, detect_kind, looks_like_hub_id

REPO = "alice/tiny-llama-gguf"


@pytest.fixture(scope="module")
def ggufs(llama_with_card: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Q8_0 and F16 GGUFs of the tiny fine-tune whose README names apache-2.0 and meta-llama/Llama-3.2-1B."""
    out = tmp_path_factory.mktemp("ggufs")
    # no Modelfiles: the tests with one add it themselves
    llmdeploy.save_pretrained_gguf(llama_with_card, out, quantization=["q8_0", "f16"], progress=False, modelfile=False)
    return out


@pytest.fixture(scope="module")
def plans(llama_with_card: pathlib.Path) -> dict[str, llmdeploy.gguf.plan.QuantPlan]:
    """The exporter's own plans: the exact tensor bytes and parameters, computed without reading any file."""
    return {p.file_type: p for p in llmdeploy.plan_gguf(llama_with_card, quantization=["q8_0", "f16"])}


@pytest.fixture(scope="module")
def merged(adapter_folder: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    llmdeploy.save_pretrained_merged(adapter_folder, out)
    return out


def _reparsed(card: ModelCard) -> ModelCard:
    """The card as the Hub reads README.md back: YAML block + body."""
    return ModelCard(str(card))


def _kb(n: int) -> str:
    return f"{n / 1e3:.2f} kB"


def test_gguf_card_metadata_comes_from_the_files(ggufs: pathlib.Path) -> None:
    card = _reparsed(build_model_card(ggufs, kind="gguf", repo_id=REPO))
    data = card.data.to_dict()
    # the source folder's README named both; the exporter carried them into general.license / general.base_model
    assert data["base_model"] == "meta-llama/Llama-3.2-1B"
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "gguf"
    assert data["pipeline_tag"] == "text-generation"
    assert {"llmdeploy", "gguf", "llama-cpp", "llama", "q8_0", "f16"} <= set(data["tags"])


def test_gguf_table_names_each_file_with_its_quantization_size_and_bits_per_weight(
    ggufs: pathlib.Path, plans: dict
) -> None:
    text = build_model_card(ggufs, kind="gguf", repo_id=REPO).text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 2
    for quant, plan in (("Q8_0", plans["q8_0"]), ("F16", plans["f16"])):
        path = ggufs / f"tiny-llama-ft-{quant}.gguf"
        expected = f"| `{path.name}` | {quant} | {_kb(path.stat().st_size)} | {plan.bits_per_weight:.2f} |"
        assert expected in rows
    assert f"{plans['q8_0'].n_params / 1e3:.2f}K parameters" in text
    # smallest first: the snippets use it
    assert rows[0].startswith("| `tiny-llama-ft-Q8_0.gguf`")


def test_usage_snippets_name_the_repo_the_quantization_and_the_real_file(ggufs: pathlib.Path) -> None:
    text = build_model_card(ggufs, kind="gguf", repo_id=REPO).text
    assert f"llama-cli -hf {REPO}:Q8_0" in text
    assert "llama-cli -m tiny-llama-ft-Q8_0.gguf" in text
    assert f"ollama run hf.co/{REPO}:Q8_0" in text
    assert "`:F16` instead of `:Q8_0`" in text
    assert "Modelfile" not in text  # none in the folder


def test_split_parts_are_one_model_in_the_table(
    llama_with_card: pathlib.Path, plans: dict, tmp_path: pathlib.Path
) -> None:
    paths = llmdeploy.save_pretrained_gguf(
        llama_with_card, tmp_path, quantization="q8_0", max_file_size=60_000, progress=False
    )
    assert len(paths) == 3
    text = build_model_card(tmp_path, kind="gguf", repo_id=REPO).text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    total = sum(p.stat().st_size for p in paths)
    assert rows == [
        f"| `{paths[0].name}` (+ 2 more parts) | Q8_0 | {_kb(total)} | {plans['q8_0'].bits_per_weight:.2f} |"
    ]
    assert f"llama-cli -m {paths[0].name}" in text  # llama.cpp finds the other parts itself
    assert "ollama run" not in text and "Ollama does not load split GGUF files" in text


def test_modelfile_beside_the_gguf_gets_an_ollama_create_snippet(ggufs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    gguf_file = "tiny-llama-ft-Q8_0.gguf"
    shutil.copy(ggufs / gguf_file, tmp_path / gguf_file)
    (tmp_path / "Modelfile").write_text(f"FROM ./{gguf_file}\nPARAMETER temperature 0.7\n", encoding="utf-8")
    card = _reparsed(build_model_card(tmp_path, kind="gguf", repo_id=REPO))
    assert f"hf download {REPO} {gguf_file} Modelfile --local-dir tiny-llama-gguf" in card.text
    assert "ollama create tiny-llama-gguf -f Modelfile" in card.text
    assert "ollama" in card.data.tags


def test_explicit_base_model_and_license_win(ggufs: pathlib.Path) -> None:
    card = _reparsed(
        build_model_card(ggufs, kind="gguf", repo_id=REPO, base_model="alice/tiny-llama-ft", license="mit")
    )
    assert card.data.base_model == "alice/tiny-llama-ft"
    assert card.data.license == "mit"
    assert "[alice/tiny-llama-ft](https://huggingface.co/alice/tiny-llama-ft)" in card.text


def test_merged_card_base_from_a_hub_id_in_config(merged: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "Qwen/Qwen2.5-0.5B"
    (folder / "config.json").write_text(json.dumps(config))
    data = _reparsed(build_model_card(folder, kind="merged", repo_id="alice/m")).data
    assert data.base_model == "Qwen/Qwen2.5-0.5B"
    assert data.base_model_relation == "finetune"
    assert data.library_name == "transformers"


def test_merged_card_lists_files_parameters_and_engines(merged: pathlib.Path) -> None:
    card = _reparsed(build_model_card(merged, kind="merged", repo_id="alice/tiny-merged"))
    assert "llmdeploy" in card.data.tags and "llama" in card.data.tags
    assert card.data.get("license") is None  # nothing names it (the base folder is not known here)
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    n = sum(t.numel() for t in load_file(str(merged / "model.safetensors")).values())
    assert f"{n / 1e3:.2f}K parameters, bfloat16 safetensors" in card.text
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert f"| `{name}` | " in card.text
    assert "vllm serve alice/tiny-merged" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-merged"' in card.text


def test_merged_card_carries_the_licence_of_a_local_base(merged: pathlib.Path, llama_with_card: pathlib.Path) -> None:
    card = _reparsed(build_model_card(merged, kind="merged", repo_id="alice/m", base_folder=llama_with_card))
    assert card.data.license == "apache-2.0"
    assert card.data.base_model is None  # a local folder is not a base_model id


def test_lora_card(adapter_folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_folder, folder)
    (folder / "README.md").unlink()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    card = _reparsed(build_model_card(folder, kind="lora", repo_id="alice/tiny-lora"))
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert "rank 4, alpha 8, target modules `q_proj`, `v_proj`" in card.text
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/tiny-lora")' in card.text
    assert 'AutoTokenizer.from_pretrained("meta-llama/Llama-3.2-1B")' in card.text  # no tokenizer in the adapter
    assert "vllm serve meta-llama/Llama-3.2-1B --enable-lora --lora-modules tiny-lora=alice/tiny-lora" in card.text


def test_lora_card_with_a_local_base_takes_its_licence(adapter_folder: pathlib.Path) -> None:
    # PEFT wrote the base's local path into adapter_config.json: not a Hub id, but its README has the licence
    card = _reparsed(build_model_card(adapter_folder, kind="lora", repo_id="alice/tiny-lora"))
    assert card.data.base_model is None
    assert card.data.license == "apache-2.0"


@pytest.mark.parametrize(
    ("licence", "expected"),
    [
        ("license: other\nlicense_name: llama3.2\nlicense_link: LICENSE.txt\n",
         {"license": "other", "license_name": "llama3.2", "license_link": "LICENSE.txt"}),
        ("tags: [x]\n", {}),
    ],
)  # fmt: skip
def test_licence_other_keeps_its_name_and_link_and_unknown_is_left_out(
    merged: pathlib.Path, tmp_path: pathlib.Path, licence: str, expected: dict
) -> None:
    (tmp_path / "README.md").write_text(f"---\n{licence}---\n# base\n", encoding="utf-8")
    data = _reparsed(build_model_card(merged, kind="merged", repo_id="alice/m", base_folder=tmp_path)).data.to_dict()
    assert {k: v for k, v in data.items() if k.startswith("license")} == expected


def test_detect_kind() -> None:
    assert detect_kind(["a-Q4_K_M.gguf", "config.json", "model.safetensors"]) == "gguf"
    assert detect_kind(["adapter_config.json", "adapter_model.safetensors"]) == "lora"
    assert detect_kind(["config.json", "model-00001-of-00002.safetensors"]) == "merged"
    assert detect_kind(["config.json", "pytorch_model.bin"]) is None
    assert detect_kind(["notes.txt"]) is None


def test_looks_like_hub_id(tmp_path: pathlib.Path) -> None:
    assert looks_like_hub_id("meta-llama/Llama-3.2-1B")
    assert not looks_like_hub_id(str(tmp_path))  # absolute path
    assert not looks_like_hub_id("gpt2")  # no namespace: could be a local folder name
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("a--b/c")
    assert not looks_like_hub_id(None)


def test_collect_files(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    for name in ("a.gguf", "sub/b.txt", ".git/HEAD", ".cache/huggingface/x.lock", ".a.gguf.tmp-1a2b3c4d"):
        (folder / name).write_bytes(b"x")
    extra = tmp_path / "Modelfile"
    extra.write_text("FROM a.gguf\n")
    files = collect_files([folder, extra])
    assert files == {"a.gguf": folder / "a.gguf", "sub/b.txt": folder / "sub" / "b.txt", "Modelfile": extra}

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.gguf").write_bytes(b"y")
    with pytest.raises(InvalidOptionError, match="would both be uploaded as 'a.gguf'"):
        collect_files([folder, tmp_path / "other" / "a.gguf"])
    with pytest.raises(MissingFileError, match="missing.gguf does not exist"):
        collect_files(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidOptionError, match="nothing to upload"):
        collect_files(tmp_path / "empty")


def test_damaged_gguf_is_named(tmp_path: pathlib.Path) -> None:
    (tmp_path / "broken-Q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(GGUFReadError, match="broken-Q8_0.gguf is not a readable GGUF file"):
        build_model_card(tmp_path, kind="gguf", repo_id=REPO)


def test_unknown_kind(ggufs: pathlib.Path) -> None:
    with pytest.raises(InvalidOptionError, match="kind='onnx' is not a model card kind; use one of gguf, merged, lora"):
        build_model_card(ggufs, kind="onnx", repo_id=REPO)


def test_gguf_kind_needs_a_gguf_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidOptionError, match="kind='gguf' but no .gguf file is among notes.txt"):
        build_model_card(tmp_path, kind="gguf", repo_id=REPO)
