"""Retrain from production feedback: the approved corrections of the config's registered model become a versioned
training file recorded in MLflow, then one lifecycle iteration trains on the task data plus those. Pending feedback
never trains; with nothing newly approved the round ends at once, saying so.

Rounds are MLflow runs (tag tuneline.kind = feedback-round) in the config's experiment; a round counts only
when its lifecycle finished, so the corrections of a failed round are picked up again by the next one.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from prefect import flow

from flows.config import load_config
from flows.lifecycle import lifecycle
from tasks import tracking
from tasks.datasets import write_examples
from tasks.feedback import Harvest, harvest, purge, trace
from tasks.paths import feedback_db, run_folder
from tasks.tracking import publish

ROUND = "feedback-round"


def finished_rounds(experiment: str) -> list:
    """Earlier rounds whose lifecycle completed, oldest first."""
    found = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs(
        [found.experiment_id], filter_string=f"tags.`tuneline.kind` = '{ROUND}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], output_format="list") if found else []


@flow(name="feedback", log_prints=True)
def retrain_from_feedback(config_path: str, serve: bool | None = None) -> dict:
    """One feedback round for the config at `config_path`; `serve` overrides deploy.serve for its lifecycle.

    Trains on the approved feedback of the config's own registered model (every round's, the newest correction
    per response), after tracing its answers in MLflow (and reading the reviews made there) and deleting what
    the retention period no longer allows to be kept."""
    config = load_config(config_path)
    home = tracking.open_experiment(config.name)
    rounds = finished_rounds(config.name)
    since = int(rounds[-1].data.params["last_feedback_id"]) if rounds else 0
    db, fb = feedback_db(), config.feedback
    if db.is_file():  # reviews made in the MLflow UI count: they are read into the store before the harvest
        traced = trace(db, config.registered_model, config.name)
        print(f"traces: {traced.answers} answers and {traced.assessments} assessments written, "
              f"{len(traced.reviewed)} reviews read from MLflow" + (f"; {traced.error}" if traced.error else ""))
    purged = purge(db, fb.retain_days) if db.is_file() else {"responses": 0, "feedback": 0}
    found = harvest(db, config.registered_model, config.task.system_prompt, since, fb.approve_at,
                    require_review=fb.require_review) if db.is_file() else Harvest([], since, 0, 0, 0)
    if found.new < fb.min_examples:
        message = (f"no approved feedback: {found.new} new training examples of {config.registered_model} since "
                   f"feedback id {since} (a round needs {fb.min_examples}; {found.pending} pending review, "
                   f"{found.skipped} approved ratings without a correction) in {db}")
        print(message)
        return {"status": "no approved feedback", "since": since, "examples": found.new,
                "pending": found.pending, "message": message}

    number = len(rounds) + 1
    folder = run_folder(home, config.name, "feedback")
    path = write_examples(folder / f"round-{number:03d}.jsonl", found.examples)
    with mlflow.start_run(run_name=f"feedback round {number}", tags={"tuneline.kind": ROUND}) as run:
        mlflow.log_params({"round": number, "since_feedback_id": since, "last_feedback_id": found.last_id,
                           "new_examples": found.new, "examples": len(found.examples), "skipped": found.skipped,
                           "pending": found.pending, "approve_at": fb.approve_at,
                           "require_review": fb.require_review, "purged_responses": purged["responses"]})
        mlflow.log_artifact(path, "feedback")
        frame = pd.DataFrame([e.__dict__ for e in found.examples])
        mlflow.log_input(mlflow.data.from_pandas(frame, source=path, name=f"feedback-round-{number}"), context="train")
        publish("feedback", f"## Feedback round {number}\n\n{len(found.examples)} training examples from approved "
                            f"feedback of {config.registered_model} ({found.new} new since id {since}; "
                            f"{found.pending} pending review; {purged['responses']} expired answers deleted). The "
                            "lifecycle run is nested in this run.")
        print(f"feedback round {number}: {len(found.examples)} approved examples ({found.new} new), "
              f"{found.pending} pending review; running the lifecycle")
        summary = lifecycle(config_path, serve=serve, corrections=[path], parent_run_id=run.info.run_id)
    return {"status": "retrained", "round": number, "examples": len(found.examples), "file": path, **summary}
