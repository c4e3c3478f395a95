"""How to run the spec's batch on the GPU at hand without changing the experiment.

The spec fixes sequences per optimizer step (per_device_batch_size x gradient_accumulation_steps); how
they are split into micro-batches, and whether activations are checkpointed (recomputed, or offloaded
to CPU memory as unsloth does by default), only trade speed for memory. `choose` picks the fastest
setting whose estimated peak stays inside the budget: `train.max_memory_gb`, else 60% of the card.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
# Activation bytes per token, per hidden unit, per layer, for a LoRA step without checkpointing
# (measured: Llama-3.2-1B shape, unsloth, seq 2048: about 2.2 GiB per sequence, 16 layers x 2048 hidden).
ACTIVATION_BYTES = 36
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


def param_count(config) -> int:
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (heads * 2 + kv * 2)
    per_layer = attention + 3 * hidden * inter
    embeddings = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings


def estimate_gb(config, micro: int, seq: int, checkpointing: str, four_bit: bool) -> float:
    params = param_count(config)
    weights = params * (0.56 if four_bit else 2.0)
    tokens = micro * seq
    per_token_layer = {"off": ACTIVATION_BYTES, "on": CHECKPOINT_BYTES, "unsloth": 0.25}[checkpointing]
    activations = per_token_layer * tokens * config.hidden_size * config.num_hidden_layers
    if checkpointing != "off":  # the layer being recomputed
        activations += ACTIVATION_BYTES * tokens * config.hidden_size
    overhead = 1.5 * GIB  # CUDA context, allocator slack, LoRA weights and optimizer state, loss chunks
    return (weights + activations + overhead) / GIB


def choose(spec, config, gpu_memory_gb: float) -> Plan:
    train = spec.train
    total = train.per_device_batch_size * train.gradient_accumulation_steps
    budget = train.max_memory_gb or 0.6 * gpu_memory_gb
    seq = spec.model.max_seq_length
    four_bit = spec.model.load_in_4bit
    forced_gc = {"on": "on", "off": "off", "unsloth": "unsloth"}.get(train.gradient_checkpointing)
    micros = [train.micro_batch_size] if isinstance(train.micro_batch_size, int) else \
        [m for m in range(total, 0, -1) if total % m == 0]
    # The micro-batch is the biggest lever (measured on an H100: 2 x 4 -> 8 x 1 doubles tokens/s), so
    # the largest micro-batch that fits comes first; at each size, no recomputation, then recomputation
    # (about a third more arithmetic), then unsloth's CPU offload.
    modes = [forced_gc] if forced_gc else ["off", "on", "unsloth"]
    for micro in micros:
        for mode in modes:
            need = estimate_gb(config, micro, seq, mode, four_bit)
            if need <= budget:
                return Plan(micro, total // micro, mode, round(need, 2), round(budget, 2),
                            f"fastest setting estimated to fit {budget:.1f} GiB")
    micro = micros[-1]
    mode = modes[-1]
    return Plan(micro, total // micro, mode, round(estimate_gb(config, micro, seq, mode, four_bit), 2),
                round(budget, 2), "nothing is estimated to fit the budget; using the most frugal setting")


def literal(spec) -> Plan:
    """The spec taken at its word with unsloth's defaults (as the seed notebook ran it)."""
    train = spec.train
    return Plan(train.per_device_batch_size, train.gradient_accumulation_steps, "unsloth", 0.0, 0.0,
                "as written, unsloth defaults")
