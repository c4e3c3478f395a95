"""The network: `peftopt run --nproc N` starts its ranks on one machine; their rendezvous store, gloo's and NCCL's
sockets listen on the loopback address alone (an unauthenticated store reachable on every interface let anyone on
the network join or feed the ranks), and the orders rank 0 sends are JSON, never pickles (README, "Threat model":
the network)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_spec

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.integration


def _descendants(pid: int) -> set[int]:
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
    return found


def _listening(pids: set[int]) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addresses.append(fields[1].split(":")[0])
    return addresses


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1


def test_the_ranks_of_nproc_listen_on_loopback_alone(tmp_path, tiny_model, tiny_data):
    spec = write_tiny_spec(tmp_path, tiny_model, tiny_data, "ranks", train={"max_steps": 30, "save_steps": 50},
                           evaluate=None)
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec), "--nproc", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"})
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not seen:
            time.sleep(0.5)
            ranks = _descendants(proc.pid) - {proc.pid}
            if len(ranks) >= 2:
                seen = _listening(ranks)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert seen, "no listening socket seen while the ranks ran"
    assert set(seen) <= LOOPBACK, seen


def test_orders_between_ranks_are_json_not_pickles(monkeypatch):
    """send() over a one-rank gloo group: the order comes back through plain tensors of its JSON bytes."""
    import torch.distributed as dist

    from job import distributed

    def refuse(*args, **kwargs):
        raise AssertionError("an object collective (a pickle) was used")

    monkeypatch.setattr(dist, "broadcast_object_list", refuse)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "_control", dist.new_group(backend="gloo"))
        order = {"do": "exit", "code": 3, "note": "ü\u2028"}
        assert distributed.send(order) == order
        assert json.loads(json.dumps(order)) == order
    finally:
        dist.destroy_process_group()
