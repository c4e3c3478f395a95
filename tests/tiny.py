"""A tiny real Llama and a tokenizer made on the spot (no network), plus small conversation data.

    python tests/tiny.py OUT_DIR      # writes OUT_DIR/model and OUT_DIR/data.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>"]
TOPICS = ["the sea", "a red fox", "coffee", "the moon", "bread", "a small robot", "rain", "the library",
          "a bicycle", "green tea", "music", "the forest", "a clock", "snow", "the market", "a candle"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        turns = [{"from": "human", "value": f"Tell me one thing about {topic}."},
                 {"from": "gpt", "value": f"Here is one thing: {topic} is {rng.choice(['calm', 'bright', 'old', 'quick'])}"
                                          f" and {rng.choice(['warm', 'quiet', 'simple', 'useful'])}."}]
        if i % 3 == 0:
            turns = [{"from": "system", "value": "You are brief."}] + turns + [
                {"from": "human", "value": "And why?"}, {"from": "gpt", "value": f"Because {topic} is like that."}]
        rows.append({"conversations": turns})
    return rows


def make_tokenizer(out_dir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from job.templates import LLAMA_3

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [c["value"] for row in conversations(300) for c in row["conversations"]]
    corpus += ["user assistant system", "Say hello.", "Translate to Swedish: The coffee is too hot to drink.",
               "def reverse(s): return s[::-1]"] * 3
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>")
    fast.chat_template = LLAMA_3
    fast.save_pretrained(str(out_dir))
    return fast


def make_model(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    return out_dir


def write_data(path: Path, n: int = 48) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(n)))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1])
    make_model(out / "model")
    write_data(out / "data.jsonl")
    print(out)
