"""The fine-tuning config beside the unit it configures (tasks/training.py), as TRL keeps SFTConfig beside
SFTTrainer: the lifecycle YAML's `finetune` section is this model, and `train` takes it as is. Kept apart from
training.py so reading a config never imports torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class LoraConfig(Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # on a CPU, torch's dropout mask costs ~30 % of a LoRA step
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class FinetuneStage(Strict):
    """One step of sequential fine-tuning: train on one task, starting from the previous stage's weights."""

    task: str
    max_steps: int | None = Field(None, gt=0, description="default: finetune.max_steps")
    learning_rate: float | None = Field(None, gt=0, description="default: finetune.learning_rate")


class FinetuneConfig(Strict):
    """One fine-tuning run's method and hyperparameters: the `finetune` section of a lifecycle YAML, and what
    tasks/training.py's `train` takes (a sequential stage is this config with the stage's overrides)."""

    method: Literal["lora", "qlora", "dora", "full"] = "lora"  # qlora: 4-bit NF4 base (bitsandbytes), CPU or CUDA
    lora: LoraConfig = LoraConfig()  # r, alpha, dropout, target modules for lora, qlora and dora
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_steps: int | None = Field(None, gt=0, description="default null: train for `epochs` over the training split")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(256, gt=16)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_steps: int | None = Field(10, gt=0, description="checkpoint every N steps; a restarted run resumes")
    packing: bool = False
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without a better val loss")
    stages: list[FinetuneStage] = Field(default_factory=list,
                                        description="sequential fine-tuning; empty: one run on the task mixture")

    def for_stage(self, stage: FinetuneStage) -> FinetuneConfig:
        """The run of one sequential stage: its own steps and learning rate where it sets them."""
        return self.model_copy(update={"max_steps": stage.max_steps or self.max_steps,
                                       "learning_rate": stage.learning_rate or self.learning_rate, "stages": []})
