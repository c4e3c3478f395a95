"""Integration: one job over two "nodes" on this machine that share no path: two `peftopt run` launchers with one
rank each, given the variables Kubernetes' torch runtime sets (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT), one rendezvous served by the main node on the main address. Each node keeps its own run
directory (`--output-dir`) and its own Hub cache; the base comes from a Hub stand-in, and checkpoints are synced
to it (train.checkpoint_sync).

Covered: both nodes train together and exit 0, the main node alone speaks; node 1 trains on the data rank 0
prepared (sent to it: the same bytes) and writes no checkpoint of its own, while rank 0's checkpoints hold both
ranks' RNG states; a SIGTERM on node 1 alone stops every rank at one step, saved, and both nodes exit 75; a node
killed mid-run (its launcher and its rank, as a lost machine) ends the other with exit 75
(another rank was lost); then both machines are replaced (both run directories and caches gone) and the rerun
resumes from the newest checkpoint on the Hub, restored by rank 0 and sent to node 1, to the adapter of the
uninterrupted run.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_standin import HubStandIn
from test_distributed import ROOT, adapter, assert_same, events

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKEN = "hf_CanaryNodesToken0123456789abcdef"
TRAIN = {"backend": "hf", "max_steps": 12, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
         "save_steps": 2, "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0,
         "optim": "adamw_torch", "seed": 0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def hub(tiny_model):
    with HubStandIn(TOKEN) as standin:
        standin.add_repo("me/tiny", tiny_model)
        yield standin


def start_nodes(spec: Path, port: int, machines: Path, hub: HubStandIn) -> list[subprocess.Popen]:
    """Node 1 first: it waits for the main node's rendezvous. Node K's run directory and Hub cache are under
    machines/nodeK, and nowhere else."""
    import torch

    gpus = torch.cuda.device_count()
    procs = {}
    for rank in (1, 0):
        node = machines / f"node{rank}"
        # on a machine with two GPUs, one each (NCCL); otherwise CPU ranks (gloo), never two ranks on one GPU
        device = {"CUDA_VISIBLE_DEVICES": str(rank) if gpus >= 2 else ""}
        env = {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1", "PET_NNODES": "2",
               "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
               "PEFTOPT_TEST_TOKEN": TOKEN, "HF_TOKEN": "", "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "PEFTOPT_HUB_BACKOFF_S": "0.01", "HF_HOME": str(node / "hf-home"),
               **device}
        procs[rank] = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec), "--stages", "prepare,train",
                                        "--output-dir", str(node / "runs")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                                       start_new_session=True)
    return [procs[0], procs[1]]


@pytest.fixture(scope="module")
def spec_of(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("nodes")

    def write(name: str) -> Path:
        path = out / f"{name}.json"
        sync = {"repo": f"me/{name}-checkpoints", "token_env": "PEFTOPT_TEST_TOKEN"}
        path.write_text(json.dumps({
            "name": name, "output_dir": str(out / "unused"),
            "model": {"base": "me/tiny", "max_seq_length": 128, "chat_template": "llama-3"},
            "data": {"source": str(tiny_data)}, "lora": {"r": 8, "alpha": 16},
            "train": {**TRAIN, "checkpoint_sync": sync}}))
        return path

    return out, write


def test_two_nodes_without_a_shared_path_train_together_and_a_lost_node_resumes_from_the_hub(spec_of, hub):
    out, write = spec_of
    machines = out / "whole"
    whole = start_nodes(write("whole"), free_port(), machines, hub)
    outputs = [proc.communicate(timeout=600) for proc in whole]
    assert [proc.returncode for proc in whole] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    main_log = events(outputs[0][0])
    started = next(e for e in main_log if e["event"] == "train_started")
    assert started["ranks"] == 2
    assert [e["step"] for e in main_log if e["event"] == "train_progress"] == list(range(1, 13))
    assert not any(line.startswith("{") and '"event": "job_started"' in line for line in outputs[1][0].splitlines())
    main_dir, node1_dir = machines / "node0" / "runs" / "whole", machines / "node1" / "runs" / "whole"
    assert (node1_dir / "data" / "train.jsonl").read_bytes() == (main_dir / "data" / "train.jsonl").read_bytes()
    assert not (node1_dir / "adapter").exists() and not list(node1_dir.glob("checkpoints/checkpoint-*"))
    newest = sorted(main_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in newest.iterdir()}
    assert not (out / "unused").exists()  # every path the job wrote was a node's own

    # A SIGTERM on node 1 alone (the service stopping that machine): every rank stops at the same step, rank 0
    # saves it, and both nodes exit 75.
    machines = out / "term"
    procs = start_nodes(write("term"), free_port(), machines, hub)
    term_dir = machines / "node0" / "runs" / "term"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and procs[0].poll() is None and \
            not (term_dir / "checkpoints" / "checkpoint-2" / "peftopt-checkpoint.json").exists():
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [75, 75], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    # before: rank 0, never signalled itself, took the vote's stop for the end of training and finished the job
    # (exit 0) with the adapter of 4 of 12 steps
    log = events(outputs[0][0])
    last = max(e["step"] for e in log if e["event"] == "train_progress")
    assert last < 12 and max(e["step"] for e in log if e["event"] == "checkpoint_saved") == last
    assert json.loads((term_dir / "state.json").read_text())["stages"]["train"]["status"] == "interrupted"
    assert any(e["event"] == "stop_requested" and e.get("by") == "another rank" for e in log)

    cut = write("cut")
    machines = out / "cut"
    procs = start_nodes(cut, free_port(), machines, hub)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and procs[0].poll() is None and \
            not any(n.endswith("/checkpoint-4/peftopt-checkpoint.json") for n in hub.files.get("me/cut-checkpoints", {})):
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)  # node 1 lost: its launcher and its rank
    stdout, stderr = procs[0].communicate(timeout=300)
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == 75, stderr[-3000:]
    assert "another rank" in stderr or any(e["event"] == "rank_lost" for e in events(stdout) if "event" in e)

    shutil.rmtree(machines)  # both machines replaced: nothing of the first attempt is left on either
    again = start_nodes(cut, free_port(), machines, hub)
    outputs = [proc.communicate(timeout=600) for proc in again]
    assert [proc.returncode for proc in again] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    log = events(outputs[0][0])
    resumed = [e["step"] for e in log if e["event"] == "train_resumed"]
    assert len(resumed) == 1 and resumed[0] >= 4
    assert any(e["event"] == "checkpoint_restored" for e in log), [e["event"] for e in log]
    assert_same(adapter(machines / "node0" / "runs" / "cut"), adapter(out / "whole" / "node0" / "runs" / "whole"))
    assert TOKEN not in outputs[0][0] + outputs[0][1] + outputs[1][0] + outputs[1][1]
