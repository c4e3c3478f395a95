"""Edits of jobspec data by dotted key: `--set` overrides, and sweeps, whose `matrix` expands into variants
with deterministic names, one per array task.

`matrix` is either a grid (`{"lora.r": [16, 64], "data.split": ["train[:10000]"]}`, every combination, keys
in sorted order) or a list of override sets (`[{"lora.r": 16}, {"lora.r": 64, "data.split": ...}]`).
Array services pass the task's index in an environment variable; `--index` overrides it.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from typing import Any

from job import settings
from job.errors import SpecError


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        shown = key.strip()[:60] if re.fullmatch(r"[\w.]*", key.strip()) else "(not a key path)"
        raise SpecError(f"--set {shown}: expected key.path=value, e.g. lora.r=64")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string: --set model.base=org/model
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _slug(value: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_.")
    return text[:40] or "x"


def combinations(matrix: dict | list) -> list[dict[str, Any]]:
    if isinstance(matrix, list):
        if not all(isinstance(item, dict) and item for item in matrix):
            raise SpecError("matrix: a list matrix holds non-empty objects of 'key.path': value")
        return [dict(item) for item in matrix]
    if not isinstance(matrix, dict) or not matrix:
        raise SpecError("matrix: give an object of 'key.path': [values] or a list of override objects")
    keys = sorted(matrix)
    for key in keys:
        if not isinstance(matrix[key], list) or not matrix[key]:
            raise SpecError(f"matrix.{key}: a non-empty list of values")
    return [dict(zip(keys, values)) for values in itertools.product(*(matrix[k] for k in keys))]


def expand(data: dict) -> list[tuple[str, dict]]:
    """[(variant name, spec data without matrix)], in a stable order."""
    matrix = data.get("matrix")
    base = {k: v for k, v in data.items() if k != "matrix"}
    if matrix is None:
        return [(str(data.get("name")), base)]
    variants = []
    for index, combo in enumerate(combinations(matrix)):
        variant = copy.deepcopy(base)
        apply_overrides(variant, [f"{key}={_json(value)}" for key, value in combo.items()])
        suffix = "-".join(f"{key.rsplit('.', 1)[-1]}{_slug(value)}" for key, value in combo.items())
        name = combo.get("name") or f"{base.get('name')}-{index:02d}-{suffix}"[:100]
        variant["name"] = name
        variants.append((name, variant))
    return variants


def _json(value: Any) -> str:
    return json.dumps(value)


def pick_index(explicit: int | None, count: int) -> int | None:
    """The variant this task runs: --index, else the first array-index variable that is set (job/settings.py)."""
    where = "--index"
    if explicit is None:
        found = settings.get().array_index()
        if found is not None:
            where, explicit = found
    if explicit is not None and not 0 <= explicit < count:
        raise SpecError(f"{where} {explicit}: the matrix has {count} variants (0..{count - 1})")
    return explicit
