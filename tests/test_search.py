"""The hyperparameter search on the tiny model: Optuna trials as Prefect task runs and nested MLflow runs, the
best one handed on, a killed search resumed, hopeless trials pruned, and the test split never read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest

from flows.config import ConfigError, load_config
from tasks.datasets import prepare_data, read_examples, write_examples
from tasks.search import open_study, search, suggest
from tasks.training_config import FinetuneConfig
from tests.conftest import ROOT, SENTIMENT

GRID = {"sampler": "grid", "trials": 4, "space": {"learning_rate": [1e-2, 3e-2], "lora.r": [2, 4]},
        "report_every": 2, "prune": False}


def spec(**search) -> FinetuneConfig:
    return FinetuneConfig(lora={"r": 4, "alpha": 8}, max_steps=4, batch_size=4, max_seq_length=96, warmup_ratio=0.0,
                          save_steps=None, search=GRID | search)


def small_splits(folder: Path):
    """The sentiment splits cut to 96 training and 16 validation examples: each trial stays a few seconds."""
    found = prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(folder), "skip")
    write_examples(Path(found.train), read_examples(found.train)[:96])
    write_examples(Path(found.validation), read_examples(found.validation)[:16])
    return found


@pytest.fixture()
def splits(tmp_path):
    return small_splits(tmp_path / "data")


def nested_runs(parent_run_id: str) -> list:
    return mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", output_format="list")


def test_a_grid_of_four_trials_resumed_after_a_kill_logs_a_nested_run_each_and_hands_on_the_lowest_loss(
        tiny_model, splits, prefect_api, mlflow_sqlite, tmp_path):
    runs = str(tmp_path / "runs")
    with mlflow.start_run() as first:
        search(spec(trials=2), tiny_model, splits.train, splits.validation, runs, first.info.run_id)
    # A killed process leaves its trial RUNNING in the study, its settings drawn: ask one and never tell it.
    study, _ = open_study(spec(), tiny_model, splits.train, splits.validation, Path(runs) / "search")
    killed = study.ask()
    settings = suggest(killed, spec().search.space)
    with mlflow.start_run() as second:
        found = search(spec(), tiny_model, splits.train, splits.validation, runs, second.info.run_id)

    assert {t.number: t.state.name for t in study.get_trials()}[killed.number] == "FAIL"
    complete = [t for t in found.trials if t.state == "COMPLETE"]
    assert sorted(t.state for t in found.trials) == ["COMPLETE"] * 4 + ["FAIL"]
    assert {(t.params["learning_rate"], t.params["lora.r"]) for t in complete} == \
        {(lr, r) for lr in (1e-2, 3e-2) for r in (2, 4)}  # the whole grid, the killed settings tried again
    assert settings in [t.params for t in complete if t.number > killed.number]
    assert len(nested_runs(second.info.run_id)) == 2  # the resumed search trained only what was missing
    assert found.best.objective == min(t.objective for t in complete)
    assert len({t.objective for t in complete}) > 1  # the settings made a difference the search could see
    runs_by_id = {r.info.run_id: r for parent in (first, second) for r in nested_runs(parent.info.run_id)}
    assert set(runs_by_id) == {t.run_id for t in complete}
    for t in complete:  # each nested run holds its settings, its objective and its loss curve
        run = runs_by_id[t.run_id]
        assert run.data.params["search_lora.r"] == str(t.params["lora.r"])
        assert run.data.metrics["objective"] == pytest.approx(t.objective)
        assert "eval_loss" in run.data.metrics and run.data.tags["tuneline.trial_state"] == "COMPLETE"
    assert (Path(found.best.result.merged) / "model.safetensors").is_file()  # the best weights go on


def test_trials_at_once_run_in_processes_of_their_own_and_match_trials_one_after_the_other(
        tiny_model, splits, prefect_api, mlflow_sqlite, tmp_path):
    """Two trials in parallel are as reproducible as two in a row: each trains in its own process (threads of one
    would share torch's global RNG, drawn from by both LoRA initialisations at once)."""
    objectives, processes = {}, {}
    for parallel in (1, 2):
        with mlflow.start_run() as parent:
            found = search(spec(trials=2, max_parallel=parallel, space={"learning_rate": [1e-2, 3e-2]}), tiny_model,
                           splits.train, splits.validation, str(tmp_path / str(parallel)), parent.info.run_id)
        objectives[parallel] = {t.params["learning_rate"]: t.objective for t in found.trials}
        processes[parallel] = {r.data.tags["tuneline.trial_process"] for r in nested_runs(parent.info.run_id)}
    assert objectives[2] == pytest.approx(objectives[1], rel=1e-6) and len(objectives[2]) == 2
    assert all(len(found) == 2 for found in processes.values())  # a process per trial ...
    assert not any(p.endswith(f":{os.getpid()}") for found in processes.values() for p in found)  # ... not this one


def test_a_hopeless_trial_is_pruned_at_its_first_report(tiny_model, splits, prefect_api, mlflow_sqlite, tmp_path):
    runs = str(tmp_path / "runs")
    config = spec(sampler="random", trials=3, prune=True, report_every=1,
                  space={"learning_rate": [5e-2, 1e-9]})
    study, _ = open_study(config, tiny_model, splits.train, splits.validation, Path(runs) / "search")
    for lr in (5e-2, 5e-2, 1e-9):  # two learning trials first (the pruner's baseline), then one that cannot learn
        study.enqueue_trial({"learning_rate": lr}, skip_if_exists=False)
    with mlflow.start_run() as parent:
        found = search(config, tiny_model, splits.train, splits.validation, runs, parent.info.run_id)
    [pruned] = [t for t in found.trials if t.state == "PRUNED"]
    assert pruned.params == {"learning_rate": 1e-9} and found.best.params == {"learning_rate": 5e-2}
    run = mlflow.get_run(pruned.run_id)
    assert run.data.tags["tuneline.trial_state"] == "PRUNED" and "median" in run.data.tags["tuneline.pruned_because"]


def test_the_finetune_stage_searches_without_the_test_split_and_reports_the_trials(
        tiny_model, prefect_api, mlflow_sqlite, tmp_path):
    from flows.finetune import finetune_stage

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.finetune = spec(trials=2, space={"learning_rate": [1e-2, 3e-2]})
    splits = small_splits(tmp_path / "data")
    Path(splits.test).unlink()  # a search that read the test split would fail here
    with mlflow.start_run() as parent:
        tuned = finetune_stage(config, tiny_model, splits, str(tmp_path / "runs"), parent.info.run_id)
    trials = json.loads(mlflow.artifacts.load_text(f"runs:/{tuned.run_id}/search/trials.json"))
    best = next(t for t in trials["trials"] if t["number"] == trials["best"])
    assert best["objective"] == min(t["objective"] for t in trials["trials"])
    assert mlflow.get_run(best["run_id"]).data.tags["mlflow.parentRunId"] == tuned.run_id
    assert mlflow.get_run(tuned.run_id).data.params["best_learning_rate"] == str(best["params"]["learning_rate"])
    assert "search/objective.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(tuned.run_id, "search")}


def test_a_validation_score_search_is_judged_by_lm_eval_on_the_validation_items(tiny_model, prefect_api,
                                                                                 mlflow_sqlite, tmp_path):
    from evals.runner import write_tasks
    from flows.finetune import finetune_stage
    from tasks.scoring import score

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.finetune = spec(trials=2, objective="validation_score", space={"learning_rate": [1e-2, 3e-2]})
    config.task.max_validation_examples = 8
    splits = small_splits(tmp_path / "data")
    tasks_dir = str(write_tasks("reviews", splits.files, tmp_path / "tasks", 8))
    with mlflow.start_run() as parent:
        tuned = finetune_stage(config, tiny_model, splits, str(tmp_path / "runs"), parent.info.run_id, tasks_dir)
    trials = json.loads(mlflow.artifacts.load_text(f"runs:/{tuned.run_id}/search/trials.json"))
    assert trials["direction"] == "maximize"
    best = next(t for t in trials["trials"] if t["number"] == trials["best"])
    assert best["objective"] == max(t["objective"] for t in trials["trials"])
    rescored = score.fn(tuned.merged, tasks_dir, "reviews_validation", system_prompt=config.task.system_prompt,
                        shots=0, limit=8, batch_size=8)
    assert rescored.metrics["exact_match"] == best["objective"]  # the gate's metric of the weights handed on
    run = mlflow.get_run(best["run_id"]).data.metrics
    assert run["objective"] != run["eval_loss"]  # judged by the score, not the loss


@pytest.mark.parametrize(("search", "message"), [
    ({"space": {"lora.rank": [8]}}, "search.space.lora.rank: not a finetune field that can be searched"),
    ({"space": {"learning_rate": []}}, "space.learning_rate: empty list of values"),
    ({"space": {"learning_rate": {"low": 1e-3, "high": 1e-4}}}, "empty range: high 0.0001 must exceed low 0.001"),
    ({"space": {"batch_size": [0, 8]}}, "search.space.batch_size: 0 is not valid"),
    ({"sampler": "grid", "space": {"learning_rate": {"low": 1e-4, "high": 1e-3}}}, "the grid sampler needs a list"),
])
def test_a_search_space_that_cannot_run_is_a_config_error_naming_the_field(tmp_path, search, message):
    demo = (ROOT / "configs" / "demo.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(demo.replace("finetune:\n", f"finetune:\n  search: {json.dumps(search)}\n", 1)
                    .replace("../data/", f"{ROOT}/data/"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(path)


def test_optuna_study_storage_is_a_file_named_by_the_inputs(tiny_model, splits, tmp_path):
    a, url_a = open_study(spec(trials=2), tiny_model, splits.train, splits.validation, tmp_path)
    b, url_b = open_study(spec(trials=9, max_parallel=2), tiny_model, splits.train, splits.validation, tmp_path)
    c, url_c = open_study(spec(report_every=1), tiny_model, splits.train, splits.validation, tmp_path)
    assert url_a == url_b != url_c and url_a.startswith("sqlite:///") and Path(url_a[10:]).is_file()
    assert a.study_name == b.study_name != c.study_name


@pytest.mark.timeout(600)  # before max_failures this asked for trials forever
def test_a_study_whose_trials_all_fail_stops_at_max_failures_naming_the_first_error(
        splits, prefect_api, mlflow_sqlite, tmp_path):
    """Failed trials do not count towards `trials`: a study whose trials always fail once asked for more forever."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tuneline_model.json"):  # a provisioned folder without weights: trials cannot load it
        (broken / name).write_text("{}")
    failing = spec(sampler="random", trials=2, max_failures=3, space={"learning_rate": {"low": 1e-3, "high": 1e-2}})
    with mlflow.start_run() as run, pytest.raises(RuntimeError) as failed:
        search(failing, str(broken), splits.train, splits.validation, str(tmp_path / "runs"), run.info.run_id)
    assert str(failed.value).startswith("search: 3 trials failed (search.max_failures is 3); the first: trial 0: ")
    states = [r.data.tags.get("tuneline.trial_state") for r in nested_runs(run.info.run_id)]
    assert states == ["FAIL"] * 3
