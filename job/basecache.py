"""Bases built once per machine. A GGUF or model-package base becomes a trainable directory (bf16 safetensors and a
tokenizer, modelsrc.materialize_gguf_base) in about two minutes for the demo's model; that directory is kept in a
content-addressed cache, keyed by the GGUF's sha256 and how it was built, and every run and sweep variant on the
machine copies it from there.

The cache lives where PEFTOPT_BASE_CACHE says (unset: <HF_HOME>/peftopt-bases; `off`: each run builds its own).
Another writer of that directory is not trusted: an entry is a folder of regular files and a manifest of their
sha256 digests and sizes; a copy out of it opens each file without following links, hashes what it copies, and is
kept only when every file has its digest. Anything else is refused (`base_cache_refused`) and the base is built
again and stored afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from job.log import get_logger

log = get_logger("peftopt.base")

FORMAT = 1  # how a base is built from its GGUF: a change to materialize_gguf_base changes it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MANIFEST = "manifest.json"
_MANIFEST_LIMIT = 1 << 20


def root(settings) -> Path | None:
    """The cache directory, or None when it is off."""
    where = getattr(settings, "base_cache", None)
    if where == "off":
        return None
    return Path(where) if where else settings.home_cache() / "peftopt-bases"


def key(gguf_sha256: str) -> str:
    """The entry's name: what the base is built from, and how."""
    import transformers

    recipe = json.dumps({"gguf": gguf_sha256, "format": FORMAT, "transformers": transformers.__version__})
    return hashlib.sha256(recipe.encode()).hexdigest()[:32]


def fetch(settings, entry_key: str, target: Path, only: tuple[str, ...] | None = None) -> bool:
    """Copies the cached base into the empty directory `target` (or only the files named in `only` that it has),
    each file checked against the manifest. False, with `target` emptied, when there is no sound entry."""
    where = root(settings)
    if where is None:
        return False
    entry = where / entry_key
    try:
        files = _manifest(entry)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        return _refused(entry, target, f"its manifest: {exc}")
    for name, (digest, size) in files.items():
        if only is not None and name not in only:
            continue
        try:
            _copy_checked(entry / name, target / name, digest, size)
        except (OSError, ValueError) as exc:
            return _refused(entry, target, f"{name}: {exc}")
    log.info("base_cache_used", entry=str(entry), files=len(files))
    return True


def store(settings, entry_key: str, built: Path) -> None:
    """Keeps a copy of the built base under its key (a new folder renamed into place, so a reader never sees half of
    it); a failure to store costs only the next run's time."""
    where = root(settings)
    if where is None:
        return
    scratch = where / f".tmp-{uuid.uuid4().hex}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        scratch.mkdir()
        files = {}
        for path in sorted(built.iterdir()):
            if not path.is_file() or path.is_symlink() or not _NAME.fullmatch(path.name) or path.name == _MANIFEST:
                continue
            digest, size = _copy_checked(path, scratch / path.name, None, None)
            files[path.name] = {"sha256": digest, "size": size}
        (scratch / _MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        final = where / entry_key
        if final.is_symlink() or final.exists():  # a refused or concurrent entry: ours replaces it
            aside = where / f".old-{uuid.uuid4().hex}"
            os.replace(final, aside)
            _remove(aside)
        os.replace(scratch, final)
        log.info("base_cache_stored", entry=str(final), files=len(files))
    except OSError as exc:
        log.warning("base_cache_unwritable", path=str(where), error=str(exc)[:200],
                    action="the base is kept in this run only")
    finally:
        _remove(scratch)


def _manifest(entry: Path) -> dict[str, tuple[str, int]]:
    if entry.is_symlink():
        raise ValueError("the entry is a link")
    raw = _read_regular(entry / _MANIFEST, _MANIFEST_LIMIT)
    data = json.loads(raw)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError("no files listed")
    out = {}
    for name, facts in files.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == _MANIFEST:
            raise ValueError(f"a file name it may not hold ({str(name)[:60]!r})")
        if not isinstance(facts, dict) or not isinstance(facts.get("sha256"), str) \
                or not isinstance(facts.get("size"), int) or facts["size"] < 0:
            raise ValueError(f"{name}: no digest and size")
        out[name] = (facts["sha256"], facts["size"])
    return out


def _read_regular(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block the job
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError("too large")
    return data


def _copy_checked(source: Path, target: Path, digest: str | None, size: int | None) -> tuple[str, int]:
    """Copies a regular file (never through a link), hashing what it copies; checks digest and size when given."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # nor here
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise ValueError("not a regular file")
        hasher, copied = hashlib.sha256(), 0
        with open(target, "xb") as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                copied += len(chunk)
                if size is not None and copied > size:
                    raise ValueError("larger than its manifest says")
                hasher.update(chunk)
                dst.write(chunk)
    if size is not None and copied != size:
        raise ValueError("its size differs from the manifest's")
    if digest is not None and hasher.hexdigest() != digest:
        raise ValueError("its content differs from the manifest's digest")
    return hasher.hexdigest(), copied


def _refused(entry: Path, target: Path, why: str) -> bool:
    log.warning("base_cache_refused", entry=str(entry), reason=why[:300], action="building the base again")
    for path in target.iterdir():
        _remove(path)
    return False


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
