"""Preference examples (pairs, unpaired answers) as token ids, the way trl's preference trainers tokenize them:
the prompt rendered with the chat template's generation prompt, then the prompt with each answer; the answer's
tokens are those after the two renderings' common start. Prepare counts and filters with these; evaluation
scores with them (`implicit_rewards`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from job.errors import DataError
from job.rundir import jsonl_line
from job.spec import JobSpec

def _rendered(tokenizer, example: dict, row: int) -> dict[str, str]:
    """The texts trl tokenizes for one example, by the guarded renderer (job/render.py): the prompt with the
    generation prompt ("prompt"), and the prompt followed by each answer (by the answer's key).

    Raises:
        DataError: the chat template takes longer than its time or more than its memory on this row, or fails.
    """
    from job import render

    keys = [key for key in ("chosen", "rejected", "completion") if key in example]
    items = [{"messages": example["prompt"], "add_generation_prompt": True}]
    items += [{"messages": example["prompt"] + example[key]} for key in keys]
    results = render.chat(tokenizer, items)
    for result in results:
        if "error" in result:
            raise DataError(f"model.chat_template: rendering data row {row} {render.why(result)}")
    return dict(zip(["prompt", *keys], (result["text"] for result in results)))


def _answer_ids(tokenizer, prompt_text: str, full_text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, the answer's ids): the answer's tokens are those after the two renderings' common start."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    return full[:shared], full[shared:]


def tokenized(example: dict, tokenizer, row: int = 0) -> dict[str, list[int]]:
    """{"prompt": ids, "chosen": ids, "rejected": ids} or {"prompt": ids, "completion": ids}.

    Raises:
        DataError: the chat template failed on this row, or outran its time or memory (naming it).
    """
    texts = _rendered(tokenizer, example, row)
    out: dict[str, list[int]] = {}
    for key in ("chosen", "rejected", "completion"):
        if key in texts:
            out["prompt"], out[key] = _answer_ids(tokenizer, texts["prompt"], texts[key])
    return out


def encode_examples(examples: Iterable[dict], tokenizer, spec: JobSpec, origin=None,
                    sink=None) -> tuple[list[dict], dict]:
    """The examples as trl's trainers take them (conversational rows they tokenize themselves), with the counts
    prepare reports: tokens of every sequence (a pair is two), the answers' tokens as trainable, truncation to
    model.max_seq_length (trl cuts there), and data.min_tokens / max_tokens applied to the longest sequence.
    With a `sink` (a text file) each kept example is written to it as a JSON line instead of returned."""
    data, limit = spec.data, spec.model.max_seq_length
    counts: dict[str, Any] = {"skipped": Counter(), "truncated": 0, "tokens": 0, "trainable_tokens": 0,
                              "rows_by_source": Counter(), "trainable_by_source": Counter()}
    kept = []
    for index, example in enumerate(examples):
        ids = tokenized(example, tokenizer, index)
        answers = [key for key in ("chosen", "rejected", "completion") if key in ids]
        lengths = [len(ids["prompt"]) + len(ids[key]) for key in answers]
        broken = data.length_rule_broken(max(lengths))
        if broken:
            counts["skipped"][broken] += 1
            continue
        if len(ids["prompt"]) >= limit:
            counts["skipped"]["nothing to learn after truncation"] += 1  # the prompt alone fills the context
            continue
        if max(lengths) > limit:
            counts["truncated"] += 1
        trainable = sum(min(len(ids[key]), limit - len(ids["prompt"])) for key in answers)
        source = origin[index] if origin is not None else 0
        counts["tokens"] += sum(min(n, limit) for n in lengths)
        counts["trainable_tokens"] += trainable
        counts["rows_by_source"][source] += 1
        counts["trainable_by_source"][source] += trainable
        if sink is not None:
            sink.write(jsonl_line(example))
        else:
            kept.append(example)
    return kept, counts


# ------------------------------------------------------------------------------------------ evaluation


def implicit_rewards(model, tokenizer, examples: list[dict], beta: float, max_length: int, device: str,
                     limit: int = 256) -> dict[str, Any]:
    """How the trained adapter ranks the answers: for each answer the log-probability of its tokens under the
    adapter (policy) and under the base with the adapter off (reference), and the implicit reward
    beta * (policy - reference). For pairs: reward_accuracy (the share where the chosen answer's reward beats the
    rejected one's), reward_margin (mean chosen minus rejected); for unpaired answers: the share whose reward has
    the sign its label says. On at most `limit` examples."""
    import torch

    def logp(prompt_ids: list[int], answer_ids: list[int]) -> float:
        ids = (prompt_ids + answer_ids)[:max_length]
        n = len(ids) - len(prompt_ids)
        if n <= 0:
            return 0.0
        inputs = torch.tensor([ids], device=device)
        logits = model(input_ids=inputs).logits[0, :-1].float()
        targets = inputs[0, 1:]
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        return float(token_logps[-n:].sum())

    rows = []
    model.eval()
    with torch.inference_mode():
        for index, example in enumerate(examples[:limit]):
            ids = tokenized(example, tokenizer, index)
            row = {"label": example.get("label")}
            for key in ("chosen", "rejected", "completion"):
                if key in ids:
                    policy = logp(ids["prompt"], ids[key])
                    with model.disable_adapter():
                        reference = logp(ids["prompt"], ids[key])
                    row[key] = {"policy": policy, "reference": reference, "reward": beta * (policy - reference)}
            rows.append(row)
    if not rows:
        return {"examples": 0}
    out: dict[str, Any] = {"examples": len(rows), "beta": beta}
    if "chosen" in rows[0]:
        margins = [r["chosen"]["reward"] - r["rejected"]["reward"] for r in rows]
        out.update(reward_accuracy=round(sum(m > 0 for m in margins) / len(rows), 4),
                   reward_margin=round(sum(margins) / len(rows), 5))
        for key in ("chosen", "rejected"):
            out[f"logps_{key}"] = round(sum(r[key]["policy"] for r in rows) / len(rows), 4)
            out[f"reference_logps_{key}"] = round(sum(r[key]["reference"] for r in rows) / len(rows), 4)
    else:
        right = [(r["completion"]["reward"] > 0) == bool(r["label"]) for r in rows]
        out.update(reward_accuracy=round(sum(right) / len(rows), 4))
        for label, name in ((True, "desirable"), (False, "undesirable")):
            picked = [r["completion"] for r in rows if bool(r["label"]) == label]
            if picked:
                out[f"reward_{name}"] = round(sum(p["reward"] for p in picked) / len(picked), 5)
                out[f"logps_{name}"] = round(sum(p["policy"] for p in picked) / len(picked), 4)
                out[f"reference_logps_{name}"] = round(sum(p["reference"] for p in picked) / len(picked), 4)
    return out
