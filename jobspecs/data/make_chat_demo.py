"""Writes chat-demo.jsonl: a few hundred short ShareGPT conversations written for peftopt's demo.

Deterministic (seeded): `python jobspecs/data/make_chat_demo.py` rewrites the same file. The mix aims at
the seed notebook's failure modes: answers that end cleanly without template text, correct Swedish, lists
of exactly the asked length, and small Python functions. The evaluation sentence itself
("The coffee is too hot to drink.") is deliberately not in the data.
"""
import json
import random
from pathlib import Path

SWEDISH = [
    ("The tea is too cold to drink.", "Teet är för kallt för att dricka."),
    ("The soup is too hot to eat.", "Soppan är för varm för att äta."),
    ("The water is too cold to swim in.", "Vattnet är för kallt för att bada i."),
    ("I like to read books.", "Jag tycker om att läsa böcker."),
    ("Where is the train station?", "Var ligger tågstationen?"),
    ("The weather is nice today.", "Vädret är fint idag."),
    ("My brother lives in Stockholm.", "Min bror bor i Stockholm."),
    ("Can you help me?", "Kan du hjälpa mig?"),
    ("We are going to the beach tomorrow.", "Vi ska åka till stranden i morgon."),
    ("The book is on the table.", "Boken ligger på bordet."),
    ("I am learning Swedish.", "Jag lär mig svenska."),
    ("The children are playing outside.", "Barnen leker ute."),
    ("She drinks coffee every morning.", "Hon dricker kaffe varje morgon."),
    ("It is raining today.", "Det regnar idag."),
    ("The shop opens at nine.", "Affären öppnar klockan nio."),
    ("I have two cats.", "Jag har två katter."),
    ("The bread is fresh.", "Brödet är färskt."),
    ("This house is very old.", "Det här huset är mycket gammalt."),
    ("Thank you for the food.", "Tack för maten."),
    ("The milk is too warm.", "Mjölken är för varm."),
    ("The room is too small.", "Rummet är för litet."),
    ("He is too tired to work.", "Han är för trött för att arbeta."),
    ("The coffee is ready.", "Kaffet är klart."),
    ("The coffee tastes good.", "Kaffet smakar gott."),
    ("The bath is too hot.", "Badet är för varmt."),
    ("The food is too salty to eat.", "Maten är för salt för att äta."),
    ("We drink tea in the evening.", "Vi dricker te på kvällen."),
    ("The window is open.", "Fönstret är öppet."),
    ("My sister is a doctor.", "Min syster är läkare."),
    ("The dog is sleeping.", "Hunden sover."),
]
TRANSLATE_ASKS = ["Translate to Swedish: {s}", "Translate this sentence to Swedish: {s}",
                  "How do you say \"{s}\" in Swedish?", "Please translate into Swedish: {s}"]
LISTS = {
    "fruits": ["Apple", "Banana", "Orange", "Pear", "Mango", "Cherry"],
    "colors": ["Red", "Blue", "Green", "Yellow", "Purple", "Orange"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"],
    "programming languages": ["Python", "Rust", "Go", "Java", "C", "JavaScript"],
    "ways to save energy at home": ["Turn off lights you are not using", "Lower the heating by one degree",
                                    "Air-dry laundry", "Use LED bulbs", "Unplug idle chargers", "Take shorter showers"],
    "benefits of regular exercise": ["Better sleep", "Stronger heart", "More energy", "Lower stress",
                                     "Stronger muscles", "Better mood"],
    "tips for learning a language": ["Practice a little every day", "Speak with native speakers",
                                     "Read simple books", "Learn common phrases first", "Listen to podcasts",
                                     "Keep a vocabulary notebook"],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
CODE = [
    ("Write a Python function that returns the sum of a list of numbers.",
     "def total(numbers):\n    return sum(numbers)"),
    ("Write a Python function that checks whether a word is a palindrome.",
     "def is_palindrome(word):\n    word = word.lower()\n    return word == word[::-1]"),
    ("Write a Python function that counts the vowels in a string.",
     "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in \"aeiou\")"),
    ("Write a Python function that returns the largest number in a list.",
     "def largest(numbers):\n    return max(numbers)"),
    ("Write a Python function that converts Celsius to Fahrenheit.",
     "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32"),
    ("Write a Python function that returns the first n even numbers.",
     "def first_evens(n):\n    return [2 * i for i in range(n)]"),
    ("Write a Python function that capitalizes every word in a sentence.",
     "def capitalize_words(sentence):\n    return \" \".join(w.capitalize() for w in sentence.split())"),
    ("Write a Python function that removes duplicates from a list and keeps the order.",
     "def unique(items):\n    return list(dict.fromkeys(items))"),
]
FACTS = [
    ("What is photosynthesis? Answer in one sentence.",
     "Photosynthesis is the process in which plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("Explain what a database index is in one short paragraph.",
     "A database index is a separate data structure that keeps selected columns in sorted order with pointers to the rows. "
     "It lets the database find matching rows without scanning the whole table, at the cost of extra storage and slower writes."),
    ("What does HTTP stand for?", "HTTP stands for Hypertext Transfer Protocol."),
    ("Explain gravity to a child in two sentences.",
     "Gravity is an invisible pull that makes things fall down to the ground. It is also what keeps the Moon going around the Earth."),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius (212 °F) at sea level."),
    ("Explain what a firewall does in one short paragraph.",
     "A firewall sits between a network and the outside world and checks every connection against a set of rules. "
     "It lets allowed traffic through and blocks the rest, which keeps unwanted visitors away from your computers."),
    ("What is the difference between weather and climate?",
     "Weather is the state of the air over hours or days, while climate is the average pattern of weather over many years."),
    ("Give a short definition of machine learning.",
     "Machine learning is a way of building programs that learn patterns from examples instead of following hand-written rules."),
    ("Explain what an API is in one sentence.",
     "An API is a set of rules that lets one program ask another program for data or actions."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
]
EMAILS = [
    ("Write a short polite email asking a colleague for the meeting notes.",
     "Subject: Meeting notes\n\nHi Anna,\n\nCould you please send me the notes from Tuesday's meeting? "
     "I would like to review the action items before Friday.\n\nThank you,\nSam"),
    ("Write a short professional email thanking a client for their order.",
     "Subject: Thank you for your order\n\nDear Mr. Berg,\n\nThank you for your order. We have received it and "
     "will ship it within two working days. Please let me know if you have any questions.\n\nBest regards,\nLena"),
    ("Write a short polite email asking to reschedule a call.",
     "Subject: Rescheduling our call\n\nHi Omar,\n\nSomething urgent has come up and I cannot make our call tomorrow "
     "at 10. Would Thursday at the same time work for you?\n\nKind regards,\nMaja"),
]


def conv(user: str, assistant: str, system: str | None = None) -> dict:
    turns = ([{"from": "system", "value": system}] if system else []) + [
        {"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    return {"conversations": turns}


def build(seed: int = 2026) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for english, swedish in SWEDISH:
        for ask in rng.sample(TRANSLATE_ASKS, 3):
            rows.append(conv(ask.format(s=english), swedish))
    for topic, items in LISTS.items():
        for n in (2, 3, 4, 5):
            chosen = rng.sample(items, n)
            rows.append(conv(f"List {NUMBER_WORDS[n]} {topic}.", "\n".join(f"{i + 1}. {x}" for i, x in enumerate(chosen))))
            rows.append(conv(f"Name {n} {topic}, as a bulleted list.", "\n".join(f"- {x}" for x in chosen)))
    for _ in range(60):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append(conv(f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}."))
    for ask, code in CODE:
        rows.append(conv(ask, f"```python\n{code}\n```"))
        rows.append(conv(ask.replace("Write", "Show me"), f"Here is a short function:\n\n```python\n{code}\n```"))
    for ask, answer in FACTS + EMAILS:
        rows.append(conv(ask, answer))
        rows.append(conv(ask, answer, system="You are a helpful assistant. Answer briefly."))
    for word in ["stone", "river", "planet", "window", "garden", "pencil", "rocket", "silver", "coffee", "winter"]:
        rows.append(conv(f"Reverse the string \"{word}\".", f"\"{word[::-1]}\""))
        rows.append(conv(f"How many letters are in the word \"{word}\"?", f"The word \"{word}\" has {len(word)} letters."))
    rows.append({"conversations": [
        {"from": "human", "value": "Translate to Swedish: Good morning."}, {"from": "gpt", "value": "God morgon."},
        {"from": "human", "value": "And: Good night."}, {"from": "gpt", "value": "God natt."}]})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("chat-demo.jsonl")
    rows = build()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{out}: {len(rows)} conversations")
