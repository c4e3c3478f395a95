"""How to run the spec's batch on the GPU at hand without changing the experiment.

The spec fixes sequences per optimizer step (per_device_batch_size x gradient_accumulation_steps); how
they are split into micro-batches, and whether activations are checkpointed (recomputed, or offloaded
to CPU memory as unsloth does by default), only trade speed for memory. `choose` picks the fastest
setting whose estimated peak stays inside the budget: `train.max_memory_gb`, else 60% of the card.
With several ranks each takes its share of the sequences, so the updates stay the same.

A 4-bit (QLoRA) base is dequantized once into 16-bit when that still fits (`dequantize.py`): the same
forward values as dequantizing at every step, without doing it at every step. It never costs a faster batch
setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from job.errors import SpecError
from job.modelsrc import param_count

GIB = 1024**3
# Activation bytes per token, per hidden unit, per layer, for a LoRA step without checkpointing. unsloth:
# t1 (8 x 2048 tokens, QLoRA, varlen attention) on the H200 peaked at 16.27 GiB reserved on the Llama-3.2-1B
# shape and 60.8 GiB on the Llama-3.1-8B shape: 28.3 and 27.6 bytes once weights and overhead are taken off.
# hf: transformers + peft keep the unfused norms' and MLP's inputs and outputs: `peftopt bench` measured 26.6 GB
# peak reserved at 8 x 2048 tokens on the same shape (H100, varlen attention), about 50 bytes; hf+liger:
# Liger's RMSNorm and SwiGLU keep fewer (liger.py), 20.2 GB, about 38 bytes.
ACTIVATION_BYTES = {"unsloth": 28, "hf": 50, "hf+liger": 38}
# A micro-batch of this many tokens keeps an H100 busy: beyond it a larger micro-batch gains little (unsloth
# 8x1 vs 16x1 at seq 2048: +1.6%), while recomputing activations costs a third more arithmetic.
SATURATING_TOKENS = 8192
NOTHING_FITS = "nothing is estimated to fit the budget; using the most frugal setting"
# With checkpointing only layer inputs are kept (2 bytes each), plus one layer being recomputed.
CHECKPOINT_BYTES = 2


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: str  # "off", "on" (recompute) or "unsloth" (recompute, offload to CPU)
    estimated_gb: float
    budget_gb: float
    reason: str
    dequantize_base: bool = False  # a 4-bit base is dequantized once to 16-bit after loading
    parallel: str = "none"  # several ranks: "ddp" (a whole model on each) or "fsdp" (sharded over them)


def estimate_gb(config, micro: int, seq: int, checkpointing: str, four_bit: bool, backend: str = "unsloth",
                per_example: int = 1, shards: int = 1) -> float:
    """Peak GPU memory of one micro-batch of `micro` examples of `per_example` sequences of `seq` tokens, on one of
    `shards` ranks that shard the weights (train.parallel fsdp): its share, plus two layers gathered whole (the one
    computing and the next, prefetched)."""
    params = param_count(config)
    weights = params * (0.56 if four_bit else 2.0)
    if shards > 1:
        weights = weights / shards + 2 * weights / config.num_hidden_layers
    tokens = micro * seq * per_example
    per_token_layer = {"off": ACTIVATION_BYTES[backend], "on": CHECKPOINT_BYTES, "unsloth": 0.25}[checkpointing]
    activations = per_token_layer * tokens * config.hidden_size * config.num_hidden_layers
    if checkpointing != "off":  # the layer being recomputed
        activations += ACTIVATION_BYTES[backend] * tokens * config.hidden_size
    overhead = 1.5 * GIB  # CUDA context, allocator slack, LoRA weights and optimizer state, loss chunks
    return (weights + activations + overhead) / GIB


def sequences_per_rank(spec, ranks: int = 1) -> int:
    """Raises SpecError when the spec's sequences per step cannot be shared evenly over the ranks."""
    train = spec.train
    total = train.per_device_batch_size * train.gradient_accumulation_steps
    if total % ranks:
        raise SpecError(f"train: per_device_batch_size x gradient_accumulation_steps = {total} sequences per "
                        f"step cannot be shared evenly over {ranks} ranks; make it a multiple of {ranks}")
    per_rank = total // ranks
    if isinstance(train.micro_batch_size, int) and per_rank % train.micro_batch_size:
        raise SpecError(f"train.micro_batch_size: {train.micro_batch_size} does not divide the {per_rank} "
                        f"sequences each of {ranks} ranks takes per step")
    return per_rank


def choose(spec, config, gpu_memory_gb: float, backend: str = "unsloth", ranks: int = 1,
           dequantize: bool = True, sharded: bool = False) -> Plan:
    """The fastest setting estimated to fit; `sharded`: the weights split over the ranks (fsdp)."""
    from job import methods

    train = spec.train
    total = sequences_per_rank(spec, ranks)
    budget = train.max_memory_gb or 0.6 * gpu_memory_gb
    per_example = methods.get(train.method).sequences_per_example  # a preference pair is two sequences through the model
    seq = spec.model.max_seq_length
    four_bit = spec.model.load_in_4bit
    forced_gc = {"on": "on", "off": "off", "unsloth": "unsloth" if backend == "unsloth" else "on"}.get(
        train.gradient_checkpointing)
    micros = [train.micro_batch_size] if isinstance(train.micro_batch_size, int) else \
        [m for m in range(total, 0, -1) if total % m == 0]
    # Small micro-batches starve the GPU (measured on an H100: 2 x 4 -> 8 x 1 doubles tokens/s) and
    # recomputation costs a third more arithmetic, so: the largest micro-batch of at least SATURATING_TOKENS
    # that fits without recomputation; else, largest first, no recomputation, recomputation, unsloth's offload.
    modes = [forced_gc] if forced_gc else (["off", "on", "unsloth"] if backend == "unsloth" else ["off", "on"])
    candidates = [(m, "off") for m in micros if m * seq * per_example >= SATURATING_TOKENS and "off" in modes]
    candidates += [(m, mode) for m in micros for mode in modes]
    shards = ranks if sharded else 1
    for micro, mode in candidates:
        need = estimate_gb(config, micro, seq, mode, four_bit, backend, per_example, shards)
        if need <= budget:
            unpacked = estimate_gb(config, micro, seq, mode, False, backend, per_example, shards) if four_bit \
                else budget + 1
            if dequantize and unpacked <= budget:
                return Plan(micro, total // micro, mode, round(unpacked, 2), round(budget, 2),
                            f"fastest setting estimated to fit {budget:.1f} GiB, with the 4-bit base dequantized "
                            "once", dequantize_base=True)
            return Plan(micro, total // micro, mode, round(need, 2), round(budget, 2),
                        f"fastest setting estimated to fit {budget:.1f} GiB")
    micro = micros[-1]
    mode = modes[-1]
    return Plan(micro, total // micro, mode,
                round(estimate_gb(config, micro, seq, mode, four_bit, backend, per_example, shards), 2),
                round(budget, 2), NOTHING_FITS)


def on_cpu(spec, ranks: int = 1) -> Plan:
    """CPU: the spec's micro-batch (or the largest divisor of a rank's share up to it), no checkpointing."""
    train = spec.train
    total = sequences_per_rank(spec, ranks)
    if isinstance(train.micro_batch_size, int):
        micro = train.micro_batch_size
    else:
        micro = min(train.per_device_batch_size, total)
        while total % micro:
            micro -= 1
    checkpointing = "on" if train.gradient_checkpointing in ("on", "unsloth") else "off"
    return Plan(micro, total // micro, checkpointing, 0.0, 0.0, "CPU: the spec's micro-batch")


def literal(spec) -> Plan:
    """The spec taken at its word with unsloth's defaults (as the seed notebook ran it)."""
    train = spec.train
    return Plan(train.per_device_batch_size, train.gradient_accumulation_steps, "unsloth", 0.0, 0.0,
                "as written, unsloth defaults")
