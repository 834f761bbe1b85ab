"""Stage 5, finetune: SFT of the chosen model through TRL + peft (LoRA, QLoRA, DoRA or full), tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from flows.config import FinetuneConfig, LifecycleConfig
from tasks.tracking import stage_run
from tasks.training import TrainSpec, run_key, train


def train_spec(ft: FinetuneConfig) -> TrainSpec:
    return TrainSpec(
        method=ft.method, r=ft.lora.r, alpha=ft.lora.alpha, dropout=ft.lora.dropout,
        target_modules=ft.lora.target_modules, learning_rate=ft.learning_rate, lr_scheduler=ft.lr_scheduler,
        warmup_ratio=ft.warmup_ratio, max_steps=ft.max_steps, epochs=ft.epochs, batch_size=ft.batch_size,
        gradient_accumulation_steps=ft.gradient_accumulation_steps, weight_decay=ft.weight_decay,
        max_seq_length=ft.max_seq_length, seed=ft.seed, save_steps=ft.save_steps, packing=ft.packing,
    )


@flow(name="finetune")
def finetune_stage(config: LifecycleConfig, base_dir: str, train_path: str, runs_dir: str,
                   parent_run_id: str) -> dict:
    """Train in a folder named by the inputs, so a killed run resumes from its checkpoint when started again
    and a finished one is reused."""
    spec = train_spec(config.finetune)
    out_dir = str(Path(runs_dir) / run_key(base_dir, train_path, spec))
    with stage_run("finetune", parent_run_id, method=spec.method, base=base_dir, out_dir=out_dir) as run:
        result = train(base_dir, train_path, out_dir, spec)
        mlflow.set_tags({"tuneline.resumed_from": str(result["resumed_from"]), "tuneline.cached": str(result["cached"])})
        mlflow.log_metrics({k: result[k] for k in ("train_loss", "train_seconds", "tokens_per_second",
                                                   "peak_memory_mb")})
        if result["adapter"]:
            mlflow.log_artifacts(result["adapter"], "adapter")
        how = "reused a finished run" if result["cached"] else \
            f"resumed from {result['resumed_from']}" if result["resumed_from"] else "trained"
        print(f"finetune: {how}: {result['steps']} steps, loss {result['train_loss']:.3f}, "
              f"{result['train_seconds']:.0f}s")
    return {**result, "run_id": run.info.run_id}
