"""LoRA merge: llmdeploy's ``save_pretrained_merged`` against PEFT, side by side.

On the same base model and adapter, each in a fresh subprocess:

  peft          ``AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16)``,
                ``PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)``
  llmdeploy-mem the same load, then ``save_pretrained_merged(peft_model, out)`` (in-memory path)
  llmdeploy-dir ``save_pretrained_merged(adapter_folder, out, base=base_folder)`` (disk to disk)

Each child reports its own wall time (from its first line, imports included: what a user
waits for) split into phases, and its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``). Before
each run the base files are read once, so every run starts with the weights in the page cache.
After the runs, the outputs are compared tensor by tensor: llmdeploy's two paths must be
byte-identical, and within one bf16 ulp of PEFT's (PEFT rounds twice in bf16, llmdeploy once).

Models: synthetic bf16 Llamas (hidden 2048, intermediate 5632, GQA 16/4 heads, 32k vocabulary,
untied head) with the number of layers set for the size: ``--sizes 0.5 2`` gives 3 layers
(0.53 GB) and 19 layers (1.98 GB). They are written shard by shard with safetensors (a few
hundred MB of RAM to build) and cached under ``--workdir``. The adapter: LoRA r=16,
lora_alpha=32 on all seven linear layers of every block, random A and nonzero random B.

    python benchmarks/bench_merge.py                       # 0.5 GB and 2 GB, 3 runs each
    python benchmarks/bench_merge.py --sizes 0.5 --repeat 1 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/machine.py
from machine import describe as describe_machine  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
)  # fmt: skip
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_SHARD_BYTES = 10**9  # the base is saved in shards of at most 1 GB, as a hub checkpoint is
METHODS = ("peft", "llmdeploy-mem", "llmdeploy-dir")
_BUILD = 1  # bump when the builders change what they build

# -- the children ---------------------------------------------------------------------------------

_PRELUDE = """
import time
T0 = time.perf_counter()
import json, resource, sys, warnings
warnings.simplefilter("ignore")
base, adapter, out = sys.argv[1:4]
phases = {}
def mark(name, _last=[T0]):
    now = time.perf_counter()
    phases[name] = now - _last[0]
    _last[0] = now
"""
_REPORT = """
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": time.perf_counter() - T0, "cpu_s": ru.ru_utime + ru.ru_stime, "phases": phases,
                  "peak_rss_kb": ru.ru_maxrss, "loaded_peak_kb": globals().get("LOADED_PEAK_KB", 0)}))
"""
_LOAD = """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
mark("import")
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
pm = PeftModel.from_pretrained(model, adapter)
mark("load")
LOADED_PEAK_KB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak with the model loaded
"""
CHILDREN = {
    "peft": _PRELUDE + _LOAD + """
merged = pm.merge_and_unload()
mark("merge")
merged.save_pretrained(out)
mark("save")
""" + _REPORT,
    "llmdeploy-mem": _PRELUDE + _LOAD + """
from llmdeploy import save_pretrained_merged
save_pretrained_merged(pm, out)
mark("merge+save")
""" + _REPORT,
    "llmdeploy-dir": _PRELUDE + """
from llmdeploy import save_pretrained_merged
mark("import")
save_pretrained_merged(adapter, out, base=base)
mark("merge+save")
""" + _REPORT,
}  # fmt: skip

# -- the model and adapter ------------------------------------------------------------------------------


def layers_for(gb: float, shape: dict[str, int] = SHAPE) -> int:
    """The number of layers that gives about ``gb`` GB of bf16 weights (at least one)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    fixed = 2 * (2 * v * h + h)
    return max(1, round((gb * 1e9 - fixed) / per_layer))


def _tensor_shapes(n_layers: int, shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(n_layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]  # fmt: skip
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_base(folder: pathlib.Path, n_layers: int, *, shape: dict[str, int] = SHAPE, seed: int = 0) -> pathlib.Path:
    """A random bf16 Llama with ``n_layers`` layers, written shard by shard (cached)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    config = LlamaConfig(
        **shape, num_hidden_layers=n_layers, tie_word_embeddings=False, max_position_embeddings=4096,
        architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )  # fmt: skip
    # shard assignment first (sizes are known from the shapes), then each shard generated, written, dropped
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in _tensor_shapes(n_layers, shape):
        nbytes = 2 * _numel(dims)
        if size and size + nbytes > BASE_SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((name, dims))
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, dims in names:
            scale, shift = (0.1, 1.0) if name.endswith("norm.weight") else (0.02, 0.0)
            shard[name] = (shift + scale * torch.randn(dims, generator=g)).to(torch.bfloat16)
            weight_map[name] = fname
            total += shard[name].nbytes
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        del shard
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    config.save_pretrained(str(tmp))
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def build_adapter(
    folder: pathlib.Path,
    base: pathlib.Path,
    n_layers: int,
    *,
    shape: dict[str, int] = SHAPE,
    r: int = 16,
    seed: int = 1,
) -> pathlib.Path:
    """LoRA r=16 on all linear layers, float32 like a trained adapter, with nonzero B (cached)."""
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in _tensor_shapes(n_layers, shape):
        mod = name.removesuffix(".weight")
        if mod.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = dims
        key = f"base_model.model.{mod}"
        tensors[f"{key}.lora_A.weight"] = 0.05 * torch.randn((r, in_f), generator=g)
        tensors[f"{key}.lora_B.weight"] = 0.02 * torch.randn((out_f, r), generator=g)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    cfg.base_model_name_or_path = str(base)
    cfg.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def weight_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# -- running -------------------------------------------------------------------------------------------


def warm_page_cache(*folders: pathlib.Path) -> None:
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def run_child(method: str, base: pathlib.Path, adapter: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", CHILDREN[method], str(base), str(adapter), str(out)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_COMPARE = """
import json, sys, torch
from safetensors import safe_open
def tensors(folder):
    import pathlib
    files = sorted(pathlib.Path(folder).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                where[k] = str(f)
    return where
def ordered(x):
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i + 32768), i)
base, ref, a, b = (tensors(p) for p in sys.argv[1:5])
assert set(base) == set(ref) == set(a) == set(b), (sorted(set(ref) ^ set(a)), sorted(set(a) ^ set(b)))
max_ulp, identical, n_diff, n, changed = 0, True, 0, 0, 0
for k in sorted(ref):
    with safe_open(ref[k], "pt") as f: r = f.get_tensor(k)
    with safe_open(a[k], "pt") as f: x = f.get_tensor(k)
    with safe_open(b[k], "pt") as f: y = f.get_tensor(k)
    with safe_open(base[k], "pt") as f: w = f.get_tensor(k)
    identical &= torch.equal(x, y)
    changed += int(not torch.equal(w, x))
    d = (ordered(x) - ordered(r)).abs()
    max_ulp = max(max_ulp, int(d.max()))
    n_diff += int((d > 0).sum()); n += d.numel()
print(json.dumps({"max_ulp_vs_peft": max_ulp, "frac_differ_vs_peft": n_diff / n, "paths_identical": identical,
                  "tensors_changed": changed, "tensors": len(ref)}))
"""


def compare(base: pathlib.Path, peft_out: pathlib.Path, mem_out: pathlib.Path, dir_out: pathlib.Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _COMPARE, str(base), str(peft_out), str(mem_out), str(dir_out)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"comparing the outputs failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(
    n_layers: int, workdir: pathlib.Path, repeat: int, methods: list[str], check: bool, shape: dict[str, int] = SHAPE
) -> dict[str, Any]:
    tag = "" if shape == SHAPE else "-" + "-".join(str(v) for v in shape.values())
    base = workdir / f"llama{tag}-{n_layers}L-v{_BUILD}"
    adapter = workdir / f"lora-r16{tag}-{n_layers}L-v{_BUILD}"
    # built in a child: this process stays small, as every child inherits its peak RSS at exec
    # (Linux keeps the larger of the old and new address spaces' high-water marks in ru_maxrss)
    subprocess.run(
        [sys.executable, __file__, "--build", str(n_layers), str(base), str(adapter), json.dumps(shape)], check=True
    )
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(repeat):
        for m in methods:  # interleaved, so a slow spell of the machine hits every method alike
            warm_page_cache(base, adapter)
            runs[m].append(run_child(m, base, adapter, workdir / f"out-{m}"))
    result: dict[str, Any] = {"gb": weight_bytes(base) / 1e9, "layers": n_layers, "methods": {}}
    for m, rs in runs.items():
        result["methods"][m] = {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "peak_mb": statistics.median(r["peak_rss_kb"] for r in rs) / 1024,
            # for the in-memory methods: how far the merge and save raise the peak above the loaded model's
            "above_load_mb": statistics.median(r["peak_rss_kb"] - r["loaded_peak_kb"] for r in rs) / 1024
            if rs[0]["loaded_peak_kb"]
            else None,
            "min_wall_s": min(r["wall_s"] for r in rs),
            "phases": {k: statistics.median(r["phases"][k] for r in rs) for k in rs[0]["phases"]},
            "walls": [r["wall_s"] for r in rs],
        }
    if check and set(METHODS) <= set(methods):
        result["check"] = compare(base, *(workdir / f"out-{m}" for m in METHODS))
    for m in methods:
        shutil.rmtree(workdir / f"out-{m}", ignore_errors=True)
    return result


# -- report ---------------------------------------------------------------------------------------------


def _phases(p: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in p.items())


def report(results: list[dict[str, Any]], markdown: bool) -> None:
    rows = []
    for r in results:
        ref = r["methods"].get("peft")
        for m, v in r["methods"].items():
            t = f"{v['wall_s'] / ref['wall_s']:.2f}x" if ref else ""
            mem = f"{v['peak_mb'] / ref['peak_mb']:.2f}x" if ref else ""
            gb = r["gb"]
            size = f"{gb:.2f} GB ({r['layers']}L)" if gb >= 0.01 else f"{gb * 1e3:.1f} MB ({r['layers']}L)"
            tmin = f"{v['min_wall_s'] / ref['min_wall_s']:.2f}x" if ref else ""
            cpu = f"{v['cpu_s'] / ref['cpu_s']:.2f}x" if ref else ""
            above = "" if v.get("above_load_mb") is None else f"{v['above_load_mb']:.0f}"
            rows.append((size, m, f"{v['wall_s']:.1f}", t, f"{v['min_wall_s']:.1f}", tmin, f"{v['cpu_s']:.1f}", cpu,
                         f"{v['peak_mb']:.0f}", mem, above, _phases(v["phases"])))  # fmt: skip
    head = ("model", "method", "wall s (median)", "vs PEFT", "wall s (best)", "vs PEFT", "CPU s", "vs PEFT",
            "peak RSS MB", "vs PEFT", "MB above the loaded model", "phases (s, median)")  # fmt: skip
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
        for row in [head, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for r in results:
        if "check" in r:
            c = r["check"]
            print(
                f"\n{r['layers']} layers: llmdeploy's two paths byte-identical: {c['paths_identical']}; vs PEFT: max "
                f"{c['max_ulp_vs_peft']} bf16 ulp, {100 * c['frac_differ_vs_peft']:.3f}% of weights differ; "
                f"{c['tensors_changed']} of {c['tensors']} tensors changed by the merge"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0], help="model sizes in GB of bf16 weights")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method (the median is reported)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path.home() / ".cache" / "llmdeploy-bench-merge")
    ap.add_argument("--no-check", action="store_true", help="skip comparing the outputs")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=pathlib.Path, help="also write the raw results here")
    ap.add_argument("--layers", type=int, nargs="+", help="layer counts (instead of --sizes)")
    ap.add_argument("--tiny", action="store_true", help="hidden 64, vocabulary 320: a smoke test of the script")
    ap.add_argument("--build", nargs=4, metavar=("LAYERS", "BASE", "ADAPTER", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        n_layers, base, adapter = int(args.build[0]), pathlib.Path(args.build[1]), pathlib.Path(args.build[2])
        shape = json.loads(args.build[3])
        build_adapter(adapter, build_base(base, n_layers, shape=shape), n_layers, shape=shape)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shape = TINY if args.tiny else SHAPE
    layers = args.layers or [layers_for(gb, shape) for gb in args.sizes]
    results = [bench_model(n, args.workdir, args.repeat, args.methods, not args.no_check, shape) for n in layers]
    print(("" if not args.markdown else "Machine: ") + describe_machine() + "\n")
    report(results, args.markdown)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
