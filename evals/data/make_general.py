"""Writes evals/data/general.jsonl: the bundled general-capability suite the gate checks for forgetting.

Run: python evals/data/make_general.py   (deterministic: the same seed writes byte-identical files)

Five skills in equal parts, interleaved so that any `evaluation.general_limit` keeps them balanced: world
knowledge, reading comprehension, commonsense, arithmetic word problems, and recognising a reply that follows
a format instruction. Every item is written by the tables and templates below (no outside data). Each line:
{"id", "category", "question", "choices": [4 texts], "answer": index of the right choice} — the schema a
config's own suites (`evaluation.general`) follow too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261123
PER_CATEGORY = 84
OUT = Path(__file__).resolve().parent / "general.jsonl"

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Canada": "Ottawa",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Poland": "Warsaw",
            "Greece": "Athens", "Chile": "Santiago", "Germany": "Berlin", "Cuba": "Havana", "India": "New Delhi",
            "Russia": "Moscow", "China": "Beijing", "Portugal": "Lisbon", "Sweden": "Stockholm",
            "Ireland": "Dublin", "Austria": "Vienna", "Thailand": "Bangkok", "Argentina": "Buenos Aires",
            "Turkey": "Ankara", "Australia": "Canberra", "Mexico": "Mexico City", "Finland": "Helsinki"}
SYMBOLS = {"oxygen": "O", "hydrogen": "H", "gold": "Au", "silver": "Ag", "iron": "Fe", "sodium": "Na",
           "carbon": "C", "nitrogen": "N", "helium": "He", "copper": "Cu", "lead": "Pb", "calcium": "Ca",
           "potassium": "K", "neon": "Ne", "zinc": "Zn"}
ANIMALS = {"dolphin": "a mammal", "eagle": "a bird", "salmon": "a fish", "crocodile": "a reptile",
           "frog": "an amphibian", "whale": "a mammal", "penguin": "a bird", "shark": "a fish",
           "lizard": "a reptile", "bat": "a mammal", "owl": "a bird", "tuna": "a fish", "snake": "a reptile",
           "salamander": "an amphibian", "horse": "a mammal", "parrot": "a bird"}
CONTINENTS = {"Brazil": "South America", "Nigeria": "Africa", "Vietnam": "Asia", "Belgium": "Europe",
              "Canada": "North America", "Fiji": "Oceania", "Ghana": "Africa", "Nepal": "Asia",
              "Denmark": "Europe", "Colombia": "South America", "Mexico": "North America", "Samoa": "Oceania",
              "Morocco": "Africa", "Japan": "Asia", "Hungary": "Europe", "Uruguay": "South America"}
FACTS = [("How many days are in a week?", "seven", ["five", "ten", "twelve"]),
         ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
         ("What is frozen water called?", "ice", ["steam", "salt", "sand"]),
         ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
         ("What is the largest ocean on Earth?", "the Pacific", ["the Atlantic", "the Indian", "the Arctic"]),
         ("How many minutes are in an hour?", "sixty", ["thirty", "hundred", "twenty-four"]),
         ("What gas do plants take in from the air?", "carbon dioxide", ["helium", "neon", "argon"]),
         ("Which star is at the centre of our solar system?", "the Sun", ["Sirius", "Polaris", "the Moon"]),
         ("How many continents are there?", "seven", ["three", "nine", "twelve"]),
         ("What do bees make?", "honey", ["milk", "silk", "wax paper"])]

USES = {"a pair of scissors": "cutting paper", "a broom": "sweeping the floor", "a kettle": "boiling water",
        "an umbrella": "staying dry in the rain", "a pillow": "resting your head", "a ladder": "reaching high places",
        "a toothbrush": "cleaning teeth", "a spoon": "eating soup", "a key": "opening a lock",
        "a thermometer": "measuring temperature", "a map": "finding the way", "a towel": "drying yourself",
        "a hammer": "driving in nails", "a fridge": "keeping food cold", "a pen": "writing",
        "a clock": "telling the time", "a bucket": "carrying water", "a stapler": "joining sheets of paper",
        "a pair of sunglasses": "shading your eyes", "a blanket": "keeping warm in bed"}
SITUATIONS = {"It starts to rain and you are walking outside.": "open an umbrella",
              "Your hands are dirty before dinner.": "wash your hands",
              "The room is too dark to read.": "turn on a light",
              "You are thirsty.": "drink some water",
              "The milk smells sour.": "throw it away",
              "You feel cold in the evening.": "put on a sweater",
              "A pot on the stove is boiling over.": "turn down the heat",
              "Your phone battery is almost empty.": "charge the phone",
              "You are tired late at night.": "go to sleep",
              "The plant's soil is completely dry.": "water the plant",
              "You spilled juice on the table.": "wipe it up",
              "The traffic light turns red while you drive.": "stop the car"}

NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Ravi", "Elena", "Jonas", "Chen", "Nadia"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
OBJECTS = ["scarf", "book", "mug", "lamp", "backpack", "kite", "notebook", "bicycle"]
PLACES = ["garage", "kitchen", "attic", "garden shed", "bedroom", "office", "basement", "hallway"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "stamps", "coins"]
WORDS = ["river", "window", "garden", "planet", "silver", "market", "candle", "forest", "pillow", "rocket"]


def _mc(rng: random.Random, question: str, right: str, wrong: list[str]) -> dict:
    choices = [right, *rng.sample([w for w in dict.fromkeys(wrong) if w != right], 3)]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(right)}


def knowledge(rng: random.Random) -> list[dict]:
    items = [_mc(rng, f"What is the capital of {c}?", city, list(CAPITALS.values())) for c, city in CAPITALS.items()]
    items += [_mc(rng, f"What is the chemical symbol for {e}?", s, list(SYMBOLS.values())) for e, s in SYMBOLS.items()]
    items += [_mc(rng, f"What kind of animal is a {a}?", k,
                  ["a mammal", "a bird", "a fish", "a reptile", "an amphibian"]) for a, k in ANIMALS.items()]
    items += [_mc(rng, f"On which continent is {c}?", k, sorted(set(CONTINENTS.values())))
              for c, k in CONTINENTS.items()]
    items += [_mc(rng, q, right, wrong) for q, right, wrong in FACTS]
    return rng.sample(items, PER_CATEGORY)


def reading(rng: random.Random) -> list[dict]:
    items = []
    while len(items) < PER_CATEGORY:
        a, b = rng.sample(NAMES, 2)
        colour, thing, place, day = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(DAYS)
        story = (f"On {day}, {a} gave {b} a {colour} {thing}. {b} thanked {a} and put the {thing} in the "
                 f"{place}.")
        kind = len(items) % 4
        if kind == 0:
            items.append(_mc(rng, f"{story} What colour was the {thing}?", colour, COLOURS))
        elif kind == 1:
            items.append(_mc(rng, f"{story} Who gave the {thing}?", a, [b, *NAMES]))
        elif kind == 2:
            items.append(_mc(rng, f"{story} Where did {b} put the {thing}?", f"in the {place}",
                             [f"in the {p}" for p in PLACES]))
        else:
            items.append(_mc(rng, f"{story} On which day did this happen?", day, DAYS))
    return items


def commonsense(rng: random.Random) -> list[dict]:
    pool = [_mc(rng, f"What is {thing} mainly used for?", use, list(USES.values())) for thing, use in USES.items()]
    pool += [_mc(rng, f"{situation} What is the sensible thing to do?", action, list(SITUATIONS.values()))
             for situation, action in SITUATIONS.items()]
    items = list(pool)
    while len(items) < PER_CATEGORY:  # the same facts asked with the distractors drawn again
        thing, use = rng.choice(sorted(USES.items()))
        items.append(_mc(rng, f"Which of these would you use for {use}?", thing, list(USES)))
    return items[:PER_CATEGORY]


def arithmetic(rng: random.Random) -> list[dict]:
    items = []
    for i in range(PER_CATEGORY):
        name, thing = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(5, 30), rng.randint(2, 20), rng.randint(1, 5)
        if i % 3 == 0:
            question = f"{name} has {a} {thing}, buys {b} more and gives {c} away. How many {thing} are left?"
            right = a + b - c
        elif i % 3 == 1:
            question, right = f"{name} fills {c} boxes with {b} {thing} each. How many {thing} is that in all?", b * c
        else:
            question, right = f"{name} had {a + b} {thing} and lost {b} of them. How many {thing} remain?", a
        wrong = [right + d for d in (-2, -1, 1, 2, 3, 10) if right + d >= 0]
        items.append(_mc(rng, question, str(right), [str(w) for w in wrong]))
    return items


def formats(rng: random.Random) -> list[dict]:
    items = []
    for i in range(PER_CATEGORY):
        w1, w2, w3 = rng.sample(WORDS, 3)
        kind = i % 6
        if kind == 0:
            instruction, right, wrong = "Answer in capital letters only.", f"{w1} {w2}".upper(), \
                [f"{w1} {w2}", f"{w1.title()} {w2}", f"{w1} {w2.upper()}"]
        elif kind == 1:
            instruction, right, wrong = "Answer with exactly one word.", w1, \
                [f"{w1} {w2}", f"{w1} and {w2}", f"the {w1} {w2} {w3}"]
        elif kind == 2:
            instruction, right, wrong = 'Answer with a JSON object with the key "answer".', \
                f'{{"answer": "{w1}"}}', [f"answer: {w1}", f'["{w1}"]', f'{{"reply": "{w1}"}}']
        elif kind == 3:
            instruction, right, wrong = "Answer with a list numbered 1 to 3.", f"1. {w1} 2. {w2} 3. {w3}", \
                [f"{w1}, {w2}, {w3}", f"- {w1} - {w2} - {w3}", f"1. {w1} 2. {w2}"]
        elif kind == 4:
            instruction, right, wrong = "Answer with a number only.", str(rng.randint(2, 99)), \
                [f"about {rng.randint(2, 99)}", f"{w1}", f"{rng.randint(2, 99)} {w1}s"]
        else:
            instruction, right, wrong = "Answer in lowercase letters only.", f"{w1} {w2}", \
                [f"{w1.title()} {w2}", f"{w1.upper()} {w2}", f"{w1} {w2.title()}"]
        items.append(_mc(rng, f"Which reply follows the instruction \"{instruction}\"?", right, wrong))
    return items


def main() -> None:
    rng = random.Random(SEED)
    categories = {"knowledge": knowledge(rng), "reading": reading(rng), "commonsense": commonsense(rng),
                  "arithmetic": arithmetic(rng), "format": formats(rng)}
    lines = []
    for i in range(PER_CATEGORY):  # interleaved: any prefix stays balanced
        for name, items in categories.items():
            lines.append(json.dumps({"id": f"gen-{len(lines):04d}", "category": name, **items[i]}, ensure_ascii=False))
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} items ({PER_CATEGORY} per category) to {OUT}")


if __name__ == "__main__":
    main()
