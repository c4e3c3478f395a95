"""Every call peftopt makes to the Hugging Face Hub goes through `retrying`: transient failures (connection
refused or reset, timeouts, HTTP 429 and 5xx) are retried with backoff, honouring Retry-After; the rest,
and a failure that outlasts the retries, become one ExternalError line (exit 4) naming what to do.

PEFTOPT_HUB_RETRIES (default 5 tries) and PEFTOPT_HUB_BACKOFF_S (default 2 s, doubling) tune it.
"""
from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

from job.errors import ExternalError
from job.log import get_logger

log = get_logger("peftopt.hub")
T = TypeVar("T")
MAX_WAIT_S = 120.0  # a Retry-After longer than this is capped: a batch task should fail and be retried instead


def tries() -> int:
    return max(1, int(os.environ.get("PEFTOPT_HUB_RETRIES", "5")))


def backoff_s() -> float:
    return float(os.environ.get("PEFTOPT_HUB_BACKOFF_S", "2"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


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


def retrying(what: str, call: Callable[[], T]) -> T:
    """Runs `call`, retrying what a retry may fix.

    Raises:
        ExternalError: the Hub refused (401/403: the token; 404: the repo or file), or kept failing.
    """
    from huggingface_hub.errors import HfHubHTTPError

    delay, attempts = backoff_s(), tries()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except HfHubHTTPError as exc:
            status, retry_after = _status(exc)
            if status in (401, 403):
                raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) rejected the token (HTTP {status}); "
                                    "check that it is valid and may write to this repo") from None
            if status == 404:
                raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) has no such repo or file "
                                    "(HTTP 404); check the repo id") from None
            if status is not None and status < 500 and status != 429:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) answered HTTP {status}: {first}") from None
            reason = f"HTTP {status}"
            wait = min(retry_after, MAX_WAIT_S) if retry_after is not None else delay
        except Exception as exc:
            if not _transport_error(exc):
                raise
            reason, wait = type(exc).__name__, delay
        if attempt == attempts:
            raise ExternalError(f"{what}: the Hugging Face Hub ({endpoint()}) is unreachable or failing ({reason}) "
                                f"after {attempts} tries; rerun later: finished work is kept") from None
        log.warning("hub_retry", what=what, attempt=attempt, reason=reason, wait_s=round(wait, 2))
        time.sleep(wait)
        delay *= 2
    raise AssertionError("unreachable")
