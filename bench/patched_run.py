"""`python3 bench/patched_run.py CHANGE -- ARGS`: `peftopt ARGS` with one change of the 2026-12-04 sessions taken back,
to find which one a figure moved with (bench/gpu_t1.sh's merge-probe):
    no-freeze   the cycle collector not held off while training (trainer.CollectorPauses)
    old-copy    the checkpoint snapshot copied tensor by tensor, then the GPU synchronized (as before HostSnapshot)
    quiet-writer  the checkpoint writer thread takes the snapshot and writes nothing (what the writing costs the
                loop: training only, the run keeps no checkpoint)
    switch-interval  the interpreter's switch interval at 0.1 ms instead of 5 (how long the training thread waits
                for the lock the writer thread holds)
    no-flops-once  the Trainer's FLOP count with the model's parameters counted after every micro-batch
    step-sync   each step's loss read back as the step ends (before trainer.LossReadAStepLate)
    device-reads  the held-back loss kept on the device (read back with a sync of the whole queue), unsloth's segment
                lengths found on the device (unsloth.lengths_from_host off) and batches copied with blocking copies:
                the tree before the session of 2026-12-04 (seventh) (and no kept-label count from the host)
    gpu-count   the fused loss's kept labels counted on the GPU (unsloth.kept_labels_from_host off)
    tensor-writes  the checkpoint's adapter and optimizer state written tensor by tensor: safetensors' header and
                a write per tensor, torch.save pickling each of the optimizer's tensors (before checkpoints.save_state
                and statefile's packed format)
    none        nothing changed
"""
import contextlib
import os
import sys

sys.path.insert(0, os.getcwd())


def tensor_by_tensor_writes() -> None:
    """The writer's two files as it wrote them before the packs were written whole (bench/writer_lock_probe.py
    compares the two ways too)."""
    import json

    import torch

    from job import checkpoints

    def write_safetensors(snapshot, path, metadata=None):
        tensors = snapshot.take()
        header = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": checkpoints.SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
                            "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(path, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for tensor in tensors.values():
                if tensor.numel():
                    out.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    checkpoints.write_safetensors = write_safetensors
    checkpoints.save_state = lambda snapshot, path: torch.save(snapshot.take(), path)


class _OldCopy:
    """The snapshot as checkpoints._to_cpu took it before HostSnapshot."""

    def __init__(self, tree, own_storage=True):
        import torch

        def to_cpu(value):
            if isinstance(value, torch.Tensor):
                return value.detach().to("cpu", copy=True, non_blocking=value.is_cuda)
            if isinstance(value, dict):
                return {k: to_cpu(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(to_cpu(v) for v in value)
            return value

        self.tree = to_cpu(tree)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def take(self):
        return self.tree

    skeleton = property(lambda self: self.tree)  # no packs: the writer writes what take() gives, tensor by tensor

    def where(self, value):
        return None

    def packs(self):
        return []


def main() -> None:
    change, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    if change == "no-freeze":
        from job.backends import trainer

        trainer.CollectorPauses.frozen = contextlib.contextmanager(lambda self: (yield self))
    elif change == "old-copy":
        from job import checkpoints

        checkpoints.HostSnapshot = _OldCopy
    elif change == "quiet-writer":
        import shutil

        from job import checkpoints

        def quiet(self, snapshot):
            for taken in snapshot["tensors"].values():
                taken.take()
            shutil.rmtree(snapshot["partial"], ignore_errors=True)

        checkpoints.AsyncCheckpointWriter._write = quiet
    elif change == "tensor-writes":
        tensor_by_tensor_writes()
    elif change == "switch-interval":
        sys.setswitchinterval(0.0001)
    elif change == "no-flops-once":
        from job.backends import trainer

        trainer.flops_counted_once = lambda trainer: None
    elif change == "step-sync":
        from job.backends import trainer

        trainer.LossReadAStepLate = lambda trainer: None
    elif change == "device-reads":
        from job.backends import trainer, unsloth

        trainer.LossReadAStepLate.held = lambda self, name, value: value.detach().clone() \
            if hasattr(value, "detach") else value
        unsloth.lengths_from_host = lambda trainer: None
        unsloth.kept_labels_from_host = lambda trainer: False
        made = trainer.trainer_config

        def blocking_copies(*args, **kwargs):
            config = made(*args, **kwargs)
            config.accelerator_config.non_blocking = False
            return config

        trainer.trainer_config = blocking_copies
    elif change == "gpu-count":
        from job.backends import unsloth

        unsloth.kept_labels_from_host = lambda trainer: False
    elif change != "none":
        sys.exit(f"unknown change {change}")
    sys.argv = ["peftopt", *args]
    from job.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
