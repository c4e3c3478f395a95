"""Reading jobspecs: JSON or YAML (PyYAML's safe loader, bounded) with duplicate-key and UTF-8 checks, `--set` overrides, sweeps, every validation
problem reported at once as `path.to.field: what is wrong`, and local paths made absolute.
`load_spec(path, overrides)` is the only way in. Run alone to check files: `python -m job.specfile FILE...`.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from job import settings
from job.errors import SpecError
from job.log import TOKEN_LIKE, add_secret
from job.spec import JobSpec, local_data_format
from job.sweep import apply_overrides, expand, pick_index

MAX_SPEC_BYTES = 4 * 1024 * 1024
YAML_SUFFIXES = (".yaml", ".yml")
MAX_YAML_NODES = 100_000  # after aliases are expanded: an anchor used a billion times is refused, not built
_yaml_lines: dict[str, dict[str, int]] = {}  # a YAML spec's line of each field, for its error messages
_set_paths: dict[str, set[str]] = {}  # the fields a spec's --set overrides gave, for its error messages



def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise SpecError(f"duplicate key {key!r}: each key may appear once per object")
        seen[key] = value
    return seen


def parse_json_text(raw: bytes, origin: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")  # -sig: without the BOM some editors write
    except UnicodeDecodeError as exc:
        raise SpecError(f"{origin}: not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except SpecError as exc:
        raise SpecError(f"{origin}: {exc.message}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{origin}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise SpecError(f"{origin}: JSON nested too deeply") from None


def parse_yaml_text(raw: bytes, origin: str) -> Any:
    """A YAML jobspec through PyYAML's safe loader (no tags that build objects), refused when it repeats a key, holds
    more than MAX_YAML_NODES values once its aliases are expanded, or refers to itself; each field's line is kept
    for the error messages."""
    import yaml

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{origin}: not UTF-8 (bad byte at offset {exc.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_lines[origin] = _check_yaml(node, origin)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        raise SpecError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin}: invalid YAML: {str(exc)[:200]}") from None
    except RecursionError:
        raise SpecError(f"{origin}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _check_yaml(root, origin: str) -> dict[str, int]:
    """Walks the composed nodes once each (aliases are shared nodes), counting the values they expand to."""
    import yaml

    lines: dict[str, int] = {}
    size: dict[int, int] = {}
    stack = [(root, "", False)]
    open_nodes: set[int] = set()
    while stack:
        node, path, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            kids = [v for _, v in node.value] if isinstance(node, yaml.MappingNode) else \
                node.value if isinstance(node, yaml.SequenceNode) else []
            size[key] = 1 + sum(size[id(k)] for k in kids)
            if size[key] > MAX_YAML_NODES:
                raise SpecError(f"{origin}:{node.start_mark.line + 1}: YAML expands to more than {MAX_YAML_NODES:,} "
                                "values (aliases of aliases?); write the spec out")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise SpecError(f"{origin}:{node.start_mark.line + 1}: a YAML alias refers to a value that holds it")
        open_nodes.add(key)
        stack.append((node, path, True))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if name in seen:
                    raise SpecError(f"{origin}:{key_node.start_mark.line + 1}: duplicate key {name!r} (first on line "
                                    f"{seen[name]}): each key may appear once per object")
                seen[name] = key_node.start_mark.line + 1
                child = f"{path}.{name}" if path else name
                lines.setdefault(child, key_node.start_mark.line + 1)
                stack.append((value_node, child, False))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = f"{path}[{index}]"
                lines.setdefault(child, item.start_mark.line + 1)
                stack.append((item, child, False))
    return lines


def parse_spec_text(raw: bytes, origin: str) -> Any:
    if origin.endswith(YAML_SUFFIXES):
        return parse_yaml_text(raw, origin)
    return parse_json_text(raw, origin)


def _find_token_like(data: Any) -> list[str]:
    """Every string in the spec that looks like a token, or holds a secret the environment holds (walked without
    recursion: deeply nested junk is refused later)."""
    from job.log import registered_secrets

    secrets = registered_secrets()
    found, pending = [], [(data, "")]
    while pending:
        node, path = pending.pop()
        if isinstance(node, dict):
            pending += [(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
        elif isinstance(node, list):
            pending += [(v, f"{path}[{i}]") for i, v in enumerate(node)]
        elif isinstance(node, str) and (TOKEN_LIKE.search(node) or any(secret in node for secret in secrets)):
            found.append(f"{path}: holds a token (or looks like one); tokens never go in a jobspec: put it in "
                         "the environment and name the variable in push.token_env")
    return sorted(found)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        if err["type"] == "extra_forbidden":
            key, allowed = str(loc[-1]), _allowed_keys(loc)
            close = difflib.get_close_matches(key, allowed, n=1) or [
                k for k in allowed if key.lower().startswith(k) or k.startswith(key.lower())][:1]
            msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "value_error" and "\n" in msg:  # cross-section rules carry their own paths
            lines += msg.splitlines()
        elif err["type"] == "value_error" and not path and ": " in msg:
            lines.append(msg)
        else:
            lines.append(f"{path or '(top level)'}: {msg}")
    return lines


def validate_data(data: Any, origin: str = "jobspec") -> JobSpec:
    """Raises SpecError listing every problem in `data` (a parsed jobspec)."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a jobspec is a mapping of sections (a JSON object), not {type(data).__name__}")
    problems = _find_token_like(data)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_error(exc)
        spec = None
    except RecursionError:
        problems.append("(top level): nested too deeply")
        spec = None
    if problems:
        lines = _yaml_lines.get(origin.split(" [", 1)[0], {})
        given = _set_paths.get(origin.split(" [", 1)[0], set())
        problems = [_with_line(problem, lines, given) for problem in problems]
        raise SpecError(f"{origin}: {len(problems)} problem(s)", details=problems)
    return spec  # type: ignore[return-value]


def _with_line(problem: str, lines: dict[str, int], given: set[str] = frozenset()) -> str:
    """The problem with where its field came from: the --set that gave it, or its line in a YAML spec."""
    path = problem.split(": ", 1)[0]
    if any(path == key or path.startswith((f"{key}.", f"{key}[")) for key in given):
        return f"--set {problem}"
    while path and path not in lines:  # an unknown key's own line, else its section's
        path = path.rsplit(".", 1)[0] if "." in path else path.rsplit("[", 1)[0] if "[" in path else ""
    return f"line {lines[path]}: {problem}" if path else problem


def _token_envs(data: Any) -> list[str]:
    """Every `token_env` a parsed jobspec names, wherever it is (valid or not; walked without recursion, as
    deeply nested junk is refused later)."""
    found, pending = [], [data]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            found += [v for k, v in node.items() if k == "token_env" and isinstance(v, str)]
            pending += node.values()
        elif isinstance(node, list):
            pending += node
    return found


def register_secrets(data: Any) -> None:
    """Masks the values of every token variable the spec names before anything from it is validated or
    echoed (the Hub's own variables are registered when logging starts)."""
    for value in settings.get().secrets(_token_envs(data)):
        add_secret(value)


def read_spec_data(path: Path, overrides) -> Any:
    from job.inputs import regular_file_problem

    problem = regular_file_problem(path, MAX_SPEC_BYTES)
    if problem == "does not exist":
        raise SpecError(f"{path}: no such jobspec file")
    if problem:
        raise SpecError(f"{path}: {problem}".replace("is a directory, not a regular file", "is a directory, not a "
                                                     "jobspec file"))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    data = parse_spec_text(raw, str(path))
    register_secrets(data)
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
        _set_paths[str(path)] = {override.split("=", 1)[0].strip() for override in overrides}
        register_secrets(data)
    return data


def load_variants(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[JobSpec]:
    """Every variant of a (possibly sweeping) jobspec, validated. Raises SpecError listing problems."""

    path = Path(path)
    data = read_spec_data(path, overrides)
    validate_data(data, str(path))  # the file itself, matrix included
    return [resolve_paths(validate_data(variant, f"{path} [{name}]"), path.parent) for name, variant in expand(data)]


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), index: int | None = None) -> JobSpec:
    """Reads, overrides and validates a jobspec; for a sweep, the variant `index` (or the array task's).
    Relative paths inside it are relative to its folder.

    Raises:
        SpecError: the file is missing, not JSON, or not a valid jobspec (all problems listed).
    """

    variants = load_variants(path, overrides)
    if len(variants) == 1 and index in (None, 0):
        return variants[0]
    chosen = pick_index(index, len(variants))
    if chosen is None:
        raise SpecError(f"{path}: a sweep of {len(variants)} variants; pass --index N or run it as an array "
                        "job (peftopt expand lists the variants)")
    return variants[chosen]


def _resolve(value: str | None, base_dir: Path, present_is_local: bool = False) -> str | None:
    """`value` made absolute against the spec's folder when it names a local file: by its form, or (a model, whose
    directory has no suffix to tell it from a Hub id) by being there, as from_pretrained prefers a local folder."""
    if value is None:
        return None
    p = Path(value)
    is_local = value.startswith((".", "/")) or bool(local_data_format(value)) or value.endswith((".gguf", ".jinja")) \
        or present_is_local and ":" not in value and (base_dir / p).exists()
    if is_local and not p.is_absolute():
        return str((base_dir / p).resolve())
    return value


def resolve_paths(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Makes the jobspec's local paths absolute, relative to the folder of the file that named them."""
    updates: dict[str, Any] = {"model": spec.model.model_copy(update={
        "base": _resolve(spec.model.base, base_dir, present_is_local=True),
        "merge_base": _resolve(spec.model.merge_base, base_dir, present_is_local=True),
        "chat_template": _resolve(spec.model.chat_template, base_dir)
        if spec.model.chat_template.endswith(".jinja") else spec.model.chat_template,
    })}
    if spec.data and spec.data.source is not None:
        updates["data"] = spec.data.model_copy(update={"source": _resolve(spec.data.source, base_dir)})
    elif spec.data:
        updates["data"] = spec.data.model_copy(update={"sources": [
            s.model_copy(update={"source": _resolve(s.source, base_dir)}) for s in spec.data.sources]})
    if spec.evaluate:
        evaluate = {}
        if isinstance(spec.evaluate.prompts, str):
            evaluate["prompts"] = str((base_dir / spec.evaluate.prompts).resolve())
        if spec.evaluate.harness and spec.evaluate.harness.include_path:
            evaluate["harness"] = spec.evaluate.harness.model_copy(
                update={"include_path": str((base_dir / spec.evaluate.harness.include_path).resolve())})
        updates["evaluate"] = spec.evaluate.model_copy(update=evaluate)
    return spec.model_copy(update=updates)


if __name__ == "__main__":  # python -m job.specfile jobspecs/*.json
    import sys

    for name in sys.argv[1:]:
        try:
            load_spec(name)
            print(f"{name}: ok")
        except SpecError as err:
            print("\n  ".join([err.message, *err.details]))
