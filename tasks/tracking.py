"""MLflow runs: one parent run per iteration, one nested run per stage, evaluation results as metrics + samples."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from prefect.artifacts import create_markdown_artifact

from tasks.paths import configure_env


def use(tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Point MLflow at `tracking_uri` and the experiment; fail fast, naming the URI, when it is unreachable.

    A tracking server stores artifacts where it was told to; a bare SQLite URI would default to ./mlruns,
    so new experiments get `artifact_root` explicitly.
    """
    mlflow.set_tracking_uri(tracking_uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            location = None if tracking_uri.startswith("http") else (Path(artifact_root) / experiment).as_uri()
            mlflow.create_experiment(experiment, artifact_location=location)
        return mlflow.set_experiment(experiment).experiment_id
    except MlflowException as exc:
        raise ConnectionError(f"MLflow tracking server at {tracking_uri} is not usable: {exc.message}") from exc


def open_experiment(name: str) -> Path:
    """Telemetry off, BentoML under the state folder, MLflow on the experiment `name`; returns the state folder."""
    home = configure_env()
    use(mlflow.get_tracking_uri(), name, artifact_root=home / "mlflow" / "artifacts")
    return home


def run_url(run) -> str:
    """Where a reviewer opens `run`: its page in the MLflow UI, or its id when tracking is a local file."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"runs:/{run.info.run_id} in {uri}"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free-form names."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish(stage: str, markdown: str) -> None:
    """A stage's decision and figures as a Prefect markdown artifact, ending with a link to its MLflow run.

    Keyed by experiment and stage, so the Prefect UI keeps each config's history of that stage's reports."""
    run = mlflow.active_run()
    experiment = mlflow.get_experiment(run.info.experiment_id).name
    key = artifact_key(experiment, stage)
    link = run_url(run)
    target = f"[MLflow run {run.info.run_id[:8]}]({link})" if link.startswith("http") else link
    create_markdown_artifact(key=key, markdown=f"{markdown.rstrip()}\n\n{target}\n",
                             description=f"{experiment}: {stage}")


@contextmanager
def stage_run(stage: str, parent_run_id: str, **params):
    """A nested run for one lifecycle stage, under the iteration's parent run."""
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id,
                          tags={"tuneline.stage": stage}) as run:
        if params:
            mlflow.log_params(params)
        yield run


def log_eval(name: str, result, metrics: dict[str, float] | None = None, **params) -> None:
    """One evaluation as its own nested run: score, stderr, n, params and every sample's prompt and reply."""
    with mlflow.start_run(run_name=name, nested=True):
        mlflow.log_params(params)
        mlflow.log_metrics({"score": result.score, "score_stderr": result.stderr, "n": result.n, **result.metrics,
                            **(metrics or {})})
        mlflow.log_text("".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in result.samples),
                        "samples.jsonl")
