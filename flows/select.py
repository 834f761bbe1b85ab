"""Stage 3, select: every candidate model scored zero-shot on the validation split (the gate's metric, and how
likely it finds the reference answers) and measured for cost (parameters, generation tokens/s, peak memory);
the configured rule picks one."""

from __future__ import annotations

import mlflow
from prefect import flow

from evals.variants import ZERO_SHOT, likelihood_task
from flows.config import EvalConfig, ModelsConfig, TaskConfig
from tasks.datasets import chat_messages, read_examples
from tasks.models import model_info, provision_model
from tasks.scoring import score, score_likelihood
from tasks.selection import Selection, choose, measure_cost
from tasks.tracking import log_eval, publish, stage_run


@flow(name="select")
def select_stage(task: TaskConfig, models: ModelsConfig, evaluation: EvalConfig, metric: str, store: str,
                 tasks_dir: str, validation_path: str, parent_run_id: str) -> Selection:
    probe = chat_messages(read_examples(validation_path)[0], with_answer=False)  # a real prompt for the timing
    rows = []
    with stage_run("select", parent_run_id, candidates=",".join(models.candidates),
                   **{f"budget_{k}": v for k, v in models.budget.model_dump().items() if v is not None}):
        for source in models.candidates:
            folder = provision_model(source, store)
            info = model_info(folder)
            cost = measure_cost(folder, probe, models.cost_tokens)
            result = score(folder, tasks_dir, ZERO_SHOT.task(task.name, "validation"), system_prompt=task.system_prompt,
                           shots=0, limit=task.max_validation_examples, batch_size=evaluation.batch_size,
                           kind=task.kind, generate=evaluation.generate_sample)
            likely = score_likelihood(folder, tasks_dir, likelihood_task(task.name),
                                      system_prompt=task.system_prompt, limit=task.max_validation_examples,
                                      batch_size=evaluation.batch_size)
            log_eval(f"candidate {source}", result, metrics={**cost, "answer_logprob": likely["mean_logprob"]},
                     source=source, instruct=info["instruct"], shots=0, split="validation")
            rows.append({"source": source, "model_dir": folder, "instruct": info["instruct"], **cost,
                         "score": result.metrics[metric], "stderr": result.stderr,
                         "likelihood": likely["mean_logprob"], "result": result})
        best, reason = choose(rows, models.budget)
        mlflow.log_params({"chosen": best["source"]})
        mlflow.log_metric("chosen_score", best["score"])
        mlflow.set_tag("tuneline.reason", reason)
        table = "\n".join(
            f"| {r['source']} | {'instruct' if r['instruct'] else 'base'} | {r['parameters'] / 1e6:.1f}M "
            f"| {r['tokens_per_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['score']:.3f} | {r['likelihood']:.3f} |"
            for r in rows
        )
        publish(
            "select",
            f"## Model selection\n\n| model | kind | params | tokens/s | peak MB | validation {metric} "
            f"| answer log-prob per token |\n|---|---|---|---|---|---|---|\n{table}\n\n"
            f"Chosen: **{best['source']}**: {reason}.",
        )
        print(f"select: chose {best['source']}: {reason}")
    return Selection(best["source"], best["model_dir"], reason, best["score"], best["likelihood"], best["result"])
