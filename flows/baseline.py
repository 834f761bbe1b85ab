"""Stage 4, baseline: prompt engineering on the chosen model (zero- and k-shot, chain of thought,
retrieval-picked shots; each with and without the chat template). The best prompt is the bar to clear, and
every prompt but chain of thought is a recipe a system can be served with (tasks/recipes.py)."""

from __future__ import annotations

import mlflow
from prefect import flow

from evals.runner import write_listed_tasks
from evals.variants import ZERO_SHOT, Variant
from flows.config import BaselineConfig, EvalConfig, TaskConfig
from tasks.datasets import Splits
from tasks.recipes import Baselines
from tasks.retrieval import attach_fixed, attach_shots, pick_fixed
from tasks.scoring import score, table
from tasks.selection import Selection
from tasks.tracking import log_eval, publish, stage_run


@flow(name="baseline")
def baseline_stage(task: TaskConfig, prompts: BaselineConfig, evaluation: EvalConfig, metric: str, seed: int | str,
                   chosen: Selection, tasks_dir: str, splits: Splits, parent_run_id: str) -> Baselines:
    """`prompts` (the config's `baseline` section) says which prompts to try; `seed` picks the fixed shots."""
    plan = prompts.variants(ranked=task.ranked)
    rows = {}
    with stage_run("baseline", parent_run_id, model=chosen.source, prompts=len(plan)):
        held_out = {"validation": splits.validation, "test": splits.test}  # for choosing, and for evaluate
        if prompts.retrieval_shots:
            files = attach_shots(splits.shot_pool, held_out, prompts.retrieval_shots, tasks_dir)
            write_listed_tasks(task.name, files, tasks_dir, task.max_answer_tokens,
                               Variant("retrieved", prompts.retrieval_shots), ranked=task.ranked)
        fixed = {k: pick_fixed(splits.shot_pool, k, seed) for k in prompts.shots if k}
        for k, shots in fixed.items():
            files = attach_fixed(shots, held_out, tasks_dir, f"fixed{k}")
            write_listed_tasks(task.name, files, tasks_dir, task.max_answer_tokens, Variant("fixed", k),
                               ranked=task.ranked)
        for v in plan:
            if v == ZERO_SHOT and chosen.result is not None:  # selection scored exactly this, on these items
                result = chosen.result
            else:
                result = score(chosen.model_dir, tasks_dir, v.task(task.name, "validation"),
                               system_prompt=task.system_prompt, shots=v.shots, chat=v.chat,
                               limit=task.max_validation_examples, batch_size=evaluation.batch_size,
                               kind=task.kind, generate=evaluation.generate_sample)
            log_eval(f"baseline {v.name}", result, kind=v.kind, shots=v.shots, chat_template=v.chat,
                     split="validation")
            rows[v.name] = {**result.metrics, "score": result.metrics[metric], "stderr": result.stderr}
        found = Baselines(tuple(plan), rows, best=max(plan, key=lambda v: rows[v.name]["score"]), fixed=fixed)
        mlflow.log_metrics({f"score_{name.replace(',', '').replace(' ', '_')}": r["score"]
                            for name, r in rows.items()})
        mlflow.log_params({"best_baseline": found.best.name, "ranked_by": metric})
        publish(
            "baseline",
            f"## Prompt baselines on {chosen.source} (validation split)\n\n"
            f"{table(rows, task.ranked, first='prompt')}\n\n"
            f"Bar for fine-tuning: **{found.best.name}** (best {metric}, the gate's metric; ties keep the simpler "
            "prompt). Each prompt's samples are in its MLflow run.",
        )
        print(f"baseline: {({k: round(r['score'], 3) for k, r in rows.items()})} ({metric}); best {found.best.name}")
    return found
