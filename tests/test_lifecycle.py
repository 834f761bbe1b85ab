"""The lifecycle end to end with the gate on: a task the tiny model truly learns in a few dozen steps, so a real
pass goes through the paired statistics, the smoke test and `champion`; then a real failure (the same model
again cannot be shown to be no worse than itself), recorded with its interval. (A champion that trained on
today's test items: tests/test_evaluate.py.) Real ephemeral Prefect, MLflow on SQLite, lm-eval, `bentoml serve`."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT

MODEL = "gate-on-model"
NOUNS = ["kettle", "lamp", "chair", "phone", "bag", "shoe", "mug", "clock", "desk", "pen", "book", "fan"]


@pytest.fixture()
def config(tmp_path):
    """Short reports whose answer has a fixed form ("label: yes/no"): the random tiny model answers 0 % right
    before training and learns the form (and so the majority label at least) in 40 steps of full fine-tuning."""
    rng = random.Random(0)
    rows = [{"text": f"The {rng.choice(NOUNS)} is {'great' if good else 'broken'} ({i})",
             "label": "yes" if good else "no"} for i, good in enumerate(rng.random() < 0.5 for _ in range(400))]
    data = tmp_path / "reports.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo.update(name="gate-on", registered_model=MODEL)
    demo["data"].update(validation=0.1, test=0.15, on_bad_rows="error")
    demo["task"] = {"name": "reports", "data": str(data), "system_prompt": "", "prompt": "{{ text }}",
                    "answer": "label: {{ label }}", "max_validation_examples": 8, "max_test_examples": 48,
                    "max_answer_tokens": 6}
    demo["models"]["candidates"] = ["tiny:0"]
    demo["baseline"].update(shots=[0], chain_of_thought=False, retrieval_shots=0, without_chat_template=False)
    demo["finetune"].update(method="full", learning_rate=1e-2, max_steps=40, batch_size=8, max_seq_length=64,
                            save_steps=None)
    demo["evaluation"].update(general_limit=None, batch_size=16)
    # The gate's own rules; a random tiny model's multiple-choice answers move a lot under full fine-tuning,
    # so the forgetting bound is looser than for a real model (and still a bound, not a mean).
    demo["gate"].update(min_improvement=0.0, champion_margin=0.0, max_forgetting=0.15, smoke_prompts=2)
    demo["deploy"]["serve"] = False
    path = tmp_path / "gate-on.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def test_the_gate_passes_on_evidence_then_rejects_with_intervals(config, home, prefect_api, mlflow_sqlite):
    from flows.lifecycle import lifecycle

    client = MlflowClient()
    first = lifecycle(str(config))["promotion"]
    assert first["passed"], first["reasons"]
    assert first["reasons"][0].startswith("beats the bar (0-shot, chat on the base weights) on exact_match: n=48, "
                                       "difference +")
    assert "McNemar exact" in first["reasons"][0] and first["reasons"][-1] == "smoke test passed"
    v1 = client.get_model_version(MODEL, first["version"])
    assert v1.aliases and "champion" in v1.aliases
    assert v1.tags["tuneline.rule.vs_bar"].startswith("pass: n=48")
    assert any(k.startswith("tuneline.rule.forgetting_tuneline_general") for k in v1.tags)
    assert {"tuneline.split.train", "tuneline.split.test"} <= set(v1.tags)

    # The same data and settings again: the same weights, which cannot be shown to beat the champion (itself).
    second = lifecycle(str(config))["promotion"]
    assert not second["passed"]
    assert any(r.startswith(f"not shown to be no worse than the champion v{first['version']} on exact_match: "
                            "n=48, difference +0.000, 90 % interval [+0.000, +0.000]") for r in second["reasons"])
    assert client.get_model_version(MODEL, second["version"]).tags["tuneline.decision"] == "fail"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first["version"]
