"""train.epochs counts in the train stage's fingerprint only when set: the finished runs of specs written before the
field stay finished on a rerun."""
from job.spec import JobSpec
from job.stages import train

BASE = {"name": "n", "model": {"base": "m/m"}, "lora": {}, "data": {"source": "a.jsonl"}}


def test_epochs_count_only_when_given():
    steps = train.STAGE.inputs(JobSpec.model_validate({**BASE, "train": {"max_steps": 30}}))["fields"]
    epochs = train.STAGE.inputs(JobSpec.model_validate({**BASE, "train": {"epochs": 2}}))["fields"]
    assert "train.epochs" not in steps and steps["train.max_steps"] == 30
    assert epochs["train.epochs"] == 2 and epochs["train.max_steps"] is None
