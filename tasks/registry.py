"""The MLflow registry as the gate: every candidate becomes a version; only a pass moves `champion`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

CHAMPION = "champion"
SCORE_TAG = "tuneline.score"


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return ("PASS: " if self.passed else "FAIL: ") + "; ".join(self.reasons)


def gate(score: float, best_baseline: float, champion_score: float | None, min_improvement: float) -> Decision:
    """Every rule is checked and reported, pass or fail, so a reviewer sees why."""
    reasons, passed = [], True
    margin = score - best_baseline
    if margin > min_improvement:
        reasons.append(f"beats the best baseline by {margin:+.3f} (needed > {min_improvement:+.3f})")
    else:
        passed = False
        reasons.append(f"does not beat the best baseline: {margin:+.3f} (needed > {min_improvement:+.3f})")
    if champion_score is None:
        reasons.append("no current champion")
    elif score >= champion_score:
        reasons.append(f"not worse than the champion ({score:.3f} >= {champion_score:.3f})")
    else:
        passed = False
        reasons.append(f"worse than the champion ({score:.3f} < {champion_score:.3f})")
    return Decision(passed, reasons)


def champion(name: str) -> tuple[str, float] | None:
    """(version, score) of the current champion, or None when there is none yet."""
    try:
        mv = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version), float(mv.tags.get(SCORE_TAG, "nan"))


@task(name="register-model", retries=2, retry_delay_seconds=5)
def register(name: str, model_dir: str, run_id: str, score: float) -> str:
    """Log the merged model folder (safetensors) into `run_id` and register it as a new version."""
    client = MlflowClient()
    client.log_artifacts(run_id, model_dir, artifact_path="model")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                     tags={SCORE_TAG: f"{score:.6f}"})
    return str(mv.version)


@task(name="record-decision", retries=2, retry_delay_seconds=5)
def record(name: str, version: str, decision: Decision) -> None:
    """Tags carry the decision and its reasons; a pass moves `champion`, keeping the previous one for rollback."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, "tuneline.decision", "pass" if decision.passed else "fail")
    client.set_model_version_tag(name, version, "tuneline.reasons", "; ".join(decision.reasons))
    if decision.passed:
        previous = champion(name)
        if previous:
            client.set_model_version_tag(name, version, "tuneline.previous_champion", previous[0])
        client.set_registered_model_alias(name, CHAMPION, version)


def download(name: str, ref: str, dst: str | Path) -> Path:
    """The files of `models:/name/<version>` or `models:/name@<alias>` in a local folder."""
    uri = f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
