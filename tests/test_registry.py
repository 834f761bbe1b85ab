"""The gate and the registry: a pass moves `champion`; a fail is recorded with reasons and moves nothing."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from tasks import registry

NAME = "gate-test"


def test_gate_reports_every_rule():
    decision = registry.gate(score=0.6, best_baseline=0.3, champion_score=None, min_improvement=0.1)
    assert decision.passed
    assert decision.reasons == ["beats the best baseline by +0.300 (needed > +0.100)", "no current champion"]


@pytest.mark.parametrize(
    ("score", "baseline", "champion", "reason"),
    [
        (0.35, 0.3, None, "does not beat the best baseline: +0.050 (needed > +0.100)"),
        (0.6, 0.3, 0.7, "worse than the champion (0.600 < 0.700)"),
    ],
)
def test_gate_rejects_with_reason(score, baseline, champion, reason):
    decision = registry.gate(score, baseline, champion, min_improvement=0.1)
    assert not decision.passed and reason in decision.reasons


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def _candidate(model_dir: str, score: float, baseline: float) -> str:
    with mlflow.start_run() as run:
        version = registry.register.fn(NAME, model_dir, run.info.run_id, score)
    current = registry.champion(NAME)
    decision = registry.gate(score, baseline, current[1] if current else None, min_improvement=0.0)
    registry.record.fn(NAME, version, decision)
    return version


def test_champion_moves_only_on_pass(mlflow_sqlite, tmp_path, model_dir):
    mlflow.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("gate")
    client = MlflowClient()

    v1 = _candidate(model_dir, score=0.5, baseline=0.2)
    assert registry.champion(NAME) == (v1, 0.5)

    v2 = _candidate(model_dir, score=0.4, baseline=0.2)  # beats the baseline, but worse than the champion
    assert registry.champion(NAME) == (v1, 0.5)
    tags = client.get_model_version(NAME, v2).tags
    assert tags["tuneline.decision"] == "fail" and "worse than the champion" in tags["tuneline.reasons"]

    v3 = _candidate(model_dir, score=0.1, baseline=0.2)  # worse than prompting
    assert registry.champion(NAME) == (v1, 0.5)
    assert "does not beat the best baseline" in client.get_model_version(NAME, v3).tags["tuneline.reasons"]

    v4 = _candidate(model_dir, score=0.8, baseline=0.2)
    assert registry.champion(NAME) == (v4, 0.8)
    assert client.get_model_version(NAME, v4).tags["tuneline.previous_champion"] == v1

    downloaded = registry.download(NAME, "champion", tmp_path / "dl")
    assert (downloaded / "config.json").read_text() == "{}"
