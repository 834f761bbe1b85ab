"""The gate and the registry: a pass moves `champion`; every kind of failure is recorded with its reason and
moves nothing; manual promotion and rollback are recorded."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from tasks import registry
from tasks.registry import Evidence, Rules

NAME = "gate-test"
RULES = Rules(min_improvement=0.1, max_forgetting=0.05)
GOOD = Evidence(finetuned=0.6, baseline=0.3, base_general=0.50, finetuned_general=0.49, smoke_failures=[])


def test_gate_passes_and_reports_every_rule():
    decision = registry.gate(GOOD, champion_score=None, rules=RULES)
    assert decision.passed
    assert decision.reasons == [
        "beats the best baseline by +0.300 (needed > +0.100)",
        "no current champion",
        "general benchmark change -0.010 (allowed drop <= 0.050)",
        "smoke test passed",
    ]


@pytest.mark.parametrize(
    ("changes", "champion", "reason"),
    [
        ({"finetuned": 0.35}, None, "does not beat the best baseline: +0.050 (needed > +0.100)"),
        ({}, 0.7, "worse than the champion (0.600 < 0.700)"),
        ({"finetuned_general": 0.40}, None, "forgets 0.100 on the general benchmark (allowed <= 0.050)"),
        ({"crashed": {"finetuned": "RuntimeError: boom"}}, None, "evaluation of finetuned crashed (RuntimeError: boom)"),
        ({"finetuned": None}, None, "missing evaluation: fine-tuned"),
        ({"finetuned_general": None}, None, "missing evaluation: general benchmark (forgetting)"),
        ({"smoke_failures": ["'hi': served 'a' != in-process 'b'"]}, None, "smoke test: the served model answered 1"),
        ({"smoke_failures": None}, None, "smoke test did not run"),
    ],
)
def test_gate_rejects_with_reason(changes, champion, reason):
    evidence = Evidence(**{**GOOD.__dict__, **changes})
    decision = registry.gate(evidence, champion, RULES)
    assert not decision.passed
    assert any(r.startswith(reason) for r in decision.reasons), decision.reasons


@pytest.fixture()
def registry_env(mlflow_sqlite, tmp_path):
    mlflow.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("gate")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def _candidate(model_dir: str, evidence: Evidence) -> str:
    with mlflow.start_run() as run:
        version = registry.register.fn(NAME, model_dir, run.info.run_id, {"exact_match": evidence.finetuned},
                                       "exact_match")
    current = registry.champion(NAME)
    registry.record.fn(NAME, version, registry.gate(evidence, current[1] if current else None, RULES))
    return version


def test_champion_moves_only_on_pass_and_rollback_restores(registry_env, tmp_path):
    client = MlflowClient()
    v1 = _candidate(registry_env, GOOD)
    assert registry.champion(NAME) == (v1, 0.6)

    rejected = {
        "worse than the champion": Evidence(**{**GOOD.__dict__, "finetuned": 0.5}),
        "does not beat the best baseline": Evidence(**{**GOOD.__dict__, "finetuned": 0.65, "baseline": 0.6}),
        "forgets": Evidence(**{**GOOD.__dict__, "finetuned": 0.9, "finetuned_general": 0.2}),
        "evaluation of finetuned crashed": Evidence(**{**GOOD.__dict__, "finetuned": 0.9,
                                                        "crashed": {"finetuned": "OSError: no weights"}}),
        "smoke test": Evidence(**{**GOOD.__dict__, "finetuned": 0.9, "smoke_failures": ["differs"]}),
    }
    for reason, evidence in rejected.items():
        version = _candidate(registry_env, evidence)
        tags = client.get_model_version(NAME, version).tags
        assert tags["tuneline.decision"] == "fail" and reason in tags["tuneline.reasons"]
        assert registry.champion(NAME) == (v1, 0.6)
        assert str(client.get_model_version_by_alias(NAME, "challenger").version) == version

    better = _candidate(registry_env, Evidence(**{**GOOD.__dict__, "finetuned": 0.8}))
    assert registry.champion(NAME) == (better, 0.8)
    assert client.get_model_version(NAME, better).tags["tuneline.previous_champion"] == v1
    assert (registry.download(NAME, "champion", tmp_path / "dl") / "config.json").read_text() == "{}"

    assert "rolled back from v" in registry.rollback(NAME, "bad answers in production")
    assert registry.champion(NAME)[0] == v1
    assert client.get_model_version(NAME, better).tags["tuneline.rolled_back"] == "bad answers in production"
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(NAME, "again")

    registry.promote_manually(NAME, better, "fixed upstream")
    assert registry.champion(NAME)[0] == better
    tags = client.get_model_version(NAME, better).tags
    assert tags["tuneline.decision"] == "manual" and tags["tuneline.reasons"] == "promoted by hand: fixed upstream"
    history = [v for k, v in client.get_registered_model(NAME).tags.items() if k.startswith("tuneline.history.")]
    assert len(history) == 2 and any("rollback" in h for h in history)


def test_cli_rollback_without_champion_is_a_one_line_error(mlflow_sqlite):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flows.cli", "rollback", "--model", "nobody", "--reason", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: nobody has no champion to roll back"


def test_gate_reports_the_smoke_test_as_not_run_when_other_rules_failed():
    failing = Evidence(**{**GOOD.__dict__, "finetuned": 0.35, "smoke_failures": None})
    decision = registry.gate(failing, None, RULES)
    assert not decision.passed
    assert decision.reasons[-1] == "smoke test not run: the rules above failed"


def test_promote_builds_no_bento_for_a_version_the_metrics_reject(tiny_model, home, prefect_api, mlflow_sqlite,
                                                                   tmp_path):
    """Building and serving a Bento takes a minute: only a version that passed every other rule gets one."""
    import bentoml

    from flows.config import load_config
    from flows.promote import promote_stage
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model = "never-built"
    scores = {"baseline": {"exact_match": 0.5, "general_acc": None},
              "base": {"exact_match": 0.1, "general_acc": 0.5},
              "finetuned": {"exact_match": 0.4, "general_acc": 0.5}}
    mlflow.create_experiment("promote", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("promote")
    with mlflow.start_run() as parent, mlflow.start_run(nested=True) as finetune:
        pass
    verdict = promote_stage(config, tiny_model, finetune.info.run_id, {"scores": scores, "crashed": {}},
                            str(tmp_path / "no-test-split-needed.jsonl"), str(home), parent.info.run_id)
    assert not verdict["passed"] and verdict["bento"] is None
    assert "smoke test not run: the rules above failed" in verdict["reasons"]
    built = [m for m in bentoml.models.list() if m.info.labels.get("registered_model") == "never-built"]
    assert built == []
    tags = MlflowClient().get_model_version("never-built", verdict["version"]).tags
    assert tags["tuneline.decision"] == "fail" and "does not beat the best baseline" in tags["tuneline.reasons"]
