"""Stage 2, data: raw records → chat-format train/validation/test splits, counted in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from flows.config import TaskConfig
from tasks.datasets import SPLITS, prepare_data
from tasks.tracking import stage_run


@flow(name="data")
def data_stage(task: TaskConfig, out_dir: str, parent_run_id: str) -> dict[str, str]:
    with stage_run("data", parent_run_id, source=str(task.data), seed=task.splits.seed):
        splits = prepare_data(str(task.data), task.system_prompt, task.prompt, task.answer,
                              task.splits.validation, task.splits.test, task.splits.seed, out_dir)
        counts = {name: sum(1 for _ in open(splits[name], encoding="utf-8")) for name in SPLITS}
        mlflow.log_metrics({f"examples_{name}": n for name, n in counts.items()})
        mlflow.log_artifact(splits["train"], "data")
        print(f"data: {counts} from {Path(task.data).name}")
    return splits
