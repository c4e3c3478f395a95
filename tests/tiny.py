"""Tiny real models (Llama; Qwen 3, Mistral, Phi-3, Gemma 2) with tokenizers made on the spot (no network), plus
small conversation data.

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


FAMILIES = {  # special tokens, BOS, EOS, PAD, and whether BOS starts every text
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"],
              None, "<|im_end|>", "<|endoftext|>"),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"], "<s>", "</s>", "<pad>"),
    "phi3": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             "<s>", "<|endoftext|>", "<|endoftext|>"),
}


def make_family_tokenizer(out_dir: Path, family: str):
    """A byte-level BPE tokenizer with the family's special tokens and no chat template (so that `auto` picks the
    family's built-in by architecture); Gemma 2's is SentencePiece, as llama.cpp's converter requires."""
    if family == "gemma2":
        return make_sentencepiece_tokenizer(out_dir)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>" if "<unk>" in specials else None)
    fast.save_pretrained(str(out_dir))
    if family == "phi3":  # llama.cpp's Phi-3 converter reads a BPE vocabulary only when the config says GPT-2's
        path = out_dir / "tokenizer_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}, indent=2))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out_dir))


def make_sentencepiece_tokenizer(out_dir: Path):
    """Gemma's layout (pad 0, eos 1, bos 2, unk 3, the turn markers as user symbols), trained on the spot."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}))  # special, as Gemma's own config says
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))  # transformers converts the SentencePiece model
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _corpus() -> list[str]:
    corpus = [c["value"] for row in conversations(300) for c in row["conversations"]]
    return corpus + ["user assistant system model", "Say hello.", "Translate to Swedish: The coffee is too hot.",
                     "def reverse(s): return s[::-1]"] * 3


def make_model(out_dir: Path, seed: int = 0, family: str = "llama") -> Path:
    """A tiny random model of a family (llama, qwen3, mistral, phi3, gemma2) with its tokenizer."""
    import torch
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir) if family == "llama" else make_family_tokenizer(out_dir, family)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config, model_class = {
        "llama": (lambda: transformers.LlamaConfig(rope_theta=500000.0, **common), transformers.LlamaForCausalLM),
        "qwen3": (lambda: transformers.Qwen3Config(head_dim=64, **common), transformers.Qwen3ForCausalLM),
        "mistral": (lambda: transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM),
        "phi3": (lambda: transformers.Phi3Config(**common), transformers.Phi3ForCausalLM),
        # Gemma ties its output to the embeddings, and llama.cpp's converter drops an lm_head of its own
        "gemma2": (lambda: transformers.Gemma2Config(head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                                                     **{**common, "tie_word_embeddings": True}),
                   transformers.Gemma2ForCausalLM),
    }[family]
    model_class(config()).save_pretrained(str(out_dir))
    return out_dir


def make_answering_model(out_dir: Path, answer: str) -> Path:
    """A tiny Llama whose greedy answer to any prompt is `answer`, then <|eot_id|>: its attention and MLP write
    nothing (o_proj and down_proj are zero), so each position sees only its own token's embedding, and the
    output head maps the generation prompt's last token to the answer's first, each answer token to the next.
    The answer's tokens must all differ (the model knows the token it is on, not where it is)."""
    import torch
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir)
    opening = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                            tokenize=False)
    chain = [tokenizer(opening, add_special_tokens=False)["input_ids"][-1]]
    chain += tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    if len(set(chain)) != len(chain):
        raise ValueError(f"{answer!r}: a token repeats in {chain}")
    hidden = 64
    if len(chain) > hidden:
        raise ValueError(f"{answer!r}: more than {hidden - 1} tokens")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[following, i] = 4.0
    model.save_pretrained(str(out_dir))
    return out_dir


def write_data(path: Path, n: int = 48) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(n)))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1])
    make_model(out / "model")
    write_data(out / "data.jsonl")
    print(out)
