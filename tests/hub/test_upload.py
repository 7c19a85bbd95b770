"""Pushes through the real huggingface_hub client, over HTTP, to the loopback Hub (llmdeploy/hub/upload.py)."""

from __future__ import annotations

import logging
import pathlib
import shutil
import socket
import warnings

import pytest
from huggingface_hub import ModelCard

import llmdeploy
from llmdeploy.errors import HubError, InvalidOptionError, UnsupportedQuantTypeError
from llmdeploy.hub import push_folder, push_to_hub_gguf, push_to_hub_merged

from .conftest import READ_TOKEN, USER, WRITE_TOKEN
from .server import LoopbackHub


@pytest.fixture(scope="module")
def reference_ggufs(llama_with_card: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The same export written locally: what the push must deliver, byte for byte (the export is deterministic)."""
    out = tmp_path_factory.mktemp("reference")
    llmdeploy.save_pretrained_gguf(llama_with_card, out, quantization=["q8_0", "f16"], progress=False)
    return out


def _push_gguf(hub: LoopbackHub, folder: pathlib.Path, repo: str = f"{USER}/tiny-gguf", **kwargs) -> str:
    kwargs.setdefault("token", WRITE_TOKEN)
    return push_to_hub_gguf(folder, repo, quantization=["q8_0", "f16"], endpoint=hub.endpoint, progress=False, **kwargs)


def test_push_gguf_delivers_the_exported_bytes_in_one_commit_with_a_card(
    hub: LoopbackHub, llama_with_card: pathlib.Path, reference_ggufs: pathlib.Path, temp_root: pathlib.Path
) -> None:
    url = _push_gguf(hub, llama_with_card)

    repo = hub.repos[f"{USER}/tiny-gguf"]
    assert len(repo.commits) == 1
    commit = repo.commits[0]
    assert url == f"{hub.endpoint}/{USER}/tiny-gguf/commit/{commit.oid}"
    assert commit.summary == "Upload Q8_0, F16 GGUF with llmdeploy"
    expected = {p.name: p.read_bytes() for p in reference_ggufs.iterdir()}
    assert set(commit.files) == {*expected, "README.md"}
    for name, data in expected.items():
        assert commit.files[name] == data, name
    # the GGUFs went through LFS (batch, PUT to storage, verify); the card and the Modelfiles inline
    ggufs = [name for name in expected if name.endswith(".gguf")]
    assert sorted(expected) == sorted([*ggufs, "Modelfile-F16", "Modelfile-Q8_0"])
    assert sorted(commit.lfs) == sorted(ggufs)
    assert sorted(commit.inline) == ["Modelfile-F16", "Modelfile-Q8_0", "README.md"]
    assert hub.routes().count("lfs-put") == 2 and hub.routes().count("lfs-verify") == 2
    assert hub.unexpected == []  # nothing else (no Xet endpoints): the client took the LFS path
    assert list(temp_root.iterdir()) == []  # the export's temporary folder is gone

    card = ModelCard(commit.files["README.md"].decode())
    assert hub.validated == [commit.files["README.md"].decode()]  # checked by the Hub before the upload
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "gguf"
    assert card.data.license == "apache-2.0"
    assert {"llmdeploy", "gguf", "llama-cpp", "q8_0", "f16"} <= set(card.data.tags)
    for name in ggufs:  # the file table lists the models; the Modelfiles appear in the Ollama snippet
        assert f"| `{name}` |" in card.text
    assert "ollama create tiny-gguf -f Modelfile-Q8_0" in card.text
    assert f"llama-cli -hf {USER}/tiny-gguf:Q8_0" in card.text


def test_base_model_from_an_in_memory_models_hub_name(hub: LoopbackHub, llama_folder: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llama_folder), dtype=torch.float32)
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"  # as after from_pretrained("meta-llama/...")
    tokenizer = AutoTokenizer.from_pretrained(str(llama_folder))
    push_to_hub_gguf(
        model, f"{USER}/mem", tokenizer=tokenizer, quantization="q8_0", token=WRITE_TOKEN, endpoint=hub.endpoint,
        progress=False,
    )  # fmt: skip
    card = ModelCard(hub.repos[f"{USER}/mem"].files["README.md"].decode())
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.base_model_relation == "quantized"
    assert card.data.get("license") is None  # nothing tells it


def test_small_files_go_inline_and_big_ones_through_lfs(hub: LoopbackHub, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    small = b"a few bytes of notes\n"
    big = b"".join(b"line %08d of a large text file\n" % i for i in range(400_000))  # 12.8 MB of text
    assert len(big) >= 10 * 1024 * 1024  # the Hub's size threshold for LFS
    (folder / "notes.txt").write_bytes(small)
    (folder / "big.txt").write_bytes(big)

    push_folder(folder, f"{USER}/files", token=WRITE_TOKEN, endpoint=hub.endpoint)

    (commit,) = hub.repos[f"{USER}/files"].commits
    assert commit.files == {"notes.txt": small, "big.txt": big}  # no card: no model files
    assert commit.inline == ["notes.txt"] and commit.lfs == ["big.txt"]
    assert commit.summary == "Upload 2 files with llmdeploy"


def test_private_reaches_the_create_request(hub: LoopbackHub, tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    for private, repo in ((True, "a"), (False, "b"), (None, "c")):
        push_folder(tmp_path / "notes.txt", f"{USER}/{repo}", token=WRITE_TOKEN, endpoint=hub.endpoint, private=private)
    creates = [r.body for r in hub.requests if r.route == "create"]
    assert [c.get("visibility") for c in creates] == ["private", "public", None]
    assert hub.repos[f"{USER}/a"].visibility == "private"


def test_an_existing_readme_is_kept(hub: LoopbackHub, reference_ggufs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "mine"
    shutil.copytree(reference_ggufs, folder)
    own = "---\nlicense: mit\n---\n# My own card\n"
    (folder / "README.md").write_text(own, encoding="utf-8")

    push_folder(folder, f"{USER}/mine", token=WRITE_TOKEN, endpoint=hub.endpoint, commit_message="mine")

    (commit,) = hub.repos[f"{USER}/mine"].commits
    assert commit.files["README.md"] == own.encode()
    assert commit.summary == "mine"
    assert (folder / "README.md").read_text(encoding="utf-8") == own  # nothing in the folder was touched


def test_a_readme_already_in_the_repo_is_kept(
    hub: LoopbackHub, reference_ggufs: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "README.md").write_text("# Written on the Hub\n", encoding="utf-8")
    push_folder(tmp_path / "README.md", f"{USER}/kept", token=WRITE_TOKEN, endpoint=hub.endpoint)
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        push_folder(reference_ggufs, f"{USER}/kept", token=WRITE_TOKEN, endpoint=hub.endpoint)

    repo = hub.repos[f"{USER}/kept"]
    assert len(repo.commits) == 2 and "README.md" not in repo.commits[1].files
    assert repo.files["README.md"] == b"# Written on the Hub\n"
    assert f"{USER}/kept already has a README.md: it is kept" in caplog.text


def test_token_is_sent_but_never_shown(
    hub: LoopbackHub,
    reference_ggufs: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, huggingface_hub's and httpx's included
    push_folder(reference_ggufs, f"{USER}/secret", token=WRITE_TOKEN, endpoint=hub.endpoint)

    api = [r for r in hub.requests if r.route != "lfs-put"]
    assert api and all(r.authorization == f"Bearer {WRITE_TOKEN}" for r in api)
    # storage URLs (presigned on the real Hub) never get the token
    assert [r.authorization for r in hub.requests if r.route == "lfs-put"] == [None, None]
    out, err = capsys.readouterr()
    assert caplog.text and WRITE_TOKEN not in caplog.text
    assert WRITE_TOKEN not in out + err
    assert WRITE_TOKEN not in hub.repos[f"{USER}/secret"].files["README.md"].decode()


def test_token_from_hf_token_variable(
    hub: LoopbackHub, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    (tmp_path / "notes.txt").write_text("x")
    push_folder(tmp_path, f"{USER}/env", endpoint=hub.endpoint)
    assert {r.authorization for r in hub.requests} == {f"Bearer {WRITE_TOKEN}"}


def test_no_token_fails_before_any_request_or_export(
    hub: LoopbackHub, llama_with_card: pathlib.Path, temp_root: pathlib.Path
) -> None:
    with pytest.raises(HubError, match=r"no Hugging Face token to push to alice/x: log in with `hf auth login`"):
        push_to_hub_gguf(llama_with_card, f"{USER}/x", endpoint=hub.endpoint, progress=False)
    assert hub.requests == [] and list(temp_root.iterdir()) == []


@pytest.mark.parametrize(
    ("token", "status", "fix"),
    [
        ("hf_NotAValidToken000000000000000000", 401, "log in with `hf auth login` (or set HF_TOKEN), or pass token="),
        (READ_TOKEN, 403, "use a token with the 'write' role"),
    ],
)
def test_rejected_token_names_repo_step_and_fix_without_the_token(
    hub: LoopbackHub, llama_with_card: pathlib.Path, temp_root: pathlib.Path, token: str, status: int, fix: str
) -> None:
    with pytest.raises(HubError) as info:
        _push_gguf(hub, llama_with_card, repo=f"{USER}/denied", token=token)
    message = str(info.value)
    assert message.startswith(f"Hub create repo failed for {USER}/denied ({hub.endpoint}): HTTP {status}")
    assert fix in message
    assert token not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # the request is not chained
    assert hub.requests[0].authorization == f"Bearer {token}"
    assert hub.commits == [] and list(temp_root.iterdir()) == []  # nothing exported: the repo step failed first


def test_failed_upload_leaves_no_temporary_folder_and_no_commit(
    hub: LoopbackHub, llama_with_card: pathlib.Path, temp_root: pathlib.Path
) -> None:
    hub.fail("lfs-put", 403, "Request has expired")  # the storage refuses the file (not retried, like S3)
    with pytest.raises(HubError) as info:
        _push_gguf(hub, llama_with_card, repo=f"{USER}/broken")
    message = str(info.value)
    assert f"Hub upload failed for {USER}/broken" in message
    assert "while uploading 'tiny-llama-ft-" in message and "HTTP 403: Request has expired" in message
    assert WRITE_TOKEN not in message
    assert hub.repos[f"{USER}/broken"].commits == []
    assert list(temp_root.iterdir()) == []


def test_failed_commit_names_the_commit_step(hub: LoopbackHub, tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    hub.fail("commit", 422, "Invalid commit")
    with pytest.raises(HubError, match=rf"^Hub commit failed for {USER}/c \(.*\): HTTP 422: Invalid commit"):
        push_folder(tmp_path, f"{USER}/c", token=WRITE_TOKEN, endpoint=hub.endpoint)


def test_unreachable_endpoint(tmp_path: pathlib.Path, hub: LoopbackHub) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HubError, match=r"Hub create repo failed for alice/u \(http://127.0.0.1:\d+\): cannot reach"):
        push_folder(tmp_path, f"{USER}/u", token=WRITE_TOKEN, endpoint=f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad--name/x"])
def test_invalid_repo_id_fails_before_any_request(hub: LoopbackHub, tmp_path: pathlib.Path, repo_id: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidOptionError, match=f"repo_id='{repo_id}'"):
        push_folder(tmp_path, repo_id, token=WRITE_TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_push_merged_delivers_the_merged_folder(
    hub: LoopbackHub, adapter_folder: pathlib.Path, llama_with_card: pathlib.Path, tmp_path: pathlib.Path,
    temp_root: pathlib.Path,
) -> None:  # fmt: skip
    reference = llmdeploy.save_pretrained_merged(adapter_folder, tmp_path / "reference")
    push_to_hub_merged(adapter_folder, f"{USER}/merged", token=WRITE_TOKEN, endpoint=hub.endpoint)

    (commit,) = hub.repos[f"{USER}/merged"].commits
    expected = {p.name: p.read_bytes() for p in reference.iterdir()}
    assert set(commit.files) == {*expected, "README.md"}
    for name, data in expected.items():
        assert commit.files[name] == data, name
    assert "model.safetensors" in commit.lfs and "config.json" in commit.inline
    card = ModelCard(commit.files["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"  # from the local base's README
    assert card.data.base_model is None  # the base is a local folder, not a Hub id
    assert commit.summary == "Upload merged model with llmdeploy"
    assert list(temp_root.iterdir()) == []


def test_push_lora_from_an_adapter_folder_keeps_its_readme(hub: LoopbackHub, adapter_folder: pathlib.Path) -> None:
    push_to_hub_merged(adapter_folder, f"{USER}/lora", save_method="lora", token=WRITE_TOKEN, endpoint=hub.endpoint)
    (commit,) = hub.repos[f"{USER}/lora"].commits
    assert commit.files["README.md"] == (adapter_folder / "README.md").read_bytes()
    assert commit.files["adapter_model.safetensors"] == (adapter_folder / "adapter_model.safetensors").read_bytes()
    assert commit.summary == "Upload LoRA adapter with llmdeploy"


def test_push_lora_of_an_in_memory_model_replaces_peft_template_card(
    hub: LoopbackHub, llama_with_card: pathlib.Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_with_card), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # as if loaded from the Hub (PEFT's own base_model_name_or_path stays the local folder: its save looks there)
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"

    push_to_hub_merged(peft_model, f"{USER}/mem-lora", save_method="lora", token=WRITE_TOKEN, endpoint=hub.endpoint)

    (commit,) = hub.repos[f"{USER}/mem-lora"].commits
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(commit.files)
    card = ModelCard(commit.files["README.md"].decode())
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert {"llmdeploy", "lora", "transformers"} <= set(card.data.tags)  # ours and PEFT's
    assert not [t for t in card.data.tags if str(llama_with_card) in t or t.startswith("base_model:")]
    assert "rank 4, alpha 8" in card.text


def test_invalid_readme_metadata_is_refused_before_the_upload(
    hub: LoopbackHub, reference_ggufs: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    folder = tmp_path / "bad-card"
    shutil.copytree(reference_ggufs, folder)
    (folder / "README.md").write_text("---\n- a list\n- not a mapping\n---\n# card\n", encoding="utf-8")
    with pytest.raises(HubError, match=rf"^Hub validate README.md failed for {USER}/bad-card .*Fix the YAML block"):
        push_folder(folder, f"{USER}/bad-card", token=WRITE_TOKEN, endpoint=hub.endpoint)
    assert "lfs-put" not in hub.routes() and hub.commits == []  # refused before any large file was sent


def test_unknown_quantization_fails_before_any_request(hub: LoopbackHub, llama_with_card: pathlib.Path) -> None:
    with pytest.raises(UnsupportedQuantTypeError, match="Unknown GGUF file type 'q9_k'"):
        push_to_hub_gguf(llama_with_card, f"{USER}/q9", quantization="q9_k", token=WRITE_TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []
