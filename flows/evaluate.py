"""Stage 6, evaluate: the fine-tuned model and the best prompt baseline, both on the unseen test split."""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import LifecycleConfig
from tasks.scoring import score
from tasks.tracking import log_eval, stage_run


@flow(name="evaluate")
def evaluate_stage(config: LifecycleConfig, base_dir: str, tuned_dir: str, baseline: dict, tasks_dir: str,
                   parent_run_id: str) -> dict:
    task = config.task
    common = dict(system_prompt=task.system_prompt, limit=task.max_test_examples,
                  batch_size=config.evaluation.batch_size)
    with stage_run("evaluate", parent_run_id, split="test"):
        bar = score(base_dir, tasks_dir, f"{task.name}_test", shots=baseline["shots"], **common)
        log_eval(f"test baseline {baseline['best']}", bar, shots=baseline["shots"], split="test")
        tuned = score(tuned_dir, tasks_dir, f"{task.name}_test", shots=0, **common)
        log_eval("test fine-tuned", tuned, shots=0, split="test")
        mlflow.log_metrics({"test_baseline": bar["score"], "test_finetuned": tuned["score"]})
        create_markdown_artifact(
            key="evaluate",
            markdown="## Test split\n\n| model | score |\n|---|---|\n"
                     f"| best baseline ({baseline['best']}) | {bar['score']:.3f} ± {bar['stderr']:.3f} |\n"
                     f"| fine-tuned (0-shot) | {tuned['score']:.3f} ± {tuned['stderr']:.3f} |\n",
        )
        print(f"evaluate: baseline {bar['score']:.3f} vs fine-tuned {tuned['score']:.3f} on test")
    return {"baseline": bar["score"], "finetuned": tuned["score"], "n": tuned["n"]}
