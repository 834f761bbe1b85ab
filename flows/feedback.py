"""Retrain from production feedback: the corrections the service captured since the last round become a
versioned training file recorded in MLflow, then one lifecycle iteration trains on the task data plus every
round so far. With nothing new it ends at once, saying so.

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
from tasks.feedback import Harvest, harvest
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
    """One feedback round for the config at `config_path`; `serve` overrides deploy.serve for its lifecycle."""
    config = load_config(config_path)
    home = tracking.open_experiment(config.name)
    rounds = finished_rounds(config.name)
    since = int(rounds[-1].data.params["last_feedback_id"]) if rounds else 0
    db = feedback_db()
    found = harvest(db, since, config.feedback.approve_at) if db.is_file() else Harvest([], since, 0)
    if len(found.examples) < config.feedback.min_examples:
        message = (f"no new feedback: {len(found.examples)} new training examples since feedback id {since} "
                   f"(a round needs {config.feedback.min_examples}; {found.skipped} ratings without a correction) "
                   f"in {db}")
        print(message)
        return {"status": "no new feedback", "since": since, "examples": len(found.examples), "message": message}

    number = len(rounds) + 1
    folder = run_folder(home, config.name, "feedback")
    earlier = [mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(folder / f"earlier-{i}"),
                                                   artifact_path=f"feedback/round-{i:03d}.jsonl")
               for i, r in enumerate(rounds, start=1)]
    path = write_examples(folder / f"round-{number:03d}.jsonl", found.examples)
    with mlflow.start_run(run_name=f"feedback round {number}", tags={"tuneline.kind": ROUND}) as run:
        mlflow.log_params({"round": number, "since_feedback_id": since, "last_feedback_id": found.last_id,
                           "new_examples": len(found.examples), "skipped": found.skipped,
                           "earlier_rounds": len(earlier), "approve_at": config.feedback.approve_at})
        mlflow.log_artifact(path, "feedback")
        frame = pd.DataFrame([e.__dict__ for e in found.examples])
        mlflow.log_input(mlflow.data.from_pandas(frame, source=path, name=f"feedback-round-{number}"), context="train")
        publish("feedback", f"## Feedback round {number}\n\n{len(found.examples)} new training examples from "
                            f"feedback ids {since + 1}–{found.last_id} ({found.skipped} ratings without a correction "
                            f"skipped), plus {len(earlier)} earlier rounds. The lifecycle run is nested in this run.")
        print(f"feedback round {number}: {len(found.examples)} new examples (ids {since + 1}–{found.last_id}), "
              f"{len(earlier)} earlier rounds; running the lifecycle")
        summary = lifecycle(config_path, serve=serve, corrections=[*earlier, path], parent_run_id=run.info.run_id)
    return {"status": "retrained", "round": number, "examples": len(found.examples), "file": path, **summary}
