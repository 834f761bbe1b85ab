"""Model selection: the rule (score, budget, ties), the measured cost, and the select stage picking the better
of two tiny models through lm-eval, with a nested MLflow run per candidate."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from evals.runner import write_tasks
from flows.config import load_config
from tasks.datasets import prepare_data, read_examples, write_examples
from tasks.models import load
from tasks.schema import BudgetConfig
from tasks.scoring import score
from tasks.selection import NoCandidateFits, choose, measure_cost
from tests.conftest import ROOT, SENTIMENT


def row(source, score, parameters, tokens_per_s=50.0, peak_memory_mb=500.0):
    return {"source": source, "score": score, "parameters": parameters, "tokens_per_s": tokens_per_s,
            "peak_memory_mb": peak_memory_mb}


def test_choose_takes_the_best_score_and_breaks_ties_by_size():
    rows = [row("big", 0.4, 300e6), row("small", 0.4, 100e6), row("worse", 0.2, 50e6)]
    best, reason = choose(rows, BudgetConfig())
    assert best["source"] == "small" and "tied" in reason
    assert choose([row("a", 0.1, 1e6), row("b", 0.3, 9e9)], BudgetConfig())[0]["source"] == "b"


def test_a_tie_on_the_metric_goes_to_the_model_that_finds_the_answers_more_likely():
    rows = [{**row("smol", 0.0, 135e6), "likelihood": -1.37}, {**row("gemma", 0.0, 270e6), "likelihood": -0.9}]
    best, reason = choose(rows, BudgetConfig())
    assert best["source"] == "gemma" and "most likely (-0.900 log-probability per token)" in reason
    assert choose([{**r, "likelihood": -1.0} for r in rows], BudgetConfig())[0]["source"] == "smol"  # then the size


def test_choose_respects_the_budget_and_says_what_it_excluded():
    rows = [row("gemma", 0.5, 270e6, tokens_per_s=8.0), row("smol", 0.3, 135e6, tokens_per_s=20.0)]
    best, reason = choose(rows, BudgetConfig(max_parameters=200_000_000))
    assert best["source"] == "smol" and "gemma excluded: 270M parameters > 200M" in reason
    assert choose(rows, BudgetConfig(min_tokens_per_s=10))[0]["source"] == "smol"
    with pytest.raises(NoCandidateFits, match=r"gemma: .*MB peak memory > 100 MB; smol: .*"):
        choose(rows, BudgetConfig(max_memory_mb=100))


def test_measure_cost_reports_parameters_speed_and_memory(tiny_model):
    cost = measure_cost.fn(tiny_model, [{"role": "user", "content": "Review: fine kettle"}], 8)
    model, _ = load(Path(tiny_model))
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["tokens_per_s"] > 0 and 100 < cost["peak_memory_mb"] < 20_000


def test_select_stage_picks_the_better_of_two_tiny_models(tiny_model, prefect_api, mlflow_sqlite, tmp_path):
    from flows.select import select_stage

    # The references are what the good model says itself (it scores 1.0); the other model is the same network
    # with its final norm negated, so every greedy choice differs from the good model's.
    splits = prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(tmp_path / "data"), "skip")
    validation = read_examples(splits.validation)[:4]
    write_examples(Path(splits.validation), validation)
    tasks_dir = write_tasks("reviews", splits.files, tmp_path / "t", 6)
    said = score.fn(tiny_model, str(tasks_dir), "reviews_validation", system_prompt="sys", shots=0, limit=4,
                    batch_size=4)
    replies = {s["doc_id"]: s["response"] for s in said.samples}
    write_examples(Path(splits.validation),
                   [type(e)(e.id, e.system, e.user, replies[i], e.task) for i, e in enumerate(validation)])
    model, tokenizer = load(Path(tiny_model))
    model.model.norm.weight.data.neg_()
    model.save_pretrained(tmp_path / "worse")
    tokenizer.save_pretrained(tmp_path / "worse")

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.task.system_prompt, config.task.max_validation_examples, config.task.max_answer_tokens = "sys", 4, 6
    config.models.candidates = [f"path:{tmp_path / 'worse'}", f"path:{tiny_model}"]
    config.models.cost_tokens = 4
    mlflow.create_experiment("select", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("select")
    with mlflow.start_run() as parent:
        chosen = select_stage(config.task, config.models, config.evaluation, config.gate.metric,
                              str(tmp_path / "store"), str(tasks_dir), splits.validation, parent.info.run_id)

    assert chosen.source == f"path:{tiny_model}" and chosen.score == 1.0
    runs = {r.info.run_name: r for r in mlflow.search_runs(output_format="list")}
    good, worse = runs[f"candidate path:{tiny_model}"], runs[f"candidate path:{tmp_path / 'worse'}"]
    assert worse.data.metrics["score"] < 1.0 and worse.data.metrics["tokens_per_s"] > 0
    assert good.data.metrics["parameters"] == worse.data.metrics["parameters"] > 0
    assert "best validation score (1.000)" in runs["select"].data.tags["tuneline.reason"]
    sample = json.loads(mlflow.artifacts.load_text(f"runs:/{good.info.run_id}/samples.jsonl").splitlines()[0])
    assert sample["prompt"].count("Review:") == 1  # zero-shot: the question alone
