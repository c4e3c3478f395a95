"""The chat-template worker (job/render.py starts it): renders conversations with transformers' own sandboxed Jinja
renderer (`render_jinja_template`, what `apply_chat_template` calls), each under a time limit, the whole process under
a memory limit, so that a template that loops or builds a huge string costs one conversation an error line instead
of the job its time or its machine. It imports nothing of peftopt (it runs as a script, with -I).

    python -I job/render_worker.py MEMORY_BYTES SECONDS      # JSON requests on stdin, one JSON answer line each
                                                             # (MEMORY_BYTES on top of what its imports mapped)

A request: {"template": str, "kwargs": {...}, "items": [{"messages": [...], "tools": [...]?, "add_generation_prompt":
bool?, "spans": bool?}]}. An answer: {"results": [{"text": str, "spans": [[start, end], ...]?} | {"error": kind,
"message": str}]}, kind one of "time", "memory", "prefix" (assistant turns cannot be located), "template"; the
results end at the first error.
"""
import json
import resource
import signal
import sys


class Expired(Exception):
    pass


def _expire(signum, frame):
    raise Expired()


def render(template, kwargs, messages, tools, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


def handle(template, kwargs, item):
    messages, tools = item["messages"], item.get("tools")
    full = render(template, kwargs, messages, tools, bool(item.get("add_generation_prompt")))
    if not item.get("spans"):
        return {"text": full}
    spans = []
    for i, message in enumerate(messages):  # each assistant reply, found by rendering growing prefixes
        if message.get("role") != "assistant":
            continue
        before = render(template, kwargs, messages[:i], tools, True) if i else ""
        through = render(template, kwargs, messages[: i + 1], tools, False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            return {"error": "prefix", "message": "the template does not render conversations prefix by prefix"}
        spans.append([len(before), len(through)])
    return {"text": full, "spans": spans}


def _address_space() -> int:
    """The bytes of address space this process has mapped (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main() -> None:
    memory, seconds = int(sys.argv[1]), float(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the job ends this worker
    from transformers.utils.chat_template_utils import render_jinja_template  # noqa: F401  (imported before the limit)

    limit = _address_space() + memory  # on top of what the imports mapped, whatever this interpreter's libraries are
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    signal.signal(signal.SIGALRM, _expire)
    for line in sys.stdin:
        request = json.loads(line)
        results = []
        for item in request["items"]:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                results.append(handle(request["template"], request.get("kwargs") or {}, item))
            except Expired:
                results.append({"error": "time", "message": f"took more than {seconds:g} s"})
            except MemoryError:
                results.append({"error": "memory", "message": f"needed more than {memory >> 20:,} MiB"})
            except RecursionError:
                results.append({"error": "template", "message": "RecursionError: nested too deeply"})
            except Exception as exc:  # jinja2's errors, the template's raise_exception
                text = str(exc).splitlines()[0][:300] if str(exc) else ""
                results.append({"error": "template", "message": f"{type(exc).__name__}: {text}"})
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if "error" in results[-1]:  # the caller stops at the first failure: the rest would only cost time
                break
        # ASCII JSON (non-ASCII escaped): one line, whatever line separators the text holds
        sys.stdout.write(json.dumps({"results": results}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
