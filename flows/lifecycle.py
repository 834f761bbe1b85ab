"""One iteration of the lifecycle, top to bottom: data → select → lengths → baseline → finetune → align (when the
config has `align`) → evaluate → promote → deploy.

One MLflow parent run per iteration with a nested run per stage; one Prefect flow run with a subflow per stage.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import mlflow
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.align import align_stage
from flows.baseline import baseline_stage
from flows.config import load_config
from flows.data import lengths_stage, prepare
from flows.deploy import deploy_stage
from flows.evaluate import evaluate_stage
from flows.finetune import finetune_on_pool, finetune_stage
from flows.promote import promote_stage
from flows.select import select_stage
from tasks import tracking
from tasks.alignment import Aligned
from tasks.datasets import read_examples
from tasks.packaging import Deployment
from tasks.paths import run_folder
from tasks.recipes import Baselines
from tasks.registry import Evaluation, Verdict
from tasks.selection import Selection
from tasks.training import FineTuned


@flow(name="lifecycle", log_prints=True)
def lifecycle(config_path: str, serve: bool | None = None, corrections: list[str] | None = None,
              parent_run_id: str | None = None) -> dict:
    """Run one iteration of the config at `config_path`.

    serve: override the config's deploy.serve. corrections: chat-example JSONL files from production feedback,
    added to the training split. parent_run_id: nest this iteration's MLflow run under that run."""
    config = load_config(config_path)
    if serve is not None:
        config.deploy.serve = serve
    home = tracking.open_experiment(config.name)
    run_dir = run_folder(home, config.name)

    # The stage subflows run in this process, whose liveness the lifecycle's own heartbeat already reports;
    # a heartbeat thread per subflow would cost up to a second each to stop (Prefect's sleeps 1 s at a time).
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            mlflow.start_run(run_name=f"{config.name} {run_dir.name}", nested=parent_run_id is not None,
                             parent_run_id=parent_run_id, tags={"tuneline.kind": "lifecycle"}) as parent:
        mlflow.log_artifact(config_path, "config")
        pid = parent.info.run_id
        splits, tasks_dir = prepare(config, run_dir, pid, corrections)
        chosen: Selection = select_stage(config.task, config.models, config.evaluation, config.gate.metric,
                                         str(home / "models"), tasks_dir, splits.validation, pid)
        fitted = lengths_stage(config.tasks, config.finetune, splits, chosen.model_dir, pid, str(home / "finetune"))
        if "validation" in fitted.changed:  # selection scored items that are gone now: the bar is scored anew
            chosen = replace(chosen, result=None)
        baselines: Baselines = baseline_stage(config.task, config.baseline, config.evaluation, config.gate.metric,
                                              config.data.seed, chosen, tasks_dir, splits, pid)
        tuned: FineTuned = (finetune_on_pool if config.finetune.work_pool else finetune_stage)(
            config, chosen.model_dir, splits, str(home / "finetune"), pid, tasks_dir)
        aligned: Aligned | None = align_stage(config, tuned.merged, splits, str(home / "finetune"), pid,
                                              tasks_dir) if config.align else None
        report: Evaluation = evaluate_stage(config, chosen.model_dir, tuned.merged, baselines, tasks_dir, pid,
                                            champion=True, aligned=aligned)
        verdict: Verdict = promote_stage(config.registered_model, config.gate, config.task, config.deploy, tuned.run_id,
                                         report, splits, str(home), pid)
        service: Deployment = deploy_stage(config, str(home), pid,
                                           built={verdict.version: verdict.bento} if verdict.bento else None,
                                           probe=read_examples(splits.test)[0].user)

    return {
        "mlflow_run_id": pid,
        "model": chosen.source,
        "data": {"train": splits.train, "counts": splits.counts, "mixed_train": splits.mixed_train},
        "baseline": baselines.rows,
        "test": report.scores,
        "preferences": report.preferences,
        "promotion": asdict(verdict),
        "service": asdict(service),
    }
