"""Logging, configured once: structlog on top of stdlib logging so that library lines share one format.

stdout gets one JSON object per line when it is not a TTY (what a batch service collects) and a human
console rendering on a TTY; `events.jsonl` in the run directory always gets JSON. Known secret values
are replaced by `***` in every event before any handler sees it.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_secrets: set[str] = set()
_file_handler: logging.Handler | None = None
_json_stdout = True


def add_secret(value: str | None) -> None:
    """Registers a value (a token) that must never be written: it is masked in every event from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask(v) for v in value)
    return value


def redact_secrets(_logger, _name, event_dict):
    return {k: _mask(v) for k, v in event_dict.items()} if _secrets else event_dict


def _shared_processors():
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]


def library_record(_logger, _name, event_dict):
    """A line from a library (stdlib logging, warnings) is the event `library_log`, its text in `message`:
    a console that groups by event name gets one group, not one per library sentence or banner."""
    event_dict["message"] = str(event_dict.pop("event", "")).strip()
    event_dict["event"] = "library_log"
    return event_dict


def _formatter(json_output: bool) -> logging.Formatter:
    renderer = (
        structlog.processors.JSONRenderer(default=str)
        if json_output
        # plain tracebacks: rich ones print local variables, which could hold a token
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    final = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_output:
        # Tracebacks without local variables: locals could hold a token.
        final.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), library_record], processors=[*final, renderer]
    )


def configure(json_output: bool | None = None, level: str | None = None) -> None:
    """Sets up stdout logging. json_output=None means JSON unless stdout is a TTY (PEFTOPT_LOG_FORMAT overrides)."""
    global _json_stdout
    fmt = os.environ.get("PEFTOPT_LOG_FORMAT", "").lower()
    if json_output is None:
        json_output = fmt == "json" or (fmt != "console" and not sys.stdout.isatty())
    _json_stdout = json_output
    level = (level or os.environ.get("PEFTOPT_LOG_LEVEL", "INFO")).upper()
    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_peftopt", False):
            root.removeHandler(handler)
    stdout_handler = logging.StreamHandler(sys.stdout)
    stdout_handler.setFormatter(_formatter(json_output))
    stdout_handler._peftopt = True  # type: ignore[attr-defined]
    root.addHandler(stdout_handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def keep_stdout_for_events() -> None:
    """Reserves stdout for the JSON event stream: libraries that print() (unsloth's banner, progress
    text) and child processes writing to fd 1 are sent to stderr instead, so every stdout line parses."""
    import io

    try:
        stdout_fd, stderr_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return  # not a process-level stream (embedded, captured): nothing to protect
    events = os.fdopen(os.dup(stdout_fd), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(stderr_fd, stdout_fd)
    sys.stdout = sys.stderr
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_peftopt", False) and isinstance(handler, logging.StreamHandler) \
                and not isinstance(handler, logging.FileHandler):
            handler.setStream(events)


def events_to_stderr() -> None:
    """For commands whose stdout is their result (`bench`): log events go to stderr instead."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_peftopt", False) and isinstance(handler, logging.StreamHandler) \
                and not isinstance(handler, logging.FileHandler):
            handler.setStream(sys.stderr)


def json_stdout() -> bool:
    return _json_stdout


def attach_events_file(path: os.PathLike | str) -> None:
    """Also writes every event as JSON to `path` (appending: a resumed run keeps its history)."""
    global _file_handler
    detach_events_file()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_formatter(True))
    handler._peftopt = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    _file_handler = handler


def detach_events_file() -> None:
    global _file_handler
    if _file_handler is not None:
        logging.getLogger().removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None


def route_library_logs(only_loaded: bool = False) -> None:
    """Sends transformers/datasets/peft/trl/huggingface_hub logging through our handlers instead of their own
    stderr ones. transformers and datasets install a private handler and turn propagation off when first
    imported, so they are imported here first (unless `only_loaded`: a process that never uses them).
    """
    import importlib

    for name in ("huggingface_hub.utils.logging", "transformers.utils.logging", "datasets.utils.logging"):
        try:
            if not only_loaded or name.startswith("huggingface_hub"):  # that one is light
                importlib.import_module(name)
        except ImportError:
            pass
    module = sys.modules.get("transformers.utils.logging")
    if module is not None:
        if _json_stdout:  # bars belong on a terminal, not in a JSON stream
            module.disable_progress_bar()
        module.disable_default_handler()
        module.enable_propagation()
        module.set_verbosity_warning()
    if _json_stdout and "huggingface_hub" in sys.modules:  # download bars belong on a terminal too
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    module = sys.modules.get("datasets.utils.logging")
    if module is not None:
        module.set_verbosity_warning()
        module.disable_progress_bar()
    for name in ("peft", "trl", "accelerate", "huggingface_hub", "bitsandbytes", "unsloth"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):  # huggingface_hub's own stderr handler, for one
            library.removeHandler(handler)
        library.propagate = True
        library.setLevel(logging.WARNING)


def get_logger(name: str = "peftopt"):
    return structlog.get_logger(name)
