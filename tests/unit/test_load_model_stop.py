"""Unit: a stop request that the signal handler raises while a model loads is the stop (exit 75), not a model
that cannot be loaded (exit 4): found by a CI run where SIGTERM landed in evaluate's model loading."""
import pytest

from job import modelsrc
from job.errors import ExternalError, Interrupted
from job.specfile import validate_data


def test_a_stop_while_loading_stays_a_stop_and_a_bad_file_stays_exit_4(monkeypatch, tmp_path):
    import transformers

    spec = validate_data({"name": "s", "model": {"base": str(tmp_path), "chat_template": "llama-3"},
                          "data": {"source": "x.jsonl"}, "lora": {}, "train": {"max_steps": 1}})

    def stopped(*args, **kwargs):
        raise Interrupted("stopped by a signal during evaluate; rerun to redo it")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stopped)
    with pytest.raises(Interrupted):
        modelsrc.load_model(str(tmp_path), spec, "cpu")

    def broken(*args, **kwargs):
        raise OSError("no file named model.safetensors")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ExternalError, match="cannot load model"):
        modelsrc.load_model(str(tmp_path), spec, "cpu")
