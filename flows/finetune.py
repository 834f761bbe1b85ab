"""Stage 5, finetune: LoRA SFT of the chosen model through TRL + peft, tracked in MLflow."""

from __future__ import annotations

import mlflow
from prefect import flow

from flows.config import LifecycleConfig
from tasks.tracking import stage_run
from tasks.training import train_lora


@flow(name="finetune")
def finetune_stage(config: LifecycleConfig, base_dir: str, train_path: str, out_dir: str,
                   parent_run_id: str) -> dict:
    ft = config.finetune
    with stage_run("finetune", parent_run_id, method=ft.method, base=base_dir) as run:
        result = train_lora(
            base_dir, train_path, out_dir, r=ft.lora.r, alpha=ft.lora.alpha, dropout=ft.lora.dropout,
            target_modules=ft.lora.target_modules, learning_rate=ft.learning_rate, max_steps=ft.max_steps,
            batch_size=ft.batch_size, gradient_accumulation_steps=ft.gradient_accumulation_steps,
            max_seq_length=ft.max_seq_length, seed=ft.seed,
        )
        mlflow.log_metrics({"final_train_loss": result["train_loss"], "train_seconds": result["train_seconds"]})
        mlflow.log_artifacts(result["adapter"], "adapter")
        print(f"finetune: {result['steps']} steps, loss {result['train_loss']:.3f}, {result['train_seconds']:.0f}s")
    return {**result, "run_id": run.info.run_id}
