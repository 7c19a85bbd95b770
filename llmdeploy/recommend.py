"""Which engine and which file to deploy a model with, on a given GPU or CPU.

The decision tree (``recommend``):

1. **Memory budget.** The device's memory minus headroom for what the estimate does not count
   (driver, CUDA context, the OS, fragmentation):

   - CUDA/ROCm GPU: ``0.90 x VRAM - 0.5 GiB``;
   - Apple silicon (unified memory, llama.cpp's Metal backend): macOS lets the GPU use about
     ``0.66 x`` memory below 36 GiB and ``0.75 x`` from 36 GiB;
   - CPU only: ``0.80 x RAM - 1 GiB``.

2. **With a model** (HF folder, LoRA adapter folder or ``.gguf``), every candidate is sized by
   :func:`llmdeploy.estimate.estimate` at the requested context:

   - **vLLM with merged 16-bit safetensors** when the device is a CUDA/ROCm GPU and the 16-bit
     weights + a full-context KV cache (every layer, f16: vLLM's own cache) + the compute buffer
     + 1 GiB for vLLM's CUDA graphs and workspace fit in ``0.90 x VRAM`` (vLLM's default
     ``--gpu-memory-utilization``). It serves many requests at once at full quality.
   - Otherwise **llama.cpp / Ollama with the GGUF of the most bits that fits** the budget:
     Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K (largest bits per weight first; Q8_0 is the top,
     as 16-bit GGUFs double the memory traffic for no visible quality gain).
   - Nothing fits: the smallest candidate's needs, and what to change (context, partial offload,
     a smaller model).

3. **Without a model**: for common model sizes, the best format that fits the budget, from typical
   bits per weight and a rule-of-thumb KV cache allowance (:data:`TYPICAL_BPW`,
   :func:`general_advice`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidOptionError
from .estimate import Estimate, estimate, format_bytes, kv_cache_bytes
from .gguf.reader import open_gguf
from .gguf.plan import FILE_TYPES

__all__ = [
    "GGUF_CANDIDATES",
    "GPUS",
    "TYPICAL_BPW",
    "Choice",
    "Device",
    "Recommendation",
    "SizeAdvice",
    "device_for",
    "find_gpu",
    "general_advice",
    "recommend",
]

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """Where the model runs.

    Attributes:
        name: a readable name ("NVIDIA RTX 4090", "CPU").
        memory_gib: its memory in GiB: VRAM, unified memory (Apple) or RAM.
        kind: "cuda" (NVIDIA), "rocm" (AMD), "apple" (unified memory, Metal) or "cpu".
    """

    name: str
    memory_gib: float
    kind: str

    @property
    def budget_bytes(self) -> int:
        """The memory a deployment may plan to use, after headroom (see the module docstring)."""
        total = self.memory_gib * GIB
        if self.kind in ("cuda", "rocm"):
            budget = 0.90 * total - 0.5 * GIB
        elif self.kind == "apple":
            budget = (0.75 if self.memory_gib >= 36 else 0.66) * total
        else:
            budget = 0.80 * total - 1 * GIB
        return max(0, int(budget))

    @property
    def memory_kind(self) -> str:
        """What its memory is called: "VRAM", "unified memory" or "RAM"."""
        return {"apple": "unified memory", "cpu": "RAM"}.get(self.kind, "VRAM")

    @property
    def runs_vllm(self) -> bool:
        """Whether vLLM runs on it (CUDA and ROCm GPUs)."""
        return self.kind in ("cuda", "rocm")


def _gpus() -> dict[str, Device]:
    # Memory in GiB as the driver reports it where it differs from the label (an "80 GB" H100 shows
    # 81559 MiB, an A10 23028 MiB); otherwise the label's size.
    nvidia = {
        "RTX 2060": 6, "RTX 2070": 8, "RTX 2080": 8, "RTX 2080 Ti": 11,
        "RTX 3050": 8, "RTX 3060": 12, "RTX 3060 Ti": 8, "RTX 3070": 8, "RTX 3070 Ti": 8, "RTX 3080": 10,
        "RTX 3080 12GB": 12, "RTX 3080 Ti": 12, "RTX 3090": 24, "RTX 3090 Ti": 24,
        "RTX 4060": 8, "RTX 4060 Ti": 8, "RTX 4060 Ti 16GB": 16, "RTX 4070": 12, "RTX 4070 Super": 12,
        "RTX 4070 Ti": 12, "RTX 4070 Ti Super": 16, "RTX 4080": 16, "RTX 4080 Super": 16, "RTX 4090": 24,
        "RTX 5060": 8, "RTX 5060 Ti": 16, "RTX 5070": 12, "RTX 5070 Ti": 16, "RTX 5080": 16, "RTX 5090": 31.8,
        "RTX A4000": 16, "RTX A5000": 24, "RTX A6000": 48, "RTX 6000 Ada": 48, "RTX PRO 6000": 95.6,
        "T4": 15, "V100 16GB": 16, "V100 32GB": 32, "A10": 22.5, "A10G": 22.5, "A30": 24, "A40": 45,
        "A100 40GB": 40, "A100 80GB": 80, "L4": 22.5, "L40": 45, "L40S": 45, "H100": 79.6, "H100 NVL": 93.6,
        "H200": 140.4, "GH200": 95, "B200": 178,
    }  # fmt: skip
    amd = {"MI210": 64, "MI250": 128, "MI300X": 192, "MI325X": 256, "RX 7900 XTX": 24, "RX 7900 XT": 20}
    table = {name: Device(f"NVIDIA {name}", float(gib), "cuda") for name, gib in nvidia.items()}
    table.update({name: Device(f"AMD {name}", float(gib), "rocm") for name, gib in amd.items()})
    return table


#: Known GPUs by name, with their memory. Apple M-series chips are not listed: their unified memory
#: varies by machine, so ``--gpu "M2 Max"`` needs ``--ram``.
GPUS: Mapping[str, Device] = _gpus()
_APPLE = re.compile(r"^(apple)?m[1-9](pro|max|ultra)?$")


def _normalize(name: str) -> str:
    name = name.lower()
    for word in ("nvidia", "geforce", "amd", "radeon", "instinct", "tesla", "apple"):
        name = name.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", name)


def _index() -> dict[str, str]:
    index = {}
    for name in GPUS:
        key = _normalize(name)
        index[key] = name
        if key.startswith("rtx") and key[3:] not in index:
            index[key[3:]] = name  # "4090" for "RTX 4090"
    return index


_INDEX = _index()


def find_gpu(name: str) -> Device:
    """The GPU called ``name`` ("RTX 4090", "rtx4090", "NVIDIA GeForce RTX 4090", "A100 80GB", "H100").

    Args:
        name: a GPU name, any case and spacing.

    Raises:
        InvalidOptionError: an unknown or ambiguous name; the message lists the known ones and
            suggests ``--vram``.
    """
    key = _normalize(name)
    if key in _INDEX:
        return GPUS[_INDEX[key]]
    variants = sorted({n for k, n in _INDEX.items() if k.startswith(key) and re.fullmatch(r"\d+gb", k[len(key) :])})
    if key and variants:
        raise InvalidOptionError(
            f"GPU {name!r} comes with different memory sizes: say which one ({', '.join(variants)}), or give its "
            "memory with --vram GiB."
        )
    if _APPLE.match(key):
        raise InvalidOptionError(
            f"{name!r} is an Apple chip with unified memory that varies by machine: give its memory with --ram GiB "
            "(e.g. --gpu 'M2 Max' --ram 64)."
        )
    raise InvalidOptionError(
        f"Unknown GPU {name!r}. Known GPUs: {', '.join(GPUS)}; Apple M-series chips with --ram. For another GPU, "
        "give its memory instead: --vram GiB."
    )


def _machine_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        raise InvalidOptionError("Cannot read this machine's RAM; give it with --ram GiB.") from None


def device_for(
    *, gpu: str | None = None, vram_gib: float | None = None, cpu_only: bool = False, ram_gib: float | None = None
) -> Device:
    """The device of ``recommend``'s options: one of a GPU name, a VRAM size or CPU-only.

    Args:
        gpu: a GPU name (:data:`GPUS`) or an Apple chip ("M3 Max", with ``ram_gib``).
        vram_gib: a GPU's memory in GiB (an NVIDIA/AMD GPU not in the table).
        cpu_only: run on the CPU; ``ram_gib`` defaults to this machine's RAM.
        ram_gib: RAM in GiB (CPU-only), or an Apple chip's unified memory.

    Raises:
        InvalidOptionError: none or several of gpu / vram_gib / cpu_only, a memory size that is
            not positive, an unknown GPU.
    """
    chosen = [opt for opt, given in (("--gpu", gpu), ("--vram", vram_gib), ("--cpu-only", cpu_only or None)) if given]
    if len(chosen) != 1:
        raise InvalidOptionError(
            f"Give exactly one of --gpu NAME, --vram GiB or --cpu-only (got {', '.join(chosen) or 'none'})."
        )
    for option, value in (("--vram", vram_gib), ("--ram", ram_gib)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InvalidOptionError(f"{option} must be a positive number of GiB, got {value}.")
    if vram_gib is not None:
        return Device("GPU", float(vram_gib), "cuda")
    if cpu_only:
        ram = ram_gib if ram_gib is not None else round(_machine_ram_gib(), 1)
        return Device("CPU", float(ram), "cpu")
    assert gpu is not None
    if ram_gib is not None and _APPLE.match(_normalize(gpu)):
        chip = " ".join(gpu.split()) if gpu.lower().startswith("apple") else f"Apple {' '.join(gpu.split())}"
        return Device(chip, float(ram_gib), "apple")
    return find_gpu(gpu)


# --- with a model -----------------------------------------------------------------------------

#: The GGUF file types ``recommend`` considers, most bits per weight first.
GGUF_CANDIDATES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
_VLLM_OVERHEAD = 1 * GIB  # CUDA graphs, PyTorch and NCCL workspace (vLLM's profile run finds ~0.5-1.5 GiB)
_VLLM_UTILIZATION = 0.90  # vLLM's default --gpu-memory-utilization


@dataclasses.dataclass(frozen=True)
class Choice:
    """A deployment: engine, artifact, the memory it needs, why, and the commands to make it.

    Attributes:
        engine: "vLLM" or "llama.cpp / Ollama".
        artifact: "merged 16-bit safetensors" or "GGUF Q4_K_M".
        quantization: the GGUF file type, or None for 16-bit safetensors.
        memory_bytes: what it needs at the context (weights + KV cache + compute buffer [+ vLLM's overhead]).
        reasons: why this one, one sentence each.
        commands: shell commands that produce and serve it.
    """

    engine: str
    artifact: str
    quantization: str | None
    memory_bytes: int
    reasons: tuple[str, ...]
    commands: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SizeAdvice:
    """For one model size: the best format that fits, without a model at hand.

    Attributes:
        params_b: parameters, in billions.
        format: "16-bit (vLLM)", "GGUF Q8_0" ... or None when nothing fits.
        memory_bytes: the estimated memory of that format (or of Q2_K when nothing fits).
    """

    params_b: float
    format: str | None
    memory_bytes: int


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """What ``recommend`` decided.

    Attributes:
        device: the device.
        budget_bytes: the memory the plan may use (the device's memory minus headroom).
        context: the context length planned for.
        choice: the deployment (None when nothing fits, or without a model).
        candidates: every GGUF candidate sized (with a model), most bits first.
        vllm_bytes: what the vLLM deployment would need (None without an HF model or a vLLM device).
        notes: remarks (why vLLM was not chosen, what to change when nothing fits...).
        general: without a model, per common model size, the best format that fits.
    """

    device: Device
    budget_bytes: int
    context: int
    choice: Choice | None = None
    candidates: tuple[Estimate, ...] = ()
    vllm_bytes: int | None = None
    notes: tuple[str, ...] = ()
    general: tuple[SizeAdvice, ...] = ()


_gib = format_bytes


def recommend(
    *,
    gpu: str | None = None,
    vram_gib: float | None = None,
    cpu_only: bool = False,
    ram_gib: float | None = None,
    model: Any = None,
    context: int = 8192,
    base: str | os.PathLike[str] | None = None,
) -> Recommendation:
    """Pick the engine and the file to deploy ``model`` with on a device (see the module docstring).

    Args:
        gpu: a GPU name (``"RTX 4090"``, ``"A100 80GB"``; an Apple chip with ``ram_gib``).
        vram_gib: a GPU's memory in GiB, instead of a name.
        cpu_only: run on the CPU, with ``ram_gib`` (default: this machine's RAM).
        ram_gib: RAM in GiB for CPU-only, or an Apple chip's unified memory.
        model: an HF model folder, a LoRA adapter folder or a ``.gguf`` file; None for general
            advice per model size.
        context: the context length to plan for, in tokens.
        base: the base model folder of an adapter folder, if its config does not name a local one.

    Raises:
        InvalidOptionError: device options that do not name one device; an unknown GPU.
        MissingFileError, GGUFReadError, UnsupportedArchitectureError: a model that cannot be sized.
    """
    device = device_for(gpu=gpu, vram_gib=vram_gib, cpu_only=cpu_only, ram_gib=ram_gib)
    if context <= 0:
        raise InvalidOptionError(f"--context must be a positive number of tokens, got {context}.")
    budget = device.budget_bytes
    if model is None:
        advice = general_advice(budget, context=context, vllm=device.runs_vllm)
        return Recommendation(device, budget, context, general=advice)
    is_gguf = str(model).lower().endswith(".gguf")
    names = list(GGUF_CANDIDATES) + ([] if is_gguf else ["bf16"])
    estimates = estimate(model, quantization=names, context=context, base=base)
    by_name = {e.quantization: e for e in estimates}
    candidates = tuple(by_name[n] for n in GGUF_CANDIDATES)
    notes: list[str] = []
    if is_gguf:
        (as_is,) = estimate(model, context=context)
        if as_is.quantization not in ("f32", "f16", "bf16"):
            # requantizing cannot restore what the file lost: only the file itself or fewer bits
            fewer = [e for e in candidates if e.bits_per_weight < as_is.bits_per_weight]
            candidates = (as_is, *(e for e in fewer if e.quantization != as_is.quantization))
            notes.append(
                f"The file is already {as_is.quantization.upper()}: only it and smaller quantizations are considered."
            )
    vllm_bytes = None
    if not is_gguf and device.runs_vllm:
        sixteen = by_name["bf16"]
        full_kv = kv_cache_bytes(sixteen.shape, context, swa_full=True)
        vllm_bytes = sixteen.tensor_bytes + full_kv + sixteen.compute_bytes + _VLLM_OVERHEAD
        limit = int(_VLLM_UTILIZATION * device.memory_gib * GIB)
        if vllm_bytes <= limit:
            choice = _vllm_choice(model, base, sixteen, vllm_bytes, limit, context, device)
            return Recommendation(device, budget, context, choice, candidates, vllm_bytes, tuple(notes))
        notes.append(
            f"vLLM with 16-bit weights needs about {_gib(vllm_bytes)} (weights {_gib(sixteen.tensor_bytes)} + "
            f"KV cache {_gib(full_kv)} + compute and CUDA graphs), more than its {_gib(limit)} "
            f"({_VLLM_UTILIZATION:.0%} of {device.memory_gib:g} GiB)."
        )
    elif not device.runs_vllm:
        notes.append(f"vLLM does not run on {'Apple silicon' if device.kind == 'apple' else 'a CPU'}; llama.cpp does.")
    else:
        notes.append("A .gguf file is served by llama.cpp / Ollama (vLLM needs the HF safetensors).")
    fitting = [e for e in candidates if e.total_bytes <= budget]
    if not fitting:
        smallest = candidates[-1]
        offload = "offload only some layers to the GPU (llama.cpp -ngl N, Ollama num_gpu) and keep the rest in RAM, "
        notes.append(
            f"Even {smallest.quantization.upper()} needs {_gib(smallest.total_bytes)} at {context:,} tokens of "
            f"context, over the {_gib(budget)} budget of the {device.name}. Lower --context (the KV cache is "
            f"{_gib(smallest.kv_cache_bytes)}), {offload if device.kind in ('cuda', 'rocm') else ''}"
            "or choose a smaller model."
        )
        return Recommendation(device, budget, context, None, candidates, vllm_bytes, tuple(notes))
    best = fitting[0]
    choice = _gguf_choice(model, best, candidates, budget, context, device, is_gguf)
    return Recommendation(device, budget, context, choice, candidates, vllm_bytes, tuple(notes))


def _vllm_choice(
    model: Any, base: Any, sixteen: Estimate, need: int, limit: int, context: int, device: Device
) -> Choice:
    reasons = (
        (
            f"The 16-bit weights ({_gib(sixteen.tensor_bytes)}) and a full {context:,}-token KV cache fit in "
            f"{_VLLM_UTILIZATION:.0%} of the {device.name}'s {device.memory_gib:g} GiB ({_gib(need)} of {_gib(limit)})."
        ),
        (
            "vLLM serves the unquantized model at full quality and batches concurrent requests; the memory left "
            "over becomes KV cache for more parallel sequences."
        ),
    )
    commands = []
    served = str(model)
    from .merge.merge import is_adapter_folder

    if is_adapter_folder(model):
        base_arg = f" --base {base}" if base is not None else ""
        commands.append(f"llmdeploy merge {model}{base_arg} --out merged")
        served = "merged"
    commands.append(f"vllm serve {served} --max-model-len {context} --gpu-memory-utilization {_VLLM_UTILIZATION}")
    return Choice("vLLM", "merged 16-bit safetensors", None, need, reasons, tuple(commands))


def _gguf_choice(
    model: Any,
    best: Estimate,
    candidates: tuple[Estimate, ...],
    budget: int,
    context: int,
    device: Device,
    is_gguf: bool,
) -> Choice:
    name = best.quantization.upper()
    reasons = [
        (
            f"GGUF {name} ({best.bits_per_weight:.2f} bits per weight) is the largest that fits: "
            f"{_gib(best.total_bytes)} (weights {_gib(best.tensor_bytes)} + KV cache {_gib(best.kv_cache_bytes)} + "
            f"compute {_gib(best.compute_bytes)}) of the {_gib(budget)} budget."
        ),
    ]
    bigger = [e for e in candidates if e.bits_per_weight > best.bits_per_weight]
    if bigger:
        nxt = bigger[-1]
        reasons.append(f"{nxt.quantization.upper()} would need {_gib(nxt.total_bytes)}.")
    if device.kind == "cpu" and best.quantization in ("q8_0", "q6_k", "q5_k_m"):
        reasons.append(
            "On a CPU, generation speed is bound by memory bandwidth: a smaller quantization (Q4_K_M) is "
            "faster, at some quality cost."
        )
    elif device.kind == "apple":
        reasons.append("llama.cpp and Ollama run GGUF on Apple silicon's GPU through Metal.")
    stem = _stem(model, is_gguf)
    commands = []
    path = f"gguf/{stem}-{name}.gguf"
    if not is_gguf:
        commands.append(f"llmdeploy gguf {model} --quant {best.quantization} --out gguf --name {stem}")
    elif best.quantization == (source_type := open_gguf(model).file_type):
        path = str(model)
    else:
        flag = ""
        if source_type not in ("f32", "f16", "bf16", "q8_0"):  # requant takes these without the flag
            flag = " --allow-requantize"
            reasons.append(
                f"The file is already {source_type.upper()}: requantizing it loses more quality than quantizing "
                "the 16-bit model; export from the HF folder with `llmdeploy gguf` if you have it."
            )
        commands.append(f"llmdeploy requant {model} --quant {best.quantization} --out gguf --name {stem}{flag}")
    offload = " -ngl 99" if device.kind != "cpu" else ""
    commands.append(f"llama-server -m {path} -c {context}{offload}")
    source = path if os.path.isabs(path) else f"./{path}"
    modelfile = f"printf 'FROM {source}\\nPARAMETER num_ctx {context}\\n' > Modelfile"
    commands.append(f"{modelfile} && ollama create {stem.lower()} -f Modelfile")
    return Choice(
        "llama.cpp / Ollama", f"GGUF {name}", best.quantization, best.total_bytes, tuple(reasons), tuple(commands)
    )


def _stem(model: Any, is_gguf: bool) -> str:
    """The file name stem for the commands: the folder's or file's name, without a split or file-type suffix."""
    name = pathlib.Path(str(model)).name
    if is_gguf:
        name = re.sub(r"-\d{5}-of-\d{5}$", "", name[: -len(".gguf")])
        name = re.sub(rf"-({'|'.join(FILE_TYPES)})$", "", name, flags=re.IGNORECASE) or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


# --- without a model ------------------------------------------------------------------------

#: Typical bits per weight of whole files (embeddings and output included) for 7-8B Llama-class models.
TYPICAL_BPW: Mapping[str, float] = {
    "q8_0": 8.50, "q6_k": 6.56, "q5_k_m": 5.70, "q4_k_m": 4.89, "q3_k_m": 3.91, "q2_k": 3.00,
}  # fmt: skip
COMMON_SIZES_B = (0.5, 1, 3, 4, 7, 8, 12, 14, 24, 27, 32, 70, 72, 123, 405)


def _rough_runtime_bytes(params_b: float, context: int) -> int:
    """A KV cache + compute allowance for a model of ``params_b`` billion parameters (rule of thumb)."""
    per_token = 45 * 1024 * math.sqrt(params_b)  # 8B: 127 KiB (Llama 3 8B: 128), 70B: 376 KiB (Llama 3 70B: 320)
    return int(per_token * context + 0.5 * GIB)


def general_advice(budget_bytes: int, *, context: int = 8192, vllm: bool = True) -> tuple[SizeAdvice, ...]:
    """Per common model size, the best format that fits ``budget_bytes`` (rules of thumb, no model read).

    Memory = parameters x bits per weight / 8 (16 for 16-bit, :data:`TYPICAL_BPW` for GGUF) + a KV
    cache and compute allowance of ``45 KiB x sqrt(params in billions)`` per token of context + 0.5 GiB
    (Llama 3 8B stores 128 KiB per token, 70B 320 KiB), + 1 GiB for vLLM's CUDA graphs and workspace.

    Args:
        budget_bytes: the usable memory (a :class:`Device`'s ``budget_bytes``).
        context: the context length.
        vllm: whether 16-bit vLLM is an option (a CUDA/ROCm GPU).
    """
    formats = ([("16-bit (vLLM)", 16.0)] if vllm else []) + [(f"GGUF {q.upper()}", b) for q, b in TYPICAL_BPW.items()]
    advice = []
    for size in COMMON_SIZES_B:
        runtime = _rough_runtime_bytes(size, context)
        best = None
        for label, bpw in formats:
            need = int(size * 1e9 * bpw / 8) + runtime + (_VLLM_OVERHEAD if label.startswith("16-bit") else 0)
            if need <= budget_bytes:
                best = SizeAdvice(size, label, need)
                break
        advice.append(best or SizeAdvice(size, None, int(size * 1e9 * formats[-1][1] / 8) + runtime))
    return tuple(advice)
