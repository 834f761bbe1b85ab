"""Prompt baselines: k-shot prompts hold k shots from the train split only; retrieval picks the nearest
training examples; the baseline stage scores every prompt variant and records each as a nested MLflow run."""

from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import numpy as np
import pytest

from evals.runner import write_listed_tasks, write_tasks
from evals.variants import Variant
from flows.config import load_config
from tasks.datasets import prepare_data, read_examples
from tasks.retrieval import attach_fixed, attach_shots, embed, encoder, nearest, pick_fixed
from tasks.scoring import score
from tasks.selection import Selection
from tests.conftest import DEMO_DATA, ROOT, SENTIMENT


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("baseline-data")
    rows = out / "reviews.jsonl"  # a fifth of the demo's reviews: the retrieval tests embed every one of them
    rows.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:320]), encoding="utf-8")
    found = prepare_data.fn([SENTIMENT.model_copy(update={"data": str(rows)})], 0.1, 0.1, 13, str(out), "skip")
    tasks_dir = write_tasks("reviews", found.files, out / "tasks", 4, reasoning_tokens=4)
    return {**found.files, "data": found, "tasks_dir": str(tasks_dir), "out": out}


def users(path: str) -> set[str]:
    return {e.user for e in read_examples(path)}


@pytest.mark.parametrize("chat", [True, False])
def test_k_shot_prompts_hold_the_same_k_shots_from_the_train_split_only(tiny_model, splits, chat):
    fixed = pick_fixed(splits["train"], 3, seed=13)
    files = attach_fixed.fn(fixed, {"validation": splits["validation"]}, splits["tasks_dir"], "fixed3")
    write_listed_tasks("reviews", files, splits["tasks_dir"], 4, Variant("fixed", 3))
    result = score.fn(tiny_model, splits["tasks_dir"], "reviews_validation_fixed3", system_prompt="sys", shots=3,
                      chat=chat, limit=4, batch_size=4)
    train, held_out = users(splits["train"]), users(splits["validation"]) | users(splits["test"])
    question = {i: e.user for i, e in enumerate(read_examples(splits["validation"]))}
    for sample in result.samples:
        prompt = sample["prompt"]
        assert [u for u in train if u in prompt] == [u for u in train if u in {s["user"] for s in fixed}]
        assert len(fixed) == 3 and pick_fixed(splits["train"], 3, seed=13) == fixed  # drawn once, by seed
        assert [u for u in held_out if u in prompt] == [question[sample["doc_id"]]]  # only the question itself
        assert ("<|im_start|>system\nsys" in prompt) == chat  # plain text has neither template nor system prompt


def test_nearest_ranks_by_meaning(prefect_api):
    pool = ["the kettle leaks water everywhere", "great running shoes, very light", "my teapot is leaking",
            "the phone battery dies by noon"]
    assert [sorted(hits) for hits in nearest(pool, ["kettle leaking", "shoes for jogging"], 2)][0] == [0, 2]
    assert nearest(pool, ["shoes for jogging"], 1) == [[1]]


def test_retrieved_shots_are_the_nearest_training_examples(tiny_model, splits, prefect_api):
    files = attach_shots.fn(splits["train"], {"validation": splits["validation"], "test": splits["test"]}, 2,
                            str(splits["out"] / "tasks"))
    train = read_examples(splits["train"])
    vectors = embed([e.user for e in train])  # the pool's embeddings as attach_shots computed them (cached)
    rows = [json.loads(line) for line in open(files["validation"], encoding="utf-8")]
    for row in rows[:5]:
        query = encoder().encode([row["user"]], normalize_embeddings=True)[0]
        brute = [train[i].id for i in np.argsort(-(vectors @ query))[:2]]
        assert [s["id"] for s in row["shots"]] == brute[::-1]  # nearest last, next to the question
    write_listed_tasks("reviews", files, splits["tasks_dir"], 4, Variant("retrieved", 2))
    result = score.fn(tiny_model, splits["tasks_dir"], "reviews_validation_retrieved", system_prompt="sys", shots=2,
                      limit=3, batch_size=3)
    for sample in result.samples:
        shots = rows[sample["doc_id"]]["shots"]
        prompt = sample["prompt"]
        question = rows[sample["doc_id"]]["user"]
        assert prompt.index(shots[0]["user"]) < prompt.index(shots[1]["user"]) < prompt.index(question)
        assert not users(splits["test"]) & {u for u in users(splits["train"]) if u in prompt}


def test_baseline_stage_scores_every_prompt_and_records_each(tiny_model, splits, prefect_api, mlflow_sqlite):
    from flows.baseline import baseline_stage

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.task.name, config.task.system_prompt = "reviews", "sys"
    config.task.max_validation_examples, config.task.max_answer_tokens = 3, 4
    config.baseline.shots, config.baseline.retrieval_shots, config.baseline.chain_of_thought = [0, 2], 2, True
    zero = score.fn(tiny_model, splits["tasks_dir"], "reviews_validation", system_prompt="sys", shots=0, limit=3,
                    batch_size=3)
    chosen = Selection("tiny:0", tiny_model, "the only candidate", zero.score, 0.0, zero)
    mlflow.create_experiment("baseline", artifact_location=(splits["out"] / "artifacts").as_uri())
    mlflow.set_experiment("baseline")
    with mlflow.start_run() as parent:
        # the sections the stage reads, not the whole config
        found = baseline_stage(config.task, config.baseline, config.evaluation, config.gate.metric, 13, chosen,
                               splits["tasks_dir"], splits["data"], parent.info.run_id)

    expected = [f"{p}, {mode}" for mode in ("chat", "plain")
                for p in ("0-shot", "2-shot", "chain of thought", "2 retrieved shots")]
    assert [v.name for v in found.variants] == list(found.rows) == expected
    # the bar is the argmax of the gate's metric, and among equals the first (simplest) prompt
    scores = {name: r["score"] for name, r in found.rows.items()}
    assert found.best.name == next(name for name in expected if scores[name] == max(scores.values()))
    runs = {r.info.run_name: r for r in mlflow.search_runs(output_format="list")}
    assert {f"baseline {name}" for name in expected} <= set(runs)
    assert runs["baseline chain of thought, plain"].data.params["chat_template"] == "False"
    cot = mlflow.artifacts.load_text(f"runs:/{runs['baseline chain of thought, chat'].info.run_id}/samples.jsonl")
    assert "step by step" in json.loads(cot.splitlines()[0])["prompt"]


def test_the_bar_is_scored_anew_once_the_lengths_check_changed_the_validation_items(tiny_model, splits, prefect_api,
                                                                                     mlflow_sqlite):
    """Selection's zero-shot scoring is reused only while it was measured on the items the baseline scores: the
    lifecycle drops it when the lengths check removed validation items (a bar over different item sets)."""

    from flows.baseline import baseline_stage

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.task.name, config.task.system_prompt = "reviews", "sys"
    config.task.max_validation_examples, config.task.max_answer_tokens = 3, 4
    config.baseline.shots, config.baseline.retrieval_shots, config.baseline.chain_of_thought = [0], 0, False
    config.baseline.without_chat_template = False
    zero = score.fn(tiny_model, splits["tasks_dir"], "reviews_validation", system_prompt="sys", shots=0, limit=3,
                    batch_size=3)
    metric = config.gate.metric
    wider = replace(zero, metrics={**zero.metrics, metric: 0.99})  # as if measured on more items
    chosen = Selection("tiny:0", tiny_model, "the only candidate", 0.99, 0.0, wider)
    with mlflow.start_run() as parent:
        sections = (config.task, config.baseline, config.evaluation, metric, 13)
        reused = baseline_stage(*sections, chosen, splits["tasks_dir"], splits["data"], parent.info.run_id)
        anew = baseline_stage(*sections, replace(chosen, result=None), splits["tasks_dir"], splits["data"],
                              parent.info.run_id)
    assert reused.rows["0-shot, chat"]["score"] == 0.99
    assert anew.rows["0-shot, chat"]["score"] == zero.metrics[metric]
