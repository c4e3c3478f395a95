"""Diagnostic, not a test: does a merged model part from its adapter because its weights are rounded to 16 bits?

    python bench/merge_rounding.py RUN_DIR      # after `make demo`: runs/smoke_gemma3_270m

Merges the run's adapter into its base in float32, then the same merge rounded to bfloat16 (computed in float32,
as the evaluate stage loads the merged model on CPU), greedy-decodes each prompt the adapter answered in the
evaluate stage, and prints, per prompt, the token at which the answer parts from the adapter's (None: identical).
"""
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def parts_after(a: list[int], b: list[int]):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(run: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(run / "merged"))
    answers = [json.loads(line) for line in open(run / "eval" / "adapter.jsonl")]
    recorded = [json.loads(line) for line in open(run / "eval" / "merged.jsonl")]

    def greedy(model, item) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=len(item["token_ids"]), do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    for rounding in (None, torch.bfloat16):
        base = AutoModelForCausalLM.from_pretrained(str(run / "base"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload().eval()
        if rounding is not None:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter.to(rounding).to(torch.float32))
        with torch.inference_mode():
            print(f"merged, weights {'float32' if rounding is None else 'rounded to bfloat16'}:",
                  [parts_after(greedy(model, item), item["token_ids"]) for item in answers])
    print("merged as the evaluate stage recorded it:",
          [parts_after(r["token_ids"], a["token_ids"]) for r, a in zip(recorded, answers)])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smoke_gemma3_270m"))
