"""Preference data (tasks/preferences.py) and production feedback as preferences (tasks/feedback.py): the shapes,
their bad rows named by file and line, rankings into ordered pairs, splits by prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.feedback_store import Store
from tasks.datasets import DataError, read_examples, split
from tasks.feedback import export_pairs, judged, review
from tasks.preferences import (
    as_choices,
    held_out_pairs,
    load_preferences,
    prepare_preferences,
    ranked_pairs,
    read_preferences,
)
from tasks.schema import TaskConfig


def task(path: Path, shape: str = "pairs", **extra) -> TaskConfig:
    fields = {"name": "prefs", "kind": "preference", "shape": shape, "data": str(path), "system_prompt": "sys",
              "prompt": "Review: {{ review }}", "answer": "{{ answer }}"}
    return TaskConfig(**(fields | extra))


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def words(messages: list[dict]) -> int:
    """A stand-in token count: words of the chat (the real tokenizer is used by the align stage)."""
    return sum(len(m["content"].split()) for m in messages)


def test_ranked_pairs_order_cap_and_ties():
    assert ranked_pairs(["a", "b", "c", "d"], None, 3) == [("a", "b"), ("a", "c"), ("a", "d")]
    assert ranked_pairs(["a", "b", "c"], None, 10) == [("a", "b"), ("a", "c"), ("b", "c")]
    # scores order the answers (higher is better); equal scores make no pair, however they are listed
    assert ranked_pairs(["low", "top", "mid", "mid too"], [1, 9, 5, 5], 10) == [
        ("top", "mid"), ("top", "mid too"), ("top", "low"), ("mid", "low"), ("mid too", "low")]
    assert ranked_pairs(["x", "y"], [3, 3], 10) == []
    assert ranked_pairs(["Same.", "same"], None, 10) == []  # equal after normalisation: no preference


@pytest.mark.parametrize(("shape", "row", "fault"), [
    ("pairs", {"review": "ok", "chosen": "good"}, "missing field 'rejected'"),
    ("pairs", {"review": "ok", "chosen": "Good!", "rejected": "good"}, "same answer after normalisation"),
    ("rankings", {"review": "ok", "answers": ["a", "b"], "scores": [2, 2]}, "a ranking of ties only"),
    ("rankings", {"review": "ok", "answers": "a"}, "must be a list of at least 2 answers"),
    ("rankings", {"review": "ok", "answers": ["a", "b"], "scores": [1]}, "must be a list of 2 numbers"),
    ("binary", {"review": "ok", "answer": "a", "desirable": "maybe"}, "must be true or false"),
    ("pairs", {"chosen": "a", "rejected": "b"}, "missing field 'review'"),
])
def test_each_bad_row_is_named_by_file_and_line(tmp_path, shape, row, fault):
    good = {"pairs": {"chosen": "a", "rejected": "b"}, "rankings": {"answers": ["a", "b"]},
            "binary": {"answer": "a", "desirable": True}}[shape]
    path = write(tmp_path / "p.jsonl", [{"review": "first", **good}, row])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{fault}"):
        read_preferences(task(path, shape))
    rows, rejects = read_preferences(task(path, shape), on_bad_rows="skip")
    assert len(rows) == 1 and fault in rejects[0]["reason"] and rejects[0]["where"].endswith("p.jsonl:2")


def test_a_held_out_prompt_of_the_fine_tuning_task_and_duplicates_are_bad_rows(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"review": "the lid broke", "chosen": "a", "rejected": "b"},
                                        {"review": "fine pan", "chosen": "a", "rejected": "b"},
                                        {"review": "Fine pan!", "chosen": "A", "rejected": "b."}])
    held = {"review the lid broke": "test"}  # a normalised prompt of the SFT test split
    rows, rejects = read_preferences(task(path), on_bad_rows="skip", held_out=held)
    assert [r.user for r in rows] == ["Review: fine pan"]
    assert "test prompt of the fine-tuning task" in rejects[0]["reason"]
    assert rejects[1]["reason"] == f"duplicate of {path}:2"


def test_csv_rows_and_field_mapping_for_judged_answers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,reply,ok\nthe lid broke,negative,true\nthe lid broke,positive,false\n")
    spec = task(path, "binary", fields={"review": "text", "answer": "reply", "desirable": "ok"})
    rows, _ = read_preferences(spec)
    assert [(r.chosen, r.desirable) for r in rows] == [("negative", True), ("positive", False)]
    [pair] = held_out_pairs(rows)  # one prompt's desirable against its undesirable answer
    assert (pair.chosen, pair.rejected) == ("negative", "positive")


def test_rankings_become_capped_pairs_and_splits_keep_a_prompt_whole(tmp_path):
    rows = [{"id": f"r{i}", "review": f"review number {i}", "answers": ["best", "ok", "bad", "worst"]}
            for i in range(120)]
    rows.append({"id": "long", "review": "word " * 40, "answers": ["best", "bad"]})
    out = prepare_preferences(task(write(tmp_path / "p.jsonl", rows), "rankings", max_pairs_per_prompt=2),
                              tmp_path / "out", validation=0.1, test=0.2, seed=13, on_bad_rows="skip", held_out={},
                              count=words, max_tokens=30, max_test_pairs=1000)
    splits = {name: load_preferences(getattr(out, name)) for name in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == 240  # 2 pairs per prompt, the over-long row rejected
    assert all((p.chosen, p.rejected) in {("best", "ok"), ("best", "bad")} for part in splits.values() for p in part)
    keys = [{p.key for p in part} for part in splits.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    reject = json.loads(Path(out.rejects).read_text())
    assert reject["where"].endswith("id long") and "over-long" in reject["reason"]
    assert out.counts["rejected"] == 1 and out.counts["test_pairs"] == len(splits["test"])
    with pytest.raises(DataError, match="id long: over-long"):
        prepare_preferences(task(write(tmp_path / "p.jsonl", rows), "rankings"), tmp_path / "again",
                            validation=0.1, test=0.2, seed=13, on_bad_rows="error", held_out={}, count=words,
                            max_tokens=30, max_test_pairs=1000)


def test_prompts_the_fine_tuning_task_trains_on_still_fill_every_preference_split(tmp_path):
    """Preference prompts are the fine-tuning task's training prompts (its held-out ones are refused): split with
    the task's own buckets they would all land in train, leaving nothing to test preferences on."""
    rows = [{"id": f"r{i}", "review": f"review number {i}", "chosen": "a", "rejected": "b"} for i in range(300)]
    prefs = read_preferences(task(write(tmp_path / "all.jsonl", rows)))[0]
    trained = {p.key for p in split(prefs, 0.1, 0.2, 13)["train"]}  # the fine-tuning split of the same records
    kept = [r for r, p in zip(rows, prefs, strict=True) if p.key in trained]
    out = prepare_preferences(task(write(tmp_path / "p.jsonl", kept)), tmp_path / "out", validation=0.1, test=0.2,
                              seed=13, on_bad_rows="error", held_out={}, count=words, max_tokens=99,
                              max_test_pairs=1000)
    assert out.counts["validation"] > 5 and out.counts["test"] > 20


def test_held_out_pairs_are_scored_in_a_drawn_order(tmp_path):
    rows = read_preferences(task(write(tmp_path / "p.jsonl", [
        {"review": f"r{i}", "chosen": "right", "rejected": "wrong"} for i in range(40)])))[0]
    choices = as_choices(rows, 13)
    assert all(e.assistant == "right" and set(e.choices) == {"right", "wrong"} for e in choices)
    firsts = sum(e.choices[0] == "right" for e in choices)
    assert 10 < firsts < 30  # equal likelihoods score chance, not the first position's share
    assert as_choices(rows, 13) == choices  # and the same order every time


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "feedback.db"
    store = Store(path)
    for rid, question, answer in [("r1", "Review: the lid broke", "positive"), ("r2", "Review: great pan", "positive"),
                                  ("r3", "Review: meh", "negative"), ("r4", "Review: ok", "neutral"),
                                  ("r5", "Review: fine", "neutral")]:
        store.save_response(rid, "reviews/1", [{"role": "user", "content": question}], answer)
    store.save_feedback("r1", 1, "negative", None)  # 1: a correction → a pair
    store.save_feedback("r2", 5, None, None)  # 2: rated high → desirable
    store.save_feedback("r3", 1, None, None)  # 3: rated low → undesirable
    store.save_feedback("r4", 1, "Neutral.", None)  # 4: a "correction" equal to the answer: no preference
    store.save_feedback("r5", 1, "positive", None)  # 5: left pending
    return path


def test_approved_feedback_becomes_pairs_and_judged_answers_pending_never(db, tmp_path):
    assert judged(db, "reviews", approve_at=4, reject_at=2).pairs == []  # nothing approved yet
    review(db, "approved", [1, 2, 3, 4], by="alice")
    found = judged(db, "reviews", approve_at=4, reject_at=2)
    assert found.pairs == [{"id": "feedback-1", "prompt": "Review: the lid broke", "chosen": "negative",
                            "rejected": "positive"}]
    assert [(r["answer"], r["desirable"]) for r in found.binary] == [("positive", True), ("negative", False)]
    assert found.pending == 1
    assert judged(db, "reviews").binary == []  # without thresholds ratings judge nothing

    found, binary = export_pairs(db, tmp_path / "out" / "prefs.jsonl", "reviews", approve_at=4, reject_at=2)
    spec = task(tmp_path / "out" / "prefs.jsonl", fields={"review": "prompt"}, prompt="{{ review }}")
    [pair] = read_preferences(spec)[0]  # the export is what an align.data task reads
    assert (pair.user, pair.chosen, pair.rejected) == ("Review: the lid broke", "negative", "positive")
    kto = read_preferences(task(binary, "binary", fields={"review": "prompt"}, prompt="{{ review }}"))[0]
    assert [r.desirable for r in kto] == [True, False]


def test_preference_rows_never_reach_the_fine_tuning_splits(tmp_path):
    """A preference file given as a fine-tuning task is refused by the config, not half-read as examples."""
    from flows.config import ConfigError, load_config

    data = write(tmp_path / "p.jsonl", [{"review": "x", "chosen": "a", "rejected": "b"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"name: n\nregistered_model: m\nmodels: {{candidates: ['tiny:0']}}\n"
                      f"task: {{name: p, kind: preference, data: {data}, prompt: '{{{{ review }}}}', "
                      "answer: '{{ answer }}'}\n")
    with pytest.raises(ConfigError, match="task: kind preference is the data of `align`"):
        load_config(config)
    assert read_examples  # the examples reader stays the fine-tuning one
