"""Ollama Modelfiles for exported GGUF files: ``FROM``, a Go ``TEMPLATE`` and ``PARAMETER stop`` lines.

``modelfile_for(gguf_name, metadata)`` turns the GGUF's ``tokenizer.*`` KVs into a Modelfile.
The TEMPLATE is written only when it provably lays a conversation out exactly as the model's own
Jinja chat template (``tokenizer.chat_template``) does; otherwise the Modelfile has none, says so
in a comment, and Ollama renders prompts with that Jinja template itself (Ollama runs GGUF models
through llama.cpp's server, which reads ``tokenizer.chat_template``).

How a TEMPLATE is found:

1. **Family, by markers.** Five chat formats are known, each by tokens its template contains or writes:
   Llama 3 (``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``), ChatML as in Qwen 2,
   2.5 and 3 (``<|im_start|>``, ``<|im_end|>``), Gemma 2 and 3 (``<start_of_turn>``,
   ``<end_of_turn>``), Mistral (``[INST]``, ``[/INST]``) and Phi-3 (``<|user|>``, ``<|assistant|>``,
   ``<|end|>``).
2. **Details, by rendering.** The Jinja template is rendered (sandboxed, as transformers renders
   it) for a few probe conversations with marker texts as contents. What surrounds the markers
   gives what varies inside a family: a default system prompt (Qwen 2.5) or a fixed system
   preamble (Llama 3.1's knowledge-cutoff lines), where a system prompt goes (its own turn;
   prepended to the first user message, as Gemma 3 does; or to the last one, as Mistral v3 does),
   the spacing around ``[INST]``, whether the template writes the BOS token, the generation prompt.
3. **Proof.** The resulting layout renders six conversations (with and without a system prompt,
   one to three user turns) exactly as the Jinja template does, or no TEMPLATE is written. A
   template that calls ``strftime_now`` (today's date: Llama 3.2, Mistral Small 3) is not
   written either: a Go template cannot know the date.

Conventions of the TEMPLATE, which is written for Ollama's ``.Messages`` (Ollama merges
consecutive messages of one role, and puts the Modelfile's ``SYSTEM`` first when a request has no
system message):

- A template that does not render a system message (it raises, or drops it: Gemma 2, early
  Mistral and Phi-3) gets it prepended to the first message with a newline, as llama.cpp does.
- A final assistant message is left open (no end-of-turn), so Ollama continues it; otherwise the
  generation prompt follows the last message.
- System messages after the first are written as a turn of their own where the family has a
  system turn (Llama 3, ChatML, Phi-3), and dropped elsewhere.
- Not expressible, so not reproduced: Jinja's ``trim`` of message contents (Llama 3, Gemma),
  tool calls and tool results, and the reasoning handling of thinking models' past turns.

BOS: llama.cpp (and so Ollama) puts the BOS token before the prompt itself when the vocabulary's
``add_bos_token`` is true, so a template that writes ``bos_token`` gets no BOS text in its TEMPLATE
then (it would be doubled); with ``add_bos_token`` false the TEMPLATE writes it.

Stop strings are the family's end-of-turn tokens and the vocabulary's EOS/EOT/EOM tokens, each
only if the vocabulary has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ._fsutil import fsync_dir
from .errors import InvalidOptionError, OutputExistsError
from .gguf.reader import open_gguf

__all__ = ["Modelfile", "metadata_from_gguf", "modelfile_for", "save_modelfile", "write_modelfile"]

logger = logging.getLogger("llmdeploy")

_CHAT_TEMPLATE = "tokenizer.chat_template"
_TOKENS = "tokenizer.ggml.tokens"
_MODEL = "tokenizer.ggml.model"
_PRE = "tokenizer.ggml.pre"
_ADD_BOS = "tokenizer.ggml.add_bos_token"
_BOS_ID = "tokenizer.ggml.bos_token_id"
_STOP_IDS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# llama.cpp's BOS default when a GGUF has no add_bos_token (src/llama-vocab.cpp, 0.3.36): on for
# SentencePiece and WordPiece vocabularies, off for BPE ones except these pre-tokenizers.
_BOS_BY_DEFAULT_MODELS = frozenset(("llama", "bert"))
_BOS_BY_DEFAULT_PRE = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
     "tekken", "chameleon")
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Modelfile:
    """An Ollama Modelfile for one GGUF file.

    Attributes:
        text: the file's content.
        family: the chat format the TEMPLATE follows (``"llama3"``, ``"chatml"``, ``"gemma"``,
            ``"mistral"``, ``"phi3"``), or ``None`` when the Modelfile has no TEMPLATE.
        stop: the ``PARAMETER stop`` strings, in file order.
        template: the TEMPLATE's Go template, or ``None`` (it is also what a Hub repository's
            ``template`` file holds for ``ollama run hf.co/...``).
    """

    text: str
    family: str | None
    stop: tuple[str, ...]
    template: str | None = None


def modelfile_for(gguf_name: str, metadata: Mapping[str, Any]) -> Modelfile:
    """The Modelfile for a GGUF file, from the file's tokenizer KVs.

    A TEMPLATE is written when the chat template is a known family and a Go template reproduces
    it exactly (see the module docstring); otherwise the Modelfile says why in a comment, and a
    warning is logged: Ollama then uses the ``tokenizer.chat_template`` inside the GGUF.

    Args:
        gguf_name: the GGUF file's name (``"model-Q4_K_M.gguf"``) or its path relative to the
            Modelfile's folder; ``FROM`` names it (``FROM ./model-Q4_K_M.gguf``).
        metadata: the GGUF's ``tokenizer.*`` KVs, as the exporter writes them or
            :func:`metadata_from_gguf` reads them: ``tokenizer.chat_template`` (str),
            ``tokenizer.ggml.tokens`` (list of str), ``tokenizer.ggml.bos_token_id`` /
            ``eos_token_id`` / ``eot_token_id`` / ``eom_token_id`` (int),
            ``tokenizer.ggml.add_bos_token`` (bool), ``tokenizer.ggml.model`` / ``pre`` (str).

    Returns:
        The Modelfile's text, the recognised family and the stop strings.

    Raises:
        InvalidOptionError: ``gguf_name`` is empty or spans lines.
    """
    from_path = _from_path(gguf_name)
    tokens = metadata.get(_TOKENS)
    tokens = list(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else []
    source = metadata.get(_CHAT_TEMPLATE)
    absent = not isinstance(source, str) or not source.strip()
    found, families, reason = (
        (None, [], "the GGUF has no tokenizer.chat_template") if absent else _find_layout(source, metadata, tokens)
    )

    lines = [
        f"# Ollama Modelfile for {from_path}, written by llmdeploy.",
        "# Create the model with: ollama create <model name> -f <this file>",
        f"FROM {from_path}",
    ]
    go_template = None
    if found is not None:
        family, layout = found
        go_template = layout.go_template()
        lines.append(f"# Chat format: {family.title}, from the GGUF's tokenizer.chat_template. {layout.describe()}")
        lines.append(f'TEMPLATE """{go_template}"""')
    elif absent:
        lines.append(f"# No TEMPLATE: {reason}. Add one if this is a chat model.")
        logger.warning(
            "%s: %s, so the Modelfile has no TEMPLATE and Ollama will pass prompts to the model unformatted; "
            "add a TEMPLATE to the Modelfile if this is a chat model.",
            gguf_name, reason,
        )  # fmt: skip
    else:
        lines.append(f"# No TEMPLATE: {reason}. Ollama uses the tokenizer.chat_template embedded in the GGUF.")
        logger.warning(
            "%s: no TEMPLATE in the Modelfile: %s. Ollama will use the tokenizer.chat_template embedded in "
            "the GGUF (current Ollama reads it).",
            gguf_name, reason,
        )  # fmt: skip
    # The end-of-turn tokens of every family whose markers the template has, TEMPLATE or not.
    stop = _stop_strings(metadata, tokens, [token for f in families for token in f.end_of_turn])
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return Modelfile(
        text="\n".join(lines) + "\n",
        family=found[0].name if found is not None else None,
        stop=tuple(stop),
        template=go_template,
    )


def write_modelfile(
    gguf_path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    *,
    path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write the Modelfile for a GGUF file (see :func:`modelfile_for`), atomically.

    Args:
        gguf_path: the GGUF file the Modelfile's ``FROM`` names (relative to the Modelfile).
        metadata: its ``tokenizer.*`` KVs (see :func:`modelfile_for`; :func:`metadata_from_gguf`
            reads them from the file).
        path: where to write; default ``Modelfile`` beside the GGUF. An existing folder gets a
            ``Modelfile`` inside it.
        overwrite: replace an existing file (it stays intact until the new one is complete).

    Returns:
        The path written.

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is False.
    """
    gguf_path = pathlib.Path(gguf_path)
    target = pathlib.Path(path) if path is not None else gguf_path.parent / "Modelfile"
    if target.is_dir():
        target = target / "Modelfile"
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite=True to replace it, or choose another path")
    try:
        from_name = pathlib.Path(os.path.relpath(gguf_path.absolute(), target.parent.absolute())).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        from_name = gguf_path.absolute().as_posix()
    return save_modelfile(modelfile_for(from_name, metadata), target, overwrite=overwrite)


def save_modelfile(modelfile: Modelfile, target: str | os.PathLike[str], *, overwrite: bool = False) -> pathlib.Path:
    """Write a prepared :class:`Modelfile` to ``target`` atomically (temp file + rename).

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is False.
    """
    target = pathlib.Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite=True to replace it, or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(modelfile.text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(target.parent)
    return target


def metadata_from_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``tokenizer.*`` KVs of a GGUF file, as :func:`modelfile_for` takes them.

    Read with :func:`llmdeploy.gguf.reader.open_gguf` (the header only); for a split model, any part
    will do (the KVs come from the first).

    Args:
        path: the ``.gguf`` file.

    Returns:
        ``{key: value}``: strings as ``str``, numbers and bools as Python scalars, arrays as lists
        (string arrays, such as ``tokenizer.ggml.tokens``, as lists of ``str``).

    Raises:
        MissingFileError: no such file.
        GGUFReadError: the file is not a readable GGUF.
    """
    model = open_gguf(path)
    return {entry.key: entry.to_python() for entry in model.metadata if entry.key.startswith("tokenizer.")}


# --------------------------------------------------------------------------- the Modelfile's pieces


def _from_path(gguf_name: str) -> str:
    name = str(gguf_name)
    if not name.strip() or any(c in name for c in "\r\n"):
        raise InvalidOptionError(f"gguf_name={gguf_name!r}: give the GGUF file's name, e.g. 'model-Q4_K_M.gguf'")
    if name.startswith(("/", "./", "../", "~")) or pathlib.PurePath(name).is_absolute():
        return name
    return f"./{name}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _stop_strings(metadata: Mapping[str, Any], tokens: list[str], end_of_turn: list[str]) -> list[str]:
    """End-of-turn tokens of the family, then the EOS/EOT/EOM tokens: those in the vocabulary."""
    candidates = list(end_of_turn)
    for key in _STOP_IDS:
        token = _token(metadata, tokens, key)
        if token is not None:
            candidates.append(token)
    vocabulary = set(tokens)
    # A stop string must survive the Modelfile's "..." quoting: one printable line without quotes.
    usable = [t for t in candidates if t in vocabulary and t.strip() and t.isprintable() and '"' not in t]
    return list(dict.fromkeys(usable))


def _token(metadata: Mapping[str, Any], tokens: list[str], key: str) -> str | None:
    token_id = metadata.get(key)
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def _adds_bos(metadata: Mapping[str, Any]) -> bool:
    """Whether llama.cpp puts the BOS token before a prompt for this vocabulary."""
    model, pre = metadata.get(_MODEL), metadata.get(_PRE)
    if model == "gemma4" or pre == "gemma4":  # llama.cpp turns it on for Gemma 4 whatever the file says
        return True
    explicit = metadata.get(_ADD_BOS)
    if explicit is not None:
        return bool(explicit)
    return model in _BOS_BY_DEFAULT_MODELS or (model == "gpt2" and pre in _BOS_BY_DEFAULT_PRE)


# --------------------------------------------------------------------------- families and layouts


@dataclasses.dataclass(frozen=True)
class _Family:
    """A chat format: the markers its Jinja template contains, and what it fixes."""

    name: str
    title: str
    markers: tuple[str, ...]
    # role -> (text before, text after) a message's content; None: read from the template (Mistral)
    turns: Mapping[str, tuple[str, str]] | None
    end_of_turn: tuple[str, ...]


def _each_role(before: str, after: str) -> dict[str, tuple[str, str]]:
    return {role: (before.format(role=role), after) for role in ("system", "user", "assistant")}


_FAMILIES = (
    _Family(
        "llama3", "Llama 3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        _each_role("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"), ("<|eot_id|>", "<|eom_id|>"),
    ),
    _Family(
        "chatml", "ChatML", ("<|im_start|>", "<|im_end|>"), _each_role("<|im_start|>{role}\n", "<|im_end|>\n"),
        ("<|im_end|>",),
    ),
    _Family(
        "gemma", "Gemma", ("<start_of_turn>", "<end_of_turn>"),
        {"user": ("<start_of_turn>user\n", "<end_of_turn>\n"), "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")},
        ("<end_of_turn>",),
    ),
    _Family("mistral", "Mistral [INST]", ("[INST]", "[/INST]"), None, ()),
    _Family(
        "phi3", "Phi-3", ("<|user|>", "<|assistant|>", "<|end|>"), _each_role("<|{role}|>\n", "<|end|>\n"),
        ("<|end|>",),
    ),
)  # fmt: skip

_FIRST_SYSTEM = "(index $.Messages 0)"
_STARTS_WITH_SYSTEM = f'and $.Messages (eq {_FIRST_SYSTEM}.Role "system")'


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a chat template lays out a conversation, in pieces an Ollama TEMPLATE can write.

    A conversation is: ``bos``, then the leading system message (``system="turn"``:
    ``first_system`` around its text, or ``no_system`` when there is none), then each message
    between its role's ``(before, after)`` (a final assistant message without its ``after``), then
    ``generation`` unless the last message is the assistant's. With ``system="first_user"`` or
    ``"last_user"`` the leading system text and ``separator`` go before that user message's text
    instead. ``later_system`` surrounds system messages further on (``None``: dropped).
    """

    bos: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    system: str
    first_system: tuple[str, str] = ("", "")
    no_system: str = ""
    separator: str = ""
    later_system: tuple[str, str] | None = None
    native_system: bool = True  # False: the template ignores system messages; merged as llama.cpp does

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """What the TEMPLATE gives Ollama for ``(role, content)`` messages (mirrors ``go_template``)."""
        leading = messages[0][1] if messages and messages[0][0] == "system" else None
        out = [self.bos]
        if self.system == "turn":
            out.append(self.no_system if leading is None else self.first_system[0] + leading + self.first_system[1])
        for i, (role, content) in enumerate(messages):
            last = i == len(messages) - 1
            if role == "user":
                merged = leading is not None and (
                    (self.system == "first_user" and i == 1) or (self.system == "last_user" and last)
                )
                out += [self.user[0], leading + self.separator if merged else "", content, self.user[1]]
            elif role == "assistant":
                out += [self.assistant[0], content, "" if last else self.assistant[1]]
            elif role == "system" and i != 0 and self.later_system is not None:
                out += [self.later_system[0], content, self.later_system[1]]
            if last and role != "assistant":
                out.append(self.generation)
        return "".join(out)

    def go_template(self) -> str:
        """The Go template (Ollama's TEMPLATE) that renders ``.Messages`` as :meth:`render` does."""
        t = [_go_text(self.bos)]
        if self.system == "turn":
            t.append(
                f"{{{{ if {_STARTS_WITH_SYSTEM} }}}}{_go_text(self.first_system[0])}"
                f"{{{{ {_FIRST_SYSTEM}.Content }}}}{_go_text(self.first_system[1])}"
            )
            if self.no_system:
                t.append(f"{{{{ else }}}}{_go_text(self.no_system)}")
            t.append("{{ end }}")
        t.append(
            '{{ range $i, $m := $.Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}{{ if eq $m.Role "user" }}'
        )
        t.append(_go_text(self.user[0]))
        if self.system in ("first_user", "last_user"):
            where = "(eq $i 1)" if self.system == "first_user" else "$last"
            t.append(
                f'{{{{ if and {where} (eq {_FIRST_SYSTEM}.Role "system") }}}}{{{{ {_FIRST_SYSTEM}.Content }}}}'
                f"{_go_text(self.separator)}{{{{ end }}}}"
            )
        t.append(f"{{{{ $m.Content }}}}{_go_text(self.user[1])}")
        t.append(f'{{{{ else if eq $m.Role "assistant" }}}}{_go_text(self.assistant[0])}{{{{ $m.Content }}}}')
        if self.assistant[1]:
            t.append(f"{{{{ if not $last }}}}{_go_text(self.assistant[1])}{{{{ end }}}}")
        if self.later_system is not None:
            t.append(
                f'{{{{ else if and (eq $m.Role "system") (ne $i 0) }}}}{_go_text(self.later_system[0])}'
                f"{{{{ $m.Content }}}}{_go_text(self.later_system[1])}"
            )
        t.append("{{ end }}")
        if self.generation:
            t.append(f'{{{{ if and $last (ne $m.Role "assistant") }}}}{_go_text(self.generation)}{{{{ end }}}}')
        t.append("{{ end }}")
        return "".join(t)

    def describe(self) -> str:
        """One sentence for the Modelfile's comment: where the system prompt goes."""
        if not self.native_system:
            return "The chat template has no system role; a system prompt is prepended to the first message."
        return {
            "turn": "A system prompt is a turn of its own.",
            "first_user": "A system prompt is prepended to the first user message, as the chat template does.",
            "last_user": "A system prompt is prepended to the last user message, as the chat template does.",
        }[self.system]

    def replace(self, old: str, new: str) -> _Layout:
        """The same layout with ``old`` replaced by ``new`` in every piece of text."""

        def sub(value: Any) -> Any:
            if isinstance(value, str):
                return value.replace(old, new)
            if isinstance(value, tuple):
                return tuple(sub(v) for v in value)
            return value

        return dataclasses.replace(self, **{f.name: sub(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _go_text(text: str) -> str:
    """``text`` as literal text of a Go template ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


# --------------------------------------------------------------------------- reading a Jinja template

# Message contents and special tokens for the probe renders: texts no template writes itself.
_S, _U1, _A1, _U2, _A2, _U3 = (
    f"{name}-llmdeploy-probe" for name in ("system", "user1", "model1", "user2", "model2", "user3")
)
_BOS, _EOS = "<bos-llmdeploy-probe>", "<eos-llmdeploy-probe>"
# The conversations a layout must render exactly as the chat template does.
_CHECKS = (
    [("user", _U1)],
    [("user", _U1), ("assistant", _A1), ("user", _U2)],
    [("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2), ("user", _U3)],
    [("system", _S), ("user", _U1)],
    [("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)],
    [("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2), ("user", _U3)],
)


class _RenderError(Exception):
    """The Jinja template failed on a probe conversation."""


class _NotThisFormat(Exception):
    """The template is not (exactly) the family's format; the message says what differs."""


def _find_layout(
    source: str, metadata: Mapping[str, Any], tokens: list[str]
) -> tuple[tuple[_Family, _Layout] | None, list[_Family], str]:
    """The family and layout that reproduce ``source`` (or ``None`` and why not), and the families it looks like."""
    template, reason = _compile(source)
    marker_text = _marker_text(source, template)
    families = [f for f in _FAMILIES if all(m in marker_text for m in f.markers)]
    if template is None:
        return None, families, reason
    if not families:
        return None, families, "tokenizer.chat_template is none of the formats llmdeploy writes TEMPLATEs for"
    reasons = []
    for family in families:
        try:
            layout = _read_layout(family, template)
            if template.dated:
                raise _NotThisFormat("it writes the current date (strftime_now), which a TEMPLATE cannot")
            return (family, _final(layout, metadata, tokens)), families, ""
        except _NotThisFormat as e:
            reasons.append(f"it looks like {family.title} but {_one_line(str(e))}")
    return None, families, "; ".join(reasons)


def _compile(source: str) -> tuple[_ChatTemplate | None, str]:
    """The chat template, or ``None`` and why it cannot be rendered."""
    try:
        return _ChatTemplate(source), ""
    except ImportError:
        return None, "jinja2 is not installed, so llmdeploy cannot check a TEMPLATE against the chat template"
    except Exception as e:  # noqa: BLE001 - a template that does not compile: whatever jinja2 raises
        return None, f"tokenizer.chat_template does not compile ({_one_line(str(e))})"


def _marker_text(source: str, template: _ChatTemplate | None) -> str:
    """Where a family's markers are looked for: the source, and what it renders (Phi-3 small writes
    ``'<|' + role + '|>'``, so ``<|user|>`` is only in its output)."""
    texts = [source]
    if template is not None:
        for conversation in (_CHECKS[4], _CHECKS[1]):
            with contextlib.suppress(_RenderError):
                texts.append(template(conversation, True))
    return "\n".join(texts)


class _ChatTemplate:
    """A Jinja chat template, rendered the way transformers' ``apply_chat_template`` renders it (sandboxed).

    Attributes:
        dated: the formats of every ``strftime_now`` call the template made (today's date).
    """

    def __init__(self, source: str):
        import jinja2
        import jinja2.ext
        import jinja2.sandbox

        class GenerationTag(jinja2.ext.Extension):
            """transformers' ``{% generation %}`` (marks assistant text for training masks): renders its body."""

            tags: ClassVar[set[str]] = {"generation"}

            def parse(self, parser: Any) -> Any:
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        self.dated: list[str] = []

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            self.dated.append(fmt)
            return datetime.datetime(2024, 7, 26).strftime(fmt)

        def tojson(
            value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
        ) -> str:
            return json.dumps(
                value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationTag]
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        env.filters["tojson"] = tojson
        self._template = env.from_string(source)

    def __call__(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        """The prompt for ``(role, content)`` messages, with the probe's BOS/EOS texts."""
        try:
            return self._template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=add_generation_prompt, bos_token=_BOS, eos_token=_EOS, tools=None,
                documents=None,
            )  # fmt: skip
        except Exception as e:  # chat templates are untrusted code: any failure only means "not this layout"
            raise _RenderError(str(e)) from e


def _read_layout(family: _Family, template: _ChatTemplate) -> _Layout:
    """The family's layout with the details ``template`` shows, checked against it."""
    if family.turns is None:
        user, assistant = _read_turns(template)
    else:
        user, assistant = family.turns["user"], family.turns["assistant"]
    later_system = family.turns.get("system") if family.turns is not None else None

    # A lone user message: [BOS] [default system block or preamble] user turn [generation prompt].
    text = _prompt(template, [("user", _U1)])
    turn = user[0] + _U1 + user[1]
    if (at := text.find(turn)) < 0:
        raise _NotThisFormat(f"a user message does not render as {turn!r}")
    head, generation = text[:at], text[at + len(turn) :]
    bos = _BOS if head.startswith(_BOS) else ""
    no_system = head[len(bos) :]
    pieces: dict[str, Any] = {"bos": bos, "user": user, "assistant": assistant, "generation": generation}

    # A system message: in a turn of its own, merged into a user message, or not written at all.
    try:
        text = _prompt(template, [("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)])
    except _NotThisFormat:
        text = ""
    if _S not in text:
        layout = _Layout(**pieces, system="first_user", separator="\n", native_system=False)
    elif user[0] + _S in text:
        after = text[text.index(user[0] + _S) + len(user[0]) + len(_S) :]
        first, last = after.find(_U1), after.find(_U2)
        if no_system or (first < 0 and last < 0):
            raise _NotThisFormat("its system prompt goes into a user message in a way a TEMPLATE cannot write")
        if first >= 0 and (last < 0 or first < last):
            layout = _Layout(**pieces, system="first_user", separator=after[:first])
        else:
            layout = _Layout(**pieces, system="last_user", separator=after[:last])
    else:
        head = text[: max(text.find(user[0] + _U1), 0)]
        head = head[len(bos) :] if bos and head.startswith(bos) else head
        if _S not in head:
            raise _NotThisFormat("its system prompt is not written before the first user message")
        before, after = head.split(_S, 1)
        if family.turns is None and not no_system:
            later_system = (before, after)  # Mistral v7: [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] wherever it is
        layout = _Layout(
            **pieces, system="turn", first_system=(before, after), no_system=no_system, later_system=later_system
        )
    _check(layout, template)
    return layout


def _read_turns(template: _ChatTemplate) -> tuple[tuple[str, str], tuple[str, str]]:
    """The text around user and assistant messages (Mistral, whose spacing varies by version)."""
    conversation = [("user", _U1), ("assistant", _A1), ("user", _U2)]
    s0, s1, s2, s3 = _split(_prompt(template, conversation), (_U1, _A1, _U2))
    user_after = _split(_prompt(template, conversation, add_generation_prompt=False), (_U1, _A1, _U2))[3]
    if not s1.startswith(user_after) or "[/INST]" not in user_after:
        raise _NotThisFormat(f"its user messages do not end in [/INST] the same way each time ({s1!r}, {s3!r})")
    s0 = s0.removeprefix(_BOS)
    common = 0
    while common < min(len(s0), len(s2)) and s0[len(s0) - 1 - common] == s2[len(s2) - 1 - common]:
        common += 1
    user_before = s0[len(s0) - common :]
    if "[INST]" not in user_before:
        raise _NotThisFormat(f"its user messages do not start with [INST] the same way each time ({s0!r}, {s2!r})")
    return (user_before, user_after), (s1[len(user_after) :], s2[: len(s2) - common])


def _split(text: str, markers: Sequence[str]) -> list[str]:
    """``text`` cut at each marker, in order; each marker must appear exactly once."""
    pieces, rest = [], text
    for marker in markers:
        if text.count(marker) != 1:
            raise _NotThisFormat(f"a conversation does not render its messages once each, in order ({marker!r})")
        before, rest = rest.split(marker, 1)
        pieces.append(before)
    return [*pieces, rest]


def _prompt(template: _ChatTemplate, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The chat template's prompt for ``messages``; failing on one means it is not the family's format."""
    try:
        return template(messages, add_generation_prompt)
    except _RenderError as e:
        raise _NotThisFormat(f"it fails on a plain conversation ({e})") from e


def _check(layout: _Layout, template: _ChatTemplate) -> None:
    """Raise unless ``layout`` renders every check conversation exactly as the Jinja template does."""
    for conversation in _CHECKS:
        jinja_messages = list(conversation)
        if not layout.native_system and conversation[0][0] == "system":
            # llama.cpp, for a template without a system role, prepends the system text to the next message
            (_, system), (role, content) = jinja_messages[:2]
            jinja_messages[:2] = [(role, system + "\n" + content)]
        expected, ours = _prompt(template, jinja_messages), layout.render(conversation)
        if ours != expected:
            at = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
            raise _NotThisFormat(
                f"a TEMPLATE would write {ours[at : at + 40]!r} where the chat template writes "
                f"{expected[at : at + 40]!r} (after {expected[max(0, at - 40) : at]!r})"
            )


def _final(layout: _Layout, metadata: Mapping[str, Any], tokens: list[str]) -> _Layout:
    """``layout`` with the vocabulary's BOS/EOS texts in place of the probe's, and BOS as llama.cpp adds it."""
    bos = _token(metadata, tokens, _BOS_ID) or ""
    eos = _token(metadata, tokens, _STOP_IDS[0]) or ""
    if layout.bos and _adds_bos(metadata):
        # llama.cpp (and so Ollama) already puts the BOS token before the prompt: writing its text too
        # would double it.
        layout = dataclasses.replace(layout, bos="")
    layout = layout.replace(_BOS, bos).replace(_EOS, eos)
    template = layout.go_template()
    if '"""' in template:
        raise _NotThisFormat('its text contains """, which ends a Modelfile TEMPLATE')
    if not all(c.isprintable() or c in "\n\r\t" for c in template):
        raise _NotThisFormat("its text has control characters, which Ollama's Modelfile parser drops")
    return layout
