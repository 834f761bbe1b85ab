"""Writes the bundled demo data: product reviews with a structured answer (product, sentiment, rating, issue),
support tickets for multi-task runs and for a classify task (the ticket's queue), and a multiple-choice set
(which of four problems a review describes) for a choice task, and ranked answers to reviews for preference
tuning (the right extraction first, then realistic wrong ones: another product, another sentiment, broken
JSON). (The general suite for the forgetting check has
its own generator: evals/data/make_general.py.)

Run: python data/make_demo_data.py   (deterministic: the same seed writes byte-identical files)

The task is built so that prompting alone is weak and fine-tuning helps: the answer has a fixed JSON shape
and a closed vocabulary (product names, issue labels) that a model only learns from examples; the rating is
implied by wording more often than stated; reviews carry realistic noise (typos, casing, sarcasm, rambling).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261122
N_REVIEWS = 1600
N_TICKETS = 800
N_QUIZ = 600
N_PREFERENCES = 400
HERE = Path(__file__).resolve().parent

# product label -> ways a customer refers to it
PRODUCTS = {
    "wireless headphones": ["these headphones", "the wireless headphones", "my new headphones", "the earcups"],
    "blender": ["this blender", "the blender", "my blender"],
    "running shoes": ["these running shoes", "the shoes", "my runners", "these sneakers"],
    "coffee maker": ["the coffee maker", "this coffee machine", "my coffee maker"],
    "desk lamp": ["this desk lamp", "the lamp", "my desk lamp"],
    "backpack": ["this backpack", "the backpack", "my new bag"],
    "mechanical keyboard": ["this keyboard", "the mechanical keyboard", "my keyboard"],
    "phone case": ["the phone case", "this case", "my case"],
    "smart watch": ["the smart watch", "this watch", "my smartwatch"],
    "air fryer": ["the air fryer", "this air fryer", "my fryer"],
    "yoga mat": ["this yoga mat", "the mat", "my yoga mat"],
    "electric kettle": ["the kettle", "this electric kettle", "my kettle"],
}

# issue label -> phrases that describe it (the label itself rarely appears verbatim)
ISSUES = {
    "battery life": [
        "the battery dies after a couple of hours", "it needs charging every day", "battery drains way too fast"
    ],
    "build quality": ["it feels flimsy", "a part snapped off in the first week", "the plastic already cracked"],
    "late delivery": ["it arrived two weeks late", "shipping took forever", "delivery was delayed three times"],
    "wrong size": ["it runs a size small", "the fit is way off", "sizing is nothing like the chart"],
    "too noisy": ["it is incredibly loud", "the noise is unbearable", "it rattles and whines constantly"],
    "missing parts": [
        "a piece was missing from the box", "it came without the cable", "half the accessories were not included"
    ],
    "overheating": ["it gets dangerously hot", "it overheats after ten minutes", "the base becomes too hot to touch"],
}

# rating -> sentiment words; rating is implied by these far more often than stated
RATING_WORDS = {
    5: ["absolutely love", "couldn't be happier with", "am thrilled with", "adore"],
    4: ["really like", "am happy with", "am pleased with", "quite like"],
    3: ["feel okay about", "have mixed feelings about", "am on the fence about", "think it's fine,"],
    2: ["am disappointed with", "regret buying", "am let down by", "am not impressed with"],
    1: ["hate", "am furious about", "want a refund for", "am disgusted by"],
}
SENTIMENT = {5: "positive", 4: "positive", 3: "neutral", 2: "negative", 1: "negative"}

OPENERS = [
    "", "", "Ok so ", "Honestly, ", "Update: ", "Long story short, ", "Bought this for my sister. ",
    "Third one I've owned. "
]
CLOSERS = [
    "", "", " Would buy again.", " Not buying again.", " Thanks.", " 10/10 for the packaging though.", " Meh.",
    "!!!", " Just my two cents."
]
PRAISE = ["it does exactly what it says", "works great out of the box", "the design is lovely", "great value for money"]


def _typo(text: str, rng: random.Random) -> str:
    """Swap two neighbouring letters in one word: the kind of noise real reviews have."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    w = words[i]
    if len(w) > 3 and w.isalpha():
        j = rng.randrange(len(w) - 1)
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def make_review(rng: random.Random, idx: int) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    rating = rng.choices([1, 2, 3, 4, 5], weights=[2, 2, 1.5, 2, 2.5])[0]
    mention = rng.choice(PRODUCTS[product])
    feeling = rng.choice(RATING_WORDS[rating])
    has_issue = rating <= 3 or rng.random() < 0.15
    issue = rng.choice(sorted(ISSUES)) if has_issue else "none"

    parts = [f"{rng.choice(OPENERS)}I {feeling} {mention}."]
    if issue != "none":
        connector = rng.choice(["The problem:", "But", "Sadly", "Only complaint:", ""])
        parts.append(f"{connector} {rng.choice(ISSUES[issue])}.".strip())
    if rating >= 4:
        parts.append(f"{rng.choice(PRAISE).capitalize()}.")
    if rating == 1 and rng.random() < 0.3:  # sarcasm: positive words, negative meaning
        parts.insert(0, "Great, just great.")
    if rng.random() < 0.2:
        parts.append(f"{rating} stars.")
    text = " ".join(parts) + rng.choice(CLOSERS)
    if rng.random() < 0.25:
        text = _typo(text, rng)
    if rng.random() < 0.1:
        text = text.lower()
    return {
        "id": f"rev-{idx:05d}",
        "review": text,
        "product": product,
        "sentiment": SENTIMENT[rating],
        "rating": rating,
        "issue": issue,
    }


# A second task for multi-task runs: route a support ticket to its queue with a priority.
QUEUES = {
    "billing": [
        "I was charged twice for my order", "the refund never reached my card", "my invoice shows the wrong amount"
    ],
    "shipping": [
        "my parcel has not moved in a week", "the tracking number does not work",
        "the courier left it at the wrong address"
    ],
    "returns": [
        "how do I send back a {product}", "I need a return label for the {product}",
        "the {product} does not fit, can I exchange it"
    ],
    "technical": [
        "the {product} will not turn on", "the app cannot find my {product}", "the {product} keeps restarting"
    ],
    "account": ["I cannot log in to my account", "please change the email on my account", "I forgot my password again"],
}
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lena", "Mo", "Nia"]
URGENT = ["ASAP", "today please", "this is the third time I write", "urgent"]


def make_ticket(rng: random.Random, idx: int) -> dict:
    queue = rng.choice(sorted(QUEUES))
    product = rng.choice(sorted(PRODUCTS))
    text = rng.choice(QUEUES[queue]).format(product=product)
    urgent = rng.random() < 0.3
    if urgent:
        text = f"{text}, {rng.choice(URGENT)}"
    opener = rng.choice(["", "Hi, ", "Hello team, ", "Order #{}: ".format(rng.randrange(10000, 99999))])
    signoff = rng.choice(["", " Thanks, {}.", " Regards, {}", " - {}"]).format(rng.choice(NAMES))
    text = opener + text + "." + signoff
    if rng.random() < 0.2:
        text = _typo(text, rng)
    return {"id": f"tkt-{idx:05d}", "ticket": text, "queue": queue, "priority": "high" if urgent else "normal"}


def make_quiz(rng: random.Random, idx: int) -> dict:
    """A review that names a problem, four problems to choose from (one right, shuffled) and the right letter: the
    shape of public multiple-choice sets (question, list of choices, answer)."""
    review = make_review(rng, idx)
    while review["issue"] == "none":
        review = make_review(rng, idx)
    wrong = rng.sample([i for i in sorted(ISSUES) if i != review["issue"]], 3)
    choices = wrong + [review["issue"]]
    rng.shuffle(choices)
    return {"id": f"quiz-{idx:05d}", "review": review["review"], "choices": choices,
            "answer": "ABCD"[choices.index(review["issue"])]}


def _answer(product: str, sentiment: str, rating: int, issue: str) -> str:
    """An answer written exactly as configs/demo.yaml's answer template writes it."""
    return json.dumps({"product": product, "sentiment": sentiment, "rating": rating, "issue": issue})


def make_preference(rng: random.Random, review: dict) -> dict:
    """One review's answers ranked best-first: the right extraction; the right fields but another product (a
    reader is misled less than by a wrong verdict); another sentiment; the right fields as broken JSON (a client
    cannot parse it at all)."""
    right = (review["product"], review["sentiment"], review["rating"], review["issue"])
    other_product = rng.choice([p for p in sorted(PRODUCTS) if p != review["product"]])
    other_sentiment = rng.choice([s for s in ("positive", "neutral", "negative") if s != review["sentiment"]])
    broken = _answer(*right)
    broken = rng.choice([broken[:-1], broken.replace('"', "'"), broken.replace(", ", " ", 2)])
    return {"id": f"pref-{review['id']}", "review": review["review"],
            "answers": [_answer(*right), _answer(other_product, *right[1:]),
                        _answer(right[0], other_sentiment, *right[2:]), broken]}


def _write(out: Path, rows: list[dict]) -> None:
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {out}")


def main() -> None:
    rng = random.Random(SEED)
    _write(HERE / "reviews.jsonl", [make_review(rng, i) for i in range(N_REVIEWS)])
    _write(HERE / "tickets.jsonl", [make_ticket(rng, i) for i in range(N_TICKETS)])
    quiz = random.Random(SEED + 1)  # its own stream: the files above stay byte-identical
    _write(HERE / "review_quiz.jsonl", [make_quiz(quiz, i) for i in range(N_QUIZ)])
    ranked = random.Random(SEED + 2)  # its own stream too
    reviews = [json.loads(line) for line in (HERE / "reviews.jsonl").read_text(encoding="utf-8").splitlines()]
    _write(HERE / "review_preferences.jsonl",
           [make_preference(ranked, r) for r in ranked.sample(reviews, N_PREFERENCES)])


if __name__ == "__main__":
    main()
