"""Writes N alpaca rows of random words (12 in the instruction, 30 in the output, numbered so that none is a
duplicate) for measuring prepare's memory on large files (README, "Data shapes"):
    python bench/alpaca_rows.py 1000000 alpaca-1m.jsonl
    /usr/bin/time -v peftopt run SPEC --stages prepare      # SPEC's data.source: that file, format alpaca
"""
import json
import random
import sys

WORDS = ("the a model data train loss rate batch layer weight adapter merge export quantize gradient "
         "learning").split()


def main(count: int, path: str) -> None:
    rng = random.Random(0)
    with open(path, "w") as out:
        for i in range(count):
            out.write(json.dumps({"instruction": " ".join(rng.choices(WORDS, k=12)) + f" #{i}", "input": "",
                                  "output": " ".join(rng.choices(WORDS, k=30))}) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
