"""Stage 5, finetune: SFT of the chosen model through TRL + peft (LoRA, QLoRA, DoRA or full), tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from flows.config import LifecycleConfig, load_config
from flows.data import lengths_stage, prepare, training_plan
from tasks import registry, tracking
from tasks.datasets import Splits
from tasks.models import provision_model
from tasks.paths import run_folder
from tasks.tracking import publish, stage_run
from tasks.training import FineTuned, run_key, train


@flow(name="finetune")
def finetune_stage(config: LifecycleConfig, base_dir: str, splits: Splits, runs_dir: str, parent_run_id: str
                   ) -> FineTuned:
    """One run on the task mixture, or sequential stages each starting from the previous stage's weights.

    Each run trains in a folder named by its inputs, so a killed run resumes from its checkpoint when
    started again and a finished one is reused.
    """
    plan = [(stage.task, stage) for stage in config.finetune.stages] or [(None, None)]
    rows = []
    with stage_run("finetune", parent_run_id, method=config.finetune.method, base=base_dir,
                   stages=",".join(task or "mixture" for task, _ in plan)) as run:
        current = base_dir
        for step, (task, stage) in enumerate(plan):
            files = splits.per_task[task] if task else splits.files
            spec = config.finetune.for_stage(stage) if stage else config.finetune
            out_dir = str(Path(runs_dir) / run_key(current, files["train"], spec))
            result = train(current, files["train"], out_dir, spec, files["validation"])
            prefix = f"stage{step}_" if task else ""
            mlflow.log_metrics({prefix + k: result[k] for k in ("train_loss", "train_seconds", "tokens_per_second",
                                                               "peak_memory_mb")})
            mlflow.set_tags({f"tuneline.{prefix}resumed_from": str(result["resumed_from"]),
                             f"tuneline.{prefix}cached": str(result["cached"])})
            if result["adapter"]:
                mlflow.log_artifacts(result["adapter"], f"{prefix}adapter")
            how = "reused a finished run" if result["cached"] else \
                f"resumed from {result['resumed_from']}" if result["resumed_from"] else "trained"
            print(f"finetune{' stage ' + str(step) + ' (' + task + ')' if task else ''}: {how}: {result['steps']} "
                  f"steps, loss {result['train_loss']:.3f}, {result['train_seconds']:.0f}s")
            rows.append(f"| {task or 'mixture'} | {how} | {result['steps']} | {result['train_loss']:.3f} "
                        f"| {result['train_seconds']:.0f} | {result['tokens_per_second']:.0f} |")
            current = result["merged"]
        plan, warnings = training_plan(config, sum(splits.mixed_train.values()))
        for warning in warnings:
            print(f"WARNING: {warning}")
        publish("finetune", f"## Fine-tuning ({config.finetune.method})\n\n| data | run | steps | final loss | "
                            "seconds | tokens/s |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
                            + f"\n\nPlanned: {plan}." + "".join(f"\n\n**Warning:** {w}." for w in warnings)
                            + "\n\nThe adapter and the loss curve are in the MLflow run.")
    return FineTuned(result["merged"], run.info.run_id, result["steps"], result["train_loss"],
                     result["train_seconds"], result["tokens_per_second"])


@flow(name="finetune-model", log_prints=True)
def finetune_model(config_path: str, model: str | None = None, max_steps: int | None = None) -> dict:
    """Fine-tune alone: the config's data and method on `model` (default: its first candidate), without
    selection, baselines or the gate. The result is registered as a new version with decision `pending`;
    `champion` does not move (evaluate-version, then promote-version, take it from there)."""
    config = load_config(config_path)
    if max_steps is not None:
        config.finetune.max_steps = max_steps
    source = model or config.models.candidates[0]
    home = tracking.open_experiment(config.name)
    run_dir = run_folder(home, config.name)
    store = str(home / "models")
    with mlflow.start_run(run_name=f"finetune {source}", tags={"tuneline.kind": "finetune-model"}) as parent:
        splits, _ = prepare(config, run_dir, parent.info.run_id)
        base = provision_model(source, store)
        lengths_stage(config, splits, base, parent.info.run_id)
        tuned = finetune_stage(config, base, splits, str(home / "finetune"), parent.info.run_id)
        version = registry.register(config.registered_model, tuned.merged, tuned.run_id, {}, config.gate.metric,
                                    splits.keys)
        registry.mark_pending(config.registered_model, version)
    print(f"finetune-model: {config.registered_model} v{version} registered from {source}; champion unchanged")
    return {"version": version, "model": source, "steps": tuned.steps, "train_loss": tuned.train_loss,
            "mlflow_run_id": parent.info.run_id}
