"""Integration: a Hub base model's cached snapshot is used only when it is whole. The machine check fetches a
base's config.json alone, and a download killed midway leaves the files it finished: either left a snapshot folder
that the next attempt took as the model (the tokenizer or weights missing, on every retry). Driven through the real
huggingface_hub client against the Hub stand-in."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_standin import HubStandIn

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_CanaryModelsToken0123456789abcdef"

SNIPPET = """
import json, sys
from huggingface_hub import hf_hub_download
from job import hub
for name in sys.argv[1:]:  # what an earlier, cut-short attempt left in the cache
    hf_hub_download("me/tiny", name)
folder = hub.model_snapshot("me/tiny")
import os
print(json.dumps(sorted(os.listdir(folder))))
"""


@pytest.mark.parametrize("left_behind", [["config.json"], ["config.json", "tokenizer.json"],
                                         ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                          "tokenizer.json"]],
                         ids=["the config alone", "no weights", "one of two shards"])
def test_a_partial_snapshot_is_completed_instead_of_used(tmp_path, tiny_model, left_behind):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    model.mkdir()
    for path in Path(tiny_model).iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    if "model.safetensors.index.json" in left_behind:  # the same weights in two shards
        weights = load_file(str(model / "model.safetensors"))
        (model / "model.safetensors").unlink()
        names = sorted(weights)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for shard, keys in halves.items():
            save_file({k: weights[k] for k in keys}, str(model / shard), metadata={"format": "pt"})
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    with HubStandIn(TOKEN) as hub:
        hub.add_repo("me/tiny", model)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
               "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1", "PEFTOPT_HUB_BACKOFF_S": "0.01"}
        done = subprocess.run([sys.executable, "-c", SNIPPET, *left_behind], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    files = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    want = {p.name for p in model.glob("*.safetensors")}
    assert want and want <= files
