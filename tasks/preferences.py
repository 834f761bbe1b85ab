"""Preference data: judged answers to prompts → ordered pairs (DPO) or judged answers (KTO), split by prompt.

Three shapes of row, read through the task's templates and field mapping like every other task: pairs (a
chosen and a rejected answer), rankings (answers best-first, or with scores: ordered pairs, ties skipped, capped
per prompt) and binary (one answer, desirable or not). Every bad row is named with its file and line and its
fault, as the data stage names them; with `on_bad_rows: skip` it goes to the rejects file instead.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from jinja2 import TemplateError

from tasks.datasets import (
    SCALARS,
    SPLITS,
    DataError,
    Example,
    compile_template,
    example_key,
    fingerprint,
    normalise,
    read_rows,
    readable_rows,
    rejecter,
    split,
    template_variables,
    write_examples,
    write_rejects,
)
from tasks.schema import TaskConfig

# The columns each shape reads (renamed through `fields` like any template variable).
COLUMNS = {"pairs": ("chosen", "rejected"), "rankings": ("answers",), "binary": ("answer", "desirable")}
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


@dataclass(frozen=True)
class Preference:
    """One judged row: a pair (chosen over rejected), or one answer judged desirable or not (`desirable` set).
    `key` is the prompt's identity (its input fields, as the task's examples are keyed): splits go by prompt."""
    id: str
    system: str
    user: str
    chosen: str = ""
    rejected: str = ""
    desirable: bool | None = None  # binary rows: `chosen` holds the answer
    key: str = ""

    @property
    def paired(self) -> bool:
        return self.desirable is None


@dataclass(frozen=True)
class PreferenceSplits:
    """What the preference data hands on: its split files (by prompt), the held-out pairs each system is scored
    on as a two-answer choice, counts, fingerprints and the rejects file."""
    train: str
    validation: str
    test: str
    test_choices: str  # the test pairs as ranked examples: choices (chosen, rejected) in a drawn order
    rejects: str
    counts: dict[str, int]
    fingerprints: dict[str, str]


def ranked_pairs(answers: list[str], scores: list[float] | None, cap: int) -> list[tuple[str, str]]:
    """Ordered (better, worse) pairs of a ranking: answers best-first, or ordered by `scores` (higher is better).
    Equal scores, or answers equal after normalisation, state no preference and make no pair. At most `cap`
    pairs, the best answer against each worse one first, then the second best against those below it, …"""
    order = list(range(len(answers)))
    if scores is not None:
        order.sort(key=lambda i: -scores[i])  # stable: equal scores keep their order, and make no pair below
    pairs = []
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if (scores is not None and scores[i] == scores[j]) or normalise(answers[i]) == normalise(answers[j]):
                continue
            pairs.append((answers[i], answers[j]))
    return pairs[:cap]


def _flag(value) -> bool | None:
    """A `desirable` cell: JSON booleans, or the words a CSV or spreadsheet writes for them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, SCALARS) else ""
    return True if text in TRUE else False if text in FALSE else None


def _judged(task: TaskConfig, record: dict, render: Callable[[object], str]) -> tuple[list[tuple], str | None]:
    """The row's judgements as (chosen, rejected, desirable) triples, or its fault."""
    column = {name: task.fields.get(name, name) for name in COLUMNS[task.shape] + ("scores",)}
    for name in COLUMNS[task.shape]:
        if column[name] not in record or record[column[name]] in (None, ""):
            return [], f"missing field {column[name]!r} (a {task.shape} row needs {', '.join(COLUMNS[task.shape])})"
    if task.shape == "pairs":
        chosen, rejected = render(record[column["chosen"]]), render(record[column["rejected"]])
        if normalise(chosen) == normalise(rejected):
            return [], "chosen and rejected are the same answer after normalisation: no preference to learn"
        return [(chosen, rejected, None)], None
    if task.shape == "binary":
        flag = _flag(record[column["desirable"]])
        if flag is None:
            return [], f"{column['desirable']!r} must be true or false, got {record[column['desirable']]!r}"
        return [(render(record[column["answer"]]), "", flag)], None
    answers, scores = record[column["answers"]], record.get(column["scores"])
    if not isinstance(answers, list) or len(answers) < 2:
        return [], f"{column['answers']!r} must be a list of at least 2 answers, got {json.dumps(answers)[:60]}"
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(answers)
                               or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)):
        return [], f"{column['scores']!r} must be a list of {len(answers)} numbers, one per answer"
    pairs = ranked_pairs([render(a) for a in answers], scores, task.max_pairs_per_prompt)
    if not pairs:
        return [], "a ranking of ties only: no answer is preferred to another"
    return [(c, r, None) for c, r in pairs], None


def read_preferences(task: TaskConfig, on_bad_rows: str = "error", held_out: dict[str, str] | None = None,
                     seed: int = 13) -> tuple[list[Preference], list[dict]]:
    """Every row of `task.data` as judged rows, and the rejects. `held_out`: a normalised prompt or prompt key →
    the SFT split it is held out in; a preference on such a prompt would train on a question the gate tests, so
    it is a bad row."""
    if task.kind != "preference":
        raise ValueError(f"task {task.name} is of kind {task.kind}, not preference")
    variables = template_variables(*task.prompts, task.answer) - {"answer"}
    input_vars = sorted(template_variables(*task.prompts))
    rows, _ = read_rows(task.data)
    compiled = {text: compile_template(text) for text in (*task.prompts, task.answer)}
    rng = random.Random(seed)
    found, rejects, seen = [], [], {}
    reject = rejecter(on_bad_rows, rejects, task=task.name)
    for where, record, context in readable_rows(rows, task, variables, reject):
        prompt = task.prompts[0] if task.prompt_choice == "first" else rng.choice(task.prompts)
        try:
            user = compiled[prompt].render(**context).strip()
            judged, fault = _judged(task, record,
                                    lambda value: compiled[task.answer].render(**context, answer=value).strip())
        except TemplateError as exc:
            reject(where, f"template error: {exc}", record)
            continue
        if fault or not user or any(not c for c, _, _ in judged):
            reject(where, fault or f"the {'prompt' if not user else 'answer'} template renders empty text", record)
            continue
        key = example_key(normalise(" ".join(str(context[v]) for v in input_vars)))
        split_name = (held_out or {}).get(key) or (held_out or {}).get(normalise(user))
        if split_name:
            reject(where, f"its prompt is a {split_name} prompt of the fine-tuning task: the gate tests on it", record)
            continue
        identity = (key, tuple((normalise(c), normalise(r), d) for c, r, d in judged))
        if identity in seen:
            reject(where, f"duplicate of {seen[identity]}", record)
            continue
        seen[identity] = where
        rid = str(record.get("id", where))
        found += [Preference(rid if len(judged) == 1 else f"{rid}#{i}", task.system_prompt, user, c, r, d, key)
                  for i, (c, r, d) in enumerate(judged)]
    if not found:
        raise DataError(f"{task.data}: every row was rejected ({len(rejects)}); first: {rejects[0]['reason']}")
    return found, rejects


def held_out_prompts(held_out: dict[str, Iterable[Example]]) -> dict[str, str]:
    """The fine-tuning tasks' held-out prompts (split name → its examples) by key and by normalised text → the
    split: a preference on one of them would train on a question the gate tests."""
    found = {}
    for name, examples in held_out.items():
        for e in examples:
            found.update({e.key: name, normalise(e.user): name} if e.key else {normalise(e.user): name})
    return found


def longest_tokens(row: Preference, count: Callable[[list[dict]], int]) -> int:
    """A row's length as training sees it: the prompt and its longer answer, chat template applied."""
    return max(count(messages(row, answer)) for answer in (row.chosen, row.rejected) if answer)


def messages(row: Preference, answer: str | None = None) -> list[dict]:
    """The chat a preference row is trained and scored as: system (when set), the prompt, then `answer` as the
    assistant's turn; the same rendering as a fine-tuning example (tasks.datasets.chat_messages)."""
    turns = [{"role": "system", "content": row.system}] if row.system else []
    turns.append({"role": "user", "content": row.user})
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def held_out_pairs(rows: list[Preference]) -> list[Preference]:
    """Held-out pairs to score: a split's pairs as they are; binary rows paired per prompt, each desirable answer
    against each undesirable one."""
    pairs = [r for r in rows if r.paired]
    by_prompt: dict[str, list[Preference]] = {}
    for r in rows:
        if not r.paired:
            by_prompt.setdefault(r.key, []).append(r)
    for group in by_prompt.values():
        pairs += [Preference(f"{good.id}>{bad.id}", good.system, good.user, good.chosen, bad.chosen, None, good.key)
                  for good in group if good.desirable for bad in group if not bad.desirable]
    return pairs


def as_choices(pairs: list[Preference], seed: int) -> list[Example]:
    """Pairs as ranked examples (lm-eval multiple_choice over the two answers; the right one the chosen). The
    order of the two is drawn per pair: a model that cannot tell them apart (equal likelihoods) scores chance,
    not the first position's share."""
    out = []
    for p in pairs:
        flip = hashlib.sha256(f"{seed}:{p.id}".encode()).digest()[0] & 1
        out.append(Example(p.id, p.system, p.user, p.chosen, "preference", p.key,
                           (p.rejected, p.chosen) if flip else (p.chosen, p.rejected)))
    return out


def write_preferences(path: Path, rows: list[Preference]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load_preferences(path: str | Path) -> list[Preference]:
    return [Preference(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def prepare_preferences(task: TaskConfig, out_dir: str | Path, *, validation: float, test: float, seed: int,
                        on_bad_rows: str, held_out: dict[str, str], count: Callable[[list[dict]], int],
                        max_tokens: int, max_test_pairs: int) -> PreferenceSplits:
    """Read, check, measure with the model's tokenizer (`count`: tokens of a chat), split by prompt and write:
    rows over `max_tokens` are rejected (never truncated) before anything is split or recorded, so the counts and
    fingerprints describe the data trained and tested on."""
    rows, rejects = read_preferences(task, on_bad_rows, held_out, seed)
    reject = rejecter(on_bad_rows, rejects, task=task.name)
    kept = []
    for row in rows:
        n = longest_tokens(row, count)
        if n > max_tokens:
            reject(f"{task.data} id {row.id}", f"over-long: {n} tokens > align.max_seq_length {max_tokens} with "
                                               "the model's chat template", None)
        else:
            kept.append(row)
    if not kept:
        raise DataError(f"{task.data}: every row is longer than align.max_seq_length ({max_tokens} tokens)")
    # By the prompt's key, so one prompt's pairs stay in one split, drawn apart from the fine-tuning task's buckets:
    # with the same seed the same key lands in the same bucket, and every prompt left after the held-out check
    # (the fine-tuning task's training prompts) would land in train.
    parts = split(kept, validation, test, f"{seed}/preferences")
    out = Path(out_dir)
    files = {name: write_preferences(out / f"{name}.jsonl", parts[name]) for name in SPLITS}
    held = held_out_pairs(parts["test"])[:max_test_pairs]
    if not held:
        raise DataError(f"{task.data}: no held-out pair to score preferences on (the test split's "
                        f"{len(parts['test'])} rows judge no two answers of one prompt)")
    rejects_path = out / "rejects.jsonl"
    write_rejects(rejects_path, rejects)
    return PreferenceSplits(
        train=files["train"], validation=files["validation"], test=files["test"],
        test_choices=write_examples(out / "test_choices.jsonl", as_choices(held, seed)), rejects=str(rejects_path),
        counts={name: len(parts[name]) for name in SPLITS} | {"test_pairs": len(held), "rejected": len(rejects)},
        fingerprints={name: fingerprint(parts[name]) for name in SPLITS})
