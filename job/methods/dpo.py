"""Direct Preference Optimization: trl's DPOTrainer on preference pairs. With LoRA the reference is the base with the
adapter off (trl's peft path: no second model in memory), or its log-probs computed once before training."""
from typing import Literal

from pydantic import Field

from job.methods import Method

METHOD = Method(
    name="dpo",
    doc="preference pairs: chosen against rejected, against the base as reference",
    family="pair",
    trainer="trl:DPOTrainer:DPOConfig",
    fields={"beta": 0.1, "dpo_loss": "sigmoid", "precompute_reference": False},  # trl's DPOConfig defaults
    options={
        "beta": (float | None, Field(None, gt=0, le=100, description="Preference methods: dpo/kto's KL strength, "
                                     "orpo's odds-ratio weight (lambda), simpo's reward scale; default 0.1 (simpo 2.0).")),
        "dpo_loss": (Literal["sigmoid", "ipo", "hinge"] | None, Field(
            None, description="dpo: the loss (sigmoid is DPO's, ipo IPO's, hinge SLiC's); default sigmoid.")),
        "precompute_reference": (bool | None, Field(
            None, description="dpo, kto: compute the reference log-probs once before training instead of at every "
            "step (the same values; saves a forward pass per step, costs one pass over the data first).")),
    },
    config=lambda train: {"beta": METHOD.value(train, "beta"), "loss_type": [METHOD.value(train, "dpo_loss")],
                          "precompute_ref_log_probs": METHOD.value(train, "precompute_reference")},
    sequences_per_example=2,
    reference_per_step=lambda train: not METHOD.value(train, "precompute_reference"),
    scores="preferences",
)
