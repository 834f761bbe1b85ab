"""Preference tuning through TRL (DPOTrainer, KTOTrainer) + peft: a new LoRA adapter on the fine-tuned weights.

The reference model is the same weights with the adapter disabled (TRL's rule for a peft model given no
`ref_model`): the policy starts equal to its reference and no second copy of the weights is held. Rows are
rendered with the chat template fine-tuning, evaluation and serving use (tasks/preferences.py `messages`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from prefect import task

from tasks.alignment_config import AlignConfig
from tasks.models import META_FILE, load, model_info
from tasks.preferences import PreferenceSplits, load_preferences, messages
from tasks.training import (
    TrainResult,
    device_settings,
    last_complete_checkpoint,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    run_arguments,
)


@dataclass(frozen=True)
class Aligned:
    """What preference tuning hands on: the merged weights, the MLflow run that made them, the preference data
    (its held-out pairs as the lm-eval task `task`) and the training summary."""
    merged: str
    run_id: str
    method: str
    steps: int
    train_loss: float
    train_seconds: float
    tokens_per_second: float
    data: PreferenceSplits
    task: str


def preference_dataset(path: str, method: str) -> Dataset:
    """TRL's conversational preference rows: DPO takes (prompt, chosen, rejected); KTO takes (prompt, completion,
    label), so a pair becomes two rows, its chosen answer desirable and its rejected one not."""
    found, rows = load_preferences(path), []
    if method == "dpo" and not all(r.paired for r in found):
        raise ValueError(f"{path}: DPO trains on pairs; these rows judge single answers (use method kto)")
    for r in found:
        prompt = messages(r)
        if method == "dpo":
            rows.append({"prompt": prompt, "chosen": messages(r, r.chosen)[-1:],
                         "rejected": messages(r, r.rejected)[-1:]})
        elif r.paired:
            rows += [{"prompt": prompt, "completion": messages(r, r.chosen)[-1:], "label": True},
                     {"prompt": prompt, "completion": messages(r, r.rejected)[-1:], "label": False}]
        else:
            rows.append({"prompt": prompt, "completion": messages(r, r.chosen)[-1:], "label": bool(r.desirable)})
    return Dataset.from_list(rows)


def preference_trainer(model, tokenizer, spec: AlignConfig, train_path: str, checkpoints: Path, device: str,
                       callbacks: list | None = None):
    """TRL's DPOTrainer or KTOTrainer for `spec`, with the device's precision settings and a LoRA adapter."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # the trainers import slowly: only when training

    config_class, trainer_class = (DPOConfig, DPOTrainer) if spec.method == "dpo" else (KTOConfig, KTOTrainer)
    # TRL logs rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies beside the loss
    args = config_class(**run_arguments(spec, checkpoints), beta=spec.beta,
                        loss_type=[spec.loss] if spec.method == "dpo" else spec.loss,  # DPO combines a list
                        **device_settings(device))
    lora = PeftLoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                          target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    return trainer_class(model=model, args=args, train_dataset=preference_dataset(train_path, spec.method),
                         processing_class=tokenizer, peft_config=lora, callbacks=list(callbacks or []))


@task(name="align", log_prints=False)  # dill prints bytecode while datasets hashes a function
def align(base_dir: str, train_path: str, out_dir: str, spec: AlignConfig, callbacks: list | None = None
          ) -> TrainResult:
    """Preference tuning of `base_dir` (fine-tuned, merged weights) on the rows in `train_path`; writes the adapter
    and the merged model. A run killed mid-way resumes from its last whole checkpoint; a finished one is reused."""
    out, base = Path(out_dir), Path(base_dir)
    if done := TrainResult.load(out):
        return done
    checkpoints = out / "checkpoints"
    device = resolve_device(spec.device)
    model, tokenizer = load(base, device=device)
    trainer = preference_trainer(model, tokenizer, spec, train_path, checkpoints, device, callbacks)
    resume = last_complete_checkpoint(checkpoints)
    reset_peak_memory()
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    logged = [(log.get("step", 0), float(log["num_tokens"])) for log in trainer.state.log_history
              if "num_tokens" in log]
    start = int(Path(resume).name.rsplit("-", 1)[1]) if resume else 0
    tokens = max((n for _, n in logged), default=0.0) - max((n for step, n in logged if step <= start), default=0.0)
    last = next((log for log in reversed(trainer.state.log_history) if "rewards/margins" in log), {})

    adapter_dir, merged_dir = out / "adapter", out / "merged"
    trainer.model.save_pretrained(adapter_dir)
    trainer.model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)  # the fine-tuned weights' tokenizer and chat template, unchanged
    info = model_info(base)
    info.update(source=f"{spec.method}:{info['source']}", base=str(base))
    (merged_dir / META_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainResult(  # saved last: marks the run complete
        merged=str(merged_dir), adapter=str(adapter_dir), method=spec.method, steps=int(result.global_step),
        train_loss=float(result.training_loss), train_seconds=seconds, tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0, peak_memory_mb=peak_memory_mb(),
        resumed_from=Path(resume).name if resume else None,
        examples_per_step=spec.batch_size * spec.gradient_accumulation_steps,
        rewards={k: float(v) for k, v in last.items() if k.startswith("rewards/")}).save(out)
