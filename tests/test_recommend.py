"""llmdeploy.recommend: the GPU table, memory budgets and the deployment decision tree."""

from __future__ import annotations

import pathlib

import pytest

import llmdeploy
from llmdeploy.errors import InvalidOptionError
from llmdeploy.estimate import estimate
from llmdeploy.recommend import (
    GGUF_CANDIDATES,
    GIB,
    GPUS,
    Device,
    device_for,
    find_gpu,
    general_advice,
    recommend,
)

from . import models


@pytest.fixture(scope="module")
def folder() -> pathlib.Path:
    return models.model_folder("LlamaForCausalLM")


@pytest.fixture(scope="module")
def candidates(folder: pathlib.Path) -> dict[str, int]:
    """Total memory of each GGUF candidate at 4096 tokens, as estimate() gives it."""
    return {e.quantization: e.total_bytes for e in estimate(folder, quantization=GGUF_CANDIDATES, context=4096)}


# --- devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("RTX 4090", "RTX 4090"), ("rtx4090", "RTX 4090"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("4090", "RTX 4090"),
     ("RTX 3060", "RTX 3060"), ("a100-80gb", "A100 80GB"), ("A100 40GB", "A100 40GB"), ("Tesla T4", "T4"),
     ("NVIDIA H200", "H200"), ("L4", "L4"), ("AMD Instinct MI300X", "MI300X")],
)  # fmt: skip
def test_find_gpu_accepts_common_spellings(name: str, canonical: str) -> None:
    assert find_gpu(name) is GPUS[canonical]


def test_gpu_memory_of_well_known_cards() -> None:
    # nominal sizes; a few cards report slightly less than their label (H100: 81559 MiB)
    expected = {"RTX 3060": 12, "RTX 3090": 24, "RTX 4090": 24, "RTX 5090": 32, "A10": 24, "L4": 24, "T4": 16,
                "A100 40GB": 40, "A100 80GB": 80, "H100": 80, "H200": 141}  # fmt: skip
    for name, label_gb in expected.items():
        # within the label: the table holds what the driver reports, at most ~7% under the label
        assert 0.93 * label_gb <= GPUS[name].memory_gib <= label_gb, name


def test_ambiguous_gpu_asks_which_one() -> None:
    with pytest.raises(InvalidOptionError, match=r"A100 40GB, A100 80GB.*--vram"):
        find_gpu("A100")


def test_unknown_gpu_lists_known_names_and_suggests_vram() -> None:
    with pytest.raises(InvalidOptionError) as info:
        find_gpu("Voodoo 5")
    message = str(info.value)
    assert "'Voodoo 5'" in message and "RTX 4090" in message and "H100" in message and "--vram" in message


def test_apple_chips_need_their_memory() -> None:
    with pytest.raises(InvalidOptionError, match="--ram"):
        find_gpu("M2 Max")
    device = device_for(gpu="M3 Max", ram_gib=64)
    assert (device.kind, device.memory_gib, device.runs_vllm) == ("apple", 64.0, False)


def test_exactly_one_device_option() -> None:
    with pytest.raises(InvalidOptionError, match="exactly one"):
        device_for()
    with pytest.raises(InvalidOptionError, match="exactly one"):
        device_for(gpu="RTX 4090", vram_gib=24)
    with pytest.raises(InvalidOptionError, match="positive"):
        device_for(vram_gib=-1)
    assert device_for(cpu_only=True).memory_gib > 0  # this machine's RAM


def test_budgets_leave_headroom() -> None:
    assert Device("x", 24, "cuda").budget_bytes == int(0.9 * 24 * GIB - 0.5 * GIB)
    assert Device("x", 64, "apple").budget_bytes == int(0.75 * 64 * GIB)
    assert Device("x", 16, "apple").budget_bytes == int(0.66 * 16 * GIB)
    assert Device("x", 32, "cpu").budget_bytes == int(0.8 * 32 * GIB - GIB)
    assert Device("x", 0.5, "cpu").budget_bytes == 0  # never negative


# --- decisions with a model ---------------------------------------------------------------------


def _vram_for(budget: float) -> float:
    return (budget + 0.5 * GIB) / 0.9 / GIB  # inverse of the CUDA budget


def _ram_for(budget: float) -> float:
    return (budget + GIB) / 0.8 / GIB  # inverse of the CPU budget


def test_vllm_when_16_bit_fits(folder: pathlib.Path) -> None:
    rec = recommend(gpu="RTX 4090", model=folder, context=4096)
    assert rec.choice is not None
    assert (rec.choice.engine, rec.choice.quantization) == ("vLLM", None)
    assert rec.vllm_bytes is not None and rec.vllm_bytes <= 0.9 * 24 * GIB
    assert any(c.startswith(f"vllm serve {folder} --max-model-len 4096") for c in rec.choice.commands)


def test_vllm_for_an_adapter_merges_first(tmp_path: pathlib.Path) -> None:
    from tests.merge import common

    adapter = tmp_path / "adapter"
    common.lora(common.load(common.base())).save_pretrained(str(adapter))
    rec = recommend(vram_gib=24, model=adapter)
    assert rec.choice is not None and rec.choice.engine == "vLLM"
    assert rec.choice.commands[0] == f"llmdeploy merge {adapter} --out merged"
    assert rec.choice.commands[1].startswith("vllm serve merged ")


@pytest.mark.parametrize(("smaller", "larger"), list(zip(GGUF_CANDIDATES[1:], GGUF_CANDIDATES[:-1], strict=True)))
def test_gguf_takes_the_most_bits_that_fit(folder: pathlib.Path, candidates: dict, smaller: str, larger: str) -> None:
    # A budget between two candidates' needs: the smaller one is chosen, and the larger reported as not fitting.
    # vLLM is out: its 1 GiB overhead alone exceeds these sub-GiB GPUs.
    assert candidates[smaller] < candidates[larger]
    budget = (candidates[smaller] + candidates[larger]) / 2
    rec = recommend(vram_gib=_vram_for(budget), model=folder, context=4096)
    assert rec.choice is not None
    assert (rec.choice.engine, rec.choice.quantization) == ("llama.cpp / Ollama", smaller)
    assert rec.choice.memory_bytes == candidates[smaller] <= rec.budget_bytes
    assert [e.total_bytes <= rec.budget_bytes for e in rec.candidates] == [
        candidates[q] <= rec.budget_bytes for q in GGUF_CANDIDATES
    ]
    assert any("vLLM with 16-bit weights needs" in note for note in rec.notes)
    assert f"llmdeploy gguf {folder} --quant {smaller} --out gguf --name {folder.name}" in rec.choice.commands
    assert f"llama-server -m gguf/{folder.name}-{smaller.upper()}.gguf -c 4096 -ngl 99" in rec.choice.commands
    assert any(c.startswith("llama-server -m ") and c.endswith("-c 4096 -ngl 99") for c in rec.choice.commands)


def test_cpu_only_sizes_to_ram(folder: pathlib.Path, candidates: dict) -> None:
    budget = (candidates["q4_k_m"] + candidates["q5_k_m"]) / 2
    rec = recommend(cpu_only=True, ram_gib=_ram_for(budget), model=folder, context=4096)
    assert rec.choice is not None and rec.choice.quantization == "q4_k_m"
    assert rec.vllm_bytes is None and any("vLLM does not run on a CPU" in n for n in rec.notes)
    assert not any("-ngl" in c for c in rec.choice.commands)
    big = recommend(cpu_only=True, ram_gib=64, model=folder, context=4096)
    assert big.choice is not None and big.choice.quantization == "q8_0"  # the top GGUF candidate, never 16-bit


def test_apple_uses_gguf_even_when_16_bit_would_fit(folder: pathlib.Path) -> None:
    rec = recommend(gpu="M2 Ultra", ram_gib=192, model=folder, context=4096)
    assert rec.choice is not None and (rec.choice.engine, rec.choice.quantization) == ("llama.cpp / Ollama", "q8_0")
    assert any("Metal" in reason for reason in rec.choice.reasons)


def test_nothing_fits_says_what_to_change(folder: pathlib.Path, candidates: dict) -> None:
    rec = recommend(vram_gib=_vram_for(min(candidates.values()) / 2), model=folder, context=4096)
    assert rec.choice is None
    assert any("Lower --context" in n and "-ngl" in n for n in rec.notes)


def test_a_gguf_model_is_requantized_only_when_needed(folder: pathlib.Path, candidates: dict, tmp_path) -> None:
    (path,) = llmdeploy.save_pretrained_gguf(folder, tmp_path, quantization="q8_0", progress=False)
    as_is = recommend(vram_gib=24, model=path, context=4096)
    assert as_is.choice is not None and as_is.choice.quantization == "q8_0"
    assert not any(c.startswith("llmdeploy requant") for c in as_is.choice.commands)
    assert any("vLLM needs the HF safetensors" in n for n in as_is.notes)
    smaller = recommend(vram_gib=_vram_for((candidates["q4_k_m"] + candidates["q5_k_m"]) / 2), model=path, context=4096)
    assert smaller.choice is not None and smaller.choice.quantization == "q4_k_m"
    stem = path.name.removesuffix("-Q8_0.gguf")
    # from Q8_0, requant needs no --allow-requantize
    assert smaller.choice.commands[0] == f"llmdeploy requant {path} --quant q4_k_m --out gguf --name {stem}"
    assert smaller.choice.commands[1].startswith(f"llama-server -m gguf/{stem}-Q4_K_M.gguf ")


def test_a_quantized_gguf_is_never_requantized_to_more_bits(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (path,) = llmdeploy.save_pretrained_gguf(folder, tmp_path, quantization="q5_k_m", progress=False)
    rec = recommend(vram_gib=24, model=path, context=4096)
    assert [e.quantization for e in rec.candidates] == ["q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]
    assert rec.choice is not None and rec.choice.quantization == "q5_k_m"
    assert rec.choice.commands[0].startswith(f"llama-server -m {path} ")
    # a budget between its own needs and Q4_K_M's: requantized, with the flag and a warning
    needs = {e.quantization: e.total_bytes for e in rec.candidates}
    smaller = recommend(vram_gib=_vram_for((needs["q4_k_m"] + needs["q5_k_m"]) / 2), model=path, context=4096)
    assert smaller.choice is not None and smaller.choice.quantization == "q4_k_m"
    assert smaller.choice.commands[0].endswith(" --allow-requantize")
    assert any("already Q5_K_M" in reason for reason in smaller.choice.reasons)


# --- general advice -----------------------------------------------------------------------------


def _best(advice: tuple, params_b: float) -> str | None:
    return next(a.format for a in advice if a.params_b == params_b)


def test_general_advice_matches_well_known_fits() -> None:
    rtx4090 = recommend(gpu="RTX 4090").general
    assert _best(rtx4090, 8) == "16-bit (vLLM)"  # an 8B model serves in 16-bit on a 24 GB card
    assert _best(rtx4090, 32) is not None and _best(rtx4090, 32).startswith("GGUF Q4")  # 32B needs ~4-bit
    assert _best(rtx4090, 70) is None  # a 70B does not fit 24 GB
    h100 = recommend(gpu="H100").general
    assert _best(h100, 32) == "16-bit (vLLM)"
    assert _best(h100, 70) is not None and _best(h100, 70).startswith("GGUF")
    cpu = recommend(cpu_only=True, ram_gib=16).general
    assert all(a.format is None or a.format.startswith("GGUF") for a in cpu)  # no vLLM on a CPU


def test_general_advice_improves_with_memory() -> None:
    order = ["16-bit (vLLM)", "GGUF Q8_0", "GGUF Q6_K", "GGUF Q5_K_M", "GGUF Q4_K_M", "GGUF Q3_K_M", "GGUF Q2_K", None]
    previous = general_advice(4 * GIB)
    for gib in (8, 12, 16, 24, 48, 80, 141):
        current = general_advice(int(gib * GIB))
        for before, after in zip(previous, current, strict=True):
            assert order.index(after.format) <= order.index(before.format)
        previous = current
