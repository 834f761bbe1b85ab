"""Preference tuning (tasks/alignment.py) on the tiny model through TRL's own DPOTrainer and KTOTrainer: held-out
preference accuracy rises on a learnable preference, shown by the gate's own paired rule; a killed run resumes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from evals.runner import write_preference_task
from tasks import registry
from tasks.alignment import align
from tasks.alignment_config import AlignConfig
from tasks.datasets import token_counter
from tasks.evidence import wilson
from tasks.models import META_FILE, load
from tasks.preferences import prepare_preferences
from tasks.schema import GateConfig, TaskConfig
from tasks.scoring import score_preferences
from tests.conftest import NOUNS, killed_at_checkpoint


@pytest.fixture(scope="module")
def preferences(tmp_path_factory, tiny_model):
    """Short reports, each answered in the right form ("label: yes") and a scrambled one ("yes: label"): the same
    tokens, so only the order is preferred: the random tiny model holds it on 77 % of the held-out pairs, and 5 steps
    of either method take it to all of them (the tests train 12)."""
    out = tmp_path_factory.mktemp("preferences")
    rng = random.Random(0)
    rows = []
    for i in range(300):
        label = rng.choice(["yes", "no"])
        rows.append({"id": f"r{i}", "text": f"The {rng.choice(NOUNS)} is {'great' if label == 'yes' else 'broken'} "
                                            f"({i})", "chosen": f"label: {label}", "rejected": f"{label}: label"})
    (out / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = TaskConfig(name="prefs", kind="preference", data=str(out / "prefs.jsonl"), prompt="{{ text }}",
                      answer="{{ answer }}")
    splits = prepare_preferences(data, out / "data", validation=0.1, test=0.2, seed=13, on_bad_rows="error",
                                 held_out={}, count=token_counter(tiny_model), max_tokens=64, max_test_pairs=96)
    task = write_preference_task("prefs", splits.test_choices, out / "tasks")
    return data, splits, str(out / "tasks"), task


def spec(data: TaskConfig, **settings) -> AlignConfig:
    return AlignConfig(data=data, **{"learning_rate": 1e-2, "max_steps": 12, "batch_size": 4, "max_seq_length": 64,
                                     "save_steps": None, "lr_scheduler": "constant", "warmup_ratio": 0.0, **settings})


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_held_out_preference_accuracy_rises_under_the_shipped_gate_rule(method, preferences, tiny_model, tmp_path):
    data, splits, tasks_dir, task = preferences
    result = align.fn(tiny_model, splits.train, str(tmp_path / "run"), spec(data, method=method))
    assert result.steps == 12 and result.method == method
    assert {"rewards/chosen", "rewards/margins"} <= set(result.rewards)  # TRL's reward curves were logged
    merged = Path(result.merged)
    meta = json.loads((merged / META_FILE).read_text())
    assert meta["source"] == f"{method}:tiny:0" and meta["base"] == tiny_model
    aligned, _ = load(merged)
    assert not any("lora" in name for name, _ in aligned.named_parameters())  # merged, not an adapter

    before, after = (score_preferences.fn(folder, tasks_dir, task, system_prompt="", limit=None, batch_size=16)
                     for folder in (tiny_model, str(merged)))
    assert before["n"] == after["n"] == splits.counts["test_pairs"] >= 40
    assert wilson(after["accuracy"], after["n"])[0] > 0.5  # above chance, with its interval
    evidence = registry.Evidence("exact_match", candidate=None, bar=None,
                                 aligned=registry.AlignedEvidence(before["items"], after["items"], None))
    [rule] = registry.comparisons(evidence, GateConfig())  # the shipped confidence and align.min_improvement 0
    assert rule.rule == registry.PREFERENCE_RULE and rule.passed, rule.describe()


def test_the_reference_is_the_start_weights_without_the_adapter(preferences, tiny_model, tmp_path):
    """No second copy of the weights: TRL's trainer holds no ref_model, and its reference (the adapter disabled)
    computes exactly what the weights aligning started from compute."""
    from tasks.alignment import preference_trainer

    data, splits, _, _ = preferences
    model, tok = load(Path(tiny_model))
    trainer = preference_trainer(model, tok, spec(data), splits.train, tmp_path / "ck", "cpu")
    assert trainer.ref_model is None
    with torch.no_grad():
        for module in trainer.model.modules():  # move the adapter away from its no-op start
            if hasattr(module, "lora_B"):
                for weights in module.lora_B.values():
                    weights.weight.normal_()
        ids = torch.tensor([tok("The lamp is great").input_ids])
        start = load(Path(tiny_model))[0](ids).logits
        with trainer.model.disable_adapter():
            reference = trainer.model(ids).logits
        policy = trainer.model(ids).logits
    assert torch.allclose(reference, start, atol=1e-5) and not torch.allclose(policy, start, atol=1e-3)


def test_a_killed_alignment_resumes_from_its_last_checkpoint(preferences, tiny_model, tmp_path):
    data, splits, _, _ = preferences
    out = tmp_path / "run"
    script = tmp_path / "align.py"
    script.write_text(
        "from tasks.alignment import align\n"
        "from tasks.alignment_config import AlignConfig\n"
        f"align.fn({tiny_model!r}, {splits.train!r}, {str(out)!r}, AlignConfig.model_validate_json("
        f"{spec(data, max_steps=400, batch_size=2, save_steps=1).model_dump_json()!r}))\n")
    saved = killed_at_checkpoint(script, out / "checkpoints")
    assert 3 <= saved < 400
    settings = spec(data, max_steps=saved + 2, batch_size=2, save_steps=1)
    result = align.fn(tiny_model, splits.train, str(out), settings)
    assert result.resumed_from == f"checkpoint-{saved}" and result.steps == saved + 2
    assert not (out / "checkpoints").exists()
    again = align.fn(tiny_model, splits.train, str(out), settings)  # finished with these inputs: reused
    assert again.cached and again.merged == result.merged


@pytest.mark.system
def test_with_fine_tuning_off_the_lifecycle_aligns_the_base_weights(steady_tiny_model, home, prefect_api,
                                                                     mlflow_sqlite, tmp_path):
    """`finetune.method: none` with `align`: no SFT run trains; DPO starts from the chosen model's own weights, and
    the gate judges the aligned weights against those (its rules say `vs base`), on the same held-out pairs."""
    import mlflow
    import yaml

    from flows.lifecycle import lifecycle
    from tests.conftest import reports_config

    rng = random.Random(1)
    rows = [{"text": f"Note [{i}]: the {rng.choice(NOUNS)} is {'fine' if good else 'bad'}",
             "chosen": f"label: {'yes' if good else 'no'}", "rejected": f"{'yes' if good else 'no'}: label"}
            for i, good in enumerate(rng.random() < 0.5 for _ in range(240))]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = reports_config(tmp_path, "base-aligned", steady_tiny_model, method="none")
    config["deploy"]["serve"] = False
    config["evaluation"]["general_limit"] = 20
    config["align"] = {"data": {"name": "prefs", "kind": "preference", "data": str(tmp_path / "prefs.jsonl"),
                                "prompt": "{{ text }}", "answer": "{{ answer }}", "system_prompt": ""},
                       "learning_rate": 1e-2, "max_steps": 12, "batch_size": 8, "max_seq_length": 64,
                       "save_steps": None, "max_test_pairs": 48}
    path = tmp_path / "base-aligned.yaml"
    path.write_text(yaml.safe_dump(config))

    result = lifecycle(str(path))
    runs = {r.data.tags.get("tuneline.stage"): r for r in mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'", output_format="list")}
    assert runs["finetune"].data.params["method"] == "none" and "train_loss" not in runs["finetune"].data.metrics
    assert "align" in runs
    assert "finetuned" not in result["test"] and "aligned" in result["test"]  # nothing new to score
    assert set(result["preferences"]) == {"base", "aligned"}
    report = mlflow.artifacts.load_text(f"runs:/{runs['evaluate'].info.run_id}/report/report.md")
    assert "preferences vs base" in report and "task drop vs base" in report
    assert "base + DPO" in report
