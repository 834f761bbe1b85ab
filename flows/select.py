"""Stage 3, select: every candidate model scored zero-shot on the validation split; the best one goes on."""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import LifecycleConfig
from tasks.models import model_info, provision_model
from tasks.scoring import score
from tasks.tracking import log_eval, stage_run


@flow(name="select")
def select_stage(config: LifecycleConfig, store: str, tasks_dir: str, parent_run_id: str) -> dict:
    task = config.task
    rows = []
    with stage_run("select", parent_run_id, candidates=",".join(config.models.candidates)):
        for source in config.models.candidates:
            folder = provision_model(source, store)
            info = model_info(folder)
            result = score(folder, tasks_dir, f"{task.name}_validation", system_prompt=task.system_prompt,
                           shots=0, limit=task.max_validation_examples, batch_size=config.evaluation.batch_size)
            log_eval(f"candidate {source}", result, source=source, parameters=info["parameters"],
                     instruct=info["instruct"], shots=0, split="validation")
            rows.append({"source": source, "model_dir": folder, "parameters": info["parameters"],
                         "instruct": info["instruct"], "score": result["score"], "stderr": result["stderr"],
                         "result": result})
        # Best score; on a tie the smaller model is cheaper to train and serve.
        best = max(rows, key=lambda r: (r["score"], -r["parameters"]))
        mlflow.log_params({"chosen": best["source"]})
        mlflow.log_metric("chosen_score", best["score"])
        table = "\n".join(
            f"| {r['source']} | {'instruct' if r['instruct'] else 'base'} | {r['parameters'] / 1e6:.1f}M "
            f"| {r['score']:.3f} ± {r['stderr']:.3f} |" for r in rows
        )
        create_markdown_artifact(
            key="select",
            markdown=f"## Model selection\n\n| model | kind | params | validation score |\n|---|---|---|---|\n"
                     f"{table}\n\nChosen: **{best['source']}** (best score; ties go to the smaller model).",
        )
        print(f"select: chose {best['source']} ({best['score']:.3f})")
    return best
