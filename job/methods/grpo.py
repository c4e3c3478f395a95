"""Group Relative Policy Optimization: trl's GRPOTrainer on tasks (prompts with the checks a right answer passes),
rewarded by those checks. For each prompt it samples `num_generations` answers, scores each with the prompt's own
`assert` checks (the share that pass) and the checks `train.rewards` adds for every prompt, and moves the adapter
toward the answers that scored above their group's mean. With LoRA, the KL reference (beta > 0) is the base with the
adapter off. A batch counts answers: per_device_batch_size x gradient_accumulation_steps answers per step, that is
that many / num_generations prompts."""
from typing import Any

from pydantic import Field

from job.methods import Method

REWARDS_DOC = ("grpo: checks every answer is scored by besides its prompt's own `assert` checks, each "
               "{\"type\": ..., \"value\"?: ..., \"weight\"?: 1.0} with any declared check type (`peftopt checks`); a "
               "check without a value takes the prompt's `reference`; the `python` check runs in the sandbox.")


def _problems(train) -> list[str]:
    found = []
    group = METHOD.value(train, "num_generations")
    answers = train.per_device_batch_size * train.gradient_accumulation_steps
    if answers % group:
        found.append(f"train.num_generations: per_device_batch_size x gradient_accumulation_steps = {answers} answers "
                     f"per step is not a whole number of groups of {group}; make it a multiple of {group}")
    return found


def _config(train) -> dict[str, Any]:
    weights = [1.0] + [float(r.get("weight", 1.0)) for r in METHOD.value(train, "rewards")]
    return {"num_generations": METHOD.value(train, "num_generations"),
            "max_completion_length": METHOD.value(train, "max_completion_length"),
            "temperature": METHOD.value(train, "temperature"), "beta": METHOD.value(train, "beta"),
            "reward_weights": weights}


METHOD = Method(
    name="grpo",
    doc="tasks: answers it samples, rewarded by the checks a right answer passes",
    family="task",
    trainer="trl:GRPOTrainer:GRPOConfig",
    # trl's GRPOConfig defaults (beta 0: no KL term, no reference pass), a 256-token answer
    fields={"beta": 0.0, "num_generations": 8, "max_completion_length": 256, "temperature": 1.0, "rewards": []},
    options={
        "num_generations": (int | None, Field(None, ge=2, le=256, description="grpo: answers sampled per prompt "
                                              "(a group); default 8.")),
        "max_completion_length": (int | None, Field(None, ge=1, le=131072, description="grpo: the longest answer "
                                                    "sampled, in tokens; default 256.")),
        "temperature": (float | None, Field(None, gt=0, le=10, description="grpo: sampling temperature; "
                                            "default 1.0.")),
        "rewards": (list[dict[str, Any]] | None, Field(None, max_length=32, description=REWARDS_DOC)),
    },
    config=_config,
    length_field=None,
    rewarded=True,
    check_lists=("rewards",),
    problems=_problems,
    scores="none",
)
