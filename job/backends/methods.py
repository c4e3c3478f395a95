"""Each training method as trl runs it: the trainer and config classes, and the config fields the spec sets for it.

    sft    trl.SFTTrainer                      packing, loss on the assistant's tokens
    dpo    trl.DPOTrainer                      beta, loss_type (sigmoid, ipo, hinge)
    orpo   trl.experimental.orpo.ORPOTrainer   beta (the odds-ratio weight, lambda)
    simpo  trl.experimental.cpo.CPOTrainer     loss_type simpo, cpo_alpha 0, beta, simpo_gamma
    kto    trl.KTOTrainer                      beta, desirable / undesirable weights

With LoRA the reference of dpo and kto is the base with the adapter switched off (trl's peft path: no second
model in memory), or its log-probs computed once before training (`train.precompute_reference`); orpo and
simpo need no reference. Each trainer tokenizes the conversational rows prepare wrote with the spec's chat
template; only the answers' tokens count.
"""
from __future__ import annotations

from typing import Any

from job.spec import JobSpec


def classes(method: str) -> tuple[type, type]:
    """(config class, trainer class) of `method`."""
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer
    raise ValueError(f"unknown method {method!r}")


def settings(spec: JobSpec) -> dict[str, Any]:
    """The config fields that belong to the spec's method (the rest are the Trainer's own, shared by all)."""
    train = spec.train
    method = train.method
    if method == "sft":
        return {"packing": train.packing, "dataset_num_proc": None}
    out: dict[str, Any] = {"beta": train.beta_value()}
    if method == "dpo":
        out.update(loss_type=[train.dpo_loss or "sigmoid"], precompute_ref_log_probs=bool(train.precompute_reference))
    elif method == "kto":
        out.update(desirable_weight=train.kto_desirable_weight or 1.0,
                   undesirable_weight=train.kto_undesirable_weight or 1.0,
                   precompute_ref_log_probs=bool(train.precompute_reference))
    elif method == "simpo":
        out.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5 if train.simpo_gamma is None else train.simpo_gamma)
    return out


def sequences_per_example(method: str) -> int:
    """How many sequences one training example puts through the model: a pair is two (chosen and rejected)."""
    return 2 if method in ("dpo", "orpo", "simpo") else 1
