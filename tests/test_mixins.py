"""The model methods: patch(model), patch() for every model, and the DeployMixin base class.

Each method must do exactly what the public function does with the model passed in (the
functions themselves are tested against PEFT and llama.cpp in tests/merge and tests/gguf), and
patching must not change anything a model already had.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import llmdeploy
from llmdeploy.mixins import METHODS
from tests.hub.conftest import USER, WRITE_TOKEN, hub  # noqa: F401 - the loopback Hub fixture
from tests.merge.common import base, load, lora, read


@pytest.fixture
def peft_model():
    return lora(load(base(), torch.bfloat16), target_modules=["q_proj", "v_proj"])


def _gguf_bytes(path: pathlib.Path) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(path).tensors}


def test_patch_one_model_adds_the_methods_to_it_only(peft_model) -> None:
    other = load(base())
    assert llmdeploy.patch(peft_model) is peft_model
    for name in METHODS:
        assert callable(getattr(peft_model, name))
        assert not hasattr(other, name)
        assert not hasattr(type(peft_model), name)


def test_patched_methods_do_what_the_functions_do(peft_model, tmp_path: pathlib.Path) -> None:
    llmdeploy.patch(peft_model)
    (ours,) = peft_model.save_pretrained_gguf(tmp_path / "m", quantization="quantized", progress=False)
    (theirs,) = llmdeploy.save_pretrained_gguf(peft_model, tmp_path / "f", quantization="q4_k_m", progress=False)
    assert ours.name.endswith("-Q4_K_M.gguf")  # Unsloth's "quantized" is q4_k_m
    assert _gguf_bytes(ours) == _gguf_bytes(theirs)
    merged = peft_model.save_pretrained_merged(tmp_path / "merged")
    reference = llmdeploy.save_pretrained_merged(peft_model, tmp_path / "merged-ref")
    a, b = read(merged), read(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsloth_names_and_options_are_understood(peft_model, tmp_path: pathlib.Path, caplog) -> None:
    llmdeploy.patch(peft_model)
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        paths = peft_model.save_pretrained_gguf(
            tmp_path, quantization_method=["not_quantized", "fast_quantized"], maximum_memory_usage=0.75,
            progress=False,
        )  # fmt: skip
    assert sorted(p.name.rsplit("-", 1)[1] for p in paths) == ["F16.gguf", "Q8_0.gguf"]
    assert "maximum_memory_usage" in caplog.text


def test_patch_everything_then_every_model_has_the_methods(peft_model) -> None:
    from peft import PeftModel
    from transformers import PreTrainedModel

    try:
        assert llmdeploy.patch() is None
        model = load(base())
        for name in METHODS:
            assert callable(getattr(model, name)) and callable(getattr(peft_model, name))
    finally:
        for cls in (PreTrainedModel, PeftModel):
            for name in METHODS:
                if getattr(cls, name, None) is getattr(llmdeploy.DeployMixin, name):
                    delattr(cls, name)


def test_patching_never_replaces_what_a_model_has(tmp_path: pathlib.Path) -> None:
    model = load(base())

    def own_method(*args, **kwargs):
        return "the model's own"

    model.save_pretrained_gguf = own_method  # e.g. another library's method of the same name
    llmdeploy.patch(model)
    assert model.save_pretrained_gguf() == "the model's own"
    assert callable(model.save_pretrained_merged)
    # the existing methods behave as before
    model.save_pretrained(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_patch_refuses_what_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel or a peft.PeftModel, not dict"):
        llmdeploy.patch({})


def test_subclassing_the_mixin(tmp_path: pathlib.Path) -> None:
    from transformers import LlamaForCausalLM

    class DeployableLlama(llmdeploy.DeployMixin, LlamaForCausalLM):
        pass

    model = DeployableLlama.from_pretrained(str(base()))
    (path,) = model.save_pretrained_gguf(tmp_path / "a", quantization="q8_0", progress=False)
    (ref,) = llmdeploy.save_pretrained_gguf(base(), tmp_path / "b", quantization="q8_0", progress=False)
    assert _gguf_bytes(path) == _gguf_bytes(ref)


def test_push_to_hub_gguf_method(peft_model, hub) -> None:  # noqa: F811 - the fixture
    llmdeploy.patch(peft_model)
    url = peft_model.push_to_hub_gguf(
        f"{USER}/ft-gguf", quantization="q8_0", token=WRITE_TOKEN, endpoint=hub.endpoint, progress=False
    )
    commit = hub.repos[f"{USER}/ft-gguf"].commits[0]
    assert url.endswith(commit.oid)
    assert any(name.endswith("-Q8_0.gguf") for name in commit.files) and "README.md" in commit.files


@pytest.mark.parametrize(
    ("option", "fix"),
    [("push_to_hub", "push_to_hub_gguf"), ("imatrix_file", "not supported yet"), ("max_shard_size", "max_file_size=")],
)
def test_unsloth_options_with_another_way_are_refused_with_it(peft_model, tmp_path: pathlib.Path, option, fix) -> None:
    from llmdeploy.errors import InvalidOptionError

    llmdeploy.patch(peft_model)
    with pytest.raises(InvalidOptionError, match=f"{option}= is an Unsloth option .*{fix}"):
        peft_model.save_pretrained_gguf(tmp_path, quantization="q8_0", **{option: "x"})
    assert not any(tmp_path.iterdir())
