"""The production feedback store: every served answer and the ratings and corrections sent on it, in SQLite (WAL).

One owner for the schema: the service writes it (the Bento carries this file), the review commands and the
feedback round read and update it (tasks/feedback.py). Text is redacted before it is stored; feedback arrives
*pending* and trains nothing until a reviewer approves it. Imports nothing of the project.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path

PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
# Sent by the front (serving/front.py) alone, which drops them from clients' requests: one request's pair id, on
# both the champion's and the shadow's copy, and the mark on the shadow's copy.
PAIR_HEADER, SHADOW_HEADER = "x-tuneline-pair", "x-tuneline-shadow"

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT NOT NULL,
    messages TEXT NOT NULL, answer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
    response_id TEXT NOT NULL REFERENCES responses(id), rating INTEGER NOT NULL, correction TEXT,
    comment TEXT);
"""
# Columns added since the first schema: an older store gains them when it is opened.
ADDED = {
    "responses": {"registered_model": "TEXT NOT NULL DEFAULT ''", "version": "TEXT NOT NULL DEFAULT ''",
                  "system_supplied": "INTEGER NOT NULL DEFAULT 0", "redactions": "INTEGER NOT NULL DEFAULT 0",
                  # the served system and the request's time, for its MLflow trace; the trace's id once written
                  "system": "TEXT NOT NULL DEFAULT ''", "latency_ms": "REAL NOT NULL DEFAULT 0", "trace_id": "TEXT",
                  # a shadow deploy: the id the front gave one request's champion and shadow answers, and
                  # whether this answer is the shadow's (recorded, never returned)
                  "pair": "TEXT", "shadow": "INTEGER NOT NULL DEFAULT 0"},
    "feedback": {"status": f"TEXT NOT NULL DEFAULT '{PENDING}'", "key_id": "TEXT NOT NULL DEFAULT ''",
                 "reviewer": "TEXT", "reviewed_at": "REAL", "reason": "TEXT",
                 "redactions": "INTEGER NOT NULL DEFAULT 0",
                 # written to the trace: the rating and correction; the review decision
                 "traced": "INTEGER NOT NULL DEFAULT 0", "decision_traced": "INTEGER NOT NULL DEFAULT 0"},
}

# What redaction replaces before anything is stored. Shapes, not validation: a false positive costs a token of
# context, a miss stores someone's card number. Written by hand: no library in our stack does it offline.
REDACTIONS = [
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")),
    ("card", re.compile(r"\b\d(?:[ -]?\d){12,18}\b")),
    ("phone", re.compile(r"(?<![\w])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w])")),
]
DATE = re.compile(r"\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")


def redact(text: str) -> tuple[str, int]:
    """`text` with e-mail addresses and numbers shaped like IBAN, card or phone numbers replaced by
    `[email]`, `[iban]`, `[card]`, `[phone]`; and how many were replaced."""
    total = 0
    for name, pattern in REDACTIONS:
        def replace(match: re.Match, name: str = name) -> str:
            # a phone number has at least 7 digits (shorter runs are quantities and prices) and is not a date
            if name == "phone" and (sum(c.isdigit() for c in match.group()) < 7 or DATE.fullmatch(match.group())):
                return match.group()
            nonlocal total
            total += 1
            return f"[{name}]"

        text = pattern.sub(replace, text)
    return text, total


class Store:
    """The store at `path`; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: Path, redaction: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        for table, columns in ADDED.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        self.redaction = redaction
        self.lock = threading.Lock()

    def _clean(self, text: str | None) -> tuple[str | None, int]:
        return (text, 0) if text is None or not self.redaction else redact(text)

    def save_response(self, rid: str, model: str, messages: list[dict], answer: str, system_supplied: bool = False,
                      system: str = "", started: float | None = None, pair: str | None = None,
                      shadow: bool = False) -> None:
        """One served answer; `model` is "<registered model>/<version>", `started` the request's time.time();
        `pair` and `shadow` as the front sent them when a shadow version answers the same request."""
        count, cleaned = 0, []
        for m in messages:
            content, n = self._clean(m["content"])
            cleaned.append({**m, "content": content})
            count += n
        answer, n = self._clean(answer)
        registered, _, version = model.rpartition("/")
        now = time.time()
        with self.lock:
            self.db.execute("INSERT INTO responses (id, created, model, messages, answer, registered_model, version, "
                            "system_supplied, redactions, system, latency_ms, pair, shadow) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (rid, now, model, json.dumps(cleaned), answer, registered, version, int(system_supplied),
                             count + n, system, (now - started) * 1000 if started else 0.0, pair, int(shadow)))

    def save_feedback(self, response_id: str, rating: int, correction: str | None, comment: str | None,
                      key_id: str = "") -> int | None:
        """Pending feedback on a served answer; None if no such response was served here."""
        correction, n = self._clean(correction)
        comment, m = self._clean(comment)
        with self.lock:
            if self.db.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone() is None:
                return None
            cursor = self.db.execute(
                "INSERT INTO feedback (created, response_id, rating, correction, comment, key_id, redactions) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (time.time(), response_id, rating, correction, comment, key_id, n + m))
            return int(cursor.lastrowid)
