import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402

# The Llama-3.2-1B and Llama-3.1-8B shapes, for the batch planner's arithmetic (no weights)
CONFIG_1B = SimpleNamespace(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
CONFIG_8B = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA (run `make test-gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


def run_cli(*args, env: dict | None = None, timeout: float = 900, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m job ARGS` in a fresh process, as a user runs it: JSON events on stdout, the environment of the
    tests plus `env`."""
    return subprocess.run([sys.executable, "-m", "job", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PEFTOPT_LOG_FORMAT": "json", **(env or {})}, timeout=timeout)


def events(stdout: str) -> list[dict]:
    """The JSON events of a run's stdout."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(autouse=True)
def root_logging_as_it_was():
    """A test that configures peftopt's logging in-process (job.log.configure) leaves the root logger a handler on
    that test's captured stdout, which pytest closes after it: a later test's log line on the same worker then
    printed "--- Logging error ---" with a traceback into its stderr. The root logger's handlers and level are put
    back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def settings_from_the_environment():
    """In-process code reads the settings once (job/settings.py): each test starts and ends with the
    environment as it is then, so a test's monkeypatched variables do not leak into the next one."""
    from job import settings

    settings.init()
    yield
    settings.init()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return tiny.write_data(tmp_path_factory.mktemp("data") / "data.jsonl")


def write_tiny_spec(directory: Path, tiny_model, tiny_data, name: str = "tiny", **sections) -> Path:
    """Writes `directory/NAME.json`: a jobspec for the tiny model that trains a few steps on CPU, its runs under
    `directory/runs`. Each keyword replaces a section (None drops it); a dict is merged into the section."""
    spec = {
        "name": name, "output_dir": str(directory / "runs"),
        "model": {"base": str(tiny_model), "max_seq_length": 128, "chat_template": "llama-3"},
        "data": {"source": str(tiny_data)},
        "lora": {"r": 8, "alpha": 16},
        "train": {"backend": "hf", "max_steps": 6, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                  "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0, "optim": "adamw_torch",
                  "save_steps": 2, "seed": 0},
    }
    for key, value in sections.items():
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path = directory / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def make_spec(tmp_path, tiny_model, tiny_data):
    """Writes a jobspec for the tiny model (overrides merged in per section) and returns its path."""

    def make(name="tiny", **sections):
        return write_tiny_spec(tmp_path, tiny_model, tiny_data, name, **sections)

    return make


def documented_events() -> set[str]:
    """The event names job/events.py lists (docs/reference/events.md is generated from it)."""
    from job.events import EVENTS

    return set(EVENTS)


def assert_documented_events(lines) -> None:
    """Every event in these JSON lines has a stable snake_case name from job/events.py."""
    known = documented_events()
    seen = {json.loads(line)["event"] for line in lines if line.strip().startswith("{")}
    assert all(re.fullmatch(r"[a-z]+(_[a-z0-9]+)*", name) for name in seen), seen
    assert seen <= known, sorted(seen - known)
