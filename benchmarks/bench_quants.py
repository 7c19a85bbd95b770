"""Quantization speed: llmdeploy's kernels against ggml's C code, side by side in one process.

For every quantizable type it quantizes the same float32 rows with
llmdeploy (``llmdeploy.quants.quantize``) and with ggml
(``ggml_quantize_chunk`` from llama-cpp-python 0.3.36 through ctypes, rows
split across the same number of threads, as llama-quantize does), checks
that the bytes are identical, and prints Mparam/s for both and the ratio.
Timings are the best of ``--repeat`` runs after a warm-up (numba compiles on
first use).

    python benchmarks/bench_quants.py                  # all types, all cores
    python benchmarks/bench_quants.py --types q4_k q6_k --threads 1
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from llmdeploy import quants
from llmdeploy.quants import ggml_reference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/machine.py
from machine import describe as describe_machine  # noqa: E402


def weights(n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """bf16-representable normal weights with rare outliers, like a real checkpoint's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols), dtype=np.float32) * np.float32(0.02)
    spikes = rng.random((n_rows, n_cols)) < 1e-3
    x[spikes] *= np.float32(50)
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def best_time(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", default=None, help="type names (default: every quantizable type)")
    parser.add_argument("--threads", type=int, default=quants.default_threads())
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", default="auto", choices=["auto", "fast", "reference", "torch"])
    parser.add_argument("--device", default=None, help="device for the torch kernels, e.g. cuda")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (for docs/benchmarks.md)")
    args = parser.parse_args(argv)

    names = args.types or quants.quantizable_type_names()
    x = weights(args.rows, args.cols)
    n = x.size / 1e6
    print(f"# {describe_machine()}")
    where = f"device {args.device}" if args.device else f"{args.threads} thread(s)"
    print(f"# {args.rows}x{args.cols} float32 values, {where}, backend {args.backend}, best of {args.repeat}")
    if args.markdown:
        print("\n| type | llmdeploy Mparam/s | ggml Mparam/s | ratio | identical |\n|---|---:|---:|---:|---|")
    else:
        print(f"{'type':8} {'llmdeploy Mp/s':>15} {'ggml Mp/s':>10} {'ratio':>7}  identical")
    all_same = True

    def ours() -> np.ndarray:
        return quants.quantize(x, qtype, threads=args.threads, backend=args.backend, device=args.device)

    for name in names:
        qtype = quants.quant_type(name).qtype
        theirs = ggml_reference.quantize(x, qtype, threads=args.threads)
        same = np.array_equal(ours(), theirs)  # also the warm-up (numba compiles on first use)
        all_same &= same
        t_ours = best_time(ours, args.repeat)
        t_ggml = best_time(lambda: ggml_reference.quantize(x, qtype, threads=args.threads), args.repeat)
        row = (qtype.name, n / t_ours, n / t_ggml, t_ggml / t_ours, "yes" if same else "NO")
        if args.markdown:
            print("| {} | {:.1f} | {:.1f} | {:.2f} | {} |".format(*row))
        else:
            print("{:8} {:15.1f} {:10.1f} {:7.2f}  {}".format(*row))
        sys.stdout.flush()
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
