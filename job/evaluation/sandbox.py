"""Running code a model wrote (the `python_function` check) where it cannot reach the job's secrets, the
network, the files or the machine.

The answer's code runs in a fresh interpreter (`python -I`), with an empty environment, in a new temporary
directory outside the run directory, in its own session (its whole process group is killed on timeout), under
limits on CPU time, memory, file size and core dumps, and, before a line of it runs, under a seccomp filter
that allows only what pure computation needs: memory, writing to stdout/stderr, reading stdin, the clock,
signals, exiting. Every other system call (open, socket, fork, exec, ptrace, process_vm_readv, ...) fails
with EPERM, so the code can open no file (not /proc/<parent>/environ either), connect nowhere, start no
process. This needs no privilege: it works as uid 1000 under Docker's default seccomp profile, where user
namespaces are refused. Where a filter cannot be installed (a kernel or architecture without it), the check
is skipped and reported, unless the spec asks for unisolated code checks (`evaluate.code_checks`).

Limits: an answer can make its own check pass (it runs in the interpreter that checks it); it can waste its
CPU-time budget; nothing else.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_BYTES = 1 << 30
OUTPUT_BYTES = 1 << 20

# The harness runs in the child. It installs the limits and the filter, then runs the answer's code and tests
# its functions; the result is the last line of stdout.
HARNESS = r'''
import ctypes, inspect, json, os, platform, resource, struct, sys
payload = json.loads(sys.stdin.read())
mode = payload["mode"]
cpu = int(payload["cpu_s"]) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (payload["memory"], payload["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (payload["output"], payload["output"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
except (ValueError, OSError):
    pass

def install_filter():
    machine = platform.machine()
    if machine == "x86_64":
        arch, allowed, write_nr = 0xC000003E, payload["x86_64"], 1
    elif machine in ("aarch64", "arm64"):
        arch, allowed, write_nr = 0xC00000B7, payload["aarch64"], 64
    else:
        return f"no syscall table for {machine}"
    LD, JEQ, JGT, RET = 0x20, 0x15, 0x25, 0x06
    ALLOW, ERRNO_EPERM, KILL = 0x7FFF0000, 0x00050001, 0x80000000
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    # write: only to stdout and stderr
    prog += [(JEQ, 0, 4, write_nr), (LD, 0, 0, 16), (JGT, 0, 1, 2), (RET, 0, 0, ERRNO_EPERM), (RET, 0, 0, ALLOW),
             (LD, 0, 0, 0)]
    for number in allowed:
        prog += [(JEQ, 0, 1, number), (RET, 0, 0, ALLOW)]
    prog.append((RET, 0, 0, ERRNO_EPERM))
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Prog(len(prog), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return f"PR_SET_NO_NEW_PRIVS failed (errno {ctypes.get_errno()})"
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        return f"seccomp filter refused (errno {ctypes.get_errno()})"
    return None

# The first line of stdout is the harness's own, written before a line of the answer runs: what isolation it has.
# Everything after it the answer's code could have written.
if mode == "sandboxed":
    problem = install_filter()
    if problem:
        print(json.dumps({"isolation": "unavailable", "why": problem[:200]}))
        sys.stdout.flush()
        os._exit(3)
print(json.dumps({"isolation": "filtered" if mode == "sandboxed" else "limits only"}))
sys.stdout.flush()
ns = {"__name__": "answer"}
result = {"function": None, "error": None}
try:
    exec(compile(payload["code"], "answer", "exec"), ns)
    for name, fn in list(ns.items()):
        if inspect.isfunction(fn):
            try:
                if all(fn(arg) == want for arg, want in payload["cases"]):
                    result["function"] = name
                    break
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"[:300]
except BaseException as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"[:300]
sys.stdout.write("\n" + json.dumps(result) + "\n")
sys.stdout.flush()
os._exit(0)
'''

# What pure computation in CPython asks of the kernel once it is running: memory, the clock, signals, futexes,
# stdin/stdout, exiting. (Numbers: x86_64 from asm/unistd_64.h; aarch64 from asm-generic/unistd.h.)
ALLOWED = {
    "read": (0, 63), "close": (3, 57), "fstat": (5, 80), "lseek": (8, 62), "mmap": (9, 222), "mprotect": (10, 226),
    "munmap": (11, 215), "brk": (12, 214), "rt_sigaction": (13, 134), "rt_sigprocmask": (14, 135),
    "rt_sigreturn": (15, 139), "mremap": (25, 216), "madvise": (28, 233), "sched_yield": (24, 124),
    "nanosleep": (35, 101), "getpid": (39, 172), "exit": (60, 93), "gettimeofday": (96, 169),
    "sigaltstack": (131, 132), "gettid": (186, 178), "futex": (202, 98), "restart_syscall": (219, 128),
    "clock_gettime": (228, 113), "clock_getres": (229, 114), "clock_nanosleep": (230, 115), "exit_group": (231, 94),
    "getrandom": (318, 278),
}


@dataclass(frozen=True)
class Outcome:
    function: str | None  # the function that got every case right
    error: str | None  # why none did (the last exception, a timeout, a limit)
    isolated: bool
    skipped: str | None = None  # why the code did not run at all


def run_function_cases(code: str, cases: list, *, timeout_s: float, mode: str, tool_env: dict) -> Outcome:
    """Runs `code` and looks for a function that maps each case's input to its expected output.

    `mode` is "sandboxed" (skipped, with the reason, where no filter can be installed) or "unisolated"
    (the filter left out on purpose: the spec said so; limits, empty environment and scratch directory stay).
    """
    payload = json.dumps({"code": code, "cases": cases, "mode": mode, "cpu_s": timeout_s, "memory": MEMORY_BYTES,
                          "output": OUTPUT_BYTES, "x86_64": sorted(v[0] for v in ALLOWED.values()),
                          "aarch64": sorted(v[1] for v in ALLOWED.values())})
    with tempfile.TemporaryDirectory(prefix="peftopt-check-") as scratch:
        out_path, err_path = os.path.join(scratch, ".out"), os.path.join(scratch, ".err")
        with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", HARNESS], stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, cwd=scratch, env=tool_env, close_fds=True,
                                        start_new_session=True)
            except OSError as exc:
                return Outcome(None, None, False, skipped=f"the checker could not start: {exc.strerror}")
            try:
                proc.communicate(payload.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return Outcome(None, f"timed out after {timeout_s}s", mode == "sandboxed")
            finally:
                _kill_group(proc)  # anything the code left behind in its session
            out.seek(0)
            lines = out.read(OUTPUT_BYTES + 1).decode("utf-8", errors="replace").strip().splitlines()
            err.seek(0)
            stderr = err.read(4096).decode("utf-8", errors="replace").strip().splitlines()
    status, result = _line(lines[0] if lines else ""), _line(lines[-1] if len(lines) > 1 else "")
    if status.get("isolation") == "unavailable":  # the harness's first line: no answer code ran
        return Outcome(None, None, False, skipped=f"no isolation available here ({str(status.get('why'))[:200]})")
    if status.get("isolation") not in ("filtered", "limits only") or proc.returncode != 0 or not result:
        why = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode and proc.returncode < 0 \
            else (stderr[-1][:200] if stderr else f"exit {proc.returncode}")
        return Outcome(None, f"the code did not finish ({why})", mode == "sandboxed")
    # The result line is the answer's to forge (it runs in that interpreter): only a function the code really
    # defines is taken, and the error as a short string.
    function = result.get("function")
    error = result.get("error")
    return Outcome(function if function in defined_functions(code) else None,
                   error[:300] if isinstance(error, str) else None, mode == "sandboxed")


def _line(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def defined_functions(code: str) -> set[str]:
    """The names `code` binds at its top level to functions it may define (`def`, or a name assigned, such as a
    lambda), read by parsing it (nothing runs)."""
    import ast

    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def available(tool_env: dict) -> tuple[bool, str]:
    """Whether code checks can be isolated on this machine, and why not."""
    outcome = run_function_cases("def f(x):\n    return x\n", [[1, 1]], timeout_s=10, mode="sandboxed",
                                 tool_env=tool_env)
    if outcome.skipped:
        return False, outcome.skipped
    return outcome.function == "f", outcome.error or "isolated"
