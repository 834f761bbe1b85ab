"""The evaluate stage: base, baseline and fine-tuned side by side; a crashed evaluation is recorded, not hidden;
ranked answers (classify, choice) scored as the argmax of their summed log-probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from evals import runner
from evals.runner import write_tasks
from evals.variants import ZERO_SHOT, Variant
from flows.config import load_config
from tasks.datasets import Example, prepare_data, write_examples
from tasks.models import load
from tasks.recipes import Baselines
from tasks.schema import GateConfig
from tests.conftest import DEMO_DATA, ROOT


def test_evaluate_reports_side_by_side_and_records_a_crash(tiny_model, prefect_api, mlflow_sqlite, tmp_path, capsys):
    from flows.evaluate import evaluate_stage

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.task.max_test_examples, config.task.max_answer_tokens = 4, 8
    config.evaluation.general_limit = 8
    config.evaluation.builtin_tasks = ["arc_easy"]  # needs the hub: must be skipped with a message offline
    spec = config.task.model_copy(update={"data": str(DEMO_DATA), "system_prompt": "sys"})
    splits = prepare_data.fn([spec], 0.1, 0.1, 13, str(tmp_path / "data"), "skip")
    tasks_dir = write_tasks("reviews", splits.files, tmp_path / "t", 8,
                            reasoning_tokens=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a model folder without weights: loading it must fail

    mlflow.create_experiment("eval", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("eval")
    with mlflow.start_run() as parent:
        cot = Variant("cot", chat=False)
        rows = {ZERO_SHOT.name: {"score": 0.0}, cot.name: {"score": 0.1}}
        baselines = Baselines((ZERO_SHOT, cot), rows, best=cot, fixed={})
        report = evaluate_stage(config, tiny_model, str(broken), baselines, str(tasks_dir), parent.info.run_id)

    # the bar (chain of thought) cannot be served: the prompt candidate is the best servable recipe, zero-shot
    # here, which is the base model itself; the fine-tuned candidate crashed and says so to the gate
    assert set(report.scores) == {"base", "baseline", "prompt"}
    [finetuned] = report.candidates
    assert finetuned.system == "fine-tuned" and finetuned.evidence.candidate is None
    assert "finetuned" in finetuned.evidence.crashed
    assert "HF_HUB_OFFLINE is set" in report.builtin["skipped"]
    assert set(report.crashed) == {"finetuned"}
    assert "scoring finetuned crashed:\nTraceback (most recent call last)" in capsys.readouterr().out  # the why
    base = report.scores["base"]
    assert set(base) >= {"exact_match", "field_f1", "rougeL", "stderr", "general_acc"}
    assert 0.0 <= base["general_acc"] <= 1.0
    stage = mlflow.search_runs(filter_string="tags.`tuneline.stage` = 'evaluate'", output_format="list")[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(stage.info.run_id, "report")}
    assert {"report/report.md", "report/comparison.png", "report/wins_losses.jsonl"} <= artifacts
    report_md = mlflow.artifacts.load_text(f"runs:/{stage.info.run_id}/report/report.md")
    assert "Crashed evaluations" in report_md and "finetuned" in report_md


def test_the_champion_is_compared_only_on_test_items_it_never_trained_on(mlflow_sqlite, tmp_path):
    import json

    from flows.evaluate import _champion_items
    from tasks import registry

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model = "overlap-model"
    mlflow.create_experiment("overlap", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("overlap")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    keys = tmp_path / "data" / "keys.json"
    keys.parent.mkdir()
    keys.write_text(json.dumps({"fingerprints": {"train": "a", "validation": "b", "test": "c"},
                                "train": [f"k{i}" for i in range(10)]}))
    with mlflow.start_run() as run:
        trained = registry.register.fn("overlap-model", str(folder), run.info.run_id, {}, "exact_match", str(keys))
    with mlflow.start_run() as run:
        unknown = registry.register.fn("overlap-model", str(folder), run.info.run_id, {}, "exact_match")

    def scored(test_keys: list[str]) -> dict:
        samples = [{"doc_id": i, "key": k, "exact_match": 1.0} for i, k in enumerate(test_keys)]
        return {"champion": runner.ScoreResult(1.0, 0.0, len(samples), {"exact_match": 1.0}, samples)}

    # 2 of 20 test items were in its training split: it is compared on the other 18
    items, note = _champion_items(config, scored(["k0", "k1"] + [f"t{i}" for i in range(18)]), (trained, 0.5))
    assert note is None and set(items) == {str(i) for i in range(2, 20)}
    # 10 of 20: too few clean items left to tell; the gate fails the champion rule with this reason
    items, note = _champion_items(config, scored([f"k{i}" for i in range(10)] + [f"t{i}" for i in range(10)]),
                                  (trained, 0.5))
    assert items is None
    assert note == f"champion v{trained} not comparable: 10 of 20 test items were in its training data"
    decision = registry.gate(registry.Evidence("exact_match", {"0": 1.0}, {"0": 0.0}, champion_note=note,
                                               champion_version=trained, general={"g": ({"0": 1.0}, {"0": 1.0})}),
                             GateConfig(smoke_prompts=0))
    assert not decision.passed and note in decision.reasons
    # a version whose training split was never recorded cannot be compared either
    assert "its training split was not recorded" in _champion_items(config, scored(["t0"]), (unknown, 0.5))[1]


def test_a_configs_own_general_suite_is_scored_and_gated_on_forgetting_apart(tiny_model, tmp_path):
    from evals import runner
    from evals.runner import general_suites
    from tasks import registry
    from tasks.scoring import score_general

    custom = tmp_path / "Clinic Notes.jsonl"  # the documented schema: question, choices, answer index
    custom.write_text("".join(json.dumps({"id": f"c{i}", "question": f"Which is the number {i}?",
                                          "choices": [str(i), str(i + 7)], "answer": 0}) + "\n" for i in range(6)))
    config = load_config(ROOT / "configs" / "demo.yaml")
    config.evaluation.general = [str(custom)]
    suites = general_suites(config.evaluation.general)
    assert suites == (str(runner.GENERAL_DATA), str(custom))
    splits = {s: str(DEMO_DATA) for s in ("train", "validation", "test")}
    tasks_dir = write_tasks("reviews", splits, tmp_path / "tasks", 4, general=suites)
    name = runner.suite_task(custom)
    assert name == "tuneline_general_clinic_notes" and (tasks_dir / f"{name}.yaml").is_file()
    scored = score_general.fn(tiny_model, str(tasks_dir), name, limit=None, batch_size=6)
    assert len(scored["items"]) == 6 and scored["acc"] == sum(scored["items"].values()) / 6

    # each suite is its own forgetting rule: a drop on the custom suite alone fails the gate, naming it
    kept, forgotten = {str(i): 1.0 for i in range(200)}, {str(i): float(i % 2) for i in range(200)}
    evidence = registry.Evidence("exact_match", {str(i): 1.0 for i in range(60)}, {str(i): 0.0 for i in range(60)},
                                 general={"tuneline_general_general": (kept, kept), name: (kept, forgotten)},
                                 smoke_failures=[])
    reasons = registry.gate(evidence, GateConfig(max_forgetting=0.05)).reasons
    assert any(r.startswith("forgetting within the limit on general suite tuneline_general_general") for r in reasons)
    assert any(r.startswith(f"may forget more than allowed on general suite {name}") for r in reasons)


LABELS = ("billing", "shipping", "returns")
TICKETS = ["I was charged twice", "my parcel has not moved", "how do I send back a lamp", "the refund never came",
           "the courier left it next door", "I need a return label", "my invoice is wrong", "tracking does not work",
           "can I exchange the shoes", "charged for a cancelled order", "the box arrived crushed", "wrong size"]


def summed_logprob(model, tok, context: str, answer: str) -> float:
    """By hand: the model's log-probability of `answer`'s tokens right after `context` (one forward pass)."""
    ids = tok(context, add_special_tokens=False)["input_ids"]
    answer_ids = tok(context + answer, add_special_tokens=False)["input_ids"][len(ids):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids + answer_ids])).logits[0].float(), dim=-1)
    return float(sum(logprobs[len(ids) + j - 1, token] for j, token in enumerate(answer_ids)))


@pytest.mark.parametrize("chat", [True, False])
def test_ranked_answers_are_the_argmax_of_summed_log_probs_and_the_classes_add_up(tiny_model, tmp_path, chat):
    model, tok = load(Path(tiny_model))
    examples = [Example(f"t{i}", "Route the ticket.", f"Ticket: {text}\nQueue?", LABELS[i % 3], "route", f"k{i}",
                        LABELS) for i, text in enumerate(TICKETS)]
    files = {name: write_examples(tmp_path / f"{name}.jsonl", examples) for name in ("train", "validation", "test")}
    tasks_dir = write_tasks("route", files, tmp_path / "tasks", max_answer_tokens=3, ranked=True)
    result = runner.evaluate(model, tok, tasks_dir, "route_test", system_prompt="Route the ticket.", chat=chat,
                             batch_size=5, kind="classify")

    hits = 0
    for sample in result.samples:
        example = examples[sample["doc_id"]]
        context = tok.apply_chat_template([{"role": "system", "content": example.system},
                                           {"role": "user", "content": example.user}],
                                          tokenize=False, add_generation_prompt=True) if chat else example.user
        by_hand = np.array([summed_logprob(model, tok, context, ("" if chat else "\n") + a) for a in LABELS])
        probs = np.exp(by_hand - by_hand.max()) / np.exp(by_hand - by_hand.max()).sum()
        assert sample["prediction"] == LABELS[int(by_hand.argmax())]
        assert list(sample["probabilities"]) == list(LABELS)
        assert np.allclose(list(sample["probabilities"].values()), probs, atol=1e-4)
        assert sample["accuracy"] == float(sample["prediction"] == example.assistant)
        hits += sample["accuracy"]
    assert result.score == result.metrics["accuracy"] == hits / len(examples)
    assert {"accuracy_norm", "macro_f1", "exact_match", "field_f1"} <= result.metrics.keys()

    matrix = np.array(result.confusion["matrix"])
    assert result.confusion["labels"] == sorted(LABELS) and matrix.sum() == len(examples)
    assert [int(row.sum()) for row in matrix] == [result.classes[c]["support"] for c in sorted(LABELS)] == [4, 4, 4]
    assert np.trace(matrix) == hits
    assert result.majority == {"answer": "billing", "rate": 4 / 12}


def test_a_ranked_task_ranks_every_item_and_generates_replies_for_a_sample_only(tiny_model, tmp_path):
    """Generating is most of a ranked task's cost: with `generate`, accuracy (the score and the gate's items) is
    the same as when every item is generated, and exact match is measured on the first `generate` items only."""
    model, tok = load(Path(tiny_model))
    examples = [Example(f"t{i}", "Route the ticket.", f"Ticket: {text}\nQueue?", LABELS[i % 3], "route", f"k{i}",
                        LABELS) for i, text in enumerate(TICKETS)]
    files = {name: write_examples(tmp_path / f"{name}.jsonl", examples) for name in ("train", "validation", "test")}
    tasks_dir = write_tasks("route", files, tmp_path / "tasks", max_answer_tokens=3, ranked=True)
    whole = runner.evaluate(model, tok, tasks_dir, "route_test", system_prompt="Route the ticket.", batch_size=5,
                            kind="classify")
    sampled = runner.evaluate(model, tok, tasks_dir, "route_test", system_prompt="Route the ticket.", batch_size=5,
                              kind="classify", generate=4)

    assert sampled.n == whole.n == len(examples)
    assert sampled.score == whole.score and sampled.confusion == whole.confusion
    by_id = {s["doc_id"]: s for s in whole.samples}
    for s in sampled.samples:  # every item ranked as before; replies only for the first four
        assert (s["prediction"], s["accuracy"]) == (by_id[s["doc_id"]]["prediction"], by_id[s["doc_id"]]["accuracy"])
        assert (s["response"] is None) == (s["doc_id"] >= 4)
        if s["response"] is not None:
            assert s["response"] == by_id[s["doc_id"]]["response"]
    first = [by_id[i]["exact_match"] for i in range(4)]
    assert sampled.metrics["exact_match"] == pytest.approx(sum(first) / 4)


def test_a_retrieval_champion_is_scored_with_shots_from_its_own_pool(tiny_model, tmp_path):
    """The next round compares the champion as it is served: a retrieval system's recipe picks its shots from
    the pool registered with it (rows that are shots, without a system prompt), not from this run's data."""
    from flows.evaluate import _system_variant
    from tasks.recipes import Recipe, write_recipe
    from tasks.retrieval import ENCODER

    config = load_config(ROOT / "configs" / "demo.yaml")
    pool = [Example(f"p{i}", "sys", f"Review: {text}", f'{{"sentiment": "{label}"}}', "reviews", f"k{i}")
            for i, (text, label) in enumerate([("The kettle leaks.", "negative"), ("Love the shoes.", "positive"),
                                               ("The lamp flickers.", "negative")])]
    champion = write_recipe(Recipe("sys", True, "retrieved", 2, encoder=ENCODER), tmp_path / "champion",
                            write_examples(tmp_path / "pool.jsonl", pool))
    run = tmp_path / "run"
    write_examples(run / "data" / "test.jsonl", [Example("t", "sys", "Review: My teapot leaks.", "x", "reviews", "t")])
    variant = _system_variant(config, str(champion), str(run / "eval_tasks"))
    assert variant == Variant("retrieved", 2, True, owner="champion")
    assert variant.task("reviews", "test") == "reviews_test_champion"  # not the run's own retrieval task
    model, tok = load(Path(tiny_model))
    [sample] = runner.evaluate(model, tok, run / "eval_tasks", variant.task("reviews", "test"), system_prompt="sys",
                               shots=2, limit=1, batch_size=1).samples
    assert sample["prompt"].index("kettle") < sample["prompt"].index("teapot")  # its nearest pool shot, listed
    assert "Love the shoes" not in sample["prompt"]


def test_the_scoring_engine_follows_deploy_engine_and_names_a_missing_vllm(monkeypatch, tmp_path):
    from flows.evaluate import scoring_engine

    config = load_config(ROOT / "configs" / "demo.yaml")
    fake = tmp_path / "python"
    monkeypatch.setenv("TUNELINE_VLLM_PYTHON", str(fake))
    config.deploy.engine = "vllm"
    with pytest.raises(ValueError, match=f"evaluation.engine vllm: no vLLM environment at {fake}"):
        scoring_engine(config)  # auto follows the service's engine, which needs the environment
    fake.write_text("")  # present: the systems are scored on vLLM, as they will be served
    assert scoring_engine(config) == "vllm"
    config.evaluation.engine = "transformers"
    assert scoring_engine(config) == "transformers"
    config.evaluation.engine, config.deploy.engine = "auto", "transformers"
    assert scoring_engine(config) == "transformers"
