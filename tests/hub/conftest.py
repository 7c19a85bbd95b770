"""Fixtures for the Hub tests: a loopback Hub server, a client configured for it, tiny models."""

from __future__ import annotations

import os
import pathlib
import shutil
import warnings
from collections.abc import Iterator

import pytest

from tests.models import model_folder

from .server import LoopbackHub

WRITE_TOKEN = "hf_WriteTokenForLoopbackTests0123456789"
READ_TOKEN = "hf_ReadOnlyTokenForLoopbackTests987654"
USER = "alice"
# Small real architectures: hidden 64 (rows divide Q8_0's blocks of 32), a few hundred kB of weights.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
README = """---
license: apache-2.0
base_model: meta-llama/Llama-3.2-1B
---

# A fine-tune
"""


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> Iterator[LoopbackHub]:
    """The loopback Hub, with the real huggingface_hub client set up to reach it on the non-Xet path.

    The client takes no token from this machine (no HF_TOKEN, no stored token) unless a test sets one.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # HF_HUB_OFFLINE=1 would refuse even loopback requests
    # read once at import: the upload path checks the constant, not the variable
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    server = LoopbackHub({WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def temp_root(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """An empty folder that ``tempfile`` uses for this test: what a push leaves behind shows there."""
    import tempfile

    root = tmp_path / "tempdir"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture(scope="session")
def llama_folder() -> pathlib.Path:
    """A tiny random Llama folder (bf16 safetensors, tokenizer), cached across runs."""
    return model_folder("LlamaForCausalLM", **TINY)


@pytest.fixture(scope="session")
def llama_with_card(llama_folder: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tiny Llama with a README.md naming its licence and its base model, as a fine-tune's folder does."""
    folder = tmp_path_factory.mktemp("card") / "tiny-llama-ft"
    shutil.copytree(llama_folder, folder)
    (folder / "README.md").write_text(README, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def adapter_folder(llama_with_card: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A LoRA adapter saved by PEFT on the tiny Llama (its base_model_name_or_path: that local folder)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_with_card), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # B is zero after init: give the adapter weights a fine-tune's look
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02)
    folder = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    peft_model.save_pretrained(str(folder))
    assert os.path.isdir(folder)
    return folder
