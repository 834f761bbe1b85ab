"""Stage 5, finetune: SFT of the chosen model through TRL + peft (LoRA, QLoRA, DoRA or full), tracked in MLflow."""

from __future__ import annotations

import mlflow
from prefect import flow

from flows.config import FinetuneConfig, LifecycleConfig
from tasks.tracking import stage_run
from tasks.training import TrainSpec, train


def train_spec(ft: FinetuneConfig) -> TrainSpec:
    return TrainSpec(
        method=ft.method, r=ft.lora.r, alpha=ft.lora.alpha, dropout=ft.lora.dropout,
        target_modules=ft.lora.target_modules, learning_rate=ft.learning_rate, lr_scheduler=ft.lr_scheduler,
        warmup_ratio=ft.warmup_ratio, max_steps=ft.max_steps, epochs=ft.epochs, batch_size=ft.batch_size,
        gradient_accumulation_steps=ft.gradient_accumulation_steps, weight_decay=ft.weight_decay,
        max_seq_length=ft.max_seq_length, seed=ft.seed,
    )


@flow(name="finetune")
def finetune_stage(config: LifecycleConfig, base_dir: str, train_path: str, out_dir: str,
                   parent_run_id: str) -> dict:
    spec = train_spec(config.finetune)
    with stage_run("finetune", parent_run_id, method=spec.method, base=base_dir) as run:
        result = train(base_dir, train_path, out_dir, spec)
        mlflow.log_metrics({"final_train_loss": result["train_loss"], "train_seconds": result["train_seconds"]})
        if result["adapter"]:
            mlflow.log_artifacts(result["adapter"], "adapter")
        print(f"finetune: {result['steps']} steps, loss {result['train_loss']:.3f}, {result['train_seconds']:.0f}s")
    return {**result, "run_id": run.info.run_id}
