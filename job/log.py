"""Logging, configured once: structlog on top of stdlib logging so that library lines share one format.

stdout gets one JSON object per line when it is not a TTY (what a batch service collects) and a human
console rendering on a TTY; `events.jsonl` in the run directory always gets JSON. Secret values (every
token variable the job may use, registered before the jobspec is read) and anything that looks like a
token are replaced by `***` in every event, traceback and error line before anything is written.

Libraries that install their own stderr handler when imported (transformers, datasets, huggingface_hub)
are routed through ours by a hook that runs right after their logging module is imported, so nothing
re-routes them per stage.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import re
import sys
from typing import Any, Callable

import structlog

# A Hugging Face token or an AWS access key id: a value of this shape is never echoed, whatever field or
# override it was typed into.
TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_secrets: set[str] = set()
_file_handler: logging.Handler | None = None
_json_stdout = True
_configured = False
# Library loggers whose own handlers are removed, that propagate to ours, at WARNING.
LIBRARIES = ("transformers", "datasets", "huggingface_hub", "peft", "trl", "accelerate", "bitsandbytes", "unsloth",
             "unsloth_zoo", "torch", "liger_kernel")


def add_secret(value: str | None) -> None:
    """Registers a value (a token) that must never be written: it is masked in every event from now on."""
    if value and len(value.strip()) >= 4:
        _secrets.add(value)
        _secrets.add(value.strip())


def registered_secrets() -> frozenset[str]:
    return frozenset(_secrets)


def mask_text(text: str) -> str:
    """`text` with every registered secret and every token-like value replaced by `***`."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return TOKEN_LIKE.sub("***", text)


def mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask(v) for v in value)
    return value


def redact_secrets(_logger, _name, event_dict):
    return {k: mask(v) for k, v in event_dict.items()}


def _mask_rendered(_logger, _name, rendered):
    """The last processor: the rendered line, traceback included, masked once more."""
    return mask_text(rendered) if isinstance(rendered, str) else rendered


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
    event_dict["message"] = mask_text(str(event_dict.pop("event", "")).strip())
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
        foreign_pre_chain=[*_shared_processors(), library_record], processors=[*final, renderer, _mask_rendered]
    )


def _route(library: str, module=None) -> None:
    """Sends one library's logging through peftopt's handlers: its own handlers removed, propagating, at
    WARNING; its progress bars off when stdout is a JSON stream."""
    logger = logging.getLogger(library)
    for handler in list(logger.handlers):
        if not getattr(handler, "_peftopt", False):
            logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.WARNING)
    if module is None:
        return
    if library == "transformers":
        module.disable_default_handler()
        module.enable_propagation()
        module.set_verbosity_warning()
        # Its bars (loading, writing shards) are not peftopt's progress: a JSON stream has no place for them, and
        # on a terminal they would break the training line; the stages report their own counts.
        module.disable_progress_bar()
    elif library == "datasets":
        module.set_verbosity_warning()
        module.disable_progress_bar()
    elif library == "huggingface_hub" and _json_stdout:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    _route(library)  # the module may have added its handler again while being configured


# The logging module of each library that installs its own handler when imported.
_LOGGING_MODULES = {"transformers.utils.logging": "transformers", "datasets.utils.logging": "datasets",
                    "huggingface_hub.utils.logging": "huggingface_hub"}


class _RouteAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_route` right after one of `_LOGGING_MODULES` is imported, whenever that happens."""

    def find_spec(self, name, path, target=None):
        if name not in _LOGGING_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Routed(spec.loader, lambda module: _route(_LOGGING_MODULES[name], module))
                return spec
        return None


class _Routed(importlib.abc.Loader):
    def __init__(self, loader, after: Callable):
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.after(module)


def configure(json_output: bool | None = None, level: str | None = None, settings=None) -> None:
    """Sets up logging once per process. json_output=None means JSON unless stdout is a TTY (or the
    PEFTOPT_LOG_FORMAT setting); the secrets the environment holds are registered first."""
    global _json_stdout, _configured
    if settings is None:
        from job import settings as settings_module

        settings = settings_module.get()
    for secret in settings.secrets():
        add_secret(secret)
    fmt = settings.log_format
    if json_output is None:
        json_output = fmt == "json" or (fmt != "console" and not sys.stdout.isatty())
    _json_stdout = json_output
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
    stdout_handler = _AboveTheBar(sys.stdout) if not json_output else logging.StreamHandler(sys.stdout)
    stdout_handler.addFilter(_ShownByTheBar())
    stdout_handler.addFilter(_Benign())
    stdout_handler.setFormatter(_formatter(json_output))
    stdout_handler._peftopt = True  # type: ignore[attr-defined]
    root.addHandler(stdout_handler)
    root.setLevel((level or settings.log_level).upper())
    logging.captureWarnings(True)
    if not _configured:
        sys.meta_path.insert(0, _RouteAfterImport())
        _configured = True
    for library in LIBRARIES:
        _route(library)
    for name, library in _LOGGING_MODULES.items():  # already imported (a test, or an embedding program)
        if name in sys.modules:
            _route(library, sys.modules[name])


class _AboveTheBar(logging.StreamHandler):
    """The console handler: while the training bar is up, a line is written above it (tqdm.write), not into it."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _bar_up:
            return super().emit(record)
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging does: a failed write never stops the job
            self.handleError(record)


def keep_stdout_for_events() -> None:
    """Reserves stdout for the JSON event stream: libraries that print() (unsloth's banner, progress
    text) and child processes writing to fd 1 are sent to stderr instead, so every stdout line parses."""
    import io
    import os

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


def quiet_except_errors() -> None:
    """For the ranks other than 0 of a data-parallel run: rank 0 speaks for the job, they only of errors."""
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)


def json_stdout() -> bool:
    return _json_stdout


def attach_events_file(handle) -> None:
    """Also writes every event as JSON to the open file `handle` (appending: a resumed run keeps its
    history). The run directory opens it, refusing a link in its place."""
    global _file_handler
    detach_events_file()
    handler = logging.StreamHandler(handle)
    handler.setFormatter(_formatter(True))
    handler.addFilter(_Benign())
    handler._peftopt = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    _file_handler = handler


def detach_events_file() -> None:
    global _file_handler
    if _file_handler is not None:
        logging.getLogger().removeHandler(_file_handler)
        _file_handler.flush()
        _file_handler.stream.close()
        _file_handler = None


# Library warnings that do not apply to how peftopt runs, muted here and nowhere else: (logger, the message's start,
# why it does not apply). Every other library line stays a `library_log` event.
BENIGN = (
    ("trl.trainer.sft_trainer", "[RANK 0] Padding-free training is enabled, but the attention implementation",
     "peftopt gives packed rows their own attention (job/backends/attention.py: varlen flash, or sdpa with a block "
     "mask), so sequences do not see each other"),
    ("trl.trainer.sft_trainer", "[RANK 0] You are using packing, but the attention implementation",
     "the same: no cross-contamination between packed sequences"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional CPU kernel package (`kernels`) that peftopt does not install; bitsandbytes' own CPU path runs"),
)


class _Benign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        return not any(record.name == name and text.startswith(start) for name, start, _ in BENIGN)


class _ShownByTheBar(logging.Filter):
    """On a terminal, while the training bar is up, its `train_progress` events are what the bar shows: they
    reach the events file, not the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = record.msg.get("event") if isinstance(record.msg, dict) else None
        return not (_bar_up and event == "train_progress")


_bar_up = False


class TrainingBar:
    """The terminal's training display (tqdm): one line updated in place, step/max, loss, learning rate,
    tokens/s and the time left from recent steps; other events print above it. Only when stdout is a terminal."""

    def __init__(self, total: int, done: int):
        import shutil

        from tqdm import tqdm

        global _bar_up
        width = shutil.get_terminal_size((100, 24)).columns  # a terminal that reports no size gets 100
        self.bar = tqdm(total=total, initial=done, unit="step", ncols=width or 100, smoothing=0.1,
                        file=sys.stdout, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} "
                        "{postfix}", desc="train")
        self.done = done
        _bar_up = True

    def update(self, step: int, loss: float, learning_rate: float | None, tokens_per_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}" + (f", lr {learning_rate:.2e}" if learning_rate else "")
                                 + f", {tokens_per_s:,.0f} tok/s", refresh=False)
        self.bar.update(max(step - self.done, 0))
        self.done = step

    def close(self) -> None:
        global _bar_up
        _bar_up = False
        self.bar.close()


class StageBar:
    """A stage's counts on a terminal (rows encoded, targets answered, GGUF files made, tensors read): one line
    updated in place, closed when the work ends; nothing when stdout is not a terminal (the events say the same)."""

    def __init__(self, what: str, total: int | None, unit: str):
        from tqdm import tqdm

        global _bar_up
        width = __import__("shutil").get_terminal_size((100, 24)).columns
        self.bar = tqdm(total=total, unit=f" {unit}", ncols=width or 100, file=sys.stdout, desc=what,
                        bar_format="{desc} {n_fmt}/{total_fmt}{unit} |{bar}| {elapsed}" if total else
                        "{desc} {n_fmt}{unit} {elapsed}", mininterval=0.2)
        _bar_up = True

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        global _bar_up
        _bar_up = False
        self.bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def stage_bar(what: str, total: int | None, unit: str):
    """A StageBar when stdout is a terminal, else an object that does nothing; `close()` it when done."""
    if _json_stdout or not sys.stdout.isatty() or _bar_up:
        return _NoBar()
    return StageBar(what, total, unit)


def counted(items, what: str, unit: str, total: int | None = None):
    """`items`, counted on the terminal's stage line as they are consumed."""
    bar = stage_bar(what, total if total is not None else (len(items) if hasattr(items, "__len__") else None), unit)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


def training_bar(total: int, done: int) -> TrainingBar | None:
    return None if _json_stdout else TrainingBar(total, done)


def log_failure(exc) -> None:
    """A PeftoptError's event (job_failed, job_interrupted, ...), once: the runner logs it while the run's events
    file is still attached, and the CLI edge, which prints the error line, does not log it again."""
    if getattr(exc, "logged", False):
        return
    get_logger().error(exc.event, error=exc.message, details=exc.details or None, exit_code=exc.exit_code)
    exc.logged = True


def get_logger(name: str = "peftopt"):
    return structlog.get_logger(name)
