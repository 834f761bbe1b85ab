"""Stage 4, baseline: prompt engineering on the chosen model. The best baseline is the bar to clear."""

from __future__ import annotations

import mlflow
from prefect import flow

from flows.config import LifecycleConfig
from tasks.scoring import score
from tasks.tracking import log_eval, stage_run


@flow(name="baseline")
def baseline_stage(config: LifecycleConfig, chosen: dict, tasks_dir: str, parent_run_id: str) -> dict:
    task = config.task
    results = {}
    with stage_run("baseline", parent_run_id, model=chosen["source"], shots=str(config.baseline.shots)):
        for shots in config.baseline.shots:
            if shots == 0:  # selection already scored exactly this prompt on this split
                result = chosen["result"]
            else:
                result = score(chosen["model_dir"], tasks_dir, f"{task.name}_validation",
                               system_prompt=task.system_prompt, shots=shots, limit=task.max_validation_examples,
                               batch_size=config.evaluation.batch_size)
            log_eval(f"baseline {shots}-shot", result, shots=shots, split="validation")
            results[f"{shots}-shot"] = {"shots": shots, "score": result["score"], "stderr": result["stderr"]}
        best_name = max(results, key=lambda name: results[name]["score"])
        mlflow.log_metrics({f"score_{name}": r["score"] for name, r in results.items()})
        mlflow.log_params({"best_baseline": best_name})
        print(f"baseline: {({k: round(v['score'], 3) for k, v in results.items()})}; best {best_name}")
    return {"best": best_name, "shots": results[best_name]["shots"], "all": results}
