"""A training method is one declaration (job/methods/): a toy method, declared as a module and added to the registry
and nothing else, gets its own spec field (refused for the other methods), reads rows of its family, and trains the
tiny model end to end through the real CLI."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, events

pytestmark = pytest.mark.integration

TOY = '''
import sys, types
from pydantic import Field
import job.methods as registry
from job.methods import Method

toy = types.ModuleType("job.methods.toy")
toy.METHOD = Method(
    name="toy", doc="supervised, rows one at a time (no packing)", family="chat",
    trainer="trl:SFTTrainer:SFTConfig", fields={"toy_packing": False},
    options={"toy_packing": (bool | None, Field(None, description="toy: pack rows"))},
    config=lambda train: {"packing": toy.METHOD.value(train, "toy_packing"), "dataset_num_proc": None},
    backends=("hf",))
sys.modules["job.methods.toy"] = toy
registry.REGISTRY = registry.REGISTRY + ("toy",)   # the one registry line

from job.cli import main
sys.argv = ["peftopt", *sys.argv[1:]]
main()
'''


def peftopt_with_toy(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", TOY, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "PEFTOPT_LOG_FORMAT": "json"}, timeout=900)


def test_a_method_declared_in_one_module_trains_end_to_end(tmp_path, make_spec):
    spec = make_spec("toyrun", train={"method": "toy", "toy_packing": False, "max_steps": 2})
    result = peftopt_with_toy("run", spec, "--stages", "prepare,train")
    assert result.returncode == 0, result.stderr[-3000:]
    started = next(e for e in events(result.stdout) if e["event"] == "train_finished")
    assert started["method"] == "toy"
    metrics = json.loads((tmp_path / "runs" / "toyrun" / "metrics.json").read_text())
    assert metrics["train"]["method"] == "toy" and metrics["train"]["global_step"] == 2

    refused = peftopt_with_toy("validate", make_spec("toyfield", train={"toy_packing": True}))
    assert refused.returncode == 2 and "train.toy_packing: applies to toy, not to method 'sft'" in refused.stderr
