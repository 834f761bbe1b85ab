"""The MLflow registry as the gate: every candidate becomes a version with its metrics and decision as tags;
only a pass (or a recorded manual promotion) moves `champion`; the previous champion is kept for rollback.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "tuneline.score"
PREVIOUS_TAG = "tuneline.previous_champion"


@dataclass(frozen=True)
class Evidence:
    """What the gate judges: test scores on the gate metric, general-benchmark accuracy, crashes, the smoke test."""

    finetuned: float | None
    baseline: float | None
    base_general: float | None
    finetuned_general: float | None
    crashed: dict[str, str] = field(default_factory=dict)
    smoke_failures: list[str] | None = None  # None: not run; [] passed


@dataclass(frozen=True)
class Rules:
    min_improvement: float = 0.0
    max_forgetting: float = 0.05
    require_smoke: bool = True


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return ("PASS: " if self.passed else "FAIL: ") + "; ".join(self.reasons)


def gate(evidence: Evidence, champion_score: float | None, rules: Rules) -> Decision:
    """Every rule is checked and reported, pass or fail, so a reviewer sees why. Missing evidence fails."""
    reasons, passed = [], True

    def fail(reason: str) -> None:
        nonlocal passed
        passed = False
        reasons.append(reason)

    for name, error in evidence.crashed.items():
        fail(f"evaluation of {name} crashed ({error})")
    score, bar = evidence.finetuned, evidence.baseline
    if score is None or bar is None:
        fail("missing evaluation: " + ", ".join(n for n, v in (("fine-tuned", score), ("baseline", bar)) if v is None))
    else:
        margin = score - bar
        if margin > rules.min_improvement:
            reasons.append(f"beats the best baseline by {margin:+.3f} (needed > {rules.min_improvement:+.3f})")
        else:
            fail(f"does not beat the best baseline: {margin:+.3f} (needed > {rules.min_improvement:+.3f})")
        if champion_score is None or math.isnan(champion_score):
            reasons.append("no current champion")
        elif score >= champion_score:
            reasons.append(f"not worse than the champion ({score:.3f} >= {champion_score:.3f})")
        else:
            fail(f"worse than the champion ({score:.3f} < {champion_score:.3f})")
    if evidence.base_general is None or evidence.finetuned_general is None:
        fail("missing evaluation: general benchmark (forgetting)")
    else:
        drop = evidence.base_general - evidence.finetuned_general
        if drop > rules.max_forgetting:
            fail(f"forgets {drop:.3f} on the general benchmark (allowed <= {rules.max_forgetting:.3f})")
        else:
            reasons.append(f"general benchmark change {-drop:+.3f} (allowed drop <= {rules.max_forgetting:.3f})")
    if evidence.smoke_failures is None:
        if not rules.require_smoke:
            reasons.append("smoke test skipped by config")
        elif not passed:  # promote builds and serves only a version that passed every other rule
            reasons.append("smoke test not run: the rules above failed")
        else:
            fail("smoke test did not run")
    elif evidence.smoke_failures:
        fail(f"smoke test: the served model answered {len(evidence.smoke_failures)} prompt(s) differently "
             f"from in-process generation (first: {evidence.smoke_failures[0]})")
    else:
        reasons.append("smoke test passed")
    return Decision(passed, reasons)


def champion(name: str) -> tuple[str, float] | None:
    """(version, score) of the current champion, or None when there is none yet."""
    try:
        mv = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version), float(mv.tags.get(SCORE_TAG, "nan"))


@task(name="register-model", retries=2, retry_delay_seconds=5)
def register(name: str, model_dir: str, run_id: str, metrics: dict[str, float], gate_metric: str) -> str:
    """Log the merged model folder (safetensors) into `run_id`, register it, and make it the `challenger`."""
    client = MlflowClient()
    client.log_artifacts(run_id, model_dir, artifact_path="model")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {f"tuneline.metric.{k}": f"{v:.6f}" for k, v in metrics.items() if v is not None}
    tags[SCORE_TAG] = f"{metrics.get(gate_metric, float('nan')):.6f}"
    mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
    return str(mv.version)


def _move_champion(client: MlflowClient, name: str, version: str) -> None:
    previous = champion(name)
    if previous and previous[0] != version:
        client.set_model_version_tag(name, version, PREVIOUS_TAG, previous[0])
    client.set_registered_model_alias(name, CHAMPION, version)


@task(name="record-decision", retries=2, retry_delay_seconds=5)
def record(name: str, version: str, decision: Decision) -> None:
    """Tags carry the decision and its reasons; only a pass moves `champion`."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, "tuneline.decision", "pass" if decision.passed else "fail")
    client.set_model_version_tag(name, version, "tuneline.reasons", "; ".join(decision.reasons))
    if decision.passed:
        _move_champion(client, name, version)


def _history(client: MlflowClient, name: str, entry: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    client.set_registered_model_tag(name, f"tuneline.history.{int(time.time() * 1000)}", f"{stamp} {entry}")


def promote_manually(name: str, version: str, reason: str) -> str:
    """Make `version` the champion by hand; the reason and the previous champion are recorded."""
    client = MlflowClient()
    client.get_model_version(name, version)  # fails with MLflow's message if the version does not exist
    before = champion(name)
    _move_champion(client, name, version)
    client.set_model_version_tag(name, version, "tuneline.decision", "manual")
    client.set_model_version_tag(name, version, "tuneline.reasons", f"promoted by hand: {reason}")
    _history(client, name, f"promote v{version} (was v{before[0] if before else 'none'}): {reason}")
    return f"{name}: champion is now v{version} (was {('v' + before[0]) if before else 'none'})"


def rollback(name: str, reason: str) -> str:
    """Move `champion` back to the version it replaced; recorded on both versions and the model."""
    client = MlflowClient()
    current = champion(name)
    if current is None:
        raise ValueError(f"{name} has no champion to roll back")
    previous = client.get_model_version(name, current[0]).tags.get(PREVIOUS_TAG)
    if not previous:
        raise ValueError(f"{name} v{current[0]} replaced no earlier champion; nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current[0], "tuneline.rolled_back", reason)
    _history(client, name, f"rollback v{current[0]} -> v{previous}: {reason}")
    return f"{name}: champion rolled back from v{current[0]} to v{previous}"


def download(name: str, ref: str, dst: str | Path) -> Path:
    """The files of `models:/name/<version>` or `models:/name@<alias>` in a local folder."""
    uri = f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
