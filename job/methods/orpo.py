"""Odds Ratio Preference Optimization: trl's ORPOTrainer on preference pairs; no reference model."""
from job.methods import Method

METHOD = Method(
    name="orpo",
    doc="preference pairs: an odds-ratio term on the SFT loss, no reference",
    family="pair",
    trainer="trl.experimental.orpo:ORPOTrainer:ORPOConfig",
    fields={"beta": 0.1},  # ORPOConfig's lambda
    config=lambda train: {"beta": METHOD.value(train, "beta")},
    sequences_per_example=2,
    scores="preferences",
)
