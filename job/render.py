"""One guarded renderer for every chat template a job renders: prepare's conversations and preference rows,
evaluation prompts, the gguf stage's reference prompts, `peftopt inspect`, preflight's checks of a template. A
template comes from the base model (untrusted) or a file: it runs in a worker process of its own
(job/render_worker.py, transformers' sandboxed Jinja renderer, the same text `apply_chat_template` gives) under a
memory limit and a time limit per conversation. A template that loops, or builds a 3 GB string, costs one
conversation an error naming it; a worker that dies anyway is restarted and the conversation that killed it found.

    from job import render
    render.chat(tokenizer, [{"messages": [...], "add_generation_prompt": True}])   # -> [{"text": ...}]
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from job import interrupt
from job.errors import Interrupted

WORKER = Path(__file__).resolve().parent / "render_worker.py"
SECONDS = 5.0  # per conversation
MEMORY = 2 << 30  # address space the worker may map on top of its imports' (about 0.2 GiB)
BATCH = 256  # conversations per request


class _Worker:
    def __init__(self):
        from job import settings

        self.process = subprocess.Popen([sys.executable, "-I", str(WORKER), str(MEMORY), str(SECONDS)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env=settings.get().tool_env())
        self.buffer = b""

    def ask(self, request: dict, deadline: float) -> dict | None:
        """The worker's answer, or None when it died or outran `deadline` (it is then ended)."""
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.close()
            return None
        fd = self.process.stdout.fileno()
        with interrupt.polled(), selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                if interrupt.stop_requested():
                    self.close()
                    raise Interrupted("stopped by a signal while rendering chat templates; rerun to continue")
                if time.monotonic() > deadline:
                    self.close()
                    return None
                if selector.select(timeout=0.5):
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        self.close()
                        return None
                    self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


_lock = threading.Lock()
_worker: _Worker | None = None


def start() -> None:
    """Starts the worker ahead of the first conversation (its imports take a second or two)."""
    global _worker
    with _lock:
        if _worker is None or _worker.process.poll() is not None:
            _worker = _Worker()


def _ask(request: dict, deadline: float) -> dict | None:
    global _worker
    if _worker is None or _worker.process.poll() is not None:
        _worker = _Worker()
    answer = _worker.ask(request, deadline)
    if answer is None:
        _worker = None
    return answer


@atexit.register
def _stop() -> None:
    if _worker is not None:
        _worker.close()


interrupt.on_give_up(_stop)


def template_of(tokenizer) -> tuple[str, dict[str, Any]]:
    """The tokenizer's chat template and the variables apply_chat_template gives it (its special tokens)."""
    special = getattr(tokenizer, "special_tokens_map", None)
    if special is None:
        special = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                                     ("pad_token", getattr(tokenizer, "pad_token", None))) if v}
    return tokenizer.chat_template, dict(special)


def render(template: str, items: list[dict], kwargs: dict[str, Any] | None = None) -> list[dict]:
    """Each item ({"messages", "tools"?, "add_generation_prompt"?, "spans"?}) rendered with `template`: {"text",
    "spans"?} or {"error": "time" | "memory" | "prefix" | "template", "message"}, in the items' order. Rendering
    stops at the first error: the items after it are {"error": "skipped"} (callers stop at the first error).

    Raises:
        Interrupted: a stop was requested meanwhile.
    """
    results: list[dict] = []
    with _lock:
        for first in range(0, len(items), BATCH):
            results += _render_batch(template, items[first:first + BATCH], kwargs or {})
            if results and "error" in results[-1]:
                break
    skipped = {"error": "skipped", "message": "not rendered: an earlier conversation failed"}
    return results + [skipped] * (len(items) - len(results))


def _render_batch(template: str, items: list[dict], kwargs: dict) -> list[dict]:
    request = {"template": template, "kwargs": kwargs, "items": items}
    answer = _ask(request, time.monotonic() + SECONDS * len(items) * 4 + 30)
    if answer is not None:
        return answer["results"]
    if len(items) == 1:  # this conversation took the worker down or past its time
        return [{"error": "time", "message": f"ended the renderer (more than {SECONDS:g} s or its memory limit)"}]
    results: list[dict] = []
    for item in items:  # find the one that did
        results += _render_batch(template, [item], kwargs)
        if "error" in results[-1]:
            break
    return results


def chat(tokenizer, items: list[dict], extra: dict[str, Any] | None = None) -> list[dict]:
    """`render` with the tokenizer's chat template and special tokens (`extra` added to the template's variables)."""
    template, special = template_of(tokenizer)
    return render(template, items, {**special, **(extra or {})})


def why(result: dict) -> str:
    """An error result as the end of a sentence ("rendering data row 3 ...")."""
    kind, message = result["error"], result["message"]
    if kind == "time":
        return f"{message} (a template that loops without end?)"
    if kind == "memory":
        return f"{message} (a template that builds a huge string?)"
    return message
