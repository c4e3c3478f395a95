"""Simple Preference Optimization: trl's CPOTrainer with loss_type simpo and cpo_alpha 0; no reference model."""
from pydantic import Field

from job.methods import Method

METHOD = Method(
    name="simpo",
    doc="preference pairs: length-normalized rewards with a target margin, no reference",
    family="pair",
    trainer="trl.experimental.cpo:CPOTrainer:CPOConfig",
    fields={"beta": 2.0, "simpo_gamma": 0.5},  # CPOConfig's SimPO defaults
    options={"simpo_gamma": (float | None, Field(None, ge=0, le=100,
                                                 description="simpo: the target reward margin; default 0.5."))},
    config=lambda train: {"beta": METHOD.value(train, "beta"), "loss_type": "simpo", "cpo_alpha": 0.0,
                          "simpo_gamma": METHOD.value(train, "simpo_gamma")},
    sequences_per_example=2,
    scores="preferences",
)
