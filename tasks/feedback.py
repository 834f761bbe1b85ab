"""Production feedback → training examples: what users corrected (or approved) in the service's SQLite store,
as chat examples the data stage and the trainer read like any other split."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from tasks.datasets import Example, example_key, normalise, write_examples


@dataclass(frozen=True)
class Harvest:
    examples: list[Example]
    last_id: int  # the newest feedback id read: the next round starts after it
    skipped: int  # feedback rows read but not turned into examples (low rating without a correction)


def harvest(db_path: str | Path, since_id: int = 0, approve_at: int | None = None, task: str = "feedback") -> Harvest:
    """Feedback newer than `since_id`: a correction becomes the answer; without one, a reply rated at least
    `approve_at` is kept as it was served. The newest feedback on a response wins."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"no feedback database at {path}; the service creates it when it first answers")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT f.id, f.response_id, f.rating, f.correction, r.messages, r.answer FROM feedback f "
            "JOIN responses r ON r.id = f.response_id WHERE f.id > ? ORDER BY f.id", (since_id,)).fetchall()
    latest = {row[1]: row for row in rows}  # in id order: the newest per response wins
    examples, skipped = [], len(rows) - len(latest)
    for fid, response_id, rating, correction, messages, answer in latest.values():
        if correction:
            target = correction
        elif approve_at is not None and rating >= approve_at:
            target = answer
        else:
            skipped += 1
            continue
        turns = json.loads(messages)
        system = next((m["content"] for m in turns if m["role"] == "system"), "")
        user = next(m["content"] for m in reversed(turns) if m["role"] == "user")
        examples.append(Example(f"feedback-{fid}", system, user, target, task, example_key(normalise(user))))
    return Harvest(examples, max((row[0] for row in rows), default=since_id), skipped)


def export(db_path: str | Path, out: str | Path, since_id: int = 0, approve_at: int | None = None,
           task: str = "feedback") -> Harvest:
    """Write the harvest as JSONL chat examples (id, system, user, assistant, task)."""
    found = harvest(db_path, since_id, approve_at, task)
    write_examples(Path(out), found.examples)
    return found
