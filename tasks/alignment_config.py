"""The preference-tuning config beside the unit it configures (tasks/alignment.py), as TRL keeps DPOConfig beside
DPOTrainer: the lifecycle YAML's `align` section is this model. Kept apart so reading a config never imports torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.schema import Strict, TaskConfig
from tasks.training_config import LoraConfig

# TRL 1.16's loss names (trl.DPOConfig.loss_type, trl.KTOConfig.loss_type): a typo fails when the config is read,
# not after the SFT stage has run.
LOSSES = {"dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
          "kto": ("kto", "apo_zero_unpaired")}


class AlignConfig(Strict):
    """Preference tuning after fine-tuning: a new LoRA adapter on the fine-tuned weights, trained with TRL's
    DPOTrainer (pairs) or KTOTrainer (pairs, or answers judged one at a time), its reference the same weights with
    the adapter disabled (no second copy held). The aligned weights are one more candidate for the gate, which
    also requires them to beat the fine-tuned weights on held-out preferences."""

    data: TaskConfig = Field(description="the preference data: a task of kind preference (its shape, its columns)")
    method: Literal["dpo", "kto"] = "dpo"
    beta: float = Field(0.1, gt=0, description="how far from the reference the policy may move (higher: less)")
    loss_type: str | None = Field(None, description="TRL's loss; default sigmoid (DPO) or kto (KTO)")
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_steps: int | None = Field(None, gt=0, description="default null: train for `epochs` over the pairs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0, description="pairs (DPO) or judged answers (KTO) per step; KTO needs 2 or "
                                                 "more (its KL estimate pairs each answer with another prompt)")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_length: int = Field(256, gt=16, description="longer rows (prompt and longer answer, chat template "
                                                        "applied) are rejected, never truncated")
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_steps: int | None = Field(10, gt=0, description="checkpoint every N steps; a restarted run resumes")
    max_test_pairs: int = Field(96, gt=0, description="held-out pairs each system's preference accuracy is "
                                                     "measured on")
    min_improvement: float = Field(0.0, description="lower bound of (aligned - fine-tuned) preference accuracy "
                                                    "must exceed this")
    max_task_drop: float = Field(0.05, ge=0, description="upper bound of (fine-tuned - aligned) on the gate's "
                                                         "task metric must not exceed this")

    @model_validator(mode="after")
    def _trainable(self) -> AlignConfig:
        if self.data.kind != "preference":
            raise ValueError(f"align.data must be a task of kind preference, not {self.data.kind}")
        if self.method == "dpo" and self.data.shape == "binary":
            raise ValueError("method dpo trains on pairs; answers judged one at a time (shape binary) need "
                             "method kto")
        if self.method == "kto" and self.batch_size < 2:
            raise ValueError("method kto needs batch_size 2 or more: its KL estimate pairs each answer with "
                             "another row's prompt")
        if self.loss_type is not None and self.loss_type not in LOSSES[self.method]:
            raise ValueError(f"loss_type {self.loss_type!r} is not a {self.method} loss of TRL; one of "
                             f"{', '.join(LOSSES[self.method])}")
        return self

    @property
    def loss(self) -> str:
        return self.loss_type or LOSSES[self.method][0]
