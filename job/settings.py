"""Every environment variable peftopt reads, read once into one frozen `Settings` and validated: a bad value
is exit 2 naming the variable. `job_started` logs them (secrets only as set/unset) and README.md's
"Settings" table lists each with its default (a test keeps the two in step).

Nothing else in peftopt reads `os.environ`. What peftopt writes there is for a library or a child process
that reads it (each write says which), and the environments of child processes are built here.

    python -m job.settings        # prints the settings this environment gives
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from job.errors import SpecError

# The tokens a job may use: always these two (huggingface_hub reads both), plus every `token_env` a spec names.
HUB_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Array services pass a task's index in one of these (first set wins); `--index` overrides them.
INDEX_VARIABLES = ("AWS_BATCH_JOB_ARRAY_INDEX", "BATCH_TASK_INDEX", "JOB_COMPLETION_INDEX", "CLOUD_RUN_TASK_INDEX")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"one of {', '.join(repr(a) for a in allowed)}")
        return value
    return parse


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"an integer >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"an integer >= {minimum}")
        return value
    return parse


def _float(minimum: float, strictly: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"a number {'>' if strictly else '>='} {minimum:g}") from None
        if value < minimum or (strictly and value == minimum) or value != value:
            raise ValueError(f"a number {'>' if strictly else '>='} {minimum:g}")
        return value
    return parse


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("1 or 0 (true/false, on/off)")


def _nproc(text: str) -> str:
    value = text.strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise ValueError("a positive number or 'auto'")
    return value


def _workers(text: str) -> str:
    value = text.strip().lower()
    if value != "auto" and not value.isdigit():
        raise ValueError("a number >= 0 or 'auto'")
    return value


def _text(text: str) -> str:
    return text


def _rendezvous_fd(text: str) -> int:
    value = int(text.strip()) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < -1:
        raise ValueError("a file descriptor, or -1")
    return value


def _index(text: str) -> int:
    return _int(0)(text)


@dataclass(frozen=True)
class Variable:
    name: str
    attribute: str
    default: str | None  # as the README shows it; None: unset
    parse: Callable[[str], Any]
    doc: str
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("PEFTOPT_LOG_FORMAT", "log_format", None, _choice("json", "console"),
             "stdout rendering: json, or console; unset: JSON unless stdout is a TTY"),
    Variable("PEFTOPT_LOG_LEVEL", "log_level", "INFO", _choice("debug", "info", "warning", "error"),
             "the least severe event written"),
    Variable("PEFTOPT_NPROC", "nproc", "1", _nproc, "default of `run --nproc`: ranks to train on, or auto"),
    Variable("PEFTOPT_LIGER", "liger", "1", _switch, "0 keeps Liger's kernels off in the hf backend"),
    Variable("PEFTOPT_FUSED_LORA", "fused_lora", "1", _switch,
             "0 keeps peft's own LoRA layers in the hf backend on CUDA (1: each plain LoRA layer as one autograd "
             "function, its sums inside the GEMMs)"),
    Variable("PEFTOPT_DEQUANTIZE_BASE", "dequantize_base", "1", _switch,
             "0 keeps a 4-bit base in 4-bit while training even where the planner has memory to dequantize it once"),
    Variable("PEFTOPT_BATCH_WORKERS", "batch_workers", "auto", _workers,
             "processes that collate training batches ahead of the GPU (auto: 1 on CUDA, 0 on CPU; 0: in the "
             "training process)"),
    Variable("PEFTOPT_KERNELS_AHEAD", "kernels_ahead", "auto", _choice("auto", "0", "1"),
             "auto: when unsloth, or hf for supervised fine-tuning, trains on one GPU with room for a second copy of "
             "the model, a child process compiles the step's Triton kernels into a cache made for the job while the "
             "job imports, prepares and loads (the first step then finds them); 0: the first step compiles them"),
    Variable("TRITON_CACHE_DIR", "triton_cache_dir", None, _text,
             "where Triton keeps the kernels it compiles (unset: a directory made for each job that compiles "
             "its kernels ahead, removed when it ends; else Triton's own ~/.triton/cache)"),
    Variable("PEFTOPT_PREPARE_AHEAD", "prepare_ahead", "auto", _choice("auto", "0", "1"),
             "1: the prepare stage runs in a child process of its own while the job imports its training backend "
             "(unsloth: 10-15 s); auto: on a GPU; 0: in the job's process, in turn"),
    Variable("PEFTOPT_SAMPLER", "sampler", "generate", _choice("generate", "continuous"),
             "how grpo samples its answers on a GPU: generate (transformers' generate, padded batches) or continuous "
             "(transformers' continuous batching, paged attention); on the CPU always generate"),
    Variable("PEFTOPT_GGUF_GPU", "gguf_gpu", "1", _switch,
             "0 answers the evaluation suite with each GGUF on the CPU even when the job has a GPU and the llama.cpp "
             "prefix has its CUDA build (bin/peftopt-generate-cuda)"),
    Variable("PEFTOPT_HARNESS_DIR", "harness_dir", None, _text,
             "where lm-evaluation-harness is installed apart from the job's packages (unset: /opt/harness when "
             "it exists, as in the image; else the job's own environment)"),
    Variable("PEFTOPT_RANK_WAIT_S", "rank_wait_s", "21600", _float(1),
             "how long a waiting rank trusts rank 0 to send its next order"),
    Variable("PEFTOPT_HUB_RETRIES", "hub_retries", "5", _int(1), "tries of each Hub call"),
    Variable("PEFTOPT_HUB_BACKOFF_S", "hub_backoff_s", "2", _float(0), "first wait between Hub tries (doubles)"),
    Variable("PEFTOPT_PEAK_TFLOPS", "peak_tflops", None, _float(0, strictly=True),
             "the GPU's peak bf16 TFLOP/s for bench's MFU (unset: looked up by GPU name)"),
    Variable("PEFTOPT_BASE_CACHE", "base_cache", None, _text,
             "where bases built from a GGUF or a model package are kept for every run on this machine, checked by "
             "digest (unset: <HF_HOME>/peftopt-bases; off: each run builds its own)"),
    Variable("LLAMA_CPP_DIR", "llama_cpp_dir", None, _text,
             "the pinned llama.cpp prefix (unset: /opt/llama.cpp, ~/.cache/peftopt/llama.cpp)"),
    Variable("HF_ENDPOINT", "hf_endpoint", None, _text, "the Hub's address (unset: https://huggingface.co)"),
    Variable("HF_HOME", "hf_home", None, _text, "Hugging Face cache (unset: ~/.cache/huggingface)"),
    Variable("HF_HUB_OFFLINE", "hf_hub_offline", "0", _switch, "1: no Hub calls (a Hub model must be cached)"),
    Variable("HF_TOKEN", "hf_token", None, _text, "the Hub token (masked everywhere; push/sync name their own)",
             secret=True),
    Variable("HUGGING_FACE_HUB_TOKEN", "hugging_face_hub_token", None, _text,
             "huggingface_hub's older name for the token (masked everywhere)", secret=True),
    Variable("RANK", "rank", "0", _int(0), "set by the launcher: this process's rank"),
    Variable("WORLD_SIZE", "world_size", "1", _int(1), "set by the launcher: how many ranks"),
    Variable("LOCAL_RANK", "local_rank", "0", _int(0), "set by the launcher: the rank on this machine"),
    Variable("LOCAL_WORLD_SIZE", "local_world_size", None, _int(1),
             "set by the launcher: how many ranks on this machine (all of them: nothing is sent between ranks)"),
    Variable("MASTER_ADDR", "master_addr", None, _text, "set by the launcher: rank 0's rendezvous address"),
    Variable("MASTER_PORT", "master_port", None, _int(1), "set by the launcher: rank 0's rendezvous port"),
    Variable("PEFTOPT_RENDEZVOUS_FD", "rendezvous_fd", None, _rendezvous_fd,
             "set by `--nproc`'s launcher: rank 0's listening socket on loopback (its other ranks: -1)"),
    Variable("PEFTOPT_RENDEZVOUS_PORT", "rendezvous_port", "29500", _int(1),
             "several nodes: the port the main node's rendezvous listens on, when the service names none"),
    Variable("AWS_BATCH_JOB_NUM_NODES", "aws_batch_job_num_nodes", None, _int(1),
             "AWS Batch multi-node parallel job: how many nodes"),
    Variable("AWS_BATCH_JOB_NODE_INDEX", "aws_batch_job_node_index", None, _int(0), "AWS Batch multi-node: this node"),
    Variable("AWS_BATCH_JOB_MAIN_NODE_INDEX", "aws_batch_job_main_node_index", None, _int(0),
             "AWS Batch multi-node: the main node (its rank 0 serves the rendezvous)"),
    Variable("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS", "aws_batch_job_main_node_private_ipv4_address", None,
             _text, "AWS Batch multi-node, on the other nodes: the main node's private address"),
    Variable("PET_NNODES", "pet_nnodes", None, _int(1), "Kubernetes (Kubeflow Trainer, JobSet): how many nodes"),
    Variable("PET_NODE_RANK", "pet_node_rank", None, _int(0), "Kubernetes (Kubeflow Trainer, JobSet): this node"),
    Variable("PET_MASTER_ADDR", "pet_master_addr", None, _text, "Kubernetes (Kubeflow Trainer, JobSet): node 0's address"),
    Variable("PET_MASTER_PORT", "pet_master_port", None, _int(1), "Kubernetes (Kubeflow Trainer, JobSet): its port"),
    Variable("BATCH_HOSTS_FILE", "batch_hosts_file", None, _text,
             "GCP Batch with requireHostsFile: the tasks' hosts, task 0's first (several nodes)"),
    Variable("BATCH_TASK_COUNT", "batch_task_count", None, _int(1), "GCP Batch: how many tasks (nodes, with a hosts file)"),
    Variable("CUDA_VISIBLE_DEVICES", "cuda_visible_devices", None, _text, "the GPUs this process may use"),
    Variable("UNSLOTH_TORCH_VARLEN", "unsloth_torch_varlen", "1", _switch,
             "0: unsloth's per-segment sdpa for packed rows instead of the varlen kernel"),
    Variable("UNSLOTH_BLOCK_COMPILE", "unsloth_block_compile", "0", _switch,
             "1: unsloth compiles every decoder layer (off by default: no steady gain, 8.6 s per start)"),
    Variable("PYTORCH_CUDA_ALLOC_CONF", "pytorch_cuda_alloc_conf", None, _text,
             "torch's allocator settings, older name (either unset: peftopt sets expandable_segments:True)"),
    Variable("PYTORCH_ALLOC_CONF", "pytorch_alloc_conf", None, _text, "torch's allocator settings"),
    Variable("MLFLOW_TRACKING_URI", "mlflow_tracking_uri", None, _text,
             "train.report_to mlflow: where runs go (unset: <run dir>/tracking/mlruns)"),
    Variable("MLFLOW_EXPERIMENT_NAME", "mlflow_experiment_name", "peftopt", _text, "train.report_to mlflow: the experiment"),
    Variable("WANDB_DIR", "wandb_dir", None, _text, "train.report_to wandb: where runs go (unset: <run dir>/tracking)"),
    Variable("WANDB_PROJECT", "wandb_project", "peftopt", _text, "train.report_to wandb: the project"),
    Variable("TENSORBOARD_LOGGING_DIR", "tensorboard_logging_dir", None, _text,
             "train.report_to tensorboard: where event files go (unset: <run dir>/tracking/tensorboard)"),
    *(Variable(name, name.lower(), None, _index, "the array task's index (sweeps)") for name in INDEX_VARIABLES),
)
_BY_NAME = {v.name: v for v in VARIABLES}


@dataclass(frozen=True)
class Settings:
    log_format: str | None = None
    log_level: str = "info"
    nproc: str = "1"
    liger: bool = True
    fused_lora: bool = True
    dequantize_base: bool = True
    batch_workers: str = "auto"
    prepare_ahead: str = "auto"
    kernels_ahead: str = "auto"
    triton_cache_dir: str | None = None
    sampler: str = "generate"
    gguf_gpu: bool = True
    harness_dir: str | None = None
    rank_wait_s: float = 21600.0
    hub_retries: int = 5
    hub_backoff_s: float = 2.0
    peak_tflops: float | None = None
    base_cache: str | None = None
    rendezvous_port: int = 29500
    aws_batch_job_num_nodes: int | None = None
    aws_batch_job_node_index: int | None = None
    aws_batch_job_main_node_index: int | None = None
    aws_batch_job_main_node_private_ipv4_address: str | None = None
    pet_nnodes: int | None = None
    pet_node_rank: int | None = None
    pet_master_addr: str | None = None
    pet_master_port: int | None = None
    batch_hosts_file: str | None = None
    batch_task_count: int | None = None
    llama_cpp_dir: str | None = None
    hf_endpoint: str | None = None
    hf_home: str | None = None
    hf_hub_offline: bool = False
    hf_token: str | None = field(default=None, repr=False)
    hugging_face_hub_token: str | None = field(default=None, repr=False)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rendezvous_fd: int | None = None
    cuda_visible_devices: str | None = None
    unsloth_torch_varlen: bool = True
    unsloth_block_compile: bool = False
    pytorch_cuda_alloc_conf: str | None = None
    pytorch_alloc_conf: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str = "peftopt"
    wandb_dir: str | None = None
    wandb_project: str = "peftopt"
    tensorboard_logging_dir: str | None = None
    aws_batch_job_array_index: int | None = None
    batch_task_index: int | None = None
    job_completion_index: int | None = None
    cloud_run_task_index: int | None = None
    # The environment as read, for the variables a spec names (`token_env`) and for child processes.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def secret(self, name: str) -> str | None:
        """The value of a token variable (a spec's `token_env`), stripped of the surrounding whitespace a
        secret mounted from a file carries (a trailing newline)."""
        value = self.environ.get(name)
        return value.strip() if value is not None and value.strip() else None

    def secrets(self, names=()) -> list[str]:
        """Every secret value a job may hold: the Hub token variables and `names`, raw and stripped."""
        found = []
        for name in (*HUB_TOKEN_VARIABLES, *names):
            raw = self.environ.get(name)
            if raw:
                found += [raw, raw.strip()]
        return [value for value in dict.fromkeys(found) if len(value) >= 4]

    def array_index(self) -> tuple[str, int] | None:
        """(variable, index) of the first array-index variable that is set. With a hosts file, GCP Batch's task
        index is a node's (job/nodes.py), not a sweep variant's."""
        for name in INDEX_VARIABLES:
            if name == "BATCH_TASK_INDEX" and self.batch_hosts_file:
                continue
            value = getattr(self, name.lower())
            if value is not None:
                return name, value
        return None

    def home_cache(self) -> Path:
        return Path(self.hf_home) if self.hf_home else Path.home() / ".cache" / "huggingface"

    def batch_workers_on(self, device: str) -> int:
        """Processes collating training batches ahead of the step: on CUDA one keeps the next batch ready while
        the GPU works (collating in the loop left the GPU idle for it at every step); on CPU the cores train."""
        if self.batch_workers == "auto":
            return 1 if device == "cuda" else 0
        return int(self.batch_workers)

    def harness_path(self) -> str | None:
        """The directory the harness's child process adds to its path (None: the job's environment has it)."""
        if self.harness_dir is not None:
            return self.harness_dir or None
        return "/opt/harness" if os.path.isdir("/opt/harness") else None

    def harness_env(self) -> dict[str, str]:
        """The environment of lm-evaluation-harness's child process: the job's, with the harness's directory first
        on its path."""
        path = self.harness_path()
        paths = [p for p in (path, os.environ.get("PYTHONPATH", "")) if p]
        return self.child_env(**({"PYTHONPATH": os.pathsep.join(paths)} if path else {}), TOKENIZERS_PARALLELISM="false")

    def described(self) -> dict[str, Any]:
        """What `job_started` logs: every variable that is set, secrets as 'set'."""
        out: dict[str, Any] = {}
        for variable in VARIABLES:
            if variable.name in self.environ:
                out[variable.name] = "set" if variable.secret else getattr(self, variable.attribute)
        return out

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process that runs peftopt itself (a rank): the whole environment as
        it is now, so what peftopt set for its libraries (allocator settings) reaches the child too."""
        return {**os.environ, **extra}  # a child peftopt needs the job's whole environment, tokens included

    def tool_env(self, **extra: str) -> dict[str, str]:
        """The environment for a tool that must not see the job's secrets (llama.cpp's converter and tools,
        code checks): the locale and the program search path only, offline, no token of any kind."""
        keep = {name: os.environ[name] for name in ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ") if name in os.environ}
        return {**keep, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def load(environ: Mapping[str, str]) -> Settings:
    """Settings from `environ`.

    Raises:
        SpecError: a variable holds a value peftopt cannot use (every such variable named at once).
    """
    values: dict[str, Any] = {}
    problems = []
    for variable in VARIABLES:
        raw = environ.get(variable.name)
        if raw is None or (raw.strip() == "" and not variable.secret):
            continue
        if variable.secret:
            values[variable.attribute] = raw
            continue
        try:
            values[variable.attribute] = variable.parse(raw)
        except ValueError as exc:
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            problems.append(f"{variable.name}={shown!r}: expected {exc}")
    if problems:
        raise SpecError(problems[0] if len(problems) == 1 else f"{len(problems)} environment variables are invalid",
                        details=problems if len(problems) > 1 else None)
    return Settings(**values, environ=dict(environ))


_current: Settings | None = None


def init(environ: Mapping[str, str] | None = None) -> Settings:
    """Reads the settings (the CLI does this once, first). Raises SpecError for a bad value."""
    global _current
    _current = load(os.environ if environ is None else environ)  # the one read of the process environment
    return _current


def get() -> Settings:
    """The settings the process started with (read now if nothing read them yet: library use, tests)."""
    return _current if _current is not None else init()


def valid_variable_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name))


def documented_defaults() -> dict[str, str | None]:
    return {v.name: v.default for v in VARIABLES}


def _fields() -> set[str]:
    return {f.name for f in fields(Settings)} - {"environ"}


assert {v.attribute for v in VARIABLES} == _fields(), "every variable has a Settings field and back"


if __name__ == "__main__":
    for key, value in get().described().items():
        print(f"{key}={value}")
