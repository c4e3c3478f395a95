"""Data-parallel runs: several processes, one per GPU, started by `peftopt run --nproc N`, `torchrun` or
`accelerate launch` (they all set RANK, WORLD_SIZE and LOCAL_RANK).

Rank 0 owns the run directory: it takes the lock, writes state, metrics and logs, and runs every stage.
The other ranks join only the train stage, where the Trainer shards the batches and all-reduces the
gradients; the rest of the time they wait for rank 0's next order on a CPU (gloo) group whose timeout
is long enough for a model download or a GGUF export, and they leave with rank 0's exit code.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from job import settings as settings_module, statefile
from job.errors import EXIT_INTERRUPTED, SpecError

_control = None  # the gloo group used for orders, stop votes and token sums


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world(settings=None) -> World:
    """This process's place in the launch, as the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK) say."""
    settings = settings or settings_module.get()
    return World(settings.rank, settings.world_size, settings.local_rank)


def active(settings=None) -> bool:
    return world(settings).size > 1


def init(settings=None) -> None:
    """Joins the launcher's process group (NCCL on GPUs, gloo on CPU) and opens the control group.
    The Trainer (through accelerate) reuses the default group instead of creating its own. A waiting rank
    trusts rank 0 for PEFTOPT_RANK_WAIT_S (prepare can download a large base)."""
    global _control
    settings = settings or settings_module.get()
    if _control is not None or not active(settings):
        return
    import torch
    import torch.distributed as dist

    me = world(settings)
    if torch.cuda.is_available():
        torch.cuda.set_device(me.local_rank)
    if not dist.is_initialized():
        store = _own_store(settings) if settings.rendezvous_fd is not None else None  # else the launcher's (env://)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                device_id=torch.device("cuda", me.local_rank) if torch.cuda.is_available() else None,
                                **({"store": store, "rank": me.rank, "world_size": me.size} if store else {}))
    _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=settings.rank_wait_s))


def _own_store(settings):
    """The rendezvous store of a `--nproc` launch: rank 0 serves it on the socket the launcher bound to the loopback
    address and handed it (torch's TCPStore binds every interface unless given one), the other ranks connect."""
    import torch.distributed as dist

    me, timeout = world(settings), timedelta(seconds=settings.rank_wait_s)
    if settings.rendezvous_fd < 0:
        return dist.TCPStore(settings.master_addr, settings.master_port, me.size, False, timeout)
    return dist.TCPStore(settings.master_addr, settings.master_port, me.size, True, timeout, wait_for_workers=False,
                         master_listen_fd=settings.rendezvous_fd)


def send(order: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0 sends `order` to every rank; every rank returns it (the others block until it comes). Orders travel as
    JSON, never as pickles: what a rank receives is data."""
    import torch
    import torch.distributed as dist

    main = world().is_main
    payload = json.dumps(order).encode() if main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(size, src=0, group=_control)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if main else \
        torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=_control)
    return order if main else json.loads(bytes(data.tolist()).decode())


def vote(stop: bool, tokens: float) -> tuple[bool, float]:
    """Called by every rank at every step end: whether any rank was asked to stop (all ranks must stop at
    the same step, or the ones still training wait forever for the others' gradients), and the tokens
    all ranks have seen. One small all-reduce on the CPU group, so the GPUs are not synchronized."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([1.0 if stop else 0.0, tokens], dtype=torch.float64)
    dist.all_reduce(tensor, group=_control)
    return bool(tensor[0].item() > 0), float(tensor[1].item())


# What a collective raises when a peer is gone: gloo's transport errors (torch reports them as RuntimeError), NCCL's
# aborted communicator, torch's own network and store errors.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport",
              "NCCL communicator was aborted", "DistNetworkError", "DistStoreError", "Socket Timeout")


def peer_lost(exc: BaseException) -> str | None:
    """In a multi-rank run, the line saying that `exc` (or what caused it) is a collective failing because another
    rank died; None for anything else."""
    if not active():
        return None
    seen = 0
    while exc is not None and seen < 8:
        text = f"{type(exc).__name__}: {exc}"
        found = next((text.find(words) for words in _PEER_LOST if words in text), -1)
        if found >= 0:
            end = text.find(". ", found)  # the library's advice that follows is not about this job
            return text[: end if end > 0 else None].splitlines()[0][:300]
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


_training = {"now": False}


@contextmanager
def training_together():
    """Rank 0 around the train stage: the other ranks join it. If training fails, they are blocked in a
    collective and leave when the launcher stops them, so `release` then sends them nothing."""
    if not active():
        yield
        return
    send({"do": "train"})
    _training["now"] = True
    yield
    _training["now"] = False


def follow(train: Callable[[], Any]) -> dict:
    """A rank other than 0: trains when rank 0 says so, otherwise waits, and leaves with rank 0's code.

    Raises:
        SystemExit: rank 0 ended with a non-zero exit code.
    """
    import structlog

    from job.log import quiet_except_errors

    quiet_except_errors()  # rank 0 speaks for the job; the others only of errors
    structlog.contextvars.bind_contextvars(rank=world().rank)
    while True:
        order = send(None)
        if order["do"] == "train":
            train()
            continue
        shutdown()
        if order["code"]:
            raise SystemExit(order["code"])
        return {"status": "done", "rank": world().rank}


def release(exc: BaseException | None) -> None:
    """Rank 0, at the end: tells the waiting ranks to leave with its exit code."""
    from job.errors import EXIT_BUG, PeftoptError
    from job.log import get_logger

    if not active() or not world().is_main or _training["now"]:
        return
    code = 0 if exc is None else exc.exit_code if isinstance(exc, PeftoptError) else EXIT_BUG
    try:
        send({"do": "exit", "code": code})
        shutdown()
    except Exception as problem:  # a rank already gone (its own grace ran out after a signal) cannot listen
        get_logger("peftopt").warning("ranks_not_released", error=f"{type(problem).__name__}: {problem}",
                                      exit_code=code)


# Files travel in pieces of this size: bounded memory on every rank, and gloo's buffers stay small.
FILE_PIECE_BYTES = 64 << 20


def share_files(root: Path, names: list[str] | None) -> None:
    """Every rank calls this; rank 0's files under `root` named by `names` (rank 0's list: paths relative to `root`,
    a folder meaning every regular file in it) reach each rank's own `root`, so ranks on nodes that keep their own
    run directories read what rank 0 prepared or resumes from. A rank whose copy has the same size and digest keeps
    it, and a file no rank lacks is not sent: ranks sharing a volume send nothing. What arrives is checked against
    rank 0's digest and renamed into place whole.

    Raises:
        ExternalError: what arrived is not what rank 0 sent.
    """
    if not active() or settings_module.get().local_world_size == world().size:  # every rank on this machine
        return
    import hashlib

    import torch
    import torch.distributed as dist

    from job.errors import ExternalError

    main = world().is_main
    listing = send({"files": _listing(root, names or []) if main else None})["files"]
    wanted = [0 if main else int(not _same_file(root, name, size, digest)) for name, size, digest in listing]
    lacking = _gathered_numbers(wanted or [0])
    for i, (name, size, digest) in enumerate(listing):
        if not lacking[:, i].any():
            continue
        here = wanted[i] == 1
        target = _inside(root, name)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial") if here else None
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
        got = hashlib.sha256()
        with (open(root / name, "rb") if main else contextlib.nullcontext()) as source, \
                (open(partial, "wb") if here else contextlib.nullcontext()) as sink:
            for offset in range(0, size, FILE_PIECE_BYTES):
                count = min(FILE_PIECE_BYTES, size - offset)
                piece = torch.frombuffer(bytearray(source.read(count)), dtype=torch.uint8) if main else \
                    torch.empty(count, dtype=torch.uint8)
                dist.broadcast(piece, src=0, group=_control)
                if here:
                    data = piece.numpy().tobytes()
                    got.update(data)
                    sink.write(data)
            if here:
                sink.flush()
                os.fsync(sink.fileno())
        if here:
            if got.hexdigest() != digest:
                partial.unlink(missing_ok=True)
                raise ExternalError(f"{name}: what rank 0 sent does not match its digest; rerun the job")
            os.replace(partial, target)


def _listing(root: Path, names: list[str]) -> list[list]:
    """[relative path, size, sha256] of the regular files `names` hold under `root` (links are not followed)."""
    import hashlib

    out = []
    for name in names:
        top = root / name
        if top.is_symlink() or not top.exists():
            continue
        if top.is_file():
            files = [top]
        else:  # os.walk does not descend into linked folders; linked files are left out
            files = sorted(Path(folder) / f for folder, _, names_in in os.walk(top) for f in names_in
                           if not f.endswith(".partial") and not os.path.islink(os.path.join(folder, f))
                           and os.path.isfile(os.path.join(folder, f)))
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            out.append([path.relative_to(root).as_posix(), path.stat().st_size, digest.hexdigest()])
    return out


def _inside(root: Path, name: str) -> Path:
    """`root / name` for a relative path rank 0 named, refused if it is absolute or climbs out of `root`."""
    from job.errors import ExternalError

    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ExternalError(f"rank 0 named a file outside the run directory: {name!r}")
    return root / relative


def _same_file(root: Path, name: str, size: int, digest: str) -> bool:
    import hashlib

    path = _inside(root, name)
    if path.is_symlink() or not path.is_file() or path.stat().st_size != size:
        return False
    ours = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            ours.update(block)
    return ours.hexdigest() == digest


def gathered_bytes(mine: bytes) -> list[bytes]:
    """Every rank's bytes, in rank order, on every rank (a collective on the control group)."""
    import torch
    import torch.distributed as dist

    sizes = _gathered_numbers([len(mine)])[:, 0].tolist()
    local = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
    if mine:
        local[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    every = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(every, local, group=_control)
    return [every[r][:n].numpy().tobytes() for r, n in enumerate(sizes)]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier(group=_control)


def shutdown() -> None:
    global _control
    if _control is None:
        return
    import torch.distributed as dist

    _control = None
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ launcher


NO_LAYERS = ("train.parallel fsdp: this model declares no decoder layer class to shard by (_no_split_modules); "
             "use 'ddp'")


def layer_classes(config_dir: str) -> set[str] | None:
    """The decoder layer classes a model of this config declares (`_no_split_modules`), what `shard` wraps one by
    one; None when transformers has no causal LM class for it. Read from the class, nothing is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return None if model_class is None else set(getattr(model_class, "_no_split_modules", None) or ())


def shard(trainer) -> None:
    """train.parallel fsdp: torch's FSDP2 `fully_shard` on every decoder layer, then on the whole model, over one
    mesh of all ranks (CPU ranks on gloo, GPUs on NCCL: one code path), before the Trainer's optimizer exists, so
    that parameters, gradients and optimizer state are each rank's shard. Applied to the trainer's model once trl
    has wrapped it with LoRA; accelerate then leaves it as it is (on CPU ranks it would wrap it in DDP)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = trainer.model
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    weightless = any(p.is_meta for p in model.parameters())  # this rank's weights come from rank 0
    every = [bool(flag) for flag in _gathered_numbers([int(weightless)])[:, 0]]
    whole = model.state_dict() if any(every) and world().is_main else {}
    blocks = set(getattr(trainer.accelerator.unwrap_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise SpecError(NO_LAYERS)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if any(every):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if weightless:
            model.to_empty(device=torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda"
                           else "cpu")
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del whole
        for _, buffer in model.named_buffers():  # not in a state dict (RoPE's inv_freq): rank 0's
            torch.distributed.broadcast(buffer, src=0)
    _log_shards(model, loaded_by=[r for r, meta in enumerate(every) if not meta])
    prepare = trainer.accelerator.prepare_model

    def prepare_model(candidate, *args, **kwargs):
        return candidate if candidate is model else prepare(candidate, *args, **kwargs)

    trainer.accelerator.prepare_model = prepare_model
    trainer._load_from_checkpoint = lambda checkpoint, *_: _load_full_adapter(model, Path(checkpoint))
    trainer._load_optimizer_and_scheduler = lambda checkpoint: _load_full_optimizer(trainer, Path(checkpoint))


def placing_real_weights_only(trainer_class):
    """The method's trainer, except that it does not move a model without weights to the device (a sharded rank
    other than 0 before rank 0 sends its shard: transformers' Trainer would copy out of the meta device)."""

    class Sharded(trainer_class):
        def _move_model_to_device(self, model, device):
            if not any(p.is_meta for p in model.parameters()):
                super()._move_model_to_device(model, device)

    Sharded.__name__ = Sharded.__qualname__ = trainer_class.__name__
    return Sharded


def _log_shards(model, loaded_by: list[int]) -> None:
    """`model_sharded`: what each rank holds of the weights and of the LoRA parameters, in bytes and the local
    shape of the first LoRA matrix (gathered to rank 0, which alone speaks)."""
    import torch

    from job.log import get_logger

    weights = lora = 0
    first = None  # (name, local shape, whole shape) of the first LoRA matrix
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        size = local.numel() * local.element_size()
        if param.requires_grad:
            lora += size
            first = first or (name, list(local.shape), list(param.shape))
        else:
            weights += size
    # numbers, not pickled objects, between ranks (docs/security.md: nothing a peer sends is unpickled)
    every = _gathered_numbers([weights, lora, *(first[1] if first else [0, 0])[:2]]).tolist()
    if torch.distributed.get_rank() == 0:
        get_logger("peftopt.train").info(
            "model_sharded", ranks=len(every), loaded_by=loaded_by, weights_bytes=[r[0] for r in every],
            lora_bytes=[r[1] for r in every], lora_name=first[0] if first else None,
            lora_full_shape=first[2] if first else None, lora_shapes=[r[2:] for r in every])


def _gathered_numbers(mine: list[int]):
    """Every rank's list of integers (all the same length), as a ranks x len int64 tensor."""
    import torch

    local = torch.tensor(mine, dtype=torch.int64)
    every = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, local, group=_control)
    return torch.stack(every)


def _load_full_adapter(model, checkpoint: Path) -> None:
    """A checkpoint's adapter (written whole, job/checkpoints.py) into a sharded model: each rank keeps its shard,
    so a checkpoint resumes under any number of ranks."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    adapter = next(iter(model.peft_config))
    full = {}
    for name in model.state_dict():
        key = name.replace(f".{adapter}.", ".")  # peft saves its keys without the adapter's name
        if key in saved:
            full[name] = saved[key]
    if len(full) != len(saved):
        raise ValueError(f"{len(saved) - len(full)} of the checkpoint's adapter tensors are not this model's")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def _load_full_optimizer(trainer, checkpoint: Path) -> None:
    """The optimizer state (whole, keyed by parameter name) and the scheduler's, as the Trainer would load them."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not (checkpoint / "optimizer.pt").exists():
        return
    saved = statefile.load(checkpoint / "optimizer.pt")
    state = _by_name(saved, _names_in_order(trainer.model, trainer.optimizer))
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state, options=StateDictOptions(full_state_dict=True))
    trainer.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location="cpu",
                                                    weights_only=True))


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """A sharded model's whole state, and its optimizer's in the layout `optimizer.state_dict()` has on one process
    (what the Trainer saves and loads), gathered to rank 0's CPU: a collective every rank calls; the other ranks get
    empty dicts. So a checkpoint is the same whether it was written by one process, by ddp or by fsdp ranks, and
    resumes under any of them and any number of ranks."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return state, None
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return state, (_by_position(by_name, _names_in_order(model, optimizer)) if by_name else {})


def _names_in_order(model, optimizer) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_position(by_name: dict, order: list[str]) -> dict:
    """torch's full optimizer state (keyed by parameter name) in `optimizer.state_dict()`'s layout (by position)."""
    position = {name: i for i, name in enumerate(order)}
    state = {position[name]: value for name, value in by_name["state"].items()}
    groups = [{**group, "params": [position[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return {"state": state, "param_groups": groups}


def _by_name(by_position: dict, order: list[str]) -> dict:
    state = {order[int(i)]: value for i, value in by_position["state"].items()}
    groups = [{**group, "params": [order[int(i)] for i in group["params"]]} for group in by_position["param_groups"]]
    return {"state": state, "param_groups": groups}


def pin_single_gpu() -> tuple[str, str] | None:
    """A single process uses one GPU: with several visible, the Trainer would wrap the model in
    nn.DataParallel, which trl's SFTTrainer refuses. Must run before torch initializes CUDA. Returns (the
    devices that were visible, the one used) when some were hidden, else None."""
    listed = _listed_gpus()
    if len(listed) < 2:
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = listed[0]  # a write for torch, read when it initializes CUDA
    return ",".join(listed), listed[0]


def _listed_gpus() -> list[str]:
    """The GPUs this process may use, from CUDA_VISIBLE_DEVICES or nvidia-smi, without initializing CUDA."""
    visible = settings_module.get().cuda_visible_devices
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                env=settings_module.get().tool_env(),
                                text=True, timeout=20, check=False).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []  # no NVIDIA driver tools: no GPU to count
    return listed


def visible_gpus() -> int:
    return len(_listed_gpus())


def launch(nproc: int, argv: list[str], grace_s: float, nodes=None) -> int:
    """Runs `python -m job run ARGV` as `nproc` ranks on this machine and returns the job's exit code. With `nodes`
    (job/nodes.py) they are this node's ranks of a job over several nodes: global ranks nodes.rank * nproc + local,
    and the main node's rank 0 serves the rendezvous on the main address, the others connect to it.

    Unlike torchrun, which answers 1 for any failure, this keeps peftopt's exit codes: rank 0's code when
    it failed, else the first failing rank's (75 for a rank killed by a signal from outside); a SIGTERM is
    passed to every rank (each saves and exits 75) and one rank's failure stops the others, so no rank waits
    forever for a dead peer.
    """
    # Every rank on this machine: the rendezvous, gloo's and NCCL's sockets on loopback alone (the interface names
    # are writes for gloo and NCCL, which read them), unless the operator named an interface.
    from job import nodes as nodes_module

    current = settings_module.get().child_env()
    main = nodes_module.address(nodes.main) if nodes else "127.0.0.1"
    # On one machine, or when the main address is this machine's loopback (a test), everything stays on loopback;
    # across machines gloo and NCCL find the interface of the main address (unless the operator names one).
    local = nodes_module.is_loopback(main)
    sockets = {name: "lo" for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if name not in current and local}
    serves = nodes is None or nodes.is_main
    listening = socket.socket() if serves else None
    if listening is not None:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((main, nodes.port if nodes else 0))  # the main address only, never every interface
        listening.listen(128)
    port = listening.getsockname()[1] if listening is not None else nodes.port
    first, world = (nodes.rank * nproc, nodes.count * nproc) if nodes else (0, nproc)
    env = settings_module.get().child_env(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=main,
                                          MASTER_PORT=str(port), GROUP_RANK=str(nodes.rank if nodes else 0), **sockets)

    def fd_for(rank: int) -> int:
        return listening.fileno() if listening is not None and rank == 0 else -1

    with listening if listening is not None else contextlib.nullcontext():
        procs = [subprocess.Popen([sys.executable, "-m", "job", "run", *argv],
                                  pass_fds=(fd_for(rank),) if fd_for(rank) >= 0 else (),
                                  env=dict(env, RANK=str(first + rank), LOCAL_RANK=str(rank),
                                           PEFTOPT_RENDEZVOUS_FD=str(fd_for(rank))))
                 for rank in range(nproc)]
    signalled = {"at": None}

    def forward(signum, _frame):
        if signalled["at"] is not None:  # a second signal: everyone leaves now
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            return
        signalled["at"] = time.monotonic()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first_failure: int | None = None  # the code of the first rank that failed on its own
    try:
        failed_at = None
        while any(proc.poll() is None for proc in procs):
            codes = [proc.poll() for proc in procs]
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = time.monotonic()
                if signalled["at"] is None:
                    first_failure = next(code for code in codes if code not in (None, 0))
                for proc in procs:
                    if proc.poll() is None:
                        proc.terminate()
            started = [t for t in (failed_at, signalled["at"]) if t is not None]
            if started and time.monotonic() > min(started) + grace_s + 5:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [proc.returncode for proc in procs]
    if first_failure is None and signalled["at"] is None and any(codes):
        first_failure = next(code for code in codes if code)  # failed in the same instant as the others
    if first_failure is not None:
        # A rank killed by a signal nobody here sent (the OOM killer, its machine lost): the retry resumes from the
        # newest complete checkpoint, as after a preemption.
        return first_failure if first_failure > 0 else EXIT_INTERRUPTED
    if signalled["at"] is not None:
        return codes[0] if codes[0] > 0 else (0 if not any(codes) else EXIT_INTERRUPTED)
    return 0
