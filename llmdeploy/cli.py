"""The ``llmdeploy`` command: each subcommand calls one of the library's public functions.

::

    llmdeploy gguf MODEL --quant q4_k_m --out DIR          save_pretrained_gguf
    llmdeploy merge ADAPTER --out DIR                      save_pretrained_merged
    llmdeploy push DIR_OR_FILES... --repo user/name        hub.push_folder
    llmdeploy inspect FILE.gguf                            gguf.reader.open_gguf
    llmdeploy estimate MODEL --quant q4_k_m --context N    estimate.estimate
    llmdeploy recommend --gpu "RTX 4090" --model DIR       recommend.recommend
    llmdeploy requant IN.gguf --quant q4_k_m --out DIR     gguf.requant.requantize
    llmdeploy to-hf IN.gguf --out DIR                      gguf.to_hf.gguf_to_hf

User errors (llmdeploy's own, a missing file, a bad value) print one line, ``llmdeploy: error: ...``, and
exit with 1; usage errors exit with 2 (argparse's message); Ctrl-C exits with 130. ``LLMDEPLOY_DEBUG=1``
shows the traceback instead. Progress bars come from the library functions; ``--quiet`` turns them off.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import LLMDeployError, NotSupportedYetError

if TYPE_CHECKING:
    from .gguf.reader import GGUFModelFile, MetadataEntry

__all__ = ["build_parser", "main"]

_PROG = "llmdeploy"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``llmdeploy`` command line.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 for an error, 2 for a usage error, 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed the message
        return exc.code if isinstance(exc.code, int) else 2
    if args.handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        if os.environ.get("LLMDEPLOY_DEBUG"):
            raise
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`llmdeploy inspect x.gguf | head`)
        _silence_stdout()
        return 1
    except (LLMDeployError, OSError, ValueError) as exc:
        if os.environ.get("LLMDEPLOY_DEBUG"):
            raise
        print(f"{_PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured): nothing to flush
        pass


# The library's messages name its keyword arguments; on the command line these are flags.
_FLAGS = {"overwrite=True": "--overwrite", "allow_requantize=True": "--allow-requantize"}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for argument, flag in _FLAGS.items():
        if flag not in text:
            text = text.replace(argument, flag)
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


# --- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``llmdeploy`` argument parser, one subparser per subcommand (each sets ``handler``)."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Export fine-tuned HF/PEFT models to GGUF and merged safetensors; inspect, size and deploy them.",
    )
    parser.add_argument("--version", action="version", version=f"{_PROG} {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    parser.set_defaults(handler=None)
    # --quiet is also accepted after the subcommand; SUPPRESS keeps the subparser from resetting it
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int | None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[quiet])
        p.set_defaults(handler=handler)
        return p

    p = command("gguf", _cmd_gguf, "Export an HF model folder (or a LoRA adapter folder) to GGUF file(s).")
    p.add_argument("model", metavar="MODEL_OR_ADAPTER", help="HF model folder, or a LoRA adapter folder")
    _add_quant(p, "file type(s): q4_k_m, q8_0, f16, ... (repeat or comma-separate for several; default q8_0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--base", metavar="BASE", help="base model folder of an adapter")
    p.add_argument("--name", metavar="NAME", help="file name stem (default: the model folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--max-file-size", metavar="SIZE", help="split files into parts of at most SIZE (e.g. 2GB)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="quantization threads (default: all cores)")

    p = command("merge", _cmd_merge, "Merge a LoRA adapter into its base model and save safetensors.")
    p.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter folder (adapter_config.json + weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--base", metavar="BASE", help="base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", metavar="DTYPE", help="saved dtype: bf16, fp16 or fp32 (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest shard (default 5GB)")
    p.add_argument("--method", default="merged_16bit", choices=("merged_16bit", "lora"), help="what to save")
    p.add_argument("--overwrite", action="store_true", help="replace a model in a non-empty output folder")

    p = command("push", _cmd_push, "Upload folders or files to a Hugging Face Hub repository in one commit.")
    p.add_argument("paths", nargs="+", metavar="DIR_OR_FILES", help="folders and/or files to upload")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the Hub repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", metavar="T", help="Hub token (default: HF_TOKEN or the saved login; never printed)")
    p.add_argument("--message", metavar="M", help="commit message")

    p = command("inspect", _cmd_inspect, "Show a GGUF file's metadata, tokenizer, tensor types and size.")
    p.add_argument("file", metavar="FILE.gguf", help="a GGUF file (any part of a split file)")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("estimate", _cmd_estimate, "GGUF file sizes and the memory llama.cpp needs, per quantization.")
    p.add_argument("model", metavar="MODEL", help="HF model folder, LoRA adapter folder or .gguf file")
    _add_quant(p, "file type(s) to size (default: q4_k_m q5_k_m q6_k q8_0 f16; a .gguf: the file as it is)")
    _add_memory_options(p)
    p.add_argument("--base", metavar="BASE", help="base model folder of an adapter")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("recommend", _cmd_recommend, "Which engine and file to deploy with on a GPU or CPU.")
    device = p.add_mutually_exclusive_group(required=True)
    device.add_argument("--gpu", metavar="NAME", help='a GPU name: "RTX 4090", "A100 80GB", "M2 Max" (with --ram)...')
    device.add_argument("--vram", type=_positive_float, metavar="GIB", help="a GPU's memory in GiB")
    device.add_argument("--cpu-only", action="store_true", help="run on the CPU")
    p.add_argument("--ram", type=_positive_float, metavar="GIB", help="RAM (CPU-only) or Apple unified memory, GiB")
    p.add_argument("--model", metavar="DIR", help="HF model folder, LoRA adapter folder or .gguf file")
    p.add_argument("--base", metavar="BASE", help="base model folder of an adapter")
    p.add_argument("--context", type=_positive_int, default=8192, metavar="N", help="context length (default 8192)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("requant", _cmd_requant, "Requantize a GGUF file to other file type(s).")
    p.add_argument("input", metavar="IN.gguf", help="the GGUF file")
    _add_quant(p, "file type(s) to write (repeat or comma-separate)", required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--allow-requantize", action="store_true", help="accept an already quantized input")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--name", metavar="NAME", help="file name stem")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="quantization threads (default: all cores)")

    p = command("to-hf", _cmd_to_hf, "Convert a GGUF file back to an HF model folder.")
    p.add_argument("input", metavar="IN.gguf", help="the GGUF file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def _add_quant(p: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    p.add_argument("--quant", action="append", required=required, metavar="TYPE", help=help)


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=_positive_int, default=8192, metavar="N", help="context length (default 8192)")
    p.add_argument("--batch", type=_positive_int, default=512, metavar="N", help="llama.cpp's -ub (default 512)")
    p.add_argument("--cache-type", default="f16", metavar="TYPE", help="KV cache type: f16 (default), q8_0, ...")
    p.add_argument("--no-flash-attn", action="store_true", help="size the compute buffer without flash attention")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("GiB").removesuffix("GB").removesuffix("G"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text!r}")
    return value


def _quants(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _lazy(module: str, name: str, what: str) -> Any:
    """``module.name``, imported on first use (other parts of llmdeploy may not be installed yet)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError) as exc:
        if isinstance(exc, ModuleNotFoundError) and not (exc.name or "").startswith("llmdeploy"):
            raise
        raise NotSupportedYetError(f"{what} is not available in this llmdeploy ({module}.{name} is missing).") from None


# --- export, merge, push, requant, to-hf: thin calls -----------------------------------------------


def _cmd_gguf(args: argparse.Namespace) -> int:
    from .gguf.export import save_pretrained_gguf

    kwargs: dict[str, Any] = {
        "quantization": _quants(args.quant) or "q8_0",
        "model_name": args.name,
        "overwrite": args.overwrite,
        "max_file_size": args.max_file_size,
        "threads": args.threads,
        "progress": not args.quiet,
    }
    if args.base is not None:
        kwargs["base"] = args.base
    save_pretrained_gguf(args.model, args.out, **kwargs)  # it prints one summary line per file
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import save_pretrained_merged

    out = save_pretrained_merged(
        args.adapter,
        args.out,
        save_method=args.method,
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    if not args.quiet:
        print(f"{_PROG}: wrote {'the adapter' if args.method == 'lora' else 'the merged model'} to {out}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    push_folder = _lazy("llmdeploy.hub", "push_folder", "Uploading to the Hub")
    result = push_folder(
        args.paths, repo_id=args.repo, token=args.token, private=args.private, commit_message=args.message
    )
    if not args.quiet:
        url = getattr(result, "commit_url", None) or (result if isinstance(result, str) else None)
        print(f"{_PROG}: pushed {len(args.paths)} path(s) to {args.repo}" + (f": {url}" if url else ""))
    return 0


def _cmd_requant(args: argparse.Namespace) -> int:
    requantize = _lazy("llmdeploy.gguf.requant", "requantize", "Requantizing GGUF files")
    kwargs: dict[str, Any] = {}
    if args.name is not None:
        kwargs["model_name"] = args.name
    if args.threads is not None:
        kwargs["threads"] = args.threads
    requantize(
        args.input,
        args.out,
        quantization=_quants(args.quant),
        allow_requantize=args.allow_requantize,
        overwrite=args.overwrite,
        progress=not args.quiet,
        **kwargs,
    )
    return 0


def _cmd_to_hf(args: argparse.Namespace) -> int:
    gguf_to_hf = _lazy("llmdeploy.gguf.to_hf", "gguf_to_hf", "Converting GGUF to HF")
    out = gguf_to_hf(args.input, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(f"{_PROG}: wrote {out if out is not None else args.out}")
    return 0


# --- inspect ------------------------------------------------------------------------------------

_SPECIAL_TOKENS = ("bos", "eos", "unknown", "separator", "padding", "mask", "eot", "eom",
                   "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")  # fmt: skip
_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .gguf.reader import open_gguf

    info = open_gguf(args.file)
    report = _inspect_report(info, with_tensors=args.tensors)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(_inspect_text(report))
    return 0


_LISTED_ITEMS = 64  # an array of more items is shown by its element type and length


def _json_value(entry: MetadataEntry) -> Any:
    """A KV's value for the report: an array of more than 64 items as its element type and length."""
    if entry.sub_type is not None and len(entry.value) > _LISTED_ITEMS:
        return {"array_of": entry.sub_type.name, "length": len(entry.value)}
    return entry.to_python()


def _inspect_report(info: GGUFModelFile, *, with_tensors: bool) -> dict[str, Any]:
    md = info.kv
    arch = str(md.get("general.architecture") or "")
    metadata = {
        entry.key: _json_value(entry)
        for entry in info.metadata
        if entry.key not in _TOKEN_ARRAYS and entry.key != "tokenizer.chat_template"
    }
    per_type: dict[str, dict[str, int]] = {}
    for t in info.tensors:
        row = per_type.setdefault(t.type.name, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += math.prod(t.shape)
        row["bytes"] += t.nbytes
    types = [{"type": name, **row} for name, row in sorted(per_type.items(), key=lambda kv: -kv[1]["bytes"])]
    n_params, tensor_bytes = info.n_params, info.tensor_bytes
    report: dict[str, Any] = {
        "file": str(info.paths[0]),
        "parts": [str(p) for p in info.paths] if len(info.paths) > 1 else [],
        "file_bytes": info.file_bytes,
        "gguf_version": info.version,
        "alignment": info.alignment,
        "architecture": arch,
        "file_type": info.file_type,
        "metadata": metadata,
        "tokenizer": _tokenizer_summary(md),
        "types": types,
        "n_tensors": len(info.tensors),
        "n_params": n_params,
        "tensor_bytes": tensor_bytes,
        "bits_per_weight": 8.0 * tensor_bytes / n_params if n_params else 0.0,
    }
    if with_tensors:
        report["tensors"] = [
            {"name": t.name, "shape": list(t.shape), "type": t.type.name, "bytes": t.nbytes} for t in info.tensors
        ]
    return report


def _tokenizer_summary(md: Mapping[str, Any]) -> dict[str, Any] | None:
    if not any(key.startswith("tokenizer.") for key in md):
        return None
    tokens = md.get("tokenizer.ggml.tokens")
    special = {}
    for name in _SPECIAL_TOKENS:
        token_id = md.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is None:
            continue
        text = tokens[int(token_id)] if tokens is not None and 0 <= int(token_id) < len(tokens) else None
        special[name] = {"id": int(token_id), "text": text}
    flags = {
        key.removeprefix("tokenizer.ggml."): value
        for key, value in md.items()
        if key.startswith("tokenizer.ggml.") and isinstance(value, bool)
    }
    template = md.get("tokenizer.chat_template")
    templates = sorted(
        k.removeprefix("tokenizer.chat_template.") for k in md if k.startswith("tokenizer.chat_template.")
    )
    return {
        "model": md.get("tokenizer.ggml.model"),
        "pre": md.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if tokens is not None else 0,
        "merges": len(md["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in md else 0,
        "special_tokens": special,
        "flags": flags,
        "chat_template": isinstance(template, str),
        "chat_template_chars": len(template) if isinstance(template, str) else 0,
        "named_chat_templates": templates,
    }


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, dict) and "length" in value:
        return f"[{value['length']} x {value['array_of']}]"
    if isinstance(value, list):
        text = "[" + ", ".join(_short(v, 20) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
        return f"{text} ({len(value)} items)" if len(value) > 8 else text
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value) if not isinstance(value, str) else repr(value)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _inspect_text(report: dict[str, Any]) -> str:
    head = f"{report['file']}: {_size(report['file_bytes'])}, GGUF v{report['gguf_version']}, "
    lines = [head + f"{report['n_tensors']} tensors, alignment {report['alignment']}"]
    for part in report["parts"]:
        lines.append(f"  part {part}")
    arch = report["architecture"]
    groups: dict[str, list[tuple[str, Any]]] = {}
    for key, value in report["metadata"].items():
        prefix = key.split(".", 1)[0]
        if prefix == "tokenizer":
            continue
        group = prefix if prefix in ("general", arch) else "other"
        groups.setdefault(group, []).append((key.removeprefix(f"{group}.") if group != "other" else key, value))
    for group in ("general", arch, "other"):
        if group not in groups:
            continue
        lines.append("")
        lines.append(group)
        width = max(len(k) for k, _ in groups[group])
        for key, value in groups[group]:
            shown = _short(value)
            if group == "general" and key == "file_type":
                shown += f" ({report['file_type'].upper()})"
            lines.append(f"  {key:<{width}}  {shown}")
    tok = report["tokenizer"]
    if tok is not None:
        lines += ["", "tokenizer"]
        lines.append(f"  model           {tok['model']} (pre-tokenizer: {tok['pre']})")
        lines.append(
            f"  vocabulary      {tok['vocab_size']:,} tokens" + (f", {tok['merges']:,} merges" if tok["merges"] else "")
        )
        special = ", ".join(
            f"{name} {s['id']}" + (f" {_short(s['text'], 30)!r}" if s["text"] is not None else "")
            for name, s in tok["special_tokens"].items()
        )
        lines.append(f"  special tokens  {special or 'none'}")
        if tok["flags"]:
            lines.append("  flags           " + ", ".join(f"{k}={str(v).lower()}" for k, v in tok["flags"].items()))
        template = f"yes ({tok['chat_template_chars']:,} characters)" if tok["chat_template"] else "no"
        if tok["named_chat_templates"]:
            template += "; named: " + ", ".join(tok["named_chat_templates"])
        lines.append(f"  chat template   {template}")
    lines += ["", "tensors by type"]
    lines.append(f"  {'type':<8} {'tensors':>8} {'parameters':>15} {'bytes':>15} {'bits/weight':>12}")
    for row in report["types"]:
        bpw = 8.0 * row["bytes"] / row["params"] if row["params"] else 0.0
        lines.append(f"  {row['type']:<8} {row['tensors']:>8,} {row['params']:>15,} {row['bytes']:>15,} {bpw:>12.2f}")
    n_tensors, n_params, bpw = report["n_tensors"], report["n_params"], report["bits_per_weight"]
    lines.append(f"  {'total':<8} {n_tensors:>8,} {n_params:>15,} {report['tensor_bytes']:>15,} {bpw:>12.2f}")
    lines.append("")
    lines.append(
        f"size: tensor data {_size(report['tensor_bytes'])}, file {_size(report['file_bytes'])}; "
        f"{n_params:,} parameters at {bpw:.2f} bits per weight"
    )
    if "tensors" in report:
        width = max([len(t["name"]) for t in report["tensors"]] + [6])
        lines += ["", f"  {'tensor':<{width}}  {'shape':<20}  {'type':<7}  {'bytes':>13}"]
        for t in report["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            lines.append(f"  {t['name']:<{width}}  {shape:<20}  {t['type']:<7}  {t['bytes']:>13,}")
    return "\n".join(lines)


def _size(n: float) -> str:
    from .estimate import format_bytes

    return format_bytes(n)


# --- estimate -----------------------------------------------------------------------------------


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate

    estimates = estimate(
        args.model,
        quantization=_quants(args.quant),
        context=args.context,
        ubatch=args.batch,
        flash_attn=not args.no_flash_attn,
        cache_type=args.cache_type,
        base=args.base,
    )
    if args.json:
        print(json.dumps([_estimate_json(e) for e in estimates], indent=2))
        return 0
    print(_estimate_text(args, estimates))
    return 0


def _estimate_json(e: Any) -> dict[str, Any]:
    kv = e.kv_cache
    return {
        "quantization": e.quantization,
        "file_bytes": e.file_bytes,
        "file_bytes_exact": e.file_bytes_exact,
        "tensor_bytes": e.tensor_bytes,
        "n_params": e.n_params,
        "bits_per_weight": e.bits_per_weight,
        "context": e.context,
        "kv_cache_bytes": kv.total_bytes,
        "kv_cache": {
            "cells": kv.cells,
            "full_layers": kv.full_layers,
            "swa_cells": kv.swa_cells,
            "swa_layers": kv.swa_layers,
            "k_bytes": kv.k_bytes,
            "v_bytes": kv.v_bytes,
        },
        "compute_bytes": e.compute_bytes,
        "total_bytes": e.total_bytes,
    }


def _kv_text(e: Any) -> str:
    kv, shape = e.kv_cache, e.shape
    parts = []
    if kv.full_layers:
        parts.append(f"{_count(kv.full_layers, 'layer')} x {kv.cells:,} cells")
    if kv.swa_layers:
        window = f"(window {shape.sliding_window:,})"
        parts.append(f"{_count(kv.swa_layers, 'sliding-window layer')} x {kv.swa_cells:,} cells {window}")
    return " + ".join(parts) + f" = {_size(kv.total_bytes)}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _estimate_text(args: argparse.Namespace, estimates: list[Any]) -> str:
    first = estimates[0]
    shape = first.shape
    settings = (
        f"ubatch {args.batch}, flash attention {'off' if args.no_flash_attn else 'on'}, {args.cache_type} KV cache"
    )
    lines = [
        f"{args.model}: {shape.arch}, {shape.n_layer} layers, {first.n_params:,} parameters",
        f"context {args.context:,} tokens ({settings}); KV cache: {_kv_text(first)}",
        "",
        (
            f"{'quant':<8} {'file size':>11} {'bits/weight':>11} {'weights':>11} {'KV cache':>11} {'compute':>11} "
            f"{'total':>11}"
        ),
    ]
    for e in estimates:
        lines.append(
            f"{e.quantization.upper():<8} {_size(e.file_bytes):>11} {e.bits_per_weight:>11.2f} "
            f"{_size(e.tensor_bytes):>11} {_size(e.kv_cache_bytes):>11} {_size(e.compute_bytes):>11} "
            f"{_size(e.total_bytes):>11}"
        )
    lines.append("")
    lines.append(
        "total = weights + KV cache + compute buffer (an estimate; see docs/cli.md). A GPU runtime adds its own "
        "~0.3-0.5 GiB."
    )
    if not all(e.file_bytes_exact for e in estimates):
        lines.append("file sizes lack the tokenizer metadata: no usable tokenizer files were found beside the model.")
    if shape.context_train and args.context > shape.context_train:
        lines.append(f"note: {args.context:,} tokens exceed the model's trained context ({shape.context_train:,}).")
    return "\n".join(lines)


# --- recommend ----------------------------------------------------------------------------------


def _cmd_recommend(args: argparse.Namespace) -> int:
    from .recommend import recommend

    rec = recommend(
        gpu=args.gpu,
        vram_gib=args.vram,
        cpu_only=args.cpu_only,
        ram_gib=args.ram,
        model=args.model,
        context=args.context,
        base=args.base,
    )
    if args.json:
        print(json.dumps(_recommend_json(rec), indent=2))
    else:
        print(_recommend_text(rec, args.model))
    return 0


def _recommend_json(rec: Any) -> dict[str, Any]:
    choice = rec.choice
    return {
        "device": {"name": rec.device.name, "memory_gib": rec.device.memory_gib, "kind": rec.device.kind},
        "budget_bytes": rec.budget_bytes,
        "context": rec.context,
        "choice": None
        if choice is None
        else {
            "engine": choice.engine,
            "artifact": choice.artifact,
            "quantization": choice.quantization,
            "memory_bytes": choice.memory_bytes,
            "reasons": list(choice.reasons),
            "commands": list(choice.commands),
        },
        "vllm_bytes": rec.vllm_bytes,
        "candidates": [
            {
                "quantization": e.quantization,
                "bits_per_weight": e.bits_per_weight,
                "total_bytes": e.total_bytes,
                "fits": e.total_bytes <= rec.budget_bytes,
            }
            for e in rec.candidates
        ],
        "notes": list(rec.notes),
        "general": [{"params_b": a.params_b, "format": a.format, "memory_bytes": a.memory_bytes} for a in rec.general],
    }


def _recommend_text(rec: Any, model: str | None) -> str:
    device = rec.device
    memory = f"{device.memory_gib:g} GiB {device.memory_kind}"
    budget = f"planning budget {_size(rec.budget_bytes)} after headroom"
    lines = [f"device: {device.name} ({memory}); {budget}; context {rec.context:,} tokens"]
    if model is None:
        lines += ["", "Best format per model size (rules of thumb; pass --model for exact sizes):"]
        lines.append(f"  {'params':>7}  {'format':<16} {'memory':>10}")
        for a in rec.general:
            size = f"{a.params_b:g}B"
            if a.format is None:
                lines.append(f"  {size:>7}  does not fit ({_size(a.memory_bytes)} even at GGUF Q2_K)")
            else:
                lines.append(f"  {size:>7}  {a.format:<16} {_size(a.memory_bytes):>10}")
        return "\n".join(lines)
    lines.append(f"model: {model}")
    choice = rec.choice
    lines.append("")
    if choice is None:
        lines.append("Nothing fits.")
    else:
        lines.append(f"Recommended: {choice.engine} with {choice.artifact} (needs about {_size(choice.memory_bytes)})")
        lines += [f"  - {reason}" for reason in choice.reasons]
        lines.append("  commands:")
        lines += [f"    {command}" for command in choice.commands]
    if rec.candidates:
        lines += ["", f"GGUF candidates at {rec.context:,} tokens:"]
        lines.append(f"  {'quant':<8} {'bits/weight':>11} {'total':>11}  fits")
        for e in rec.candidates:
            fits = "yes" if e.total_bytes <= rec.budget_bytes else "no"
            lines.append(f"  {e.quantization.upper():<8} {e.bits_per_weight:>11.2f} {_size(e.total_bytes):>11}  {fits}")
    if rec.notes:
        lines.append("")
        lines += [f"note: {note}" for note in rec.notes]
    return "\n".join(lines)
