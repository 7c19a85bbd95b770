"""The ``tokenizer.*`` KVs of a GGUF: what llama.cpp's converter writes for a model's tokenizer, minus its bugs.

``tokenizer_metadata(source)`` reproduces ``convert_hf_to_gguf.py``'s ``set_vocab`` (llama-cpp-python
0.3.36) for the architectures llmdeploy exports, KV for KV, except for the four deviations below.
The converter picks one of three vocab readers by architecture and by the files it finds:

- **SentencePiece** (``tokenizer.model``): ``model="llama"``, ``pre="default"``, pieces, scores and
  SentencePiece types; ids the model has but the tokenizer lacks become ``[PAD{i}]`` (UNUSED, score
  -10000); tokens listed in ``added_tokens.json`` / ``tokenizer_config.json`` get score -1000 and
  USER_DEFINED, or CONTROL when special (or special-looking).
- **Llama HF-fast** (``tokenizer.json`` of a byte-fallback BPE, Llama only): gguf-py's ``LlamaHfVocab``;
  llmdeploy writes a SentencePiece vocabulary rebuilt from ``tokenizer.json`` instead (deviation 2).
- **BPE** (``tokenizer.json`` / ``vocab.json``): ``model="gpt2"``, tokens and merges, and the
  pre-tokenizer named by hashing the tokenizer's ids for a check text (``_pretokenizers.py``).

Then the special-token ids, ``add_bos/eos/sep_token``, chat template and normalizer flags, read the
way the converter's own gguf-py ``SpecialVocab`` reads them (see ``_SpecialTokens``).

Deliberate deviations from the converter. Each is a case where the converter's file makes llama.cpp
tokenize differently from the HF tokenizer it came from; ``tests/gguf/test_tokenizer.py`` checks that
ours does not (llama.cpp on our vocabulary == the HF tokenizer), and ``tests/gguf/test_export.py``
allows exactly these differences from the converter's files:

1. **SentencePiece user-defined pieces** (``user_defined_symbols`` of a ``tokenizer.model``). The
   converter's piece-type checks have no user-defined case, so ``<start_of_turn>``-like pieces become
   NORMAL and llama.cpp cuts them into sub-pieces, while SentencePiece and HF keep them whole. We
   write USER_DEFINED (text with ``▁`` as a space, as the converter writes user-defined added tokens).
2. **No tokenizer.model, a SentencePiece BPE tokenizer.json** (byte fallback, ``▁`` spaces: what
   transformers 5 saves for Llama, Mistral, Gemma and Phi-3). The converter's ``LlamaHfVocab`` scores
   every token -1000, so llama.cpp's SPM tokenizer, which merges the adjacent pair whose token scores
   highest, merges leftmost-first instead of by rank (``"ied"`` -> ``"▁ied"``, not ``"i" "ed"``), and
   it types added tokens below ``vocab_size`` NORMAL (Phi-3's ``<|assistant|>`` gets cut up). We score
   each token by the rank of the first merge that makes it (the k-th token made scores -k; tokens no
   merge makes score below them all), type ``<0xXX>`` BYTE and the ``unk_token`` UNKNOWN, type added
   tokens as in 3, and pad to the model's ``vocab_size`` with ``[PAD{i}]`` like the SentencePiece
   reader (the converter does not pad, and llama.cpp then refuses the file for its embedding size).
   When nothing in the folder sets ``add_bos_token`` and ``tokenizer.json``'s post-processor adds no
   token (a ``TemplateProcessing`` of just the text, e.g. Gemma 4's), we write ``add_bos_token=False``:
   the converter writes no flag, and llama.cpp's SPM default would add a BOS the tokenizer does not.
3. **Added tokens found only in tokenizer.json.** The converter's SentencePiece reader types added
   tokens from ``tokenizer_config.json``'s ``added_tokens_decoder``, which transformers 5 no longer
   writes, so e.g. Gemma 3's ``<start_of_turn>`` stays NORMAL and llama.cpp splits it. Without
   ``added_tokens_decoder`` we read ``tokenizer.json``'s ``added_tokens`` (the same ``content`` and
   ``special`` fields) by the converter's own rule: the KVs the converter writes for the same
   tokenizer saved by transformers 4.
4. **Architectures whose converter refuses a SentencePiece tokenizer.json**: Gemma and Gemma 2
   (``tokenizer.model`` missing), Phi-3 (``tokenizer.model`` missing) and Gemma 3 when its BPE path
   meets a pre-tokenizer hash it does not know (Gemma 4's tokenizer; Gemma 3's own ``tokenizer.json``
   it exports through BPE correctly, and so do we). We write 2's vocabulary; Gemma keeps
   ``add_space_prefix=False`` and Phi-3 its own added-token rule, as with a ``tokenizer.model``.

Not fixable in the file: llama.cpp's SPM tokenizer prefixes ``▁`` to every run of text (at the start
and after every special or added token, also when the text already starts with a space), the
SentencePiece rule that HF tokenizers with a ``Prepend`` normalizer follow. A ``Metaspace``
pre-tokenizer with ``prepend_scheme="first"`` (transformers' non-legacy Llama) prefixes only the start
of the text and never doubles a leading space; no GGUF key expresses that, so text starting with a
space or following an added token tokenizes differently in llama.cpp for such a tokenizer. Nor does
llama.cpp normalize Unicode: a tokenizer that NFC-normalizes its input (Qwen2's) differs on text
that is not NFC already (``"a\u0300"``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import pathlib
import re
import shutil
import tempfile
from hashlib import sha256
from string import ascii_letters, digits
from typing import Any, Callable, Iterator

import gguf
from gguf import GGUFValueType, TokenType

from .._memory import gc_paused, return_free_heap
from ..errors import MissingFileError, UnsupportedArchitectureError, UnsupportedTokenizerError
from ._pretokenizers import CHECK_TEXT, PRE_TOKENIZER_BY_HASH

__all__ = ["tokenizer_metadata"]

KV = tuple[str, Any, GGUFValueType]
_K = gguf.Keys.Tokenizer

# Files of an HF folder that the converter (and AutoTokenizer) read for the tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "merges.txt", "vocab.json",
    "tekken.json",
)  # fmt: skip

# One of these must be there for any vocab reader.
_VOCAB_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "tekken.json")

# Special-token kinds the converter's GGUFWriter has a key for; others (cls, prefix, suffix,
# middle, fsep) are skipped by its SpecialVocab with a warning, so they never reach the file.
_ID_KEYS = {
    "bos": _K.BOS_ID, "eos": _K.EOS_ID, "unk": _K.UNK_ID, "sep": _K.SEP_ID, "pad": _K.PAD_ID,
    "mask": _K.MASK_ID, "eot": _K.EOT_ID, "eom": _K.EOM_ID,
}  # fmt: skip
_ADD_KEYS = {"bos": _K.ADD_BOS, "eos": _K.ADD_EOS, "sep": _K.ADD_SEP}
# Newer than the gguf-py on PyPI; llama.cpp 0.3.36 reads them.
_NORMALIZER_LOWERCASE = getattr(_K, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase")
_NORMALIZER_STRIP_ACCENTS = getattr(_K, "NORMALIZER_STRIP_ACCENTS", "tokenizer.ggml.normalizer.strip_accents")
_DEFAULT_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def tokenizer_metadata(source: Any, tokenizer: Any = None) -> list[KV]:
    """The ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` KVs llama.cpp's converter writes, minus its bugs.

    Equal, key for key and type for type, to the ``tokenizer.*`` KVs of
    ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36) for the same folder and architecture,
    in the converter's order, except the four deviations of the module docstring: where the
    converter's file makes llama.cpp tokenize differently from the tokenizer, or where it refuses
    a SentencePiece ``tokenizer.json`` that llama.cpp can tokenize.

    Args:
        source: The model: any object with ``config`` (the ``config.json`` dict) and ``folder``
            (the folder holding the tokenizer files, or ``None``), e.g. a ``llmdeploy.source.Source``.
        tokenizer: An HF tokenizer to export instead of ``source.folder``'s files. It is saved
            with ``save_pretrained`` and read back the way the converter reads a folder; a
            SentencePiece ``tokenizer.model`` it was loaded from is included.

    Returns:
        ``(key, value, value_type)`` triples. Arrays are Python lists whose items give the
        element type (``str`` -> STRING, ``int`` -> INT32, ``float`` -> FLOAT32), as in
        ``gguf.GGUFWriter``.

    Raises:
        MissingFileError: No tokenizer files (or not the ones this architecture needs).
        UnsupportedArchitectureError: The architecture is not one llmdeploy exports.
        UnsupportedTokenizerError: A tokenizer llama.cpp cannot tokenize faithfully, e.g. a
            byte-level BPE whose pre-tokenizer it does not know (the message gives its hash).
    """
    with gc_paused(), _converter_folder(source, tokenizer) as folder, tokenizer_json_cache():
        hparams = _hparams(folder, source.config)
        arch = _architecture(hparams)
        set_vocab = _VOCAB_BY_ARCH.get(arch)
        if set_vocab is None:
            raise UnsupportedArchitectureError(
                f"No tokenizer export for architecture {arch!r}; supported: {', '.join(sorted(_VOCAB_BY_ARCH))}."
            )
        kvs = _KVs()
        set_vocab(kvs, folder, hparams)
        return kvs.items()


# --------------------------------------------------------------------------- the folder


@contextlib.contextmanager
def _converter_folder(source: Any, tokenizer: Any) -> Iterator[pathlib.Path]:
    """A temporary folder as the converter would see it: tokenizer files + ``source.config``."""
    with tempfile.TemporaryDirectory(prefix="llmdeploy-tokenizer-") as tmp:
        folder = pathlib.Path(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
            spm = _sentencepiece_file_of(tokenizer)
            if spm is not None and not (folder / "tokenizer.model").exists():
                shutil.copyfile(spm, folder / "tokenizer.model")
        else:
            origin = getattr(source, "folder", None)
            if origin is None:
                raise MissingFileError(
                    "The model has no folder with tokenizer files; pass tokenizer= (the HF tokenizer) "
                    "to export its vocabulary."
                )
            origin = pathlib.Path(origin)
            for name in _TOKENIZER_FILES:
                if (origin / name).is_file():
                    shutil.copyfile(origin / name, folder / name)
            if (origin / "additional_chat_templates").is_dir():
                shutil.copytree(origin / "additional_chat_templates", folder / "additional_chat_templates")
        if not any((folder / name).is_file() for name in _VOCAB_FILES):
            where = "the tokenizer passed" if tokenizer is not None else str(getattr(source, "folder", ""))
            raise MissingFileError(
                f"No tokenizer files (tokenizer.json or tokenizer.model) in {where}; save the tokenizer "
                "next to config.json (tokenizer.save_pretrained) or pass tokenizer=."
            )
        (folder / "config.json").write_text(json.dumps(source.config), encoding="utf-8")
        yield folder


def _sentencepiece_file_of(tokenizer: Any) -> pathlib.Path | None:
    init_kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    candidates = [getattr(tokenizer, "vocab_file", None), init_kwargs.get("vocab_file")]
    if name_or_path := getattr(tokenizer, "name_or_path", None):
        candidates.append(os.path.join(name_or_path, "tokenizer.model"))
    for candidate in candidates:
        if isinstance(candidate, (str, os.PathLike)) and os.path.basename(candidate).endswith(".model"):
            if os.path.isfile(candidate):
                return pathlib.Path(candidate)
    return None


def _hparams(folder: pathlib.Path, config: dict[str, Any]) -> dict[str, Any]:
    """The converter's ``hparams``: AutoConfig's dict (defaults filled in), text_config lifted."""
    try:
        from transformers import AutoConfig

        hparams = AutoConfig.from_pretrained(str(folder), trust_remote_code=False).to_dict()
    except Exception:  # the converter falls back to the raw config.json the same way
        hparams = dict(config)
    if "text_config" in hparams:
        hparams = {**hparams, **hparams["text_config"]}
    return hparams


def _architecture(hparams: dict[str, Any]) -> str:
    text_archs = (hparams.get("text_config") or {}).get("architectures")
    archs = text_archs or hparams.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(
            "config.json names no architecture (\"architectures\"); supported: "
            f"{', '.join(sorted(_VOCAB_BY_ARCH))}."
        )
    return archs[0]


# --------------------------------------------------------------------------- the KV list


class _KVs:
    """Ordered KVs with GGUFWriter's semantics: a re-added key keeps its place, empty arrays are skipped."""

    def __init__(self) -> None:
        self._kv: dict[str, tuple[Any, GGUFValueType]] = {}

    def string(self, key: str, value: str) -> None:
        self._kv[key] = (value, GGUFValueType.STRING)

    def uint32(self, key: str, value: int) -> None:
        self._kv[key] = (int(value), GGUFValueType.UINT32)

    def bool(self, key: str, value: bool) -> None:
        self._kv[key] = (bool(value), GGUFValueType.BOOL)

    def array(self, key: str, values: list[Any]) -> None:
        if values:
            self._kv[key] = (list(values), GGUFValueType.ARRAY)

    def chat_template(self, value: str | list[dict[str, str]]) -> None:
        if isinstance(value, str):
            self.string(_K.CHAT_TEMPLATE, value)
            return
        default, names = None, []
        for choice in value:
            name = "".join(c if c in ascii_letters + digits else "_" for c in choice.get("name", ""))
            template = choice.get("template")
            if not name or template is None:
                continue
            if name == "default":
                default = template
            else:
                names.append(name)
                self.string(_K.CHAT_TEMPLATE_N.format(name=name), template)
        self.array(_K.CHAT_TEMPLATES, list(dict.fromkeys(names)))
        if default is not None:
            self.string(_K.CHAT_TEMPLATE, default)

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def items(self) -> list[KV]:
        return [(key, value, vtype) for key, (value, vtype) in self._kv.items()]


# --------------------------------------------------------------------------- special tokens


def _first_special_id(entry: dict[str, Any]) -> Any:
    return entry.get("SpecialToken", {}).get("id")


class _SpecialTokens:
    """Special ids, add_* flags, merges, chat template and normalizer flags of a folder.

    The rules of the gguf-py ``SpecialVocab`` that llama.cpp 0.3.36's converter runs with (its own
    vendored copy, newer than gguf 0.19 on PyPI in four places: ``ByteLevel`` post-processors
    default add_bos/add_eos to False, a post-processor's add_* wins over tokenizer_config's, an
    unknown leading template token becomes bos/cls, and the normalizer flags).
    """

    def __init__(
        self,
        folder: pathlib.Path,
        *,
        load_merges: bool = False,
        kinds: tuple[str, ...] = _DEFAULT_SPECIAL_KINDS,
        n_vocab: int | None = None,
    ) -> None:
        self.folder = folder
        self.load_merges = load_merges
        self.kinds = kinds
        self.n_vocab = n_vocab
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.merges: list[str] = []
        self.chat_template: str | list[dict[str, str]] | None = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self._read_tokenizer_files()
        self._read_config()
        if load_merges and not self.merges:
            self._read_merges_txt()

    def set_id(self, kind: str, token_id: Any) -> None:
        """Record ``kind``'s id unless one is already set (the first source wins)."""
        if not isinstance(token_id, int):
            return
        if token_id < 0:
            raise UnsupportedTokenizerError(f"The {kind} token id is negative ({token_id}) in {self.folder}.")
        if (self.n_vocab is None or token_id < self.n_vocab) and kind not in self.ids:
            self.ids[kind] = token_id

    def write(self, kvs: _KVs) -> None:
        kvs.array(_K.MERGES, self.merges)
        for kind, token_id in self.ids.items():
            if kind in _ID_KEYS:
                kvs.uint32(_ID_KEYS[kind], token_id)
        for kind, value in self.add.items():
            if kind in _ADD_KEYS:
                kvs.bool(_ADD_KEYS[kind], value)
        if self.chat_template is not None:
            kvs.chat_template(self.chat_template)
        if self.lowercase is not None:
            kvs.bool(_NORMALIZER_LOWERCASE, self.lowercase)
        if self.strip_accents is not None:
            kvs.bool(_NORMALIZER_STRIP_ACCENTS, self.strip_accents)

    # -- readers, in the converter's order

    def _read_tokenizer_files(self) -> None:
        tokenizer_json = _read_json(self.folder / "tokenizer.json")
        added_tokens: list[dict[str, Any]] = []
        if tokenizer_json is not None:
            if self.load_merges:
                self.merges = _merges_of(tokenizer_json)
            if normalizer := tokenizer_json.get("normalizer"):
                self._read_normalizer(normalizer)
            added_tokens = tokenizer_json.get("added_tokens", [])
        config = _read_json(self.folder / "tokenizer_config.json")
        if tokenizer_json is not None:
            self._read_post_processor(tokenizer_json.get("post_processor"), config)
        if not config:
            return
        self.chat_template = self._chat_template(config)
        for kind in self.kinds:
            add = config.get(f"add_{kind}_token")
            if isinstance(add, bool):
                self.add.setdefault(kind, add)
            entry = config.get(f"{kind}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str):
                token_id = next((t.get("id") for t in added_tokens if t.get("content") == content), None)
                self.set_id(kind, token_id)

    def _read_normalizer(self, normalizer: dict[str, Any]) -> None:
        kind = normalizer.get("type")
        if kind == "Lowercase":
            self.lowercase = True
        elif kind == "StripAccents":
            self.strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in normalizer:
                self.lowercase = normalizer["lowercase"]
            if "strip_accents" in normalizer:
                self.strip_accents = normalizer["strip_accents"]
        elif kind == "Sequence":
            for inner in normalizer.get("normalizers", []):
                self._read_normalizer(inner)

    def _read_post_processor(self, post: dict[str, Any] | None, config: dict[str, Any] | None) -> None:
        """add_bos/eos/sep from tokenizer.json's post-processor; it may also name bos/cls/eos/sep/eot in ``config``."""
        names = {kind: (config or {}).get(f"{kind}_token") for kind in ("bos", "cls", "eos", "sep")}
        for missing, stand_in in (("bos", "cls"), ("eos", "sep")):
            if not names[missing] and names[stand_in] and config:
                config[f"{missing}_token"] = names[missing] = names[stand_in]
        if not post:
            return
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                for role, default in (("cls", "bos"), ("sep", "eos")):
                    if not names[role] and config:
                        config[f"{role}_token"] = names[role] = proc.get(role, [names[default]])[0]
            elif kind == "TemplateProcessing":
                self._read_template(proc, config, names)

    def _read_template(self, proc: dict[str, Any], config: dict[str, Any] | None, names: dict[str, Any]) -> None:
        """TemplateProcessing: leading special token = add_bos, trailing = add_eos, one between A and B = add_sep."""
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            if first := _first_special_id(single[0]):
                if not config:
                    names["bos"] = first
                elif first not in (names["bos"], names["cls"]):
                    for role in ("bos", "cls"):
                        if not names[role]:
                            config[f"{role}_token"] = names[role] = first
                self.add["bos"] = first in (names["bos"], names["cls"])
            if last := _first_special_id(single[-1]):
                if not config:
                    names["eos"] = last
                elif last != names["eos"]:
                    # The old eos survives as eot (or eom) when the template ends in another token.
                    for spare in ("eot", "eom"):
                        if spare not in self.kinds:
                            self.kinds = (*self.kinds, spare)
                            config[f"{spare}_token"] = names["eos"]
                            break
                    config["eos_token"] = names["eos"] = last
                self.add["eos"] = last == names["eos"]
        start = 1 if pair and first and _first_special_id(pair[0]) == first else 0
        stop = -1 if pair and last and _first_special_id(pair[-1]) == last else None
        pair = pair[start:stop]
        if not pair or pair[0].get("Sequence", {}).get("id") != "A" or pair[-1].get("Sequence", {}).get("id") != "B":
            return
        middle = pair[1:-1]
        if not middle:
            return
        separators = (names["sep"], names["eos"])
        add_sep = bool((token := _first_special_id(middle[0])) and token in separators and not last)
        if len(middle) == 2 and (token := _first_special_id(middle[1])) and token in separators:
            add_sep = True
        self.add["sep"] = add_sep
        if add_sep and not names["sep"] and config:
            config["sep_token"] = names["eos"]

    def _chat_template(self, config: dict[str, Any]) -> str | list[dict[str, str]] | None:
        alternative: Any = None
        jinja, as_json = self.folder / "chat_template.jinja", self.folder / "chat_template.json"
        if jinja.is_file():
            alternative = jinja.read_text(encoding="utf-8")
            extra = sorted((self.folder / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alternative = [{"name": "default", "template": alternative}]
                alternative += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif as_json.is_file():
            alternative = (_read_json(as_json) or {}).get("chat_template")
        template = config.get("chat_template", alternative)
        return template if template is None or isinstance(template, (str, list)) else None

    def _read_config(self) -> None:
        config = _read_json(self.folder / "config.json") or {}
        for kind in self.kinds:
            token_id = config.get(f"{kind}_token_id")
            if token_id is None and "text_config" in config:
                token_id = config["text_config"].get(f"{kind}_token_id")
            self.set_id(kind, token_id)

    def _read_merges_txt(self) -> None:
        path = self.folder / "merges.txt"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                self.merges.append(f"{parts[0]} {parts[1]}")


def _merges_of(tokenizer_json: dict[str, Any]) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return merges
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        # Pair form (transformers >= 4.45): a space inside a part is stored as U+0120, as in byte-level BPE.
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    raise UnsupportedTokenizerError("tokenizer.json has merges in an unknown format.")


# Parsed tokenizer.json files, by content digest, while a tokenizer_json_cache() block runs (a
# 262k-token one takes a second to parse, and an export reads it from the model folder and from
# the converter's copy of it); read-only.
_TOKENIZER_JSON: contextvars.ContextVar[dict[bytes, Any] | None] = contextvars.ContextVar(
    "tokenizer_json", default=None
)


@contextlib.contextmanager
def tokenizer_json_cache() -> Iterator[None]:
    """Parse each ``tokenizer.json`` (by content) at most once inside this block; nested blocks share it."""
    if _TOKENIZER_JSON.get() is not None:
        yield
        return
    token = _TOKENIZER_JSON.set({})
    try:
        yield
    finally:
        _TOKENIZER_JSON.reset(token)


def read_tokenizer_json(path: pathlib.Path) -> Any:
    """``path`` parsed as JSON (None when it is not a file); cached by content in a :func:`tokenizer_json_cache`."""
    return _read_json(path)


def _read_json(path: pathlib.Path) -> Any:
    if not path.is_file():
        return None
    memo = _TOKENIZER_JSON.get()
    if memo is not None and path.name == "tokenizer.json":
        data = path.read_bytes()
        key = sha256(data).digest()
        if key not in memo:
            memo[key] = json.loads(data)
        return memo[key]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- vocab readers


def _looks_special(token: str) -> bool:
    """Added tokens the converter marks CONTROL although their tokenizer does not call them special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))  # fullwidth bars: deepseek-coder
        or (token.startswith("<unused") and token.endswith(">"))
    )


# A piece of an SPM vocabulary: (text, score, type).
_Piece = tuple[str, float, int]
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _model_pieces(path: pathlib.Path) -> list[_Piece]:
    """The pieces of a SentencePiece ``tokenizer.model``, typed as the converter types them, except user-defined.

    The converter's ``SentencePieceProcessor`` checks have no user-defined case, so it types a
    ``user_defined_symbols`` piece NORMAL; we keep it USER_DEFINED (text pre-normalized like the
    converter's other user-defined tokens): deviation 1 of the module docstring.
    """
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    user_defined = proto.SentencePiece.USER_DEFINED
    pieces: list[_Piece] = []
    for token_id in range(processor.vocab_size()):
        text, score = processor.IdToPiece(token_id), processor.GetScore(token_id)
        if processor.IsUnknown(token_id):
            token_type = TokenType.UNKNOWN
        elif processor.IsControl(token_id):
            token_type = TokenType.CONTROL
        elif processor.IsUnused(token_id):
            token_type = TokenType.UNUSED
        elif processor.IsByte(token_id):
            token_type = TokenType.BYTE
        elif proto.pieces[token_id].type == user_defined:
            text, token_type = text.replace("\u2581", " "), TokenType.USER_DEFINED
        else:
            token_type = TokenType.NORMAL
        pieces.append((text, score, int(token_type)))
    return pieces


def _is_sentencepiece_json(tokenizer_json: dict[str, Any] | None) -> bool:
    """A ``tokenizer.json`` holding a SentencePiece BPE: BPE with byte fallback (``<0xXX>`` pieces, ``▁`` spaces)."""
    model = (tokenizer_json or {}).get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _json_pieces(tokenizer_json: dict[str, Any]) -> list[_Piece]:
    """The pieces of a SentencePiece BPE ``tokenizer.json`` (no ``tokenizer.model``), with scores for llama.cpp.

    llama.cpp's SPM tokenizer merges, among adjacent symbols whose concatenation is a token, the
    one whose token scores highest (leftmost on ties); a BPE ``tokenizer.json`` merges the pair of
    lowest merge rank. Scoring each token by the rank of the first merge that makes it gives the same
    merges: the k-th token made scores -k. Pieces no merge makes (characters, bytes, specials) score
    below all of them, in id order, so they never win over a real merge. Byte pieces are BYTE and
    the model's ``unk_token`` UNKNOWN; ``_sentencepiece_vocab`` types the added tokens afterwards.
    Deviation 2 of the module docstring.
    """
    model = tokenizer_json["model"]
    vocab: dict[str, int] = model.get("vocab") or {}
    by_id = {token_id: text for text, token_id in vocab.items()}
    for added in tokenizer_json.get("added_tokens", []):
        by_id.setdefault(int(added["id"]), added["content"])
    order: dict[str, int] = {}  # token -> -score
    for left, right in _merge_pairs(model.get("merges") or []):
        if left + right in vocab:
            order.setdefault(left + right, len(order))
    unmerged = [token_id for token_id, text in sorted(by_id.items()) if text not in order]
    order.update((by_id[token_id], len(order) + i) for i, token_id in enumerate(unmerged))
    unk = model.get("unk_token")
    pieces: list[_Piece] = []
    for token_id in range(max(by_id, default=-1) + 1):
        text = by_id.get(token_id)
        if text is None:
            pieces.append((f"[PAD{token_id}]", -10000.0, int(TokenType.UNUSED)))
            continue
        token_type = TokenType.NORMAL
        if _BYTE_PIECE.fullmatch(text):
            token_type = TokenType.BYTE
        elif text == unk:
            token_type = TokenType.UNKNOWN
        pieces.append((text, -float(order[text]), int(token_type)))
    return pieces


def _merge_pairs(merges: list[Any]) -> Iterator[tuple[str, str]]:
    for merge in merges:
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
            yield left, right
        else:
            yield merge[0], merge[1]


def _sentencepiece_vocab(
    folder: pathlib.Path, vocab_size: int | None, *, phi3: bool = False, from_json: bool = False
) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a SentencePiece vocabulary plus the added tokens of the folder.

    The pieces come from ``tokenizer.model`` (the converter's ``_create_vocab_sentencepiece``), or
    with ``from_json`` from a SentencePiece BPE ``tokenizer.json`` (``_json_pieces``). ``phi3``
    follows ``Phi3MiniModel.set_vocab``'s variant: added tokens are CONTROL only when marked
    special, ``tokenizer.json``'s added tokens count too, and nothing is range-checked.
    """
    if from_json:
        pieces = _json_pieces(_read_json(folder / "tokenizer.json"))
    else:
        path = folder / "tokenizer.model"
        if not path.is_file():
            raise MissingFileError(f"No tokenizer.model (SentencePiece) next to config.json in {folder}.")
        pieces = _model_pieces(path)
    size = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(TokenType.UNUSED)] * size

    def out_of_range(token_id: int, what: str) -> bool:
        if token_id < size:
            return False
        if phi3:  # the converter crashes with an IndexError here
            raise UnsupportedTokenizerError(
                f"{what} has token id {token_id}, beyond the model's vocab_size {size} (config.json); "
                "llama.cpp's converter cannot export this Phi-3 tokenizer. Make config.json's vocab_size "
                "cover every token."
            )
        return True

    for token_id, (text, score, token_type) in enumerate(pieces):
        if out_of_range(token_id, "The tokenizer"):
            break
        tokens[token_id], scores[token_id], types[token_id] = text, score, token_type

    for text, token_id in (_read_json(folder / "added_tokens.json") or {}).items():
        if token_id >= size:
            continue
        tokens[token_id], scores[token_id], types[token_id] = text, -1000.0, int(TokenType.USER_DEFINED)

    tokenizer_json = _read_json(folder / "tokenizer.json") or {}
    decoder = (_read_json(folder / "tokenizer_config.json") or {}).get("added_tokens_decoder")
    added = [(int(i), data) for i, data in (decoder or {}).items()]
    if phi3 or not decoder:
        # Phi-3: the converter's own rule. Otherwise deviation 3: a folder saved by transformers 5 keeps
        # its added tokens only in tokenizer.json, which the converter does not read here.
        added += [(int(data["id"]), data) for data in tokenizer_json.get("added_tokens", [])]
    for token_id, data in added:
        if out_of_range(token_id, "An added token"):
            continue
        text: str = data["content"]
        if data.get("special") or (not phi3 and _looks_special(text)):
            types[token_id] = int(TokenType.CONTROL)
        else:
            if not phi3:
                text = text.replace("\u2581", " ")  # user-defined spaces are pre-normalized
            types[token_id] = int(TokenType.USER_DEFINED)
        tokens[token_id], scores[token_id] = text, -1000.0
    return tokens, scores, types


def _write_scored_vocab(
    kvs: _KVs, folder: pathlib.Path, tokens: list[str], scores: list[float], types: list[int]
) -> None:
    kvs.string(_K.MODEL, "llama")
    kvs.string(_K.PRE, "default")
    kvs.array(_K.LIST, tokens)
    kvs.array(_K.SCORES, scores)
    kvs.array(_K.TOKEN_TYPE, types)
    _SpecialTokens(folder, n_vocab=len(tokens)).write(kvs)


def _vocab_size(hparams: dict[str, Any]) -> int | None:
    key = next((k for k in ("vocab_size_per_layer_input", "vocab_size") if k in hparams), None)
    return hparams[key] if key else None


def _set_sentencepiece(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    _write_scored_vocab(kvs, folder, *_sentencepiece_vocab(folder, _vocab_size(hparams)))


def _set_sentencepiece_json(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any], *, phi3: bool = False) -> None:
    """An SPM vocabulary rebuilt from ``tokenizer.json`` where the converter has no ``tokenizer.model`` to read."""
    vocab_size = hparams.get("vocab_size") if phi3 else _vocab_size(hparams)
    _write_scored_vocab(kvs, folder, *_sentencepiece_vocab(folder, vocab_size, phi3=phi3, from_json=True))
    if _K.ADD_BOS not in kvs and not _post_processor_adds_tokens(_read_json(folder / "tokenizer.json")):
        kvs.bool(_K.ADD_BOS, False)  # llama.cpp's SPM default would add one


def _post_processor_adds_tokens(tokenizer_json: dict[str, Any]) -> bool:
    post = tokenizer_json.get("post_processor")
    if post is None:
        return False
    return post.get("type") != "TemplateProcessing" or any("SpecialToken" in piece for piece in post.get("single", []))


def _sentencepiece_json_folder(folder: pathlib.Path) -> bool:
    return not (folder / "tokenizer.model").is_file() and _is_sentencepiece_json(_read_json(folder / "tokenizer.json"))


class _UnknownPreTokenizerError(UnsupportedTokenizerError):
    pass


def _pre_tokenizer_name(tokenizer: Any) -> str:
    """``tokenizer.ggml.pre`` for a BPE tokenizer: the converter's name for the hash of its check-text ids."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZER_BY_HASH.get(digest)
    if name is None:
        raise _UnknownPreTokenizerError(
            f"The tokenizer's BPE pre-tokenizer is not one llama.cpp 0.3.36 knows (check-text hash {digest}); "
            "its converter refuses it too, "
            "because llama.cpp would split text differently from the tokenizer. Export with the base model's "
            "original tokenizer files, or a tokenizer whose pre-tokenizer llama.cpp supports."
        )
    return name


def _set_bpe(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab: dict[str, int] = tokenizer.vocab
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedTokenizerError(
            f"The tokenizer has ids up to {max(vocab.values())}, beyond config.json's vocab_size {vocab_size}; "
            "llama.cpp's converter refuses this. Resize the embeddings to cover the tokenizer."
        )
    pre = _pre_tokenizer_name(tokenizer)
    by_id = {token_id: text for text, token_id in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        text = by_id.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(int(TokenType.UNUSED))
            continue
        token_type = TokenType.NORMAL
        if text in added:
            # llama.cpp expects added tokens pre-normalized, so non-normalized ones go through a round trip.
            if not decoder[token_id].normalized:
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            if decoder[token_id].special or _looks_special(text):
                token_type = TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")
                token_type = TokenType.USER_DEFINED
        tokens.append(text)
        types.append(int(token_type))
    # The Rust tokenizer of a large vocabulary holds hundreds of MB: give them back before
    # tokenizer.json is parsed for the merges.
    del tokenizer, vocab, by_id, added, decoder
    return_free_heap()
    kvs.string(_K.MODEL, "gpt2")
    kvs.string(_K.PRE, pre)
    kvs.array(_K.LIST, tokens)
    kvs.array(_K.TOKEN_TYPE, types)
    _SpecialTokens(folder, load_merges=True).write(kvs)


# --------------------------------------------------------------------------- per architecture


def _origin_architecture(folder: pathlib.Path) -> str | None:
    return ((_read_json(folder / "config.json") or {}).get("architectures") or [None])[0]


def _tokenizer_config(folder: pathlib.Path) -> dict[str, Any]:
    return _read_json(folder / "tokenizer_config.json") or {}


def _vocab_llama(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``LlamaModel``: SentencePiece, else SentencePiece from tokenizer.json (deviation 2), else BPE (Llama 3)."""
    if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise UnsupportedTokenizerError(
            f"{folder} has a Mistral tekken.json and no tokenizer.json; llmdeploy exports HF tokenizers only."
        )
    config = _tokenizer_config(folder)
    if config.get("tokenizer_class") == "HybridDNATokenizer":
        raise UnsupportedTokenizerError("HybridDNATokenizer vocabularies are not supported.")
    if (add_prefix_space := config.get("add_prefix_space")) is not None:
        kvs.bool(_K.ADD_PREFIX, add_prefix_space)
    if (folder / "tokenizer.model").is_file():
        _set_sentencepiece(kvs, folder, hparams)
    elif _sentencepiece_json_folder(folder):
        _set_sentencepiece_json(kvs, folder, hparams)
    else:
        _set_bpe(kvs, folder, hparams)
    vocab_size = hparams.get("vocab_size", 32000)
    if vocab_size == 32016:  # CodeLlama's infill tokens; only eot has a GGUF key in the converter
        special = _SpecialTokens(folder, kinds=("prefix", "suffix", "middle", "eot"))
        for kind, token_id in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            special.set_id(kind, token_id)
        special.write(kvs)
    if vocab_size == 49152:  # Granite small models
        kvs.bool(_K.ADD_BOS, False)


def _vocab_qwen2(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``Qwen2Model`` / ``Qwen3Model``: SentencePiece if there is a tokenizer.model, else BPE."""
    if _origin_architecture(folder) == "InternS1ForConditionalGeneration":
        raise UnsupportedTokenizerError("Intern-S1 tokenizers are not supported.")
    try:
        _set_sentencepiece(kvs, folder, hparams)
    except FileNotFoundError:
        _set_bpe(kvs, folder, hparams)


def _vocab_bpe(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``TextModel`` default (Qwen3-MoE): BPE."""
    if _origin_architecture(folder) == "InternS1ForConditionalGeneration":
        raise UnsupportedTokenizerError("Intern-S1 tokenizers are not supported.")
    _set_bpe(kvs, folder, hparams)


def _set_gemma_sentencepiece(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """tokenizer.model, else (the converter fails: deviation 4) a SentencePiece tokenizer.json."""
    if _sentencepiece_json_folder(folder):
        _set_sentencepiece_json(kvs, folder, hparams)
    else:
        _set_sentencepiece(kvs, folder, hparams)


def _vocab_gemma(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``GemmaModel``: SentencePiece, CodeGemma's infill ids (only eot reaches the file), no space prefix."""
    _set_gemma_sentencepiece(kvs, folder, hparams)
    special = _SpecialTokens(folder, kinds=("prefix", "suffix", "middle", "fsep", "eot"))
    for kind, token_id in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
        special.set_id(kind, token_id)
    special.chat_template = None  # written once already
    special.write(kvs)
    kvs.bool(_K.ADD_PREFIX, False)


def _vocab_gemma2(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``Gemma2Model``: SentencePiece, no space prefix."""
    _set_gemma_sentencepiece(kvs, folder, hparams)
    kvs.bool(_K.ADD_PREFIX, False)


def _vocab_gemma3(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``Gemma3Model``: SentencePiece (no space prefix) if there is a tokenizer.model, else BPE.

    A SentencePiece tokenizer.json whose pre-tokenizer hash the converter does not know (it refuses
    it) is rebuilt as SentencePiece instead: deviation 4.
    """
    if (folder / "tokenizer.model").is_file():
        _set_sentencepiece(kvs, folder, hparams)
        kvs.bool(_K.ADD_PREFIX, False)
        return
    try:
        _set_bpe(kvs, folder, hparams)
    except _UnknownPreTokenizerError:
        if not _sentencepiece_json_folder(folder):
            raise
        _set_sentencepiece_json(kvs, folder, hparams)
        kvs.bool(_K.ADD_PREFIX, False)


def _vocab_phi3(kvs: _KVs, folder: pathlib.Path, hparams: dict[str, Any]) -> None:
    """``Phi3MiniModel``: BPE for a GPT2Tokenizer (Phi-4), else its own SentencePiece variant."""
    if _tokenizer_config(folder).get("tokenizer_class") == "GPT2Tokenizer":
        _set_bpe(kvs, folder, hparams)
        return
    if _sentencepiece_json_folder(folder):  # the converter fails: deviation 4
        _set_sentencepiece_json(kvs, folder, hparams, phi3=True)
        return
    if not (folder / "tokenizer.model").is_file():
        raise MissingFileError(
            f"Phi-3 needs its SentencePiece vocabulary next to config.json: tokenizer.model, or a tokenizer.json "
            f"holding a byte-fallback BPE (none in {folder})."
        )
    _write_scored_vocab(kvs, folder, *_sentencepiece_vocab(folder, hparams.get("vocab_size"), phi3=True))


# HF architecture -> the converter class's set_vocab.
_VOCAB_BY_ARCH: dict[str, Callable[[_KVs, pathlib.Path, dict[str, Any]], None]] = {
    "LlamaForCausalLM": _vocab_llama,
    "MistralForCausalLM": _vocab_llama,
    "MixtralForCausalLM": _vocab_llama,
    "Qwen2ForCausalLM": _vocab_qwen2,
    "Qwen3ForCausalLM": _vocab_qwen2,
    "Qwen3MoeForCausalLM": _vocab_bpe,
    "GemmaForCausalLM": _vocab_gemma,
    "Gemma2ForCausalLM": _vocab_gemma2,
    "Gemma3ForCausalLM": _vocab_gemma3,
    "Gemma3ForConditionalGeneration": _vocab_gemma3,
    "Phi3ForCausalLM": _vocab_phi3,
}
