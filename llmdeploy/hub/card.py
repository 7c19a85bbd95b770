"""Model cards for what llmdeploy uploads: GGUF files, merged model folders and LoRA adapters.

The card is a :class:`huggingface_hub.ModelCard`: YAML metadata the Hub indexes (base model and
its relation, library, licence, tags) and a body that describes the files really present (for
GGUF: quantization, size and bits per weight read from each file's header) with usage snippets
that name them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gguf
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from ..errors import InvalidOptionError, MissingFileError
from ..gguf.reader import GGUFModelFile, open_gguf
from ..source import read_safetensors_header

__all__ = ["KINDS", "build_model_card", "collect_files", "detect_kind", "looks_like_hub_id", "read_json_object"]

#: The kinds of upload a card can describe.
KINDS = ("gguf", "merged", "lora")

_RELATION = {"gguf": "quantized", "merged": "finetune", "lora": "adapter"}
_LIBRARY = {"gguf": "gguf", "merged": "transformers", "lora": "peft"}
_HUB = "https://huggingface.co"
# A split GGUF part, as llama.cpp's gguf-split and llmdeploy's writer name it.
_SPLIT_PART = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Leftovers of an interrupted llmdeploy save (``.<name>.tmp-XXXXXXXX``): never part of an upload.
_IGNORE = [*DEFAULT_IGNORE_PATTERNS, ".*.tmp-*", "**/.*.tmp-*"]
# Hub repo ids: "namespace/name" of letters, digits, "-", "_", "." (no "--" or "..", at most 96 characters).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def looks_like_hub_id(value: Any) -> bool:
    """Whether ``value`` reads as a Hub repo id (``"namespace/name"``) and is not a local path."""
    if not isinstance(value, str) or len(value) > 96 or not _HUB_ID.match(value):
        return False
    if "--" in value or ".." in value or value.endswith(".git"):
        return False
    return not os.path.exists(value)


def collect_files(
    folder_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> dict[str, pathlib.Path]:
    """The files of an upload, keyed by their path in the repo.

    A folder contributes every file under it (relative paths; ``.git``, ``.cache/huggingface`` and
    unfinished ``.<name>.tmp-*`` files excepted); a file contributes its own name.

    Args:
        folder_or_files: a folder, a file, or a list of folders and files.

    Raises:
        MissingFileError: a path that does not exist.
        InvalidOptionError: two files that would land on the same path in the repo, or nothing to upload.
    """
    if isinstance(folder_or_files, (str, os.PathLike)):
        entries = [pathlib.Path(folder_or_files)]
    else:
        entries = [pathlib.Path(p) for p in folder_or_files]
    found: dict[str, pathlib.Path] = {}

    def add(name: str, path: pathlib.Path) -> None:
        if name in found and found[name].resolve() != path.resolve():
            raise InvalidOptionError(
                f"{found[name]} and {path} would both be uploaded as {name!r}; "
                "upload them to separate repos or rename one"
            )
        found[name] = path

    for entry in entries:
        if entry.is_dir():
            files = {p.relative_to(entry).as_posix(): p for p in sorted(entry.rglob("*")) if p.is_file()}
            for name in filter_repo_objects(list(files), ignore_patterns=_IGNORE):
                add(name, files[name])
        elif entry.is_file():
            add(entry.name, entry)
        else:
            raise MissingFileError(f"{entry} does not exist; pass an existing folder or file to upload")
    if not found:
        raise InvalidOptionError(f"nothing to upload: {', '.join(str(e) for e in entries)} holds no files")
    return found


def detect_kind(names: Iterable[str]) -> str | None:
    """What an upload holds: ``"gguf"`` (any ``.gguf`` file), ``"lora"`` (``adapter_config.json``),
    ``"merged"`` (``config.json`` and safetensors weights), else None."""
    names = list(names)
    base = {pathlib.PurePosixPath(n).name for n in names}
    if any(n.endswith(".gguf") for n in base):
        return "gguf"
    if "adapter_config.json" in base:
        return "lora"
    if "config.json" in base and any(n.endswith(".safetensors") for n in base):
        return "merged"
    return None


def build_model_card(
    folder_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, pathlib.Path],
    *,
    kind: str,
    repo_id: str,
    base_model: str | Sequence[str] | None = None,
    license: str | None = None,
    base_folder: str | os.PathLike[str] | None = None,
    base_model_relation: str | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """A model card for the files of an upload.

    Metadata: ``base_model`` with ``base_model_relation`` (``quantized`` for GGUF, ``finetune`` for
    a merged model, ``adapter`` for a LoRA adapter), ``library_name`` (``gguf``, ``transformers``,
    ``peft``), ``pipeline_tag``, ``tags`` (``llmdeploy``, the architecture, for GGUF also ``gguf``,
    ``llama-cpp`` and the quantization names) and the licence when it is known. The body lists the
    files (for GGUF: quantization, size and bits per weight from each file's header, split parts
    counted together) and shows how to run them, naming the real files.

    Args:
        folder_or_files: the folder or files being uploaded (or a mapping of repo path to local file).
        kind: ``"gguf"``, ``"merged"`` or ``"lora"``.
        repo_id: the repo the files go to (``"user/name"``); the snippets use it.
        base_model: the Hub id(s) of the model these files derive from. Default: found in the files
            (``adapter_config.json``'s ``base_model_name_or_path``, ``config.json``'s ``_name_or_path``,
            a GGUF's ``general.base_model.0.repo_url``) when that is a Hub id rather than a local path.
        license: the licence id (``"apache-2.0"``). Default: the licence in ``base_folder``'s
            ``README.md`` metadata, else in a GGUF's ``general.license``; left out when unknown.
        base_folder: a local folder of the model these files derive from, whose ``README.md``
            licence is carried over. Default: the local base path named in the files, if any.
        base_model_relation: overrides the relation implied by ``kind``.
        tags: extra tags.

    Returns:
        The card; ``str(card)`` is the ``README.md`` text.

    Raises:
        InvalidOptionError: an unknown ``kind``, or ``"gguf"`` without a ``.gguf`` file.
        GGUFReadError: a ``.gguf`` file that is not a readable GGUF.
    """
    if kind not in KINDS:
        raise InvalidOptionError(f"kind={kind!r} is not a model card kind; use one of {', '.join(KINDS)}")
    files = dict(folder_or_files) if isinstance(folder_or_files, Mapping) else collect_files(folder_or_files)
    if kind == "gguf":
        facts = _gguf_facts(files)
        if not facts.ggufs:
            raise InvalidOptionError(f"kind='gguf' but no .gguf file is among {', '.join(sorted(files))}")
    elif kind == "merged":
        facts = _merged_facts(files)
    else:
        facts = _lora_facts(files)

    hint = facts.base_hint
    if base_folder is None and hint and os.path.isdir(hint):
        base_folder = hint
    if base_model is None and looks_like_hub_id(hint):
        base_model = hint
    licence = {"license": license} if license else _licence_of(base_folder) or facts.licence

    all_tags = ["llmdeploy", *facts.tags, *tags]
    data = ModelCardData(
        base_model=base_model if isinstance(base_model, (str, type(None))) else list(base_model),
        library_name=_LIBRARY[kind],
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(t for t in all_tags if t)),
        **licence,
    )
    if base_model:
        data.base_model_relation = base_model_relation or _RELATION[kind]
    body = _BODIES[kind](facts, repo_id, base_model)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# -- facts read from the files ----------------------------------------------------------------------


@dataclasses.dataclass
class _Facts:
    tags: list[str] = dataclasses.field(default_factory=list)
    base_hint: str | None = None  # a Hub id or a local path, as the files name the base model
    licence: dict[str, str] = dataclasses.field(default_factory=dict)
    files: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    ggufs: list[_GGUF] = dataclasses.field(default_factory=list)
    modelfiles: dict[str, str | None] = dataclasses.field(default_factory=dict)  # Modelfile -> its FROM file
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _GGUF:
    name: str  # the repo path (the first part's, when split)
    parts: tuple[str, ...]
    quant: str  # "Q8_0", "Q4_K_M"
    size: int  # bytes of all parts
    n_params: int
    bits_per_weight: float
    architecture: str | None


def _gguf_facts(files: Mapping[str, pathlib.Path]) -> _Facts:
    groups: dict[tuple[str, str], list[str]] = {}  # one model: an unsplit file, or the parts of a split one
    for name in sorted(files):
        if not name.endswith(".gguf"):
            continue
        m = _SPLIT_PART.match(name)
        groups.setdefault(("parts", m["prefix"]) if m else ("file", name), []).append(name)
    facts = _Facts(files=dict(files))
    for parts in groups.values():
        info, model = _read_gguf(parts, files)
        facts.ggufs.append(info)
        if facts.base_hint is None:
            facts.base_hint = _hub_id_from_url(model.get(gguf.Keys.General.BASE_MODEL_REPO_URL.format(id=0)))
        if not facts.licence and model.get(gguf.Keys.General.LICENSE):
            facts.licence = _licence_dict(
                model.get(gguf.Keys.General.LICENSE),
                model.get(gguf.Keys.General.LICENSE_NAME),
                model.get(gguf.Keys.General.LICENSE_LINK),
            )
    facts.ggufs.sort(key=lambda g: (g.bits_per_weight, g.name))  # smallest first: the snippets show it
    archs = [g.architecture for g in facts.ggufs if g.architecture]
    facts.tags = ["gguf", "llama-cpp", *archs, *(g.quant.lower() for g in facts.ggufs)]
    for name, path in files.items():
        if "Modelfile" in pathlib.PurePosixPath(name).name:
            facts.modelfiles[name] = _modelfile_source(path, files)
    if facts.modelfiles:
        facts.tags.append("ollama")
    return facts


def _read_gguf(parts: list[str], files: Mapping[str, pathlib.Path]) -> tuple[_GGUF, GGUFModelFile]:
    """One GGUF model (all its split parts, read from the first): header facts, and the opened file."""
    model = open_gguf(files[parts[0]])
    n_params = model.n_params
    arch = model.get(gguf.Keys.General.ARCHITECTURE)
    info = _GGUF(
        name=parts[0],
        parts=tuple(parts),
        quant=_quant_name(model, parts[0]),
        size=model.file_bytes,
        n_params=n_params,
        bits_per_weight=8 * model.tensor_bytes / n_params if n_params else 0.0,
        architecture=arch if isinstance(arch, str) else None,
    )
    return info, model


def _quant_name(model: GGUFModelFile, file_name: str) -> str:
    """``general.file_type`` as llama.cpp names it (``"Q4_K_M"``), else the name's quant suffix."""
    if model.llama_file_type is not None:
        return model.file_type.upper()
    stem = _SPLIT_PART.sub(r"\g<prefix>", file_name).removesuffix(".gguf")
    m = re.search(r"[-.]((?:I?Q\d\w*)|(?:TQ\d_\d)|BF16|F16|F32)$", stem, re.IGNORECASE)
    return m.group(1).upper() if m else "unknown"


def _modelfile_source(path: pathlib.Path, files: Mapping[str, pathlib.Path]) -> str | None:
    """The GGUF of the upload that an Ollama Modelfile's ``FROM`` line names, if any."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        m = re.match(r"\s*FROM\s+(\S+)", line, re.IGNORECASE)
        if m:
            target = pathlib.PurePosixPath(m.group(1).strip("\"'")).name
            return next((n for n in files if pathlib.PurePosixPath(n).name == target), None)
    return None


def _merged_facts(files: Mapping[str, pathlib.Path]) -> _Facts:
    facts = _Facts(files=dict(files))
    facts.config = read_json_object(files.get("config.json"))
    facts.base_hint = facts.config.get("_name_or_path") or None
    model_type = facts.config.get("model_type")
    facts.tags = [model_type] if isinstance(model_type, str) else []
    return facts


def _lora_facts(files: Mapping[str, pathlib.Path]) -> _Facts:
    facts = _Facts(files=dict(files))
    facts.config = read_json_object(files.get("adapter_config.json"))
    facts.base_hint = facts.config.get("base_model_name_or_path") or None
    facts.tags = ["lora"]
    return facts


def read_json_object(path: pathlib.Path | None) -> dict[str, Any]:
    """The JSON object in ``path``; {} when there is no such file or it holds no JSON object."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id_from_url(url: Any) -> str | None:
    if isinstance(url, str) and url.startswith(_HUB + "/"):
        candidate = url[len(_HUB) + 1 :].strip("/")
        return candidate if looks_like_hub_id(candidate) else None
    return None


def _licence_dict(licence: Any, name: Any = None, link: Any = None) -> dict[str, str]:
    out = {"license": str(licence)} if licence else {}
    if out and licence == "other":  # the Hub wants the name and link of an "other" licence
        out.update({k: str(v) for k, v in (("license_name", name), ("license_link", link)) if v})
    return out


def _licence_of(folder: str | os.PathLike[str] | None) -> dict[str, str]:
    """The licence in ``folder/README.md``'s metadata (with its name and link for ``other``), or {}."""
    if folder is None:
        return {}
    readme = pathlib.Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:  # noqa: BLE001 - an unreadable card only means the licence is unknown
        return {}
    return _licence_dict(data.get("license"), data.get("license_name"), data.get("license_link"))


# -- bodies -----------------------------------------------------------------------------------------


def _human(n: int) -> str:
    """A size in decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _base_line(base_model: str | Sequence[str] | None) -> str:
    if not base_model:
        return ""
    bases = [base_model] if isinstance(base_model, str) else list(base_model)
    return ", ".join(f"[{b}]({_HUB}/{b})" for b in bases)


def _gguf_body(facts: _Facts, repo_id: str, base_model: str | Sequence[str] | None) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    base = _base_line(base_model)
    lines = [f"# {name}", ""]
    lines.append(
        "GGUF files for llama.cpp, Ollama, LM Studio and other GGUF runtimes, exported with llmdeploy"
        + (f" (base model: {base})." if base else ".")
    )
    lines += ["", "| File | Quantization | Size | Bits per weight |", "| --- | --- | --- | --- |"]
    for g in facts.ggufs:
        shown = f"`{g.name}`" + (f" (+ {len(g.parts) - 1} more parts)" if len(g.parts) > 1 else "")
        lines.append(f"| {shown} | {g.quant} | {_human(g.size)} | {g.bits_per_weight:.2f} |")
    params = {g.n_params for g in facts.ggufs}
    archs = sorted({g.architecture for g in facts.ggufs if g.architecture})
    if len(params) == 1:
        lines += ["", f"{_params(params.pop())} parameters" + (f", architecture `{archs[0]}`." if archs else ".")]
    first = facts.ggufs[0]
    lines += [
        "",
        "## llama.cpp",
        "",
        "```sh",
        f"llama-cli -hf {repo_id}:{first.quant}",
        f"llama-server -hf {repo_id}:{first.quant}",
        "# or with the file downloaded:",
        f"llama-cli -m {first.name}",
        "```",
    ]
    others = [q for q in dict.fromkeys(g.quant for g in facts.ggufs) if q != first.quant]
    if others:
        lines += ["", f"Other quantizations: {', '.join(f'`:{q}`' for q in others)} instead of `:{first.quant}`."]
    whole = next((g for g in facts.ggufs if len(g.parts) == 1), None)
    lines += ["", "## Ollama", ""]
    if whole is not None:
        lines += ["```sh", f"ollama run hf.co/{repo_id}:{whole.quant}", "```"]
    else:
        lines += ["Ollama does not load split GGUF files: merge the parts first (`llama-gguf-split --merge`)."]
    parts_of = {part: g.parts for g in facts.ggufs for part in g.parts}
    local = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"
    for modelfile, source in facts.modelfiles.items():
        download = [*parts_of.get(source or "", ()), modelfile]
        lines += [
            "",
            f"With the Modelfile `{modelfile}` (chat template and parameters):",
            "",
            "```sh",
            f"hf download {repo_id} {' '.join(download)} --local-dir {local}",
            f"cd {local} && ollama create {local} -f {modelfile} && ollama run {local}",
            "```",
        ]
    return "\n".join(lines) + "\n"


def _safetensors_summary(files: Mapping[str, pathlib.Path]) -> tuple[int, str | None]:
    """Parameters and the most common dtype of the safetensors files."""
    n, dtypes = 0, Counter[str]()
    for name, path in files.items():
        if not name.endswith(".safetensors"):
            continue
        header, _ = read_safetensors_header(path)
        for info in header.values():
            count = 1
            for d in info["shape"]:
                count *= int(d)
            n += count
            dtypes[info["dtype"]] += count
    return n, (dtypes.most_common(1)[0][0] if dtypes else None)


def _file_table(files: Mapping[str, pathlib.Path]) -> list[str]:
    lines = ["| File | Size |", "| --- | --- |"]
    for name in sorted(files):
        if name != "README.md":
            lines.append(f"| `{name}` | {_human(files[name].stat().st_size)} |")
    return lines


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _merged_body(facts: _Facts, repo_id: str, base_model: str | Sequence[str] | None) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    base = _base_line(base_model)
    n, dtype = _safetensors_summary(facts.files)
    arch = (facts.config.get("architectures") or [None])[0]
    what = f"A fine-tune of {base}" if base else "A fine-tuned model"
    lines = [
        f"# {name}",
        "",
        f"{what} with its LoRA adapter merged into the weights"
        + (f" ({_params(n)} parameters, {_DTYPE_NAMES.get(dtype or '', dtype)} safetensors" if n else " (safetensors")
        + (f", `{arch}`)." if arch else ").")
        + " Exported with llmdeploy; it loads as is in vLLM, SGLang, "
        "TGI and transformers.",
        "",
        *_file_table(facts.files),
        "",
        "## vLLM",
        "",
        "```sh",
        f"vllm serve {repo_id}",
        "```",
        "",
        "## SGLang",
        "",
        "```sh",
        f"python -m sglang.launch_server --model-path {repo_id}",
        "```",
        "",
        "## transformers",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto", device_map="auto")',
        "```",
    ]
    return "\n".join(lines) + "\n"


def _lora_body(facts: _Facts, repo_id: str, base_model: str | Sequence[str] | None) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    cfg = facts.config
    base = _base_line(base_model)
    base_id = base_model if isinstance(base_model, str) else (next(iter(base_model)) if base_model else None)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets = ", ".join(f"`{t}`" for t in sorted(targets))
    details = [f"rank {cfg['r']}" if "r" in cfg else "", f"alpha {cfg['lora_alpha']}" if "lora_alpha" in cfg else ""]
    details += [f"target modules {targets}" if targets else "", "DoRA" if cfg.get("use_dora") else ""]
    detail = ", ".join(d for d in details if d)
    has_tokenizer = any(n in facts.files for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer_repo = repo_id if has_tokenizer or not base_id else base_id
    lines = [
        f"# {name}",
        "",
        f"A LoRA adapter{f' for {base}' if base else ''}"
        + (f" ({detail})" if detail else "")
        + ", saved with llmdeploy.",
        "",
        *_file_table(facts.files),
        "",
        "## PEFT",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads the base model, then the adapter',
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_repo}")',
        "```",
    ]
    if base_id:
        lines += [
            "",
            "## vLLM",
            "",
            "```sh",
            f"vllm serve {base_id} --enable-lora --lora-modules {re.sub(r'[^A-Za-z0-9_-]+', '-', name)}={repo_id}",
            "```",
        ]
    return "\n".join(lines) + "\n"


_BODIES = {"gguf": _gguf_body, "merged": _merged_body, "lora": _lora_body}
