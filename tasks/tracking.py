"""MLflow runs: one parent run per iteration, one nested run per stage, evaluation results as metrics + samples."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from evals.runner import samples_jsonl


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


@contextmanager
def stage_run(stage: str, parent_run_id: str, **params):
    """A nested run for one lifecycle stage, under the iteration's parent run."""
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id,
                          tags={"tuneline.stage": stage}) as run:
        if params:
            mlflow.log_params(params)
        yield run


def log_eval(name: str, result: dict, metrics: dict[str, float] | None = None, **params) -> None:
    """One evaluation as its own nested run: score, stderr, n, params and every sample's prompt and reply."""
    with mlflow.start_run(run_name=name, nested=True):
        mlflow.log_params(params)
        mlflow.log_metrics({"score": result["score"], "score_stderr": result["stderr"], "n": result["n"],
                            **result.get("metrics", {}), **(metrics or {})})
        mlflow.log_text(samples_jsonl(result), "samples.jsonl")
