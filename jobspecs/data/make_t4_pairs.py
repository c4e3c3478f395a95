"""Writes t4-pairs.jsonl: preference pairs (TRL's explicit form, prompt/chosen/rejected) aimed at the two failures the
seed notebook's T1 to T3 kept, for jobspecs/t4.json (DPO on T1's merged model).

    python jobspecs/data/make_t4_pairs.py      # rewrites jobspecs/data/t4-pairs.jsonl

Written by hand for peftopt:
- Swedish: each English sentence of make_swedish_translate.py with its correct translation (chosen) against a
  wrong one of the kinds T0 to T3 produced (rejected): the adjective not agreeing with a neuter noun ("Vattnet är
  för kallt" against "för kall"), an English word left in ("drinka"), the English sentence repeated untranslated,
  a wrong article or verb. The evaluation sentence and anything about coffee stay out, as in task 3.
- Leakage: short questions with a clean answer (chosen) against the same answer after the system and role
  headers the notebook's answers began with (rejected: "system\\n\\nCutting Knowledge Date: December 2023 ...").
"""
import json
from pathlib import Path

from make_swedish_translate import ASKS, PAIRS

# One wrong translation per entry of PAIRS, in the same order, each of a kind the notebook's models made.
WRONG = [
    "Vattnet är för kall för att bada i.", "Huset är stor och gammal.", "Teet är för stark.",
    "Soppan är för varmt för att äta.", "Brödet är färsk.", "Mjölken är kallt.", "Rummet är för liten.",
    "The book is interesting.", "Vädret är fin i dag.", "Min bil är nytt.", "Barnet är tröttt.",
    "Äpplet är röd.", "Fönstret är öppen.", "Dörren är stängt.", "Maten är klart.", "Glaset är tom.",
    "Sängen är för hårt för att sova på.", "Tåget är sen igen.", "Museet är öppen på söndagar.",
    "Jag skulle gilla en kopp te, tack.", "Var är tåg stationen?", "Hur mycket kostar detta är?",
    "I do not understand.", "Kan du hjälp mig?", "Vi går till stranden imorrow.",
    "Hon läsa en bok varje kväll.", "Barnen spelar i trädgården.", "Det är regnar ute.",
    "Affären öppna klockan nio.", "Min bror lever i Stockholm.", "Brevet är för lång för att läsa.",
    "Isen är för tunt för att gå på.", "Vattnet är varm i dag.", "Sommaren var kortt.",
    "The city is beautiful in winter.", "Hunden är hungrigt.", "Kakan är för sött.",
    "Soffan är bekvämt.", "Mötet är på tre klockan.", "Tack för hjälp.", "Provet var svår.",
    "Havet var lugn i morse.", "Filmen var för långt.", "Papperet är för blöt för att skriva på.",
    "Vägen är farligt i mörkret.", "Poolen är för djupt för barnen.", "Solen är varmt.",
    "Ugnen är hett.", "Badet är för varm.", "Juicen är för surt för att drinka.",
]

# The system block Meta's Llama 3.1/3.2 template injects, and the role headers decoded along with the answer:
# what every T0-T3 answer in the notebook started with.
LEAKED = "system\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nuser\n\n{prompt}assistant\n\n{answer}"
CLEAN = [
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Give me a synonym for 'happy'.", "Joyful."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("Suggest a name for a grey cat.", "How about Ash?"),
    ("What is the plural of 'mouse'?", "The plural of 'mouse' is 'mice'."),
    ("Explain what a noun is in one sentence.", "A noun is a word that names a person, place, thing or idea."),
    ("What language is spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of 'ancient'?", "Modern."),
    ("Write a one-line greeting for a birthday card.", "Happy birthday, and may your year be full of good surprises!"),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Give one tip for sleeping better.", "Keep the same bedtime every night, weekends included."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote 'Pride and Prejudice'."),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
    ("Convert 2 kilometres to metres.", "2 kilometres is 2,000 metres."),
    ("What does 'RAM' stand for?", "RAM stands for random-access memory."),
    ("Name a fruit that is high in vitamin C.", "Oranges are high in vitamin C."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 °F."),
]


def rows() -> list[dict]:
    assert len(WRONG) == len(PAIRS)
    out = [{"prompt": ASKS[i % len(ASKS)].format(english), "chosen": swedish, "rejected": wrong}
           for i, ((english, swedish), wrong) in enumerate(zip(PAIRS, WRONG))]
    out += [{"prompt": prompt, "chosen": answer, "rejected": LEAKED.format(prompt=prompt, answer=answer)}
            for prompt, answer in CLEAN]
    return out


if __name__ == "__main__":
    out = Path(__file__).with_name("t4-pairs.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()), encoding="utf-8")
    print(f"wrote {out} ({len(rows())} pairs)")
