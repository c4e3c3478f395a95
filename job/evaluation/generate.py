"""Generation for evaluation: the model's chat template with the generation prompt, no system header
unless the spec asks for one, greedy by default, stop on the template's end-of-turn token, and only the
new tokens decoded with special tokens skipped (decoding the whole sequence is what made the seed
notebook's answers start with 'system ... Cutting Knowledge Date').
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from job import templates
from job.errors import SpecError
from job.spec import EvaluateSpec


def load_suite(evaluate: EvaluateSpec) -> list[dict[str, Any]]:
    """Prompts as [{id, prompt, checks}]. Raises SpecError when the suite file is unreadable."""
    if isinstance(evaluate.prompts, list):
        items = [{"id": f"p{i}", "prompt": p, "checks": {}} for i, p in enumerate(evaluate.prompts)]
    else:
        path = Path(evaluate.prompts)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SpecError(f"evaluate.prompts: cannot read suite {path}: {exc}") from None
        raw = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"evaluate.prompts: {path} holds no 'prompts' list")
        items = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise SpecError(f"evaluate.prompts: {path} prompt {i} has no 'prompt' text")
            items.append({"id": item.get("id", f"p{i}"), "prompt": item["prompt"], "checks": item.get("checks", {})})
    return items[: evaluate.num_prompts] if evaluate.num_prompts else items


def messages_for(prompt: str, system_prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]


def render(tokenizer, prompt: str, system_prompt: str | None) -> str:
    return tokenizer.apply_chat_template(messages_for(prompt, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for text in templates.stop_strings(tokenizer.chat_template or "", tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def generate_hf(model, tokenizer, suite: list[dict], evaluate: EvaluateSpec, *, max_new_tokens: int | None = None
                ) -> list[dict]:
    """Answers every prompt with a transformers model (one at a time: no padding effects)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    limit = max_new_tokens or evaluate.max_new_tokens
    from job import interrupt
    from job.errors import Interrupted

    answers = []
    for item in suite:
        if interrupt.stop_requested():
            raise Interrupted("stopped by a signal during evaluation; rerun to redo this stage")
        text = render(tokenizer, item["prompt"], evaluate.system_prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        kwargs: dict[str, Any] = {"do_sample": evaluate.do_sample, "max_new_tokens": limit,
                                  "eos_token_id": stops or None, "pad_token_id": tokenizer.pad_token_id}
        if evaluate.do_sample:
            torch.manual_seed(evaluate.seed)
            kwargs.update(temperature=evaluate.temperature, top_p=evaluate.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
        new_ids = out[0, prompt_ids.shape[1]:].tolist()
        stopped = bool(new_ids) and new_ids[-1] in stops
        if stopped:
            new_ids = new_ids[:-1]
        answers.append({
            "id": item["id"], "prompt": item["prompt"],
            "answer": tokenizer.decode(new_ids, skip_special_tokens=True),
            "token_ids": new_ids, "prompt_tokens": prompt_ids.shape[1],
            "stop_reason": "end_of_turn" if stopped else "length",
            "seconds": round(time.perf_counter() - started, 3),
        })
    return answers
