"""Production feedback → training examples, after review.

The service stores every answer and the feedback on it (serving/feedback_store.py), redacted and *pending*. A
reviewer approves or rejects it (`tuneline feedback approve|reject`, or an assessment on its MLflow trace); a
round trains on approved feedback of its own registered model only, and the newest approved correction of a
response wins across rounds.
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from serving.feedback_store import APPROVED, PENDING, REJECTED, Store
from tasks.datasets import Example, normalise, write_examples
from tasks.evidence import mcnemar_exact


@dataclass(frozen=True)
class Harvest:
    examples: list[Example]  # every approved example of the model, newest correction per response
    last_id: int  # the newest feedback id among them: a round with nothing newer than the last has nothing new
    new: int  # examples whose feedback is newer than the round's `since_id`
    skipped: int  # approved feedback not turned into examples (rating below approve_at, no correction)
    pending: int  # feedback of this model still waiting for review


@dataclass(frozen=True)
class Item:
    """One piece of feedback as a reviewer sees it."""
    id: int
    created: float
    model: str
    rating: int
    status: str
    key_id: str
    question: str
    answer: str
    correction: str | None
    comment: str | None
    reviewer: str | None
    reviewed_at: float | None
    reason: str | None
    redactions: int


def _open(db_path: str | Path, write: bool = False) -> sqlite3.Connection:
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"no feedback database at {path}; the service creates it when it first answers")
    if write:
        return Store(path).db  # brings an older store's columns up to date
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


_SELECT = ("SELECT f.id, f.created, r.model, f.rating, f.status, f.key_id, r.messages, r.answer, f.correction, "
           "f.comment, f.reviewer, f.reviewed_at, f.reason, f.redactions + r.redactions, r.registered_model, "
           "f.response_id, r.system_supplied FROM feedback f JOIN responses r ON r.id = f.response_id")


def _question(messages: str) -> str:
    return next(m["content"] for m in reversed(json.loads(messages)) if m["role"] == "user")


def items(db_path: str | Path, status: str | None = None, ids: list[int] | None = None,
          model: str | None = None) -> list[Item]:
    """Feedback in id order, filtered by status, ids and registered model."""
    where, args = [], []
    if status:
        where.append("f.status = ?")
        args.append(status)
    if ids:
        where.append(f"f.id IN ({','.join('?' * len(ids))})")
        args += ids
    if model:
        where.append("r.registered_model = ?")
        args.append(model)
    with _open(db_path) as db:
        rows = db.execute(_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY f.id",
                          args).fetchall()
    return [Item(*row[:6], _question(row[6]), *row[7:14]) for row in rows]


def reviewer() -> str:
    """Who is reviewing: $TUNELINE_REVIEWER, else the login name."""
    return os.environ.get("TUNELINE_REVIEWER") or getpass.getuser()


def review(db_path: str | Path, decision: str, ids: list[int] | None = None, key_id: str | None = None,
           reason: str | None = None, by: str | None = None) -> list[int]:
    """Approve or reject feedback by id, or every pending item sent with one API key (`key_id`); records who and
    when. Returns the ids changed; an unknown id is an error naming it, and nothing is changed then."""
    if decision not in (APPROVED, REJECTED):
        raise ValueError(f"decision must be {APPROVED} or {REJECTED}, not {decision!r}")
    db = _open(db_path, write=True)
    try:
        if key_id:
            ids = [r[0] for r in db.execute("SELECT id FROM feedback WHERE key_id = ? AND status = ?",
                                            (key_id, PENDING))]
        ids = list(ids or [])
        found = {r[0] for r in db.execute(f"SELECT id FROM feedback WHERE id IN ({','.join('?' * len(ids))})", ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no feedback with id {', '.join(map(str, missing))}")
        db.executemany("UPDATE feedback SET status = ?, reviewer = ?, reviewed_at = ?, reason = ? WHERE id = ?",
                       [(decision, by or reviewer(), time.time(), reason, i) for i in ids])
        return ids
    finally:
        db.close()


def purge(db_path: str | Path, retain_days: float, now: float | None = None) -> dict[str, int]:
    """Delete stored prompts and answers older than `retain_days` that no approved feedback points at, with
    their unapproved feedback. Approved examples are kept: they are training data."""
    cutoff = (now or time.time()) - retain_days * 86400
    db = _open(db_path, write=True)
    try:
        stale = ("SELECT id FROM responses WHERE created < ? AND id NOT IN "
                 f"(SELECT response_id FROM feedback WHERE status = '{APPROVED}')")
        feedback = db.execute(f"DELETE FROM feedback WHERE response_id IN ({stale})", (cutoff,)).rowcount
        responses = db.execute(stale.replace("SELECT id FROM", "DELETE FROM", 1), (cutoff,)).rowcount
        return {"responses": responses, "feedback": feedback}
    finally:
        db.close()


REVIEW = "tuneline.review"  # a reviewer's assessment on a trace in the MLflow UI: value "approved" or "rejected"


@dataclass(frozen=True)
class Traced:
    answers: int  # answers written as MLflow traces by this call
    assessments: int  # ratings, corrections and review decisions attached to traces
    reviewed: list[int]  # feedback ids a reviewer decided in MLflow, now applied to the store
    waiting: int  # answers of the model not traced yet (the tracking server could not be reached)
    error: str | None = None


def _reachable(uri: str) -> str | None:
    """Why the tracking server at `uri` cannot be used now, or None. Asked once, quickly: MLflow's client
    retries a dead server for minutes, and an answer not traced now is traced on the next call."""
    if not uri.startswith(("http://", "https://")):
        return None
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        return f"the tracking server at {uri} is not reachable ({type(exc).__name__}: {exc})"
    return None


def trace(db_path: str | Path, model: str, experiment: str) -> Traced:
    """Registered model `model`'s stored answers as MLflow traces in `experiment` (the question and answer, the
    system and version, the latency), their ratings and corrections as assessments on them, and review decisions
    both ways: one made with the CLI becomes an assessment on the trace; a `tuneline.review` assessment a
    reviewer adds in the MLflow UI is applied to the store, with its author and time, as if made with the CLI.

    The store stays the durable record: what could not be written (the tracking server down) is written by the
    next call, and nothing is lost. Tracing happens here, out of band, so it adds nothing to a request's time."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    db = _open(db_path, write=True)
    try:
        waiting = db.execute("SELECT COUNT(*) FROM responses WHERE registered_model = ? AND trace_id IS NULL",
                             (model,)).fetchone()[0]
        why = _reachable(mlflow.get_tracking_uri())
        if why:
            return Traced(0, 0, [], waiting, why)
        experiment_id = mlflow.set_experiment(experiment).experiment_id

        answers = 0
        for rid, created, messages, answer, version, system, latency in db.execute(
                "SELECT id, created, messages, answer, version, system, latency_ms FROM responses "
                "WHERE registered_model = ? AND trace_id IS NULL ORDER BY created", (model,)).fetchall():
            span = mlflow.start_span_no_context(
                "chat", span_type="LLM", inputs={"messages": json.loads(messages)}, experiment_id=experiment_id,
                start_time_ns=int((created - latency / 1000) * 1e9),
                tags={"tuneline.response_id": rid, "tuneline.registered_model": model,
                      "tuneline.version": version, "tuneline.system": system})
            span.set_outputs({"answer": answer})
            span.end(end_time_ns=int(created * 1e9))
            mlflow.flush_trace_async_logging()
            db.execute("UPDATE responses SET trace_id = ? WHERE id = ?", (span.trace_id, rid))
            answers += 1

        assessments = 0
        rows = db.execute("SELECT f.id, r.trace_id, f.rating, f.correction, f.comment, f.key_id, f.traced, f.status, "
                          "f.reviewer, f.reason FROM feedback f JOIN responses r ON r.id = f.response_id "
                          "WHERE r.registered_model = ? AND r.trace_id IS NOT NULL AND "
                          "(f.traced = 0 OR (f.status != ? AND f.decision_traced = 0))", (model, PENDING)).fetchall()
        for fid, trace_id, rating, correction, comment, key_id, traced, status, by, reason in rows:
            meta = {"tuneline.feedback_id": str(fid)}
            if not traced:
                client = AssessmentSource(AssessmentSourceType.HUMAN, key_id or "client")
                mlflow.log_feedback(trace_id=trace_id, name="rating", value=rating, source=client,
                                    rationale=comment, metadata=meta)
                if correction:
                    mlflow.log_expectation(trace_id=trace_id, name="expected_response", value=correction,
                                           source=client, metadata=meta)
                db.execute("UPDATE feedback SET traced = 1 WHERE id = ?", (fid,))
                assessments += 1 + bool(correction)
            if status != PENDING:
                mlflow.log_feedback(trace_id=trace_id, name=REVIEW, value=status, rationale=reason, metadata=meta,
                                    source=AssessmentSource(AssessmentSourceType.HUMAN, by or "unknown"))
                db.execute("UPDATE feedback SET decision_traced = 1 WHERE id = ?", (fid,))
                assessments += 1
        return Traced(answers, assessments, _reviews_from_mlflow(db, model), 0)
    finally:
        db.close()


def _reviews_from_mlflow(db: sqlite3.Connection, model: str) -> list[int]:
    """Apply the newest valid `tuneline.review` assessment a person left on a trace to that answer's pending
    feedback sent before it; the decision is already on the trace, so it is not written back."""
    import mlflow

    decided = []
    for trace_id, in db.execute("SELECT DISTINCT r.trace_id FROM feedback f JOIN responses r ON r.id = f.response_id "
                                "WHERE r.registered_model = ? AND f.status = ? AND f.traced = 1",
                                (model, PENDING)).fetchall():
        found = mlflow.get_trace(trace_id)
        reviews = [a for a in (found.info.assessments if found else []) if a.name == REVIEW and a.valid is not False
                   and a.source.source_type == "HUMAN" and a.value in (APPROVED, REJECTED)]
        if not reviews:
            continue
        last = max(reviews, key=lambda a: a.create_time_ms)
        ids = [i for i, in db.execute(
            "SELECT f.id FROM feedback f JOIN responses r ON r.id = f.response_id WHERE r.trace_id = ? AND "
            "f.status = ? AND f.created <= ?", (trace_id, PENDING, last.create_time_ms / 1000))]
        db.executemany("UPDATE feedback SET status = ?, reviewer = ?, reviewed_at = ?, reason = ?, decision_traced = 1 "
                       "WHERE id = ?", [(last.value, last.source.source_id, last.create_time_ms / 1000,
                                         last.rationale, i) for i in ids])
        decided += ids
    return decided


def _usable(db_path: str | Path, model: str, require_review: bool) -> tuple[list[tuple], int]:
    """The feedback rows of registered model `model` a round may use, in id order (approved; with
    `require_review` off, pending too; rejected never), and how many still wait for review."""
    with _open(db_path) as db:
        rows = db.execute(_SELECT + " WHERE r.registered_model = ? AND f.status IN (?, ?) ORDER BY f.id",
                          (model, APPROVED, APPROVED if require_review else PENDING)).fetchall()
        pending = db.execute("SELECT COUNT(*) FROM feedback f JOIN responses r ON r.id = f.response_id "
                             "WHERE r.registered_model = ? AND f.status = ?", (model, PENDING)).fetchone()[0]
    return rows, pending


def harvest(db_path: str | Path, model: str, system_prompt: str, since_id: int = 0, approve_at: int | None = None,
            task: str = "feedback", require_review: bool = True) -> Harvest:
    """The training examples in the feedback of registered model `model`: approved feedback only (with
    `require_review` off, pending too; rejected never). A correction becomes the answer; without one, a reply
    rated at least `approve_at` is kept as it was served. The newest usable feedback on a response wins, across
    every round. The system prompt is the task's (`system_prompt`): a client-supplied one is never trained on."""
    rows, pending = _usable(db_path, model, require_review)
    latest: dict[str, tuple] = {}
    skipped = 0
    for row in rows:  # id order: a newer usable item on the same response replaces the older one
        fid, rating, messages, answer, correction = row[0], row[3], row[6], row[7], row[8]
        target = correction or (answer if approve_at is not None and rating >= approve_at else None)
        if target is None:
            skipped += 1
            continue
        latest[row[15]] = (fid, _question(messages), target)
    # No key: a feedback example's identity is decided against the task's records when data is prepared
    # (tasks.datasets.identity), so a correction of a test question is known as that question.
    examples = [Example(f"feedback-{fid}", system_prompt, user, target, task) for fid, user, target in latest.values()]
    last = max((fid for fid, _, _ in latest.values()), default=since_id)
    return Harvest(examples, max(last, since_id), sum(1 for fid, _, _ in latest.values() if fid > since_id),
                   skipped, 0 if not require_review else pending)


def export(db_path: str | Path, out: str | Path, model: str, system_prompt: str, approve_at: int | None = None,
           task: str = "feedback") -> Harvest:
    """Write a model's approved feedback as JSONL chat examples (id, system, user, assistant, task)."""
    found = harvest(db_path, model, system_prompt, 0, approve_at, task)
    write_examples(Path(out), found.examples)
    return found


@dataclass(frozen=True)
class Judged:
    """Production feedback as preference data: pairs from approved corrections (the correction chosen over the
    answer served) and judged answers from approved ratings (desirable at approve_at or above, undesirable at
    reject_at or below), each as the raw record an `align.data` task reads (prompt template "{{ prompt }}",
    answer template "{{ answer }}")."""
    pairs: list[dict]
    binary: list[dict]
    pending: int


def judged(db_path: str | Path, model: str, approve_at: int | None = None, reject_at: int | None = None,
           require_review: bool = True) -> Judged:
    """The preference signal in the feedback of registered model `model`: approved feedback only (with
    `require_review` off, pending too; rejected never). The newest usable feedback on a response wins. A
    correction equal to the served answer (after normalisation) states no preference and is left out."""
    rows, pending = _usable(db_path, model, require_review)
    pairs: dict[int, dict] = {}
    binary: dict[int, dict] = {}
    for row in rows:  # id order: newer feedback on the same response replaces the older
        fid, rating, messages, answer, correction, response = row[0], row[3], row[6], row[7], row[8], row[15]
        prompt = _question(messages)
        if correction and normalise(correction) != normalise(answer):
            pairs[response] = {"id": f"feedback-{fid}", "prompt": prompt, "chosen": correction, "rejected": answer}
            binary.pop(response, None)
        elif not correction and approve_at is not None and rating >= approve_at:
            binary[response] = {"id": f"feedback-{fid}", "prompt": prompt, "answer": answer, "desirable": True}
        elif not correction and reject_at is not None and rating <= reject_at:
            binary[response] = {"id": f"feedback-{fid}", "prompt": prompt, "answer": answer, "desirable": False}
    return Judged(list(pairs.values()), [r for k, r in binary.items() if k not in pairs],
                  0 if not require_review else pending)


def export_pairs(db_path: str | Path, out: str | Path, model: str, approve_at: int | None = None,
                 reject_at: int | None = None) -> tuple[Judged, Path]:
    """Write a model's approved preference signal: pairs to `out`, judged single answers (for KTO) beside it
    as `<stem>.binary.jsonl`. Returns what was found and the second file."""
    found = judged(db_path, model, approve_at, reject_at)
    out = Path(out)
    binary = out.with_name(f"{out.stem}.binary.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, rows in ((out, found.pairs), (binary, found.binary)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return found, binary


@dataclass(frozen=True)
class ShadowReport:
    """A shadow deploy's record: the champion's and the shadow's answers to the same requests, and on those a
    reviewer settled (an approved correction, or an approved rating at least `approve_at` of the champion's
    answer) which of the two was right, with the exact McNemar test of the discordant pairs."""
    champion: str
    shadow: str
    pairs: int
    agreed: int  # the same answer (whitespace aside)
    judged: int
    champion_right: int
    shadow_right: int
    wins: int  # the shadow right where the champion was wrong
    losses: int

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.wins, self.losses)


def shadow_report(db_path: str | Path, model: str, approve_at: int | None = None) -> list[ShadowReport]:
    """Per (champion, shadow) version pair of `model`, what the shadow answered beside the champion."""
    with _open(db_path) as db:
        have = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
        if "pair" not in have:
            return []  # a store from before shadow deploys
        rows = db.execute(
            "SELECT c.id, c.model, c.answer, s.model, s.answer FROM responses c JOIN responses s "
            "ON s.pair = c.pair AND s.shadow = 1 WHERE c.shadow = 0 AND c.pair IS NOT NULL "
            "AND c.registered_model = ? ORDER BY c.created", (model,)).fetchall()
        served = {rid: answer for rid, _, answer, _, _ in rows}  # the champion's answers
        verdicts: dict[str, str] = {}  # the champion's response id → the right answer, newest approved first
        for rid, rating, correction in db.execute(
                "SELECT f.response_id, f.rating, f.correction FROM feedback f JOIN responses r ON r.id = "
                "f.response_id WHERE f.status = ? AND r.registered_model = ? AND r.pair IS NOT NULL "
                "ORDER BY f.id DESC", (APPROVED, model)):
            if rid not in verdicts and (correction or (approve_at is not None and rating >= approve_at)):
                verdicts[rid] = correction or served[rid]
    grouped: dict[tuple[str, str], list[tuple]] = {}
    for rid, champion, answer, shadow, shadow_answer in rows:
        grouped.setdefault((champion, shadow), []).append((rid, answer.strip(), shadow_answer.strip()))
    reports = []
    for (champion, shadow), found in grouped.items():
        judged = [(a == verdicts[rid].strip(), s == verdicts[rid].strip()) for rid, a, s in found if rid in verdicts]
        reports.append(ShadowReport(champion, shadow, len(found), sum(a == s for _, a, s in found), len(judged),
                                    sum(a for a, _ in judged), sum(s for _, s in judged),
                                    sum(s and not a for a, s in judged), sum(a and not s for a, s in judged)))
    return reports
