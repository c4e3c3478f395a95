"""Direct Preference Optimization: trl's DPOTrainer on preference pairs. With LoRA the reference is the base with the
adapter off (trl's peft path: no second model in memory), or its log-probs computed once before training."""
from job.methods import Method

METHOD = Method(
    name="dpo",
    doc="preference pairs: chosen against rejected, against the base as reference",
    family="pair",
    trainer="trl:DPOTrainer:DPOConfig",
    fields={"beta": 0.1, "dpo_loss": "sigmoid", "precompute_reference": False},  # trl's DPOConfig defaults
    config=lambda train: {"beta": METHOD.value(train, "beta"), "loss_type": [METHOD.value(train, "dpo_loss")],
                          "precompute_ref_log_probs": METHOD.value(train, "precompute_reference")},
    sequences_per_example=2,
    reference_per_step=lambda train: not METHOD.value(train, "precompute_reference"),
    scores="preferences",
)
