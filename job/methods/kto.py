"""Kahneman-Tversky Optimization: trl's KTOTrainer on answers labelled desirable or not (a pair gives one of each);
the reference as for DPO."""
from pydantic import Field

from job.methods import Method

METHOD = Method(
    name="kto",
    doc="unpaired answers labelled desirable or not, against the base as reference",
    family="unpaired",
    trainer="trl:KTOTrainer:KTOConfig",
    fields={"beta": 0.1, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0, "precompute_reference": False},
    options={
        "kto_desirable_weight": (float | None, Field(None, gt=0, le=100, description="kto: weight of desirable "
                                                     "answers.")),
        "kto_undesirable_weight": (float | None, Field(None, gt=0, le=100, description="kto: weight of undesirable "
                                                       "answers.")),
    },
    config=lambda train: {"beta": METHOD.value(train, "beta"),
                          "desirable_weight": METHOD.value(train, "kto_desirable_weight"),
                          "undesirable_weight": METHOD.value(train, "kto_undesirable_weight"),
                          "precompute_ref_log_probs": METHOD.value(train, "precompute_reference")},
    reference_per_step=lambda train: not METHOD.value(train, "precompute_reference"),
    scores="preferences",
)
