"""Finding and calling peftopt's pinned llama.cpp build (docker/build-llama-cpp.sh): the converter,
llama-quantize, and peftopt-generate. Nothing here downloads anything.

The prefix is $LLAMA_CPP_DIR, else /opt/llama.cpp (the image), else ~/.cache/peftopt/llama.cpp (`make llama-cpp`),
else .cache/llama.cpp in the checkout.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from job import settings as settings_module
from job.errors import ExternalError, MachineError

REPO_ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = (Path("/opt/llama.cpp"), Path.home() / ".cache" / "peftopt" / "llama.cpp", REPO_ROOT / ".cache" / "llama.cpp")
CONVERTER_SHIM = Path(__file__).resolve().parent / "convert_shim.py"


def physical_cores() -> int:
    """Cores (not hyperthreads) this process may run on: llama.cpp's decode is bound by arithmetic and
    synchronises its threads at every operation, so a core's second hardware thread adds waiting, not
    speed (llama.cpp's own tools default to physical cores for this reason). A container's CPU quota
    (Kubernetes limits, `docker run --cpus`) caps it: the host's cores are visible there but not usable."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    siblings = set()
    for cpu in allowed:
        try:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            siblings = set(map(str, allowed))
            break
    cores = max(len(siblings), 1)
    quota = cgroup_cpu_quota()
    return min(cores, quota) if quota else cores


def cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs granted by the cgroup v2 quota ("max 100000" or unreadable: none), rounded up."""
    try:
        quota, period = path.read_text().split()[:2]
        return max(-(-int(quota) // int(period)), 1)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class LlamaCpp:
    prefix: Path

    @property
    def quantize(self) -> Path:
        return self.prefix / "bin" / "llama-quantize"

    @property
    def generate_bin(self) -> Path:
        return self.prefix / "bin" / "peftopt-generate"

    @property
    def generate_cuda_bin(self) -> Path:
        """peftopt-generate built with ggml's CUDA backend (docker/build-llama-cpp.sh, LLAMA_CUDA_ARCHITECTURES);
        absent from a CPU-only build."""
        return self.prefix / "bin" / "peftopt-generate-cuda"

    @property
    def converter(self) -> Path:
        return self.prefix / "convert_hf_to_gguf.py"

    @property
    def version(self) -> str:
        return (self.prefix / "VERSION").read_text().strip()


def _complete(prefix: Path) -> bool:
    return all((prefix / p).exists() for p in ("VERSION", "bin/llama-quantize", "bin/peftopt-generate",
                                                "convert_hf_to_gguf.py", "gguf-py"))


def find() -> LlamaCpp:
    """Raises MachineError (exit 4) naming the fix when no complete build is on this machine (checked before
    any training)."""
    configured = settings_module.get().llama_cpp_dir
    candidates = [Path(configured)] if configured else list(CANDIDATES)
    for prefix in candidates:
        if _complete(prefix):
            return LlamaCpp(prefix)
    where = configured or " or ".join(str(c) for c in CANDIDATES)
    raise MachineError(f"export.gguf: the pinned llama.cpp tools are not in {where} on this machine; run "
                       "`make llama-cpp` (or set LLAMA_CPP_DIR to a prefix built by docker/build-llama-cpp.sh)")


def quant_types(tools: LlamaCpp) -> set[str]:
    """The type names `llama-quantize --help` lists as allowed (upper case: Q4_K_M, Q8_0, ...)."""
    try:
        text = subprocess.run([str(tools.quantize), "--help"], capture_output=True, text=True, timeout=30,
                              env=settings_module.get().tool_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExternalError(f"llama-quantize --help did not run: {exc}") from None
    found = set(re.findall(r"^\s*\d+\s+or\s+([A-Z0-9_]+)\s*:", text.stdout + text.stderr, re.M))
    if not found:
        tail = " | ".join((text.stderr or text.stdout).strip().splitlines()[-2:]) or f"exit {text.returncode}"
        raise ExternalError(f"llama-quantize in {tools.prefix} does not run ({tail}); rebuild it with `make llama-cpp`")
    return found


def pre_tokenizers(tools: LlamaCpp) -> set[str]:
    """The pre-tokenizer names the pinned converter can write (`res = "..."` in its sources)."""
    return {name for path in _converter_sources(tools)
            for name in re.findall(r'res = "([A-Za-z0-9_.-]+)"', path.read_text(encoding="utf-8"))}


def _converter_sources(tools: LlamaCpp) -> list[Path]:
    return [path for path in (tools.converter, *sorted((tools.prefix / "conversion").rglob("*.py"))) if path.is_file()]


def _hashed_text_and_known_hashes(tools: LlamaCpp) -> tuple[str, set[str]] | None:
    """The text the pinned converter tokenizes to tell a BPE pre-tokenizer (`chktxt`) and the token hashes it knows
    (`chkhsh == "..."`); None when its sources do not say them the way this reads them."""
    import ast

    text, known = None, set()
    for path in _converter_sources(tools):
        source = path.read_text(encoding="utf-8")
        known |= set(re.findall(r'chkhsh == "([0-9a-f]{64})"', source))
        found = re.search(r"^\s*chktxt = ('.*')\s*$", source, re.MULTILINE)
        if found and text is None:
            try:
                text = ast.literal_eval(found.group(1))
            except (ValueError, SyntaxError):
                return None
    return (text, known) if isinstance(text, str) and known else None


def pre_tokenizer_problem(tools: LlamaCpp, model_dir: Path, tokenizer) -> str | None:
    """Why the pinned converter would refuse this model's tokenizer (a BPE pre-tokenizer it does not know, as a
    model family newer than the pin has), found before training instead of after it; None when it would not.

    The converter tells a BPE pre-tokenizer by the hash of the tokens of a fixed text: a hash it knows needs no
    more (one encode). Otherwise (a SentencePiece tokenizer, which it reads without the hash, or an unknown BPE one)
    it writes the vocabulary alone (`--vocab-only`, some seconds) and says. Other failures are left to the gguf
    stage, which names them.

    Raises:
        ExternalError: the converter could not start.
    """
    import hashlib
    import tempfile

    from job import interrupt

    told = _hashed_text_and_known_hashes(tools)
    if told is not None:
        try:
            tokens = tokenizer.encode(told[0])
        except Exception:  # a tokenizer that cannot encode it: the converter's own run decides
            tokens = None
        if tokens is not None and hashlib.sha256(str(tokens).encode()).hexdigest() in told[1]:
            return None
    with tempfile.TemporaryDirectory(prefix="peftopt-vocab-") as scratch:
        arguments = json.dumps({"pre": "", "cpus": free_cpus(), "threads": 1,
                                "argv": [str(model_dir), "--vocab-only", "--outfile", str(Path(scratch) / "vocab.gguf"),
                                         "--outtype", "f16"]})
        with converter_process(tools) as process:
            _, stderr = interrupt.wait_for(process, "convert_hf_to_gguf (vocabulary)", timeout=120,
                                           input_text=arguments + "\n")
    if process.returncode == 0 or "BPE pre-tokenizer was not recognized" not in stderr:
        return None
    digest = re.search(r"chkhsh:\s*([0-9a-f]{64})", stderr)
    names = pre_tokenizers(tools)
    common = [name for name in ("llama-bpe", "qwen2", "qwen35", "gpt-2", "tekken", "deepseek-v3", "smollm", "olmo")
              if name in names]
    return (f"export.tokenizer_pre: llama.cpp's pinned converter does not know this model's BPE pre-tokenizer "
            f"(token hash {digest.group(1)[:16] if digest else 'unknown'}...), so no GGUF could be written after "
            "training; set export.tokenizer_pre to the pre-tokenizer its tokenizer was made with (the converter "
            f"knows {len(names)}, among them {', '.join(common)}), or export.gguf to []")


def describe() -> dict:
    try:
        tools = find()
        return {"prefix": str(tools.prefix), "version": tools.version}
    except MachineError as exc:
        return {"prefix": None, "version": None, "problem": exc.message}


def _start(cmd: list[str], what: str, *, stdin: bool = False, cpus: list[int] | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """A tool's process, offline and with no token in its environment (on `cpus` alone when given; `env` added).

    Raises:
        ExternalError: it could not start.
    """
    cpus = cpus or free_cpus()
    try:
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                                   env=settings_module.get().tool_env(**(env or {})))
    except OSError as exc:
        raise ExternalError(f"{what} could not start: {exc.strerror}") from None
    if cpus:  # before it starts its threads (after loading the model), which inherit it; not preexec_fn,
        # which can deadlock a process that has threads of its own, as the job does
        try:
            os.sched_setaffinity(process.pid, cpus)
        except OSError:
            pass  # it exited already; its exit code says why
    return process


def _run(cmd: list[str], what: str, *, input_text: str | None = None, timeout: float = 3600,
         process: subprocess.Popen | None = None, cpus: list[int] | None = None, stop=None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a tool (or finishes `process`, one started ahead); a stop request (SIGTERM) ends it at once and
    raises Interrupted, as does `stop` (a threading.Event: the caller gave up on it)."""
    from job import interrupt

    proc = process or _start(cmd, what, stdin=input_text is not None, cpus=cpus, env=env)
    stdout, stderr = interrupt.wait_for(proc, what, timeout=timeout, input_text=input_text, stop=stop)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ExternalError(f"{what} failed (exit {result.returncode}): {' | '.join(tail)}")
    return result


@contextlib.contextmanager
def converter_process(tools: LlamaCpp):
    """The converter started ahead of its arguments (job/convert_shim.py): it imports torch, transformers and
    gguf-py while the job does other work, and `convert` hands it the model. Ended on leaving if unused.

    Raises:
        ExternalError: it could not start.
    """
    # -I keeps the environment's Python settings out; a bytecode cache this process was given (-X pycache_prefix,
    # PYTHONPYCACHEPREFIX) is passed on, so the converter does not compile torch's sources again at each run.
    cache = ["-X", f"pycache_prefix={sys.pycache_prefix}"] if sys.pycache_prefix else []
    process = _start([sys.executable, "-I", *cache, str(CONVERTER_SHIM), str(tools.prefix)], "convert_hf_to_gguf",
                     stdin=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def convert(tools: LlamaCpp, model_dir: Path, out_file: Path, outtype: str, tokenizer_pre: str | None,
            process: subprocess.Popen | None = None) -> None:
    """convert_hf_to_gguf.py with its own vendored gguf-py (PyPI's gguf of the same number is older), in
    `process` when one was started ahead and is still waiting (`converter_process`)."""
    what = f"convert_hf_to_gguf ({outtype})"
    free = free_cpus()  # the CPUs it may use now (it may have been started before some were held)
    arguments = json.dumps({"pre": tokenizer_pre or "", "cpus": free, "threads": len(free) if free else None,
                            "argv": [str(model_dir), "--outfile", str(out_file), "--outtype", outtype]})
    with contextlib.ExitStack() as stack:
        if process is None or process.poll() is not None:
            process = stack.enter_context(converter_process(tools))
        result = _run(process.args, what, input_text=arguments + "\n", process=process)
    _check_gguf(out_file, what, result)


# CPUs a thread of the job keeps busy for a while (the decode loop of targets answered ahead, beside the gguf stage:
# job/stages/evaluate.py). The tools started meanwhile run on the other CPUs with as many threads: their threads wait
# for one another at every step, and one of them sharing a CPU with the busy thread stalls them all (the converter
# took 21.6 s instead of 4-5 s on the H200 so).
_held: list[int] = []


@contextlib.contextmanager
def cpus_held(cpus: list[int]):
    """`cpus` kept for the calling thread's own work for the duration: tools started meanwhile keep off them."""
    _held.extend(cpus)
    try:
        yield
    finally:
        for cpu in cpus:
            _held.remove(cpu)


def free_cpus() -> list[int] | None:
    """The CPUs a tool may use while some are held (`cpus_held`); None when none are held."""
    if not _held:
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return [cpu for cpu in allowed if cpu not in _held] or None


def _tool_threads(default: int) -> int:
    free = free_cpus()
    return max(1, min(default, len(free))) if free else default


def cores_beside(keep: int) -> tuple[list[int], list[int], int] | None:
    """How a tool shares this machine with this process's own work on `keep` CPUs: (this process's CPUs, the
    tool's CPUs, the tool's threads: physical cores less `keep`); None when fewer than 4 CPUs would be left to it.
    This process keeps the last CPUs: hosts often route the devices' interrupts to the first (the GPU's decode loop
    pinned there ran 3x slower on two H200 hosts than alone, docs/performance.md)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    threads = physical_cores() - keep
    if len(allowed) - keep < 4 or threads < 3:
        return None
    return allowed[-keep:], allowed[:-keep], threads


@contextlib.contextmanager
def this_thread_on(cpus: list[int]):
    """The calling thread on `cpus` alone for the duration, then back where it was. llama.cpp's threads wait for
    each other at every operation, so one of them displaced by a busy thread of the job (a GPU decode loop) stalls
    them all: on the H200 the GGUF suite took 13.1 s alone and 18.0 s beside the GPU target with this thread free
    to run on llama.cpp's cores. (The whole process on one core was worse: loading the next model took 12 s
    instead of 1.)"""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def usable_cpus() -> int:
    """Logical CPUs this process may run on, capped by the container's CPU quota: llama-quantize rounds
    blocks independently, without the per-operation synchronisation that makes decoding prefer physical cores."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(min(allowed, quota) if quota else allowed, 1)


def quantize(tools: LlamaCpp, source: Path, out_file: Path, quant: str, threads: int | None = None) -> None:
    result = _run([str(tools.quantize), str(source), str(out_file), quant.upper(),
                   str(threads or _tool_threads(usable_cpus()))],
                  f"llama-quantize {quant}")
    _check_gguf(out_file, f"llama-quantize {quant}", result)


def _check_gguf(path: Path, what: str, result: subprocess.CompletedProcess) -> None:
    """A tool that exits 0 without writing a GGUF (or writes something else) has failed too."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        magic = b""
    if magic != b"GGUF":
        tail = " | ".join((result.stderr or result.stdout or "").strip().splitlines()[-2:])
        raise ExternalError(f"{what} exited 0 but wrote no GGUF file ({tail or 'no output'})")


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    stop_reason: str


def cuda_library_dirs() -> list[str]:
    """The directories of the CUDA runtime and cuBLAS that torch's wheels installed (nvidia-cuda-runtime,
    nvidia-cublas: nvidia/cu13/lib), which peftopt-generate-cuda links to."""
    import importlib.util

    try:
        found = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    dirs = []
    for base in (found.submodule_search_locations or []) if found else []:
        for lib in sorted(Path(base).glob("*/lib")):
            if any(lib.glob("libcudart.so*")) or any(lib.glob("libcublas.so*")):
                dirs.append(str(lib))
    return dirs


def gpu_generation(tools: LlamaCpp) -> dict[str, str] | None:
    """The environment in which peftopt-generate-cuda answers on this job's GPU, or None where it cannot: no CUDA
    build in the prefix, no usable GPU, the CUDA libraries not found, or PEFTOPT_GGUF_GPU=0. Only the job's own
    device is visible to it (the first of CUDA_VISIBLE_DEVICES), so llama.cpp does not spread a small model over
    every GPU of the host."""
    if not settings_module.get().gguf_gpu or not tools.generate_cuda_bin.exists():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    libraries = cuda_library_dirs()
    if not libraries:
        return None
    visible = (settings_module.get().cuda_visible_devices or "").split(",")
    device = visible[torch.cuda.current_device()] if visible[0] else str(torch.cuda.current_device())
    return {"LD_LIBRARY_PATH": os.pathsep.join(libraries), "CUDA_VISIBLE_DEVICES": device.strip()}


def generate_many(tools: LlamaCpp, gguf_path: Path, prompts: list[str], max_tokens: int, threads: int | None = None,
                  timeout: float = 1800, cpus: list[int] | None = None, stop=None,
                  gpu: dict[str, str] | None = None) -> list[Generation]:
    """Greedy generation for every prompt in one llama.cpp process that decodes them together (one sequence
    each); the prompts' special tokens are parsed, no BOS is added. On `cpus` alone when given; on the GPU, every
    layer offloaded, with the CUDA build when `gpu` (its environment: `gpu_generation`) is given; `stop` (a
    threading.Event) ends it early, as a stop request does."""
    if not prompts:
        return []
    binary = tools.generate_cuda_bin if gpu else tools.generate_bin
    cmd = [str(binary), "-m", str(gguf_path), "-n", str(max_tokens), "-t", str(threads or _tool_threads(physical_cores())),
           "--prompts", str(len(prompts))] + (["-ngl", "999"] if gpu else [])
    stdin = "".join(f"{len(p.encode())}\n{p}" for p in prompts)
    out = _run(cmd, f"llama.cpp generation with {gguf_path.name}" + (" on the GPU" if gpu else ""),
               input_text=stdin, timeout=timeout, cpus=cpus, stop=stop, env=gpu).stdout
    prompt_ids: list[list[int]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    pieces = [b"" for _ in prompts]
    reasons = ["length" for _ in prompts]
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        index, _, rest = rest.partition(" ")
        if kind not in ("P", "G", "E") or not index.isdigit() or int(index) >= len(prompts):
            continue
        k = int(index)
        if kind == "P":
            prompt_ids[k] = [int(x) for x in rest.split()]
        elif kind == "G":
            token, _, hexed = rest.partition(" ")
            tokens[k].append(int(token))
            pieces[k] += bytes.fromhex(hexed)
        else:
            reasons[k] = "end_of_turn" if rest.strip() == "eog" else "length"
    if any(not ids for ids in prompt_ids):
        raise ExternalError(f"llama.cpp generation with {gguf_path.name} answered without the prompts' tokens")
    return [Generation(prompt_ids[k], tokens[k], pieces[k].decode("utf-8", errors="replace"), reasons[k])
            for k in range(len(prompts))]


def generate(tools: LlamaCpp, gguf_path: Path, prompt: str, max_tokens: int, threads: int | None = None,
             timeout: float = 600) -> Generation:
    """Greedy generation for one prompt (see generate_many)."""
    return generate_many(tools, gguf_path, [prompt], max_tokens, threads, timeout)[0]
