"""Every call peftopt makes to the Hugging Face Hub goes through `retrying`: transient failures (connection
refused or reset, timeouts, HTTP 429 and 5xx) are retried with backoff, honouring Retry-After; the rest,
and a failure that outlasts the retries, become one ExternalError line (exit 4) naming what to do.

PEFTOPT_HUB_RETRIES (default 5 tries) and PEFTOPT_HUB_BACKOFF_S (default 2 s, doubling) tune it (job/settings.py).
"""
from __future__ import annotations

from pathlib import Path

import time
from typing import Callable, TypeVar

from job import settings
from job.errors import ExternalError
from job.log import get_logger

log = get_logger("peftopt.hub")
T = TypeVar("T")
MAX_WAIT_S = 120.0  # a Retry-After longer than this is capped: a batch task should fail and be retried instead


def endpoint() -> str:
    return settings.get().hf_endpoint or "https://huggingface.co"


def api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=settings.get().hf_endpoint or None, token=token)


def _status(exc: BaseException) -> tuple[int | None, float | None]:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    retry_after = None
    headers = getattr(response, "headers", None) or {}
    try:
        retry_after = float(headers.get("retry-after")) if headers.get("retry-after") else None
    except (TypeError, ValueError):
        retry_after = None
    return status, retry_after


def _transport_error(exc: BaseException) -> bool:
    """Connection refused or reset, timeouts, a transfer cut short: httpx's errors are not OSErrors."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    try:
        import httpx

        return isinstance(exc, (httpx.TransportError, httpx.StreamError))
    except ImportError:
        return False


def _cause(exc: BaseException, kinds) -> BaseException | None:
    """The first exception of `kinds` in exc's chain: huggingface_hub wraps a failed request in its own
    errors (snapshot_download raises LocalEntryNotFoundError from the HTTP error that caused it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def retrying(what: str, call: Callable[[], T]) -> T:
    """Runs `call`, retrying what a retry may fix.

    Raises:
        ExternalError: the Hub refused (401/403: the token; 404: the repo or file), or kept failing.
    """
    from huggingface_hub.errors import HfHubHTTPError

    delay, attempts = settings.get().hub_backoff_s, settings.get().hub_retries
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            http = _cause(exc, HfHubHTTPError)
            status, retry_after = _status(http) if http is not None else (None, None)
            if status in (401, 403):
                raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) refused access (HTTP {status}): "
                                    "it rejected the token, or the repo is private to others; check the token "
                                    "and the repo id") from None
            if status == 404:
                raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) has no such repo or file "
                                    "(HTTP 404); check the repo id") from None
            if status is not None and status < 500 and status != 429:
                first = str(http).splitlines()[0] if str(http) else ""
                raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) answered HTTP {status}: {first}") from None
            if status is None:
                transport = _cause(exc, (OSError, TimeoutError)) or (exc if _transport_error(exc) else None)
                if transport is None:
                    raise
                transport = _cause(exc, _transport_kinds()) or transport
                reason, wait = type(transport).__name__, delay
            else:
                reason = f"HTTP {status}"
                wait = min(retry_after, MAX_WAIT_S) if retry_after is not None else delay
        if attempt == attempts:
            raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) is unreachable or failing ({reason}) "
                                f"after {attempts} tries; rerun later: finished work is kept") from None
        log.warning("hub_retry", what=what, attempt=attempt, reason=reason, wait_s=round(wait, 2))
        time.sleep(wait)
        delay *= 2
    raise AssertionError("unreachable")


def _transport_kinds() -> tuple:
    try:
        import httpx

        return (httpx.TransportError, httpx.StreamError)
    except ImportError:
        return (OSError,)


# A model's weights, config and tokenizer; not duplicates such as original/ checkpoints or other formats.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


def complete_snapshot(directory: str) -> bool:
    """A cached model snapshot holds a config, a tokenizer and every weights file its index names (or one weights
    file when it has no index)."""
    import json

    folder = Path(directory)
    if not (folder / "config.json").is_file():
        return False
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")) \
            and not any(folder.glob("*.tiktoken")):
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        return bool(shards) and all(isinstance(s, str) and "/" not in s and (folder / s).is_file() for s in shards)
    return any(p.is_file() for p in folder.glob("*.safetensors"))


def model_snapshot(repo: str) -> str:
    """The local directory of a Hub model: the cached snapshot, or downloaded (with retries) the first time.

    Raises:
        ExternalError: the Hub refused or kept failing (exit 4).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        cached = snapshot_download(repo, allow_patterns=MODEL_FILES, ignore_patterns=["original/*"],
                                   local_files_only=True)
        if complete_snapshot(cached):
            return cached
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    # A snapshot folder can hold part of the model: the machine check fetches config.json alone, and a download
    # killed midway leaves the files it finished. snapshot_download fetches what is missing.
    return retrying(f"download model {repo}", lambda: snapshot_download(
        repo, allow_patterns=MODEL_FILES, ignore_patterns=["original/*"]))
