"""The training methods: one `Method` declaration per module of this package, read by everything that needs to know
about methods (the spec's fields and their refusals, the data family prepare reads, the trl trainer and config the
backends build, the batch plan's sequences per example, the backend choice, the bench, the evaluation, the card).
Adding a method is one module declaring `METHOD = Method(...)` and one line in REGISTRY, as a stage is
(job/stages/__init__.py). Nothing here imports torch or trl until a trainer is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping

REGISTRY = (
    "sft",
    "dpo",
    "orpo",
    "simpo",
    "kto",
    "grpo",
)


def _no_reference(train) -> bool:
    return False


def _no_problems(train) -> list[str]:
    return []


@dataclass(frozen=True)
class Method:
    name: str
    doc: str  # one line: what it trains on and for what
    family: str  # the rows it trains on (job/shapes.py): "chat", "pair", "unpaired" or "task"
    trainer: str  # trl's trainer and config classes, "module:Trainer:Config"
    # The train.* fields it reads, with their defaults: a field only other methods read is refused for this one,
    # and `value(train, name)` reads the spec's value or this default.
    fields: Mapping[str, Any] = field(default_factory=dict)
    # The train.* fields it introduces, as pydantic field definitions ((type, Field(None, ...)): unset means the
    # default above); job/spec.py adds them to the train section. A field two methods read is introduced by one.
    options: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    config: Callable[[Any], dict] = lambda train: {}  # the trl config's fields of this method, from the train section
    sequences_per_example: int = 1  # sequences one example puts through the model (a pair: two)
    reference_per_step: Callable[[Any], bool] = _no_reference  # a reference forward pass each step (the adapter off)
    backends: tuple[str, ...] = ("hf",)  # the training backends verified with it
    scores: str = "heldout"  # what evaluate scores on held-out rows: "heldout" loss, "preferences" (rewards) or "none"
    # The trl config's field that takes model.max_seq_length (None: the method bounds its sequences otherwise).
    length_field: str | None = "max_length"
    # Trained against rewards: each task's checks and train.rewards (job/evaluation/rewards.py), on completions it
    # samples itself; its progress events and figures carry the rewards (job/backends/trainer.py).
    rewarded: bool = False
    # The train.* fields whose value is a list of declared checks (job/evaluation/checks.py), validated as such.
    check_lists: tuple[str, ...] = ()
    problems: Callable[[Any], list[str]] = _no_problems  # what else about the train section it cannot take

    def classes(self) -> tuple[type, type]:
        """(config class, trainer class): trl is imported here, when a trainer is built."""
        module, trainer, config = self.trainer.split(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, config), getattr(loaded, trainer)

    def value(self, train, name: str) -> Any:
        given = getattr(train, name, None)
        return self.fields[name] if given is None else given


@lru_cache(maxsize=None)
def all_methods() -> tuple[Method, ...]:
    from job import declarations

    return declarations("job.methods", REGISTRY, "METHOD")


def names() -> tuple[str, ...]:
    return REGISTRY


def get(name: str) -> Method:
    return next(method for method in all_methods() if method.name == name)


def owners(field_name: str) -> tuple[str, ...]:
    """The methods that declare train.<field_name>."""
    return tuple(m.name for m in all_methods() if field_name in m.fields)


def method_fields() -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for m in all_methods() for f in m.fields))


def spec_options() -> dict[str, tuple[Any, Any]]:
    """Every method's own train.* field definitions, for the train section (job/spec.py)."""
    out: dict[str, tuple[Any, Any]] = {}
    for method in all_methods():
        for name, definition in method.options.items():
            if name in out:
                raise RuntimeError(f"train.{name} is introduced by two methods; one introduces it, the others read it")
            out[name] = definition
    return out
