"""A small Go ``text/template`` renderer, fed the way Ollama feeds a Modelfile's TEMPLATE (tests only).

There is no Ollama to run in the tests (and Go only where it is installed: tests/test_ollama.py
checks this renderer against Go's text/template then), so this module stands in for both,
written from the documented semantics:

- ``execute(template, data)``: the subset of Go's ``text/template`` that chat templates use:
  text and ``{{ pipeline }}`` actions with ``{{-``/``-}}`` trimming and ``{{/* comments */}}``;
  ``if``/``else if``/``else``/``end``, ``range`` (with ``$i, $v :=`` and ``else``), ``with``;
  variables (``$``, ``$x := ...``, ``$x = ...``, scoped to their block), fields (``.A.B``,
  ``$x.A``, ``(pipeline).A``), string/number/bool literals, pipes (``x | f``), and the
  functions ``and or not eq ne lt le gt ge len index slice print printf`` plus Ollama's
  ``json``. ``and``/``or`` stop at the first deciding argument (Go 1.18+). Errors where Go
  errors (a missing field of a struct, an index out of range, comparing a string with a
  number), as ``GoTemplateError``.
- ``render_ollama(template, messages)``: Ollama's ``template.Execute`` for a template that uses
  ``.Messages``: consecutive messages of one role merged with a blank line (tool messages
  excepted), ``.System`` the system messages joined with a blank line, ``.Messages`` the merged
  messages (structs with ``Role``, ``Content``, ...), ``.Response`` empty. Ollama's older
  ``.Prompt``/``.Response`` path is not implemented.
- ``parse_modelfile(text)``: the commands of a Modelfile, ``(name, value)`` as Ollama's parser
  names them (``FROM`` is ``"model"``, ``PARAMETER stop "x"`` is ``("stop", "x")``), for files
  whose values are unquoted, ``"quoted"`` on one line, or ``\"\"\"triple-quoted\"\"\"`` (kept verbatim).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["GoTemplateError", "Message", "execute", "parse", "parse_modelfile", "render_ollama"]

_SPACE = " \t\r\n"


class GoTemplateError(Exception):
    """Where Go's text/template would fail to parse or execute."""


@dataclasses.dataclass
class Message:
    """Ollama's ``api.Message`` as a template sees it (a struct: unknown fields are errors)."""

    Role: str
    Content: str
    Thinking: str = ""
    ToolName: str = ""
    ToolCalls: list[Any] = dataclasses.field(default_factory=list)
    Images: list[Any] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- lexing


@dataclasses.dataclass
class _Text:
    text: str


@dataclasses.dataclass
class _Raw:
    """An action's source, between its delimiters and trim markers."""

    body: str


def _lex(src: str) -> list[_Text | _Raw]:
    items: list[_Text | _Raw] = []
    i, trim_next = 0, False
    while True:
        j = src.find("{{", i)
        text = src[i:] if j < 0 else src[i:j]
        if trim_next:
            text = text.lstrip(_SPACE)
        if j < 0:
            items.append(_Text(text))
            return items
        k = j + 2
        if src.startswith("-", k) and k + 1 < len(src) and src[k + 1] in _SPACE:  # "{{- " trims before
            text = text.rstrip(_SPACE)
            k += 1
        items.append(_Text(text))
        end = _action_end(src, k)
        body = src[k:end]
        trim_next = len(body) >= 2 and body[-1] == "-" and body[-2] in _SPACE  # " -}}" trims after
        if trim_next:
            body = body[:-1]
        if not body.strip().startswith("/*"):
            items.append(_Raw(body))
        elif not body.strip().endswith("*/"):
            raise GoTemplateError(f"unclosed comment: {body!r}")
        i = end + 2


def _action_end(src: str, k: int) -> int:
    """The index of the ``}}`` closing the action that starts at ``k`` (quotes may hold ``}}``)."""
    p = k
    while p < len(src):
        c = src[p]
        if c in "\"'":
            p += 1
            while p < len(src) and src[p] != c:
                p += 2 if src[p] == "\\" else 1
        elif c == "`":
            p = src.index("`", p + 1)
        elif src.startswith("/*", p):
            p = src.index("*/", p) + 1
        elif src.startswith("}}", p):
            return p
        p += 1
    raise GoTemplateError("unclosed action")


_TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*")
    |(?P<raw>`[^`]*`)
    |(?P<declare>:=)
    |(?P<assign>=)
    |(?P<punct>[()|,])
    |(?P<number>[-+]?\d+(?:\.\d+)?)
    |(?P<variable>\$\w*(?:\.\w+)*)
    |(?P<field>(?:\.\w+)+|\.)
    |(?P<word>\w+)
    """,
    re.VERBOSE,
)


def _tokens(body: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None:
            raise GoTemplateError(f"unexpected {body[pos:]!r} in action {body!r}")
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


# --------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class _Operand:
    kind: str  # "dot" "field" "variable" "literal" "function" "pipe"
    value: Any  # field names, (variable name, field names), literal, function name, _Pipe
    fields: tuple[str, ...] = ()  # a field chain after a parenthesized pipeline


@dataclasses.dataclass
class _Pipe:
    declare: tuple[str, ...]
    assign: bool
    commands: list[list[_Operand]]


@dataclasses.dataclass
class _Action:
    pipe: _Pipe


@dataclasses.dataclass
class _Branch:
    kind: str  # "if" "range" "with"
    pipe: _Pipe
    body: list[Any]
    otherwise: list[Any]


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def pipe(self, *, until_paren: bool = False) -> _Pipe:
        declare, assign = self._declaration()
        commands: list[list[_Operand]] = [[]]
        while (token := self.peek()) is not None:
            kind, text = token
            if text == ")":
                if not until_paren:
                    raise GoTemplateError("unexpected )")
                break
            self.take()
            if text == "|":
                commands.append([])
            elif text == "(":
                inner = self.pipe(until_paren=True)
                if self.peek() is None or self.take()[1] != ")":
                    raise GoTemplateError("unclosed (")
                fields: tuple[str, ...] = ()
                if (after := self.peek()) is not None and after[0] == "field" and after[1] != ".":
                    fields = tuple(self.take()[1].split(".")[1:])
                commands[-1].append(_Operand("pipe", inner, fields))
            else:
                commands[-1].append(self._operand(kind, text))
        if any(not c for c in commands):
            raise GoTemplateError("missing command in pipeline")
        return _Pipe(declare, assign, commands)

    def _declaration(self) -> tuple[tuple[str, ...], bool]:
        names, p = [], self.pos
        while p < len(self.tokens) and self.tokens[p][0] == "variable":
            names.append(self.tokens[p][1])
            p += 1
            if p < len(self.tokens) and self.tokens[p][1] == ",":
                p += 1
                continue
            break
        if names and p < len(self.tokens) and self.tokens[p][0] in ("declare", "assign"):
            self.pos = p + 1
            return tuple(names), self.tokens[p][0] == "assign"
        return (), False

    @staticmethod
    def _operand(kind: str, text: str) -> _Operand:
        if kind == "field":
            return _Operand("dot", ()) if text == "." else _Operand("field", tuple(text.split(".")[1:]))
        if kind == "variable":
            name, *fields = text.split(".")
            return _Operand("variable", (name, tuple(fields)))
        if kind == "string":
            return _Operand("literal", ast.literal_eval(text))  # Go's escapes are Python's
        if kind == "raw":
            return _Operand("literal", text[1:-1])
        if kind == "number":
            return _Operand("literal", float(text) if "." in text else int(text))
        if text in ("true", "false"):
            return _Operand("literal", text == "true")
        if text == "nil":
            return _Operand("literal", None)
        if kind == "word":
            return _Operand("function", text)
        raise GoTemplateError(f"unexpected {text!r}")


def parse(template: str) -> list[Any]:
    """The template's tree (a list of text, actions and branches)."""
    items = _lex(template)
    nodes, _, stop = _parse_list(items, 0)
    if stop is not None:
        raise GoTemplateError(f"unexpected {{{{{stop}}}}}")
    return nodes


def _parse_list(items: list[_Text | _Raw], i: int) -> tuple[list[Any], int, str | tuple[str, _Branch] | None]:
    """Nodes up to an ``else``/``end``, the index after it, and what stopped them (``None``: the end of input,
    ``("else-if", branch)``: an ``else if`` whose branch has been parsed up to the shared ``end``)."""
    nodes: list[Any] = []
    while i < len(items):
        item = items[i]
        i += 1
        if isinstance(item, _Text):
            if item.text:
                nodes.append(item)
            continue
        tokens = _tokens(item.body)
        if not tokens:
            raise GoTemplateError("empty action")
        word = tokens[0][1] if tokens[0][0] == "word" else None
        if word == "end":
            return nodes, i, "end"
        if word == "else":
            if len(tokens) > 1 and tokens[1][1] == "if":  # "else if X" is "else" + a nested "if X ... end"
                branch, i = _parse_branch("if", tokens[2:], items, i)
                return nodes, i, ("else-if", branch)
            return nodes, i, "else"
        if word in ("if", "range", "with"):
            branch, i = _parse_branch(word, tokens[1:], items, i)
            nodes.append(branch)
        elif word in ("define", "template", "block", "break", "continue"):
            raise NotImplementedError(f"{{{{{word}}}}} is outside this test renderer's subset")
        else:
            parser = _Parser(tokens)
            nodes.append(_Action(parser.pipe()))
    return nodes, i, None


def _parse_branch(kind: str, tokens: list[tuple[str, str]], items: list[_Text | _Raw], i: int) -> tuple[_Branch, int]:
    pipe = _Parser(tokens).pipe()
    body, i, stop = _parse_list(items, i)
    otherwise: list[Any] = []
    if isinstance(stop, tuple):  # else if: the nested branch consumed the shared "end"
        otherwise = [stop[1]]
    elif stop == "else":
        otherwise, i, stop = _parse_list(items, i)
        if isinstance(stop, tuple):
            otherwise.append(stop[1])
        elif stop != "end":
            raise GoTemplateError(f"{kind} without end")
    elif stop != "end":
        raise GoTemplateError(f"{kind} without end")
    return _Branch(kind, pipe, body, otherwise), i


# --------------------------------------------------------------------------- execution


def _truth(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


def _field(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):  # Ollama's map[string]any, executed with missingkey=zero
        return value.get(name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if name not in {f.name for f in dataclasses.fields(value)}:
            raise GoTemplateError(f"can't evaluate field {name} in type {type(value).__name__}")
        return getattr(value, name)
    raise GoTemplateError(f"can't evaluate field {name} of {value!r}")


def _format(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_format(v) for v in value) + "]"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise GoTemplateError(f"printing {type(value).__name__} is outside this test renderer's subset")


def _basic_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    raise GoTemplateError(f"invalid type for comparison: {type(value).__name__}")


def _compare(a: Any, b: Any) -> tuple[Any, Any]:
    if _basic_kind(a) != _basic_kind(b):
        raise GoTemplateError(f"incompatible types for comparison: {a!r} and {b!r}")
    return a, b


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key)
        elif isinstance(value, (list, tuple, str)):
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(value):
                raise GoTemplateError(f"index out of range: {key!r}")
            value = value[key]
        else:
            raise GoTemplateError(f"can't index item of type {type(value).__name__}")
    return value


def _slice(value: Any, *bounds: int) -> Any:
    if not isinstance(value, (list, tuple, str)):
        raise GoTemplateError(f"can't slice item of type {type(value).__name__}")
    start = bounds[0] if bounds else 0
    end = bounds[1] if len(bounds) > 1 else len(value)
    if not 0 <= start <= end <= len(value):
        raise GoTemplateError(f"slice index out of range: {bounds}")
    return value[start:end]


def _print(*args: Any) -> str:
    # fmt.Sprint: a space between operands when neither side is a string
    out = ""
    for k, arg in enumerate(args):
        if k and not isinstance(arg, str) and not isinstance(args[k - 1], str):
            out += " "
        out += _format(arg)
    return out


def _printf(fmt: str, *args: Any) -> str:
    values = iter(args)

    def one(m: re.Match[str]) -> str:
        verb = m.group(1)
        if verb == "%":
            return "%"
        value = next(values)
        return json.dumps(value) if verb == "q" else _format(value)

    return re.sub(r"%([svdq%])", one, fmt)


def _json(value: Any) -> str:
    # Go's json.Marshal: compact, and <, >, & escaped for HTML
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _len(value: Any) -> int:
    if not isinstance(value, (str, list, tuple, dict)):
        raise GoTemplateError(f"len of type {type(value).__name__}")
    return len(value)


_FUNCTIONS = {
    "not": lambda x: not _truth(x),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "eq": lambda a, *bs: any(a == b for b in bs if _compare(a, b)),
    "ne": lambda a, b: a != _compare(a, b)[1],
    "lt": lambda a, b: a < _compare(a, b)[1],
    "le": lambda a, b: a <= _compare(a, b)[1],
    "gt": lambda a, b: a > _compare(a, b)[1],
    "ge": lambda a, b: a >= _compare(a, b)[1],
    "print": _print,
    "printf": _printf,
    "json": _json,
}


class _Scope:
    """Variables: a chain of blocks; a declaration lives until its block's ``end``."""

    def __init__(self, root: Any):
        self.blocks: list[dict[str, Any]] = [{"$": root}]

    def push(self) -> None:
        self.blocks.append({})

    def pop(self) -> None:
        self.blocks.pop()

    def get(self, name: str) -> Any:
        for block in reversed(self.blocks):
            if name in block:
                return block[name]
        raise GoTemplateError(f"undefined variable: {name}")

    def declare(self, name: str, value: Any) -> None:
        self.blocks[-1][name] = value

    def assign(self, name: str, value: Any) -> None:
        for block in reversed(self.blocks):
            if name in block:
                block[name] = value
                return
        raise GoTemplateError(f"undefined variable: {name}")


def _evaluate_pipe(pipe: _Pipe, dot: Any, scope: _Scope) -> Any:
    value: Any = None
    for k, command in enumerate(pipe.commands):
        value = _evaluate_command(command, dot, scope, piped=(value,) if k else ())
    if pipe.declare and len(pipe.declare) == 1:
        (scope.assign if pipe.assign else scope.declare)(pipe.declare[0], value)
    return value


def _evaluate_command(command: list[_Operand], dot: Any, scope: _Scope, piped: tuple[Any, ...]) -> Any:
    head, args = command[0], command[1:]
    if head.kind == "function":
        if head.value in ("and", "or"):
            thunks = [lambda a=a: _evaluate_operand(a, dot, scope) for a in args] + [lambda v=v: v for v in piped]
            value = None
            for thunk in thunks:
                value = thunk()
                if _truth(value) != (head.value == "and"):
                    break
            return value
        if head.value not in _FUNCTIONS:
            raise GoTemplateError(f'function "{head.value}" not defined')
        values = [_evaluate_operand(a, dot, scope) for a in args] + list(piped)
        return _FUNCTIONS[head.value](*values)
    if args or piped:
        raise GoTemplateError(f"can't give argument to non-function {head!r}")
    return _evaluate_operand(head, dot, scope)


def _evaluate_operand(operand: _Operand, dot: Any, scope: _Scope) -> Any:
    if operand.kind == "dot":
        return dot
    if operand.kind == "literal":
        return operand.value
    if operand.kind == "field":
        value, fields = dot, operand.value
    elif operand.kind == "variable":
        name, fields = operand.value
        value = scope.get(name)
    elif operand.kind == "pipe":
        value, fields = _evaluate_pipe(operand.value, dot, scope), operand.fields
    else:
        raise GoTemplateError(f"function {operand.value!r} used as a value")
    for name in fields:
        value = _field(value, name)
    return value


def _run(nodes: list[Any], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Action):
            value = _evaluate_pipe(node.pipe, dot, scope)
            if not node.pipe.declare:
                out.append(_format(value))
        elif node.kind == "range":
            _run_range(node, dot, scope, out)
        else:
            scope.push()
            try:
                value = _evaluate_pipe(node.pipe, dot, scope)
                if _truth(value):
                    _run(node.body, value if node.kind == "with" else dot, scope, out)
                else:
                    _run(node.otherwise, dot, scope, out)
            finally:
                scope.pop()


def _run_range(node: _Branch, dot: Any, scope: _Scope, out: list[str]) -> None:
    pipe = node.pipe
    collection = _evaluate_pipe(_Pipe((), False, pipe.commands), dot, scope)
    if collection is None:
        items: list[tuple[Any, Any]] = []
    elif isinstance(collection, Mapping):
        items = [(key, collection[key]) for key in sorted(collection)]
    elif isinstance(collection, (list, tuple)):
        items = list(enumerate(collection))
    else:
        raise GoTemplateError(f"range can't iterate over {collection!r}")
    if not items:
        scope.push()
        try:
            _run(node.otherwise, dot, scope, out)
        finally:
            scope.pop()
        return
    for key, element in items:
        scope.push()
        try:
            if len(pipe.declare) == 1:
                scope.declare(pipe.declare[0], element)
            elif len(pipe.declare) == 2:
                scope.declare(pipe.declare[0], key)
                scope.declare(pipe.declare[1], element)
            _run(node.body, element, scope, out)
        finally:
            scope.pop()


def execute(template: str | list[Any], data: Any) -> str:
    """Execute a Go template (source or :func:`parse` tree) with ``data`` as dot and ``$``."""
    nodes = parse(template) if isinstance(template, str) else template
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)


# --------------------------------------------------------------------------- Ollama


def _identifiers(nodes: list[Any]) -> set[str]:
    """Lower-cased field and variable names anywhere in the tree (Ollama's ``Template.Vars``)."""
    names: set[str] = set()

    def pipe(p: _Pipe) -> None:
        for command in p.commands:
            for operand in command:
                if operand.kind == "field":
                    names.update(n.lower() for n in operand.value)
                elif operand.kind == "variable":
                    names.update(n.lower() for n in (operand.value[0], *operand.value[1]))
                elif operand.kind == "pipe":
                    pipe(operand.value)

    def walk(ns: list[Any]) -> None:
        for node in ns:
            if isinstance(node, _Action):
                pipe(node.pipe)
            elif isinstance(node, _Branch):
                pipe(node.pipe)
                walk(node.body)
                walk(node.otherwise)

    walk(nodes)
    return names


def collate(messages: Sequence[Mapping[str, str]]) -> tuple[str, list[Message]]:
    """Ollama's message preparation: the joined system text, and runs of one role merged."""
    system: list[str] = []
    merged: list[Message] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system.append(content)
        if merged and merged[-1].Role == role and role != "tool":
            merged[-1].Content += "\n\n" + content
        else:
            merged.append(Message(Role=role, Content=content))
    return "\n\n".join(system), merged


def render_ollama(template: str, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt Ollama renders from a Modelfile TEMPLATE (one using ``.Messages``) for a chat request."""
    nodes = parse(template)
    if "messages" not in _identifiers(nodes):
        raise NotImplementedError("templates without .Messages (Ollama's .Prompt/.Response path) are not emulated")
    system, merged = collate(messages)
    data = {
        "System": system, "Messages": merged, "Tools": [], "Response": "", "Think": False, "IsThinkSet": False,
        "Query": "", "Document": "", "Instruction": "",
    }  # fmt: skip
    return execute(nodes, data)


_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires")  # fmt: skip


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """A Modelfile's commands as ``(name, value)``, named as Ollama's parser names them."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in _SPACE:
            i += 1
            continue
        if text[i] == "#":
            i = _line_end(text, i)
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, i)
        if m is None or m.group(1).lower() not in _COMMANDS:
            raise GoTemplateError(f"not a Modelfile command at {text[i : i + 30]!r}")
        name, i = m.group(1).lower(), m.end()
        if name == "parameter":
            m = re.compile(r"(\w+)[ \t]+").match(text, i)
            if m is None:
                raise GoTemplateError(f"PARAMETER without a name at {text[i : i + 30]!r}")
            name, i = m.group(1), m.end()
        elif name == "from":
            name = "model"
        if text.startswith('"""', i):
            end = text.index('"""', i + 3)
            value, i = text[i + 3 : end], end + 3
            if text[i : _line_end(text, i)].strip():
                raise GoTemplateError("text after a closing triple quote")
        else:
            end = _line_end(text, i)
            value, i = text[i:end].strip(), end
            if value.startswith('"'):
                if len(value) < 2 or not value.endswith('"'):
                    raise GoTemplateError(f"unclosed quote: {value!r}")
                value = value[1:-1]
        commands.append((name, value))
    if not any(name == "model" for name, _ in commands):
        raise GoTemplateError("no FROM line")
    return commands


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end
