"""Writes swedish-translate.jsonl: short English-to-Swedish translations as ShareGPT conversations whose
answers are the translation alone (no "Sure, here is the translation"), for jobspecs/task3-sweep.json.

    python jobspecs/data/make_swedish_translate.py      # rewrites jobspecs/data/swedish-translate.jsonl

The pairs were written by hand for peftopt. Many are "X is too ADJ to VERB" and neuter nouns whose adjective
takes -t (Vattnet är för kallt ...), the agreement the seed notebook's models got wrong. The evaluation
sentence ("The coffee is too hot to drink.") and anything about coffee are left out on purpose, so the
evaluation still measures generalisation, not recall.
"""
import json
from pathlib import Path

PAIRS = [
    ("The water is too cold to swim in.", "Vattnet är för kallt för att bada i."),
    ("The house is big and old.", "Huset är stort och gammalt."),
    ("The tea is too strong.", "Teet är för starkt."),
    ("The soup is too hot to eat.", "Soppan är för varm för att äta."),
    ("The bread is fresh.", "Brödet är färskt."),
    ("The milk is cold.", "Mjölken är kall."),
    ("The room is too small.", "Rummet är för litet."),
    ("The book is interesting.", "Boken är intressant."),
    ("The weather is nice today.", "Vädret är fint i dag."),
    ("My car is new.", "Min bil är ny."),
    ("The child is tired.", "Barnet är trött."),
    ("The apple is red.", "Äpplet är rött."),
    ("The window is open.", "Fönstret är öppet."),
    ("The door is closed.", "Dörren är stängd."),
    ("The food is ready.", "Maten är klar."),
    ("The glass is empty.", "Glaset är tomt."),
    ("The bed is too hard to sleep on.", "Sängen är för hård för att sova på."),
    ("The train is late again.", "Tåget är försenat igen."),
    ("The museum is open on Sundays.", "Museet är öppet på söndagar."),
    ("I would like a cup of tea, please.", "Jag skulle vilja ha en kopp te, tack."),
    ("Where is the train station?", "Var ligger tågstationen?"),
    ("How much does this cost?", "Hur mycket kostar det här?"),
    ("I do not understand.", "Jag förstår inte."),
    ("Can you help me?", "Kan du hjälpa mig?"),
    ("We are going to the beach tomorrow.", "Vi ska åka till stranden i morgon."),
    ("She reads a book every evening.", "Hon läser en bok varje kväll."),
    ("The children are playing in the garden.", "Barnen leker i trädgården."),
    ("It is raining outside.", "Det regnar ute."),
    ("The shop opens at nine.", "Affären öppnar klockan nio."),
    ("My brother lives in Stockholm.", "Min bror bor i Stockholm."),
    ("The letter is too long to read.", "Brevet är för långt för att läsa."),
    ("The ice is too thin to walk on.", "Isen är för tunn för att gå på."),
    ("The water is warm today.", "Vattnet är varmt i dag."),
    ("The summer was short.", "Sommaren var kort."),
    ("The city is beautiful in winter.", "Staden är vacker på vintern."),
    ("The dog is hungry.", "Hunden är hungrig."),
    ("The cake is too sweet.", "Kakan är för söt."),
    ("The sofa is comfortable.", "Soffan är bekväm."),
    ("The meeting is at three o'clock.", "Mötet är klockan tre."),
    ("Thank you for the help.", "Tack för hjälpen."),
    ("The exam was difficult.", "Provet var svårt."),
    ("The sea was calm this morning.", "Havet var lugnt i morse."),
    ("The film was too long.", "Filmen var för lång."),
    ("The paper is too wet to write on.", "Papperet är för blött för att skriva på."),
    ("The road is dangerous in the dark.", "Vägen är farlig i mörkret."),
    ("The pool is too deep for the children.", "Poolen är för djup för barnen."),
    ("The sun is warm.", "Solen är varm."),
    ("The oven is hot.", "Ugnen är het."),
    ("The bath is too hot.", "Badet är för varmt."),
    ("The juice is too sour to drink.", "Juicen är för sur för att dricka."),
]
ASKS = ["Translate this sentence to Swedish: {}", "Translate to Swedish: {}", 'How do you say "{}" in Swedish?',
        "Please translate into Swedish: {}", 'What is "{}" in Swedish?']


def rows() -> list[dict]:
    return [{"conversations": [{"from": "human", "value": ASKS[i % len(ASKS)].format(english)},
                               {"from": "gpt", "value": swedish}]}
            for i, (english, swedish) in enumerate(PAIRS)]


if __name__ == "__main__":
    out = Path(__file__).with_name("swedish-translate.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()), encoding="utf-8")
    print(f"wrote {out} ({len(PAIRS)} conversations)")
