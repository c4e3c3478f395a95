"""Models and data for the GPU machine (no Hub there): a Llama-3.2-1B-shaped model with random weights
(speed and memory do not depend on the weights) and a pre-quantized 4-bit copy of a model.

    python bench/gpu_models.py llama1b OUT_DIR      # the 1B shape with the tiny tokenizer
    python bench/gpu_models.py llama8b OUT_DIR      # the 8B shape with the tiny tokenizer
    python bench/gpu_models.py data OUT.jsonl N     # N long conversations for packing full rows
    python bench/gpu_models.py pairs OUT.jsonl N [LO-HI]   # N preference pairs, answers of LO-HI words
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' tiny tokenizer
import tiny  # noqa: E402


# Llama-3.2-1B and Llama-3.1-8B: the shapes and rope settings the benchmarks stand in for
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True,
               rope_factor=32.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False,
               rope_factor=8.0),
}


def make_llama(out: Path, shape: str = "1b") -> Path:
    """A Llama of one of SHAPES (32 heads, 8 KV heads, 128,256 tokens) with random bf16 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.make_tokenizer(out)
    dims = dict(SHAPES[shape])
    factor = dims.pop("rope_factor")
    config = LlamaConfig(
        vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, **dims,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    return out


def make_prequantized(source: Path, out: Path) -> Path:
    """A bitsandbytes NF4 checkpoint of `source`, like the Hub's *-bnb-4bit repos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=quant, device_map={"": 0})
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    return out


def write_long_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = [w for row in tiny.conversations(200) for turn in row["conversations"] for w in turn["value"].split()]
    rows = []
    for _ in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(150, 400)))
        rows.append({"conversations": [{"from": "human", "value": "Tell me about " + rng.choice(tiny.TOPICS) + "."},
                                       {"from": "gpt", "value": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_long_pairs(path: Path, n: int, seed: int = 0, words_per_answer: tuple[int, int] = (150, 400)) -> Path:
    """N preference pairs (TRL's explicit form) whose two answers are as long as the long conversations' (or
    `words_per_answer` long)."""
    rng = random.Random(seed)
    words = [w for row in tiny.conversations(200) for turn in row["conversations"] for w in turn["value"].split()]

    def answer() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*words_per_answer)))

    rows = [{"prompt": "Tell me about " + rng.choice(tiny.TOPICS) + ".", "chosen": answer(), "rejected": answer()}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


if __name__ == "__main__":
    if sys.argv[1] in ("llama1b", "llama8b"):
        print(make_llama(Path(sys.argv[2]), sys.argv[1].removeprefix("llama")))
    elif sys.argv[1] == "data":
        print(write_long_data(Path(sys.argv[2]), int(sys.argv[3])))
    elif sys.argv[1] == "pairs":
        span = tuple(int(x) for x in sys.argv[4].split("-")) if len(sys.argv) > 4 else (150, 400)
        print(write_long_pairs(Path(sys.argv[2]), int(sys.argv[3]), words_per_answer=span))
