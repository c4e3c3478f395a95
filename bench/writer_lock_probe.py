"""How much a checkpoint write slows the training loop through the interpreter lock, on any machine (CPU is enough):
the checkpoint writer thread writes t1-sized checkpoints (the LoRA adapter of a 16-layer Llama-3.2-1B shape, r=16 on
seven projections, and its 8-bit Adam state: 224 tensors, 1,344 state tensors) while the main thread runs tiny torch
ops, as the loop launches kernels; the loop's lost time is its ops' time beside the writer less their time alone.

    python3 bench/writer_lock_probe.py [SAVES]

prints, for the checkpoint's two files written tensor by tensor (the adapter's tensors one write each, torch.save
pickling each of the optimizer's: bench/patched_run.py's tensor-writes) and written from the packs whole (the job's:
checkpoints.write_safetensors and save_state), the writer's seconds and the loop's lost seconds a save (medians),
alternating the two.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.patched_run import tensor_by_tensor_writes  # noqa: E402
from job import checkpoints  # noqa: E402
from job.checkpoints import AsyncCheckpointWriter, HostSnapshot  # noqa: E402

SHAPES = {"q": (2048, 2048), "k": (2048, 512), "v": (2048, 512), "o": (2048, 2048), "gate": (2048, 8192),
          "up": (2048, 8192), "down": (8192, 2048)}


def t1_state() -> tuple[dict, dict]:
    adapter, state = {}, {}
    qmap = torch.rand(256)
    for layer in range(16):
        for name, (fan_in, fan_out) in SHAPES.items():
            for suffix, shape in (("lora_A", (16, fan_in)), ("lora_B", (fan_out, 16))):
                adapter[f"layers.{layer}.{name}.{suffix}.weight"] = torch.randn(shape)
                blocks = (shape[0] * shape[1] + 255) // 256
                state[len(state)] = {"step": 10, "state1": torch.randint(0, 255, shape, dtype=torch.uint8),
                                     "state2": torch.randint(0, 255, shape, dtype=torch.uint8), "qmap1": qmap,
                                     "qmap2": qmap, "absmax1": torch.rand(blocks), "absmax2": torch.rand(blocks)}
    return adapter, {"state": state, "param_groups": [{"lr": 1e-4, "params": list(state)}]}


class _Config:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "adapter_config.json").write_text("{}")


class _Writer(AsyncCheckpointWriter):
    def __init__(self):  # the writer's `_write` alone, without a Trainer
        self.fingerprint, self.on_written, self.error, self.write_s = None, None, None, 0.0


def ops(count: int) -> float:
    value = torch.zeros(4)
    started = time.perf_counter()
    for _ in range(count):
        value.add_(1)
    return time.perf_counter() - started


def one_save(writer, root: Path, step: int, adapter: dict, optimizer: dict, alone: float) -> dict:
    partial = root / f".checkpoint-{step}.partial"
    partial.mkdir(parents=True)
    snapshot = {"step": step, "tensors": {"adapter": HostSnapshot(adapter), "optimizer": HostSnapshot(optimizer)},
                "adapter_config": {"default": _Config()}, "scheduler": {"last_epoch": step}, "rng": None,
                "trainer_state": {"global_step": step, "log_history": [{"loss": 1.0, "step": i} for i in range(step)]},
                "dir": root, "partial": partial, "keep": 2}
    thread = threading.Thread(target=writer._write, args=(snapshot,))
    started = time.perf_counter()
    thread.start()
    done, spent = 0, 0.0
    while thread.is_alive():
        spent += ops(1000)
        done += 1000
    thread.join()
    if writer.error is not None:
        raise writer.error
    return {"write_s": time.perf_counter() - started, "loop_lost_s": spent - done * alone}


def main() -> None:
    import logging

    logging.disable(logging.INFO)
    saves = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    adapter, optimizer = t1_state()
    alone = min(ops(20000) for _ in range(5)) / 20000
    root = Path(tempfile.mkdtemp(prefix="peftopt-lock-probe-"))
    writer = _Writer()
    packed = checkpoints.write_safetensors, checkpoints.save_state
    tensor_by_tensor_writes()
    by_tensor = checkpoints.write_safetensors, checkpoints.save_state
    figures: dict = {"tensor by tensor": [], "packs whole": []}
    try:
        for step in range(1, 2 * saves + 1):
            way = "packs whole" if step % 2 == 0 else "tensor by tensor"
            checkpoints.write_safetensors, checkpoints.save_state = packed if step % 2 == 0 else by_tensor
            figures[way].append(one_save(writer, root, step, adapter, optimizer, alone))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"cpu": os.cpu_count(), "saves_each": saves, **{
        name: {key: round(statistics.median(save[key] for save in rows), 3) for key in ("write_s", "loop_lost_s")}
        for name, rows in figures.items()}}))


if __name__ == "__main__":
    main()
