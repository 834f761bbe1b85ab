"""The feedback store and its review (serving/feedback_store.py, tasks/feedback.py): what reaches training, and
what is kept, on a real SQLite store written the way the service writes it."""

from __future__ import annotations

import json
import time

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from serving.feedback_store import Store, redact
from serving.service import key_id, require_key
from tasks import packaging
from tasks.datasets import Example, by_prompt, identity, prepare_data, read_examples
from tasks.feedback import harvest, items, purge, review
from tasks.processes import free_port
from tests.conftest import SENTIMENT


def serve(store: Store, rid: str, model: str, question: str, answer: str) -> None:
    store.save_response(rid, model, [{"role": "system", "content": "sys"}, {"role": "user", "content": question}],
                        answer)


@pytest.fixture()
def db(tmp_path):
    """Two registered models served from one store, as two configs under one stack."""
    path = tmp_path / "feedback.db"
    store = Store(path)
    serve(store, "r1", "reviews/1", "Review: the lid broke", "positive")
    serve(store, "r2", "tickets/3", "My card was charged twice", "shipping")
    store.save_feedback("r1", 1, "negative", None, key_id="k1")  # id 1
    store.save_feedback("r2", 1, "billing", None, key_id="k2")  # id 2
    return path


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jo.doe+shop@example.co.uk please", "email"),
    ("my card 4111 1111 1111 1111 was charged", "card"),
    ("call me on +44 20 7946 0958 tomorrow", "phone"),
    ("refund to DE89 3704 0044 0532 0130 00 now", "iban"),
])
def test_each_redaction_kind_is_replaced_and_counted(text, kind):
    cleaned, count = redact(text)
    assert f"[{kind}]" in cleaned and count == 1 and not any(c.isdigit() for c in cleaned.split("[")[1])


def test_redaction_leaves_quantities_dates_and_prices():
    text = "I bought 3 mugs for 12.99 on 2024-05-01, order 12345"
    assert redact(text) == (text, 0)


def test_pending_feedback_never_trains_and_approval_records_who_and_when(db):
    assert harvest(db, "reviews", "task system").examples == []
    assert harvest(db, "reviews", "task system").pending == 1
    assert review(db, "approved", [1], by="alice", reason="right") == [1]
    [item] = items(db, ids=[1])
    assert (item.status, item.reviewer, item.reason) == ("approved", "alice", "right")
    assert time.time() - item.reviewed_at < 60
    [example] = harvest(db, "reviews", "task system").examples
    assert (example.user, example.assistant, example.system) == ("Review: the lid broke", "negative", "task system")


def test_a_round_harvests_its_own_models_feedback_only(db):
    review(db, "approved", [1, 2], by="alice")
    assert [e.assistant for e in harvest(db, "reviews", "").examples] == ["negative"]
    assert [e.assistant for e in harvest(db, "tickets", "").examples] == ["billing"]


def test_rejected_never_trains_and_require_review_off_takes_pending_too(db):
    review(db, "rejected", [1], by="bob")
    store = Store(db)
    serve(store, "r3", "reviews/1", "Review: great pan", "negative")
    store.save_feedback("r3", 1, "positive", None)
    assert [e.assistant for e in harvest(db, "reviews", "", require_review=False).examples] == ["positive"]
    assert harvest(db, "reviews", "").examples == []


def test_the_newest_approved_correction_of_a_response_wins_across_rounds(db):
    review(db, "approved", [1], by="alice")
    first = harvest(db, "reviews", "")
    Store(db).save_feedback("r1", 2, "mixed", None)  # id 3: a later round's correction of the same answer
    review(db, "approved", [3], by="alice")
    later = harvest(db, "reviews", "", since_id=first.last_id)
    assert [e.assistant for e in later.examples] == ["mixed"] and later.new == 1


def test_approve_all_from_one_key_and_unknown_ids_change_nothing(db):
    with pytest.raises(KeyError, match="no feedback with id 9"):
        review(db, "approved", [1, 9], by="alice")
    assert items(db, status="approved") == []
    assert review(db, "approved", key_id="k2", by="alice") == [2]


def test_retention_purge_keeps_approved_examples(db):
    review(db, "approved", [1], by="alice")
    later = time.time() + 91 * 86400
    assert purge(db, 90, now=later) == {"responses": 1, "feedback": 1}  # r2 and its pending feedback
    assert [i.id for i in items(db)] == [1]
    assert [e.assistant for e in harvest(db, "reviews", "").examples] == ["negative"]
    assert purge(db, 90) == {"responses": 0, "feedback": 0}  # nothing is old yet


def test_corrections_train_but_never_become_shots_unless_opted_in(tmp_path):
    correction = tmp_path / "round.jsonl"
    correction.write_text(json.dumps({"id": "feedback-1", "system": "sys", "user": "Review: a brand new lamp",
                                      "assistant": "negative", "task": "feedback", "key": ""}) + "\n")
    for opt_in in (False, True):
        splits = prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(tmp_path / str(opt_in)), "skip", [str(correction)],
                                 corrections_in_pool=opt_in)
        assert "feedback-1" in {e.id for e in read_examples(splits.train)}
        assert ("feedback-1" in {e.id for e in read_examples(splits.shot_pool)}) == opt_in
        trained = json.loads(open(splits.keys).read())["train"]  # the version's training keys name it
        assert identity(Example("", "", "Review: a brand new lamp", "")) in trained


def test_one_identity_matches_feedback_to_the_record_it_repeats(tmp_path):
    """A correction is the record whose prompt it repeats (up to case and punctuation): a held-out one is
    refused, a training one is recorded under the record's own key, which the champion-overlap check reads."""
    plain = prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(tmp_path / "plain"), "skip")
    test_item, train_item = read_examples(plain.test)[0], read_examples(plain.train)[0]
    assert identity(test_item) == test_item.key and test_item.key  # a record: its input fields' key
    shouted = Example("feedback-1", "sys", test_item.user.upper() + " !", "leaked", "feedback")
    repeated = Example("feedback-2", "sys", f"  {train_item.user.lower()}", "better", "feedback")
    assert identity(shouted, by_prompt([test_item])) == test_item.key
    correction = tmp_path / "round.jsonl"
    correction.write_text(shouted.to_json() + "\n" + repeated.to_json() + "\n")
    splits = prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(tmp_path / "round"), "skip", [str(correction)])
    fed = [e for e in read_examples(splits.train) if e.task == "feedback"]
    assert [(e.id, e.key) for e in fed] == [("feedback-2", train_item.key)]
    rejects = [json.loads(line) for line in open(splits.rejects)]
    assert any("feedback-1" in r["where"] and "validation/test question" in r["reason"] for r in rejects)
    assert test_item.key not in json.loads(open(splits.keys).read())["train"]


def request_from(host: str) -> Request:
    return Request({"type": "http", "client": (host, 5000), "headers": [], "method": "POST", "path": "/v1"})


def test_without_a_key_only_loopback_clients_are_answered(monkeypatch):
    monkeypatch.delenv("TUNELINE_API_KEY", raising=False)
    assert require_key(request_from("127.0.0.1"), None) == ""
    with pytest.raises(HTTPException) as refused:
        require_key(request_from("10.1.2.3"), None)
    assert refused.value.status_code == 401
    monkeypatch.setenv("TUNELINE_API_KEY", "s3cret")
    assert require_key(request_from("10.1.2.3"), "Bearer s3cret") == key_id("s3cret")
    with pytest.raises(HTTPException):
        require_key(request_from("127.0.0.1"), "Bearer s3cre")


def test_serving_beyond_loopback_without_a_key_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNELINE_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="needs an API key"):
        packaging.serve.fn("tuneline-chat:none", free_port(), str(tmp_path), host="0.0.0.0")


def test_answers_become_mlflow_traces_after_an_outage_and_a_review_in_mlflow_counts(db, tmp_path, monkeypatch):
    """Every answer is an MLflow trace with its rating and correction as assessments. With the tracking server
    down nothing is lost (the store keeps all and says what waits); once it is up the traces are written, a
    reviewer's `tuneline.review` assessment made in MLflow approves the feedback with its author and time, and a
    decision made with the CLI is written to its trace."""
    import mlflow
    from mlflow.entities import AssessmentSource

    from infra import local
    from tasks.feedback import REVIEW, trace
    from tasks.processes import stop_started

    server = local.Server("mlflow", free_port(), "/health")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    down = trace(db, "reviews", "reviews-exp")
    assert down.waiting == 1 and down.answers == 0 and "not reachable" in down.error
    assert items(db, ids=[1])[0].status == "pending"

    home = tmp_path / "stack"
    local.start(server, home)
    try:
        up = trace(db, "reviews", "reviews-exp")
        assert (up.answers, up.assessments, up.reviewed, up.error) == (1, 2, [], None)  # rating + correction
        experiment = mlflow.get_experiment_by_name("reviews-exp").experiment_id
        [found] = mlflow.search_traces(locations=[experiment], return_type="list")  # not the other model's answer
        assert found.info.tags["tuneline.response_id"] == "r1" and found.info.tags["tuneline.version"] == "1"
        assert found.data.spans[0].outputs == {"answer": "positive"}
        assessed = {a.name: a for a in found.info.assessments}
        assert assessed["rating"].value == 1 and assessed["expected_response"].value == "negative"
        assert assessed["rating"].source.source_id == "k1"

        # A reviewer approves in the MLflow UI (an assessment on the trace); the next sync applies it.
        before = time.time()
        mlflow.log_feedback(trace_id=found.info.trace_id, name=REVIEW, value="approved", rationale="matches the lid",
                            source=AssessmentSource("HUMAN", "alice"))
        assert trace(db, "reviews", "reviews-exp").reviewed == [1]
        [item] = items(db, ids=[1])
        assert (item.status, item.reviewer, item.reason) == ("approved", "alice", "matches the lid")
        assert item.reviewed_at >= before - 1
        assert [e.assistant for e in harvest(db, "reviews", "sys").examples] == ["negative"]

        # A decision made with the CLI is written to the trace, once.
        store = Store(db)
        serve(store, "r3", "reviews/1", "Review: fine", "positive")
        store.save_feedback("r3", 2, "negative", None, key_id="k1")  # id 3
        review(db, "rejected", [3], by="bob", reason="it is fine")
        trace(db, "reviews", "reviews-exp")
        assert trace(db, "reviews", "reviews-exp").assessments == 0
        [third] = [t for t in mlflow.search_traces(locations=[experiment], return_type="list")
                   if t.info.tags["tuneline.response_id"] == "r3"]
        [decision] = [a for a in third.info.assessments if a.name == REVIEW]
        assert (decision.value, decision.source.source_id, decision.rationale) == ("rejected", "bob", "it is fine")
    finally:
        stop_started("mlflow", home)
        mlflow.set_tracking_uri(None)
