"""Writes t5-conversions.jsonl (training tasks) and ../prompts/t5-conversions.json (the suite that scores them) for
jobspecs/t5.json: GRPO on T1's merged model, rewarded for getting unit conversions right.

    python jobspecs/data/make_t5_conversions.py

Each task asks for one conversion between units of time, length, mass or volume, and declares the check a right
answer passes: `number` (the answer's last number equals the converted amount). The suite asks the same kinds of
question with amounts the training tasks never use, so it measures the skill, not recall of the training prompts.
Made by hand for peftopt (no data set is downloaded); the same file every time (a fixed seed).
"""
import json
import random
from pathlib import Path

# (from unit, to unit, factor): how many of the second make one of the first
UNITS = [
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
    ("feet", "inches", 12), ("yards", "feet", 3), ("kilograms", "grams", 1000), ("tonnes", "kilograms", 1000),
    ("pounds", "ounces", 16), ("liters", "milliliters", 1000), ("gallons", "quarts", 4), ("years", "months", 12),
]
ASKS = ["How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "{n} {frm} is how many {to}?",
        "What is {n} {frm} in {to}?"]
SUFFIX = " Answer with the number and the unit."
HERE = Path(__file__).resolve().parent


def task(rng: random.Random, amount: int, frm: str, to: str, factor: int, ident: str) -> dict:
    ask = rng.choice(ASKS).format(n=amount, frm=frm, to=to)
    answer = amount * factor
    return {"id": ident, "prompt": ask + SUFFIX, "reference": f"{answer} {to}",
            "assert": [{"type": "number", "value": answer}, {"type": "icontains", "value": to}]}


def main() -> None:
    rng = random.Random(5)
    suite_amounts = {2, 7, 13}  # never in the training tasks
    train = []
    for round_ in range(20):
        for frm, to, factor in UNITS:
            amount = rng.choice([n for n in range(1, 60) if n not in suite_amounts])
            train.append(task(rng, amount, frm, to, factor, f"c{len(train)}"))
    rng.shuffle(train)
    (HERE / "t5-conversions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train))
    prompts = [task(rng, amount, frm, to, factor, f"{frm}-{amount}")
               for frm, to, factor in UNITS[:10] for amount in sorted(suite_amounts)[:2]]
    suite = {"name": "t5-conversions",
             "description": "Unit conversions with amounts the training tasks of t5 never use: the answer's last "
                            "number must be the converted amount, and the answer must name the unit.",
             "prompts": prompts}
    (HERE.parent / "prompts" / "t5-conversions.json").write_text(json.dumps(suite, indent=1) + "\n")


if __name__ == "__main__":
    main()
