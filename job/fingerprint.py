"""Fingerprints: what a stage's result depends on, hashed. A stage declares the spec fields it reads and the
files it reads (job/stages/base.py); files count by their content, never by their path alone, so an edited
prompt suite, chat template, data file or base model reruns exactly the stages that read it (and, through
the upstream fingerprints each one includes, the stages after them).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from job.rundir import file_sha256

# Files of a model directory that decide what a model computes and how text becomes tokens; the weights
# count by their safetensors headers (names, shapes, dtypes, offsets) and sizes: hashing every byte of a
# multi-GB checkpoint at every start is the cost this avoids.
MODEL_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
                    "model.safetensors.index.json", "adapter_config.json")
HEADER_LIMIT = 100 * 1024 * 1024  # a safetensors header is JSON of some MB at most


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dotted(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a regular file's bytes; None when it is not there (preflight reports that)."""
    if path is None or not os.path.isfile(path):
        return None
    return file_sha256(path)


def safetensors_header(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > HEADER_LIMIT:
                return None
            return hashlib.sha256(fh.read(length)).hexdigest()
    except (OSError, struct.error):
        return None


def model_dir_digest(path: str | Path) -> dict[str, Any] | None:
    """What a model directory computes with: its config and tokenizer files by content, each weight file by
    its header and size. None when `path` is not a directory."""
    root = Path(path)
    if not root.is_dir() or root.is_symlink():
        return None
    out: dict[str, Any] = {}
    for name in MODEL_TEXT_FILES:
        if (root / name).is_file() and not (root / name).is_symlink():
            out[name] = file_sha256(root / name)
    for weights in sorted(root.glob("*.safetensors")):
        if weights.is_file() and not weights.is_symlink():
            out[weights.name] = {"size": weights.stat().st_size, "header": safetensors_header(weights)}
    return out
