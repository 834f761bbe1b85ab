"""The config sections the units take as they are: the lifecycle YAML's `task`, `models.budget` and `gate`
sections are these models, and tasks/datasets.py, tasks/selection.py and tasks/registry.py read them directly,
so each concept has one owner (the `finetune` section lives beside its unit, in tasks/training_config.py).
Only pydantic is imported here: reading a config starts no torch, MLflow or Prefect."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class TaskConfig(Strict):
    """What the model must learn: the data, how a record becomes a chat turn, and how answers are scored.

    `kind` decides the scoring. generate: the reply is generated and compared with the answer. classify: the
    answer is one of `labels` (one entry); choice: one of a per-record list (`choices`, each rendered through
    `choice_answer`). For both, the candidates are ranked by the model's log-likelihood of each one as the
    assistant reply (lm-eval multiple_choice): accuracy is the primary metric, exact match of the generated reply
    is still reported beside it. preference (only as `align.data`): judged answers to a prompt in one of three
    `shape`s, read from the columns `chosen`/`rejected` (pairs), `answers` best-first with optional `scores`
    (rankings) or `answer`/`desirable` (binary, for KTO), each answer written through the `answer` template
    (variable `answer`); `fields` maps those names to other columns as it maps template variables."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["generate", "classify", "choice", "preference"] = "generate"
    choices: str | None = Field(None, description="choice: the record field holding the list of answers")
    choice_answer: str = Field("{{ choice }}", min_length=1,
                               description="choice: how candidate i is written as the reply; variables choice, "
                                           "letter (A, B, …), index (0, 1, …) and the record's fields")
    data: str = Field(min_length=1, description="a .jsonl/.csv/.parquet file, or hf:<dataset id>[:split]")
    fields: dict[str, str] = Field(default_factory=dict, description="template variable -> source column")
    labels: dict[str, list[str]] = Field(default_factory=dict, description="variable -> allowed values")
    system_prompt: str = ""
    prompt: str | list[str] = Field(description="Jinja template(s) over a record's fields: the user message")
    prompt_choice: Literal["per_example", "first"] = "per_example"
    answer: str = Field(min_length=1, description="Jinja template over a record's fields: the assistant reply")
    weight: float = Field(1.0, gt=0, description="share of the multi-task training mixture")
    max_tokens: int | None = Field(None, gt=0,
                                   description="longer examples are rejected; default finetune.max_seq_length")
    max_validation_examples: int = Field(32, gt=0)
    max_test_examples: int = Field(48, gt=0)
    max_answer_tokens: int = Field(64, gt=0)
    shape: Literal["pairs", "rankings", "binary"] = Field("pairs", description="preference: how a row judges answers")
    max_pairs_per_prompt: int = Field(3, gt=0, description="preference rankings: ordered pairs kept per prompt, the "
                                                           "best answer against each worse one first")

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value: str | list[str]) -> str | list[str]:
        templates = [value] if isinstance(value, str) else value
        if not templates or any(not t.strip() for t in templates):
            raise ValueError("prompt must be a non-empty template or a non-empty list of them")
        return value

    @model_validator(mode="after")
    def _kind_has_its_answers(self) -> TaskConfig:
        if self.kind == "classify" and len(self.labels) != 1:
            raise ValueError(f"kind classify needs exactly one entry in labels (the class field), got "
                             f"{sorted(self.labels) or 'none'}")
        if self.kind == "choice" and not self.choices:
            raise ValueError("kind choice needs `choices`: the record field holding each record's list of answers")
        if self.kind != "choice" and self.choices:
            raise ValueError(f"choices is for kind choice, not {self.kind}")
        return self

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    @property
    def ranked(self) -> bool:
        """Scored by ranking candidate answers by likelihood (classify, choice) rather than by generation."""
        return self.kind in ("classify", "choice")


class BudgetConfig(Strict):
    """Selection picks the best validation score among the candidates within these limits (None: no limit)."""

    max_parameters: int | None = Field(None, gt=0)
    min_tokens_per_s: float | None = Field(None, gt=0, description="greedy generation speed on this machine")
    max_memory_mb: float | None = Field(None, gt=0, description="peak process memory while generating")

    def violations(self, row: dict) -> list[str]:
        """What a candidate's measured row (parameters, tokens_per_s, peak_memory_mb) breaks, in words."""
        found = []
        if self.max_parameters is not None and row["parameters"] > self.max_parameters:
            found.append(f"{row['parameters'] / 1e6:.0f}M parameters > {self.max_parameters / 1e6:.0f}M")
        if self.min_tokens_per_s is not None and row["tokens_per_s"] < self.min_tokens_per_s:
            found.append(f"{row['tokens_per_s']:.1f} tokens/s < {self.min_tokens_per_s}")
        if self.max_memory_mb is not None and row["peak_memory_mb"] > self.max_memory_mb:
            found.append(f"{row['peak_memory_mb']:.0f} MB peak memory > {self.max_memory_mb:.0f} MB")
        return found


class GateConfig(Strict):
    """The rules a fine-tuned model must pass to become `champion`; every rule is checked and reported.

    Each rule compares two systems item by item on the same test items and passes only when the one-sided
    confidence bound at `confidence` clears it (exact McNemar bounds for exact match, a paired bootstrap for
    field F1 and ROUGE-L): a point estimate alone never passes a rule."""

    metric: Literal["exact_match", "field_f1", "rougeL", "accuracy"] | None = Field(
        None, description="default: the task kind's primary metric (accuracy for classify and choice, else "
                          "exact_match)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided confidence of every rule's bound")
    min_improvement: float = Field(
        0.0, description="lower bound of (fine-tuned - best baseline) must exceed this (negative: tolerate)"
    )
    champion_margin: float = Field(0.0, ge=0, description="lower bound of (fine-tuned - champion) must exceed "
                                                          "minus this (non-inferiority)")
    max_forgetting: float = Field(0.05, ge=0, description="upper bound of the drop in each general suite's "
                                                          "accuracy must not exceed this")
    smoke_prompts: int = Field(3, ge=0, description="test prompts the built service must answer as in-process")

    @property
    def require_smoke(self) -> bool:
        """A promoted system must first be served and answer `smoke_prompts` test prompts as in-process."""
        return self.smoke_prompts > 0
