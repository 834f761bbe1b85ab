"""Supervised fine-tuning through TRL + peft: the loss is on the assistant's reply only, rendered with the
same chat template (and the same system prompt) that evaluation and serving use.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from prefect import task
from trl import SFTConfig, SFTTrainer

from tasks.datasets import Example, chat_messages, read_examples
from tasks.models import META_FILE, load, model_info


def conversational(examples: list[Example]) -> Dataset:
    """TRL's prompt/completion form: it renders both with the chat template and trains on the completion."""
    rows = []
    for e in examples:
        *prompt, completion = chat_messages(e, with_answer=True)
        rows.append({"prompt": prompt, "completion": [completion]})
    return Dataset.from_list(rows)


def device_settings() -> dict:
    """SFTConfig defaults to bf16 and gradient checkpointing even on CPU, 17x slower there (STACK.md)."""
    if torch.cuda.is_available():
        return {"bf16": True, "activation_checkpointing": True, "use_cpu": False}
    return {"bf16": False, "activation_checkpointing": False, "use_cpu": True}


@task(name="train-lora", log_prints=False)  # dill prints bytecode while datasets hashes a function
def train_lora(base_dir: str, train_path: str, out_dir: str, *, r: int, alpha: int, dropout: float,
               target_modules: list[str] | str, learning_rate: float, max_steps: int, batch_size: int,
               gradient_accumulation_steps: int, max_seq_length: int, seed: int) -> dict:
    """LoRA SFT of `base_dir` on the chat examples in `train_path`; writes the adapter and the merged model."""
    out = Path(out_dir)
    model, tokenizer = load(Path(base_dir))
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_length=max_seq_length,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 10),
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        seed=seed,
        report_to=["mlflow"],  # loss and learning-rate curves into the active (finetune) run
        completion_only_loss=True,
        dataloader_num_workers=0,
        **device_settings(),
    )
    peft_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversational(read_examples(train_path)),
                         processing_class=tokenizer, peft_config=peft_config)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started

    adapter_dir, merged_dir = out / "adapter", out / "merged"
    trainer.model.save_pretrained(adapter_dir)
    merged = trainer.model.merge_and_unload() if isinstance(trainer.model, PeftModel) else trainer.model
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    info = model_info(Path(base_dir))
    info.update(source=f"lora:{info['source']}", base=str(base_dir))
    (merged_dir / META_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {
        "adapter": str(adapter_dir),
        "merged": str(merged_dir),
        "train_loss": float(result.training_loss),
        "train_seconds": seconds,
        "steps": int(result.global_step),
    }
