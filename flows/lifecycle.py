"""One iteration of the lifecycle, top to bottom: data → select → baseline → finetune → evaluate → promote → deploy.

One MLflow parent run per iteration with a nested run per stage; one Prefect flow run with a subflow per stage.
"""

from __future__ import annotations

import time

import mlflow
from prefect import flow

from evals.runner import write_tasks
from flows.baseline import baseline_stage
from flows.config import load_config
from flows.data import data_stage
from flows.deploy import deploy_stage
from flows.evaluate import evaluate_stage
from flows.finetune import finetune_stage
from flows.promote import promote_stage
from flows.select import select_stage
from infra.local import configure_env
from tasks import registry, tracking
from tasks.datasets import SPLITS, read_examples
from tasks.models import provision_model
from tasks.training import require_device


@flow(name="lifecycle", log_prints=True)
def lifecycle(config_path: str, serve: bool | None = None) -> dict:
    """Run one iteration of the config at `config_path`; `serve` overrides the config's deploy.serve."""
    config = load_config(config_path)
    if serve is not None:
        config.deploy.serve = serve
    require_device(config.finetune.method)  # before any work: a QLoRA config on a CPU-only machine stops here
    home = configure_env()
    run_dir = home / "runs" / config.name / time.strftime("%Y%m%d-%H%M%S")
    tracking.use(mlflow.get_tracking_uri(), config.name, artifact_root=home / "mlflow" / "artifacts")

    with mlflow.start_run(run_name=f"{config.name} {run_dir.name}") as parent:
        mlflow.log_artifact(config_path, "config")
        pid = parent.info.run_id
        store = str(home / "models")
        # Token lengths are counted with the first candidate's tokenizer; selection reuses the converted model.
        splits = data_stage(config, str(run_dir / "data"), provision_model(config.models.candidates[0], store), pid)
        split_files = {name: splits[name] for name in SPLITS}
        tasks_dir = str(write_tasks(config.task.name, split_files, run_dir / "eval_tasks", config.task.max_answer_tokens,
                                    config.baseline.reasoning_tokens))
        chosen = select_stage(config, store, tasks_dir, splits["validation"], pid)
        baseline = baseline_stage(config, chosen, tasks_dir, split_files, pid)
        files = {k: splits[k] for k in ("train", "validation", "per_task")}
        tuned = finetune_stage(config, chosen["model_dir"], files, str(home / "finetune"), pid)
        champion = registry.champion(config.registered_model)
        champion_dir = str(registry.download(config.registered_model, champion[0], run_dir / "champion")) \
            if champion else None
        report = evaluate_stage(config, chosen["model_dir"], tuned["merged"], baseline, tasks_dir, pid, champion_dir)
        verdict = promote_stage(config, tuned["merged"], tuned["run_id"], report, splits["test"], str(home), pid)
        built = {verdict["version"]: verdict["bento"]} if verdict["bento"] else None
        probe = read_examples(splits["test"])[0].user
        service = deploy_stage(config, str(home), pid, built=built, probe=probe)

    return {
        "mlflow_run_id": pid,
        "model": chosen["source"],
        "baseline": baseline["all"],
        "test": report["scores"],
        "promotion": verdict,
        "service": service,
    }
