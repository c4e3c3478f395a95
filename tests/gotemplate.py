"""A renderer for the part of Go's text/template that Ollama Modelfile templates use, so that a test can put a
Modelfile's TEMPLATE beside the Jinja chat template it stands for (Ollama itself is not installable here).

Covers: text, `{{ pipeline }}`, `{{- ... -}}` whitespace trimming, `range PIPE` and `range $i, $v := PIPE`,
`if` / `else if` / `else` / `end`, fields (`.Role`, `$.System`), variables, string and integer literals, and the
functions eq, ne, and, or, not, len. Ollama's data: `.Messages` (every message, system ones included, with
consecutive messages of one role joined by a blank line) and `.System` (the system messages joined), as
ollama/template's collate() gives them.
"""
from __future__ import annotations

import re
import shlex

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


def ollama_values(messages: list[dict]) -> dict:
    system, collated = [], []
    for message in messages:
        if message["role"] == "system":
            system.append(message["content"])
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    return {"System": "\n\n".join(system), "Messages": collated}


def _tokens(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with the trim markers applied to the text around them."""
    out, position = [], 0
    for match in ACTION.finditer(text):
        literal = text[position:match.start()]
        if match.group(1):
            literal = literal.rstrip()
        out.append(["text", literal])
        out.append(["action", match.group(2).strip(), bool(match.group(3))])
        position = match.end()
    out.append(["text", text[position:]])
    for i, token in enumerate(out):  # a right trim marker trims the text after it
        if token[0] == "action" and token[2] and i + 1 < len(out):
            out[i + 1][1] = out[i + 1][1].lstrip()
    return [(t[0], t[1]) for t in out]


def _parse(tokens, i=0, stop=("end",)):
    """A list of nodes up to one of `stop` (returned with its index)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            if word not in stop:
                raise ValueError(f"unexpected {{{{ {value} }}}}")
            return nodes, i, value
        if word in ("if", "range"):
            body, i, closer = _parse(tokens, i + 1, ("end", "else"))
            node = [word, value[len(word):].strip(), body, []]
            nodes.append(node)
            while closer.startswith("else"):
                rest = closer[4:].strip()
                if rest.startswith("if "):  # else if: an if nested in the else branch, closed by the same end
                    inner_body, i, closer = _parse(tokens, i + 1, ("end", "else"))
                    inner = ["if", rest[3:].strip(), inner_body, []]
                    node[3] = [inner]
                    node = inner
                else:
                    node[3], i, closer = _parse(tokens, i + 1, ("end",))
            i += 1
            continue
        nodes.append(("output", value))
        i += 1
    if "end" in stop and stop != ("__top__",):
        raise ValueError("missing {{ end }}")
    return nodes, i, None


def _truthy(value) -> bool:
    return bool(value)


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
    "and": lambda *xs: next((x for x in xs if not _truthy(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truthy(x)), xs[-1]), "len": len,
}


def _split_args(text: str) -> list:
    """Arguments of a command: parenthesized groups kept whole."""
    args, depth, current = [], 0, ""
    lexer = shlex.shlex(text, posix=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    for part in lexer:
        depth += part.count("(") - part.count(")")
        current = f"{current} {part}" if current else part
        if depth == 0:
            args.append(current)
            current = ""
    return args


def _value(expr: str, dot, scope: dict):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        return _evaluate(expr[1:-1], dot, scope)
    if expr.startswith('"'):
        return bytes(expr[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    if expr == ".":
        return dot
    if expr.startswith("$"):
        name, _, path = expr.partition(".")
        base = scope["$"] if name == "$" else scope[name]
    else:
        base, path = dot, expr[1:]
    for field in filter(None, path.split(".")):
        base = base.get(field) if isinstance(base, dict) else None
    return base


def _evaluate(expr: str, dot, scope: dict):
    args = _split_args(expr)
    if args and args[0] in FUNCTIONS:
        return FUNCTIONS[args[0]](*(_value(a, dot, scope) for a in args[1:]))
    if len(args) != 1:
        raise ValueError(f"cannot evaluate {expr!r}")
    return _value(args[0], dot, scope)


def _run(nodes, dot, scope, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "output":
            value = _evaluate(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif node[0] == "if":
            _run(node[2] if _truthy(_evaluate(node[1], dot, scope)) else node[3], dot, scope, out)
        elif node[0] == "range":
            header = node[1]
            names = []
            if ":=" in header:
                left, header = header.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            items = _evaluate(header, dot, scope) or []
            if not items:
                _run(node[3], dot, scope, out)
            for index, item in enumerate(items):
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = index, item
                elif len(names) == 1:
                    inner[names[0]] = item
                _run(node[2], item, inner, out)


def render(template: str, messages: list[dict]) -> str:
    """What Ollama's template writes for these messages (before the model's answer)."""
    values = ollama_values(messages)
    nodes, _, _ = _parse(_tokens(template), 0, ("__top__",))
    out: list[str] = []
    _run(nodes, values, {"$": values}, out)
    return "".join(out)
