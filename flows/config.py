"""The lifecycle YAML schema: one file scopes one iteration, from candidate models to a served champion.

Unknown keys are errors (a typo must not silently fall back to a default). Relative paths resolve against
the YAML file's own folder, so a config means the same thing from any working directory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from evals.variants import Variant
from tasks import model_sources
from tasks.alignment_config import AlignConfig
from tasks.datasets import label_replies
from tasks.schema import BudgetConfig, GateConfig, Strict, TaskConfig
from tasks.training_config import FinetuneConfig, FinetuneStage, LoraConfig

__all__ = ["AlignConfig", "BudgetConfig", "ConfigError", "FinetuneConfig", "FinetuneStage", "GateConfig",
           "LifecycleConfig", "LoraConfig", "TaskConfig", "load_config"]


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


class DataConfig(Strict):
    """How every task's records are split and how bad rows are treated."""

    validation: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 13
    on_bad_rows: Literal["error", "skip"] = "error"


class ModelsConfig(Strict):
    candidates: list[str] = Field(min_length=1)
    budget: BudgetConfig = BudgetConfig()
    cost_tokens: int = Field(32, gt=0, description="tokens generated to measure each candidate's speed")

    @field_validator("candidates")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        for source in value:
            if source.partition(":")[0] not in model_sources.KINDS:
                raise ValueError(f"{source!r}: expected gguf:<name>, hf:<org/id>, path:<dir> or tiny:<seed>")
        return value


class BaselineConfig(Strict):
    """The prompt-engineering baselines scored on the chosen model; the best is the bar fine-tuning must clear."""

    shots: list[int] = Field(default_factory=lambda: [0, 3],
                             description="k-shot: the same k training examples (drawn once by data.seed) for all")
    chain_of_thought: bool = True
    reasoning_tokens: int = Field(192, gt=0, description="extra tokens a chain-of-thought reply may use")
    retrieval_shots: int = Field(3, ge=0, description="k nearest training examples by MiniLM embedding; 0: off")
    without_chat_template: bool = Field(True, description="also score each prompt as plain text, no system prompt")

    def variants(self, ranked: bool = False) -> list[Variant]:
        """Every prompt to score, simplest first (a tie keeps the simpler prompt). Ranked tasks (classify,
        choice) have no chain of thought: the answers are ranked by likelihood, nothing is reasoned out first."""
        kinds = [Variant("fixed", k) for k in self.shots]
        if self.chain_of_thought and not ranked:
            kinds.append(Variant("cot"))
        if self.retrieval_shots:
            kinds.append(Variant("retrieved", self.retrieval_shots))
        return [replace(v, chat=chat) for chat in ([True, False] if self.without_chat_template else [True])
                for v in kinds]

    @field_validator("shots")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if not value or any(k < 0 for k in value):
            raise ValueError("shots must be a non-empty list of counts >= 0")
        return value


class EvalConfig(Strict):
    batch_size: int = Field(8, gt=0)
    general: list[str] = Field(default_factory=list, description="your own multiple-choice suites (JSONL: "
                               "question, choices, answer index), each gated on forgetting beside the bundled one")
    general_limit: int | None = Field(400, gt=0, description="items of each general suite scored (forgetting)")
    generate_sample: int | None = Field(32, gt=0, description="ranked tasks (classify, choice): replies generated "
                                        "for this many items, for the exact match beside accuracy; null: all")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="what the systems answer the test split with: vllm (lm-eval through a vLLM server on "
                            "each system's weights), transformers, or auto: as deploy.engine resolves without a "
                            "probe (vllm where it is vllm, or auto on a CUDA host that has vLLM)")
    builtin_tasks: list[str] = Field(default_factory=list,
                                     description="lm-eval built-in tasks (arc_easy, …): need the hub, skipped offline")
    builtin_limit: int | None = Field(200, gt=0)


class DeployConfig(Strict):
    serve: bool = True
    host: str = Field("127.0.0.1", description="where the service listens; beyond loopback it needs "
                                                "TUNELINE_API_KEY set, or it refuses to start")
    port: int = Field(3000, gt=0, lt=65536)
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="what generates: vllm (its own environment, `make install-vllm`), transformers, or "
                            "auto: vllm on a CUDA host that has it, else transformers")
    canary: float = Field(0.0, ge=0.0, lt=1.0, description="the share of chat requests the registry's challenger "
                          "answers beside the champion (sticky per request `user`); 0: the champion answers all")
    keep: int | None = Field(None, ge=0, description="after each deploy, delete the served copies (BentoML models "
                             "and Bentos) of all but the newest N versions, never the champion, the challenger, "
                             "the rollback target or what is served, and the config's run folders but the "
                             "newest N; none: keep everything (`tuneline gc` on demand)")
    shadow: bool = Field(False, description="the challenger also answers a copy of each plain chat request the "
                                            "champion answers; its answer is recorded beside the champion's, never "
                                            "returned (`tuneline feedback shadow` compares them)")
    max_prompt_tokens: int = Field(1024, gt=0, description="longer prompts get a 400")
    max_tokens: int = Field(256, gt=0, description="the default and the largest max_tokens a request may ask for")
    constrain: bool = Field(True, description="classify: reply with the most likely label and every label's "
                                              "probability (a request may ask for free text)")

    @property
    def limits(self) -> dict[str, int]:
        """What the service enforces, baked into the Bento."""
        return {"max_prompt_tokens": self.max_prompt_tokens, "max_tokens": self.max_tokens}


class FeedbackConfig(Strict):
    """How production feedback becomes the next round's training data (flows/feedback.py)."""

    require_review: bool = Field(True, description="train only on feedback a reviewer approved (`tuneline feedback "
                                 "approve`); false also trains on pending feedback (never rejected), and "
                                 "`tuneline check` warns")
    approve_at: int | None = Field(None, ge=1, le=5,
                                   description="also train on uncorrected replies rated at least this (1-5)")
    reject_at: int | None = Field(None, ge=1, le=5, description="preference tuning: an approved rating at most this "
                                  "marks the served answer undesirable (KTO rows; `tuneline feedback export --pairs`)")
    min_examples: int = Field(1, gt=0, description="fewer new examples: the round ends with 'no approved feedback'")
    into_pool: bool = Field(False, description="approved corrections may also become retrieved or fixed shots "
                                               "(shown to other users); by default shots come from task records only")
    retain_days: float = Field(90, gt=0, description="stored prompts and answers never approved are deleted after "
                                                     "this many days (each round, and `tuneline feedback purge`)")
    redact: bool = Field(True, description="the service replaces e-mail addresses and card, phone and IBAN "
                                           "numbers before anything is stored")


class ScheduleConfig(Strict):
    """Prefect schedules `tuneline up` gives this config's deployments (cron, in `timezone`); None: on demand."""

    lifecycle: str | None = None
    feedback: str | None = None
    timezone: str = "UTC"

    @field_validator("lifecycle", "feedback")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 5:
            raise ValueError(f"{value!r}: expected a 5-field cron expression, like '0 3 * * *'")
        return value


class LifecycleConfig(Strict):
    """One iteration of the lifecycle."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow experiment name")
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig = DataConfig()
    task: TaskConfig
    extra_tasks: list[TaskConfig] = Field(default_factory=list, description="more tasks for multi-task mixing")
    models: ModelsConfig
    baseline: BaselineConfig = BaselineConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    align: AlignConfig | None = Field(None, description="preference tuning (DPO, KTO) after fine-tuning")
    evaluation: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    deploy: DeployConfig = DeployConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @property
    def tasks(self) -> list[TaskConfig]:
        """The primary task first, then the extra tasks mixed into training."""
        return [self.task, *self.extra_tasks]

    @model_validator(mode="after")
    def _metric_of_the_kind(self) -> LifecycleConfig:
        for where, task in [("task", self.task), *((f"extra_tasks.{i}", t) for i, t in enumerate(self.extra_tasks))]:
            if task.kind == "preference":
                raise ValueError(f"{where}: kind preference is the data of `align` (align.data), not a task to "
                                 "fine-tune or score on")
        if self.gate.metric is None:
            self.gate.metric = "accuracy" if self.task.ranked else "exact_match"
        elif (self.gate.metric == "accuracy") != self.task.ranked:
            raise ValueError(f"gate.metric {self.gate.metric} does not score a {self.task.kind} task "
                             f"(accuracy is for classify and choice)")
        if self.task.kind == "classify" and self.deploy.constrain and label_replies(self.task.answer,
                                                                                     self.task.labels) is None:
            raise ValueError(f"deploy.constrain: the answer template {self.task.answer!r} reads more of a record than "
                             f"its label ({next(iter(self.task.labels))}), so a classifier's replies differ from "
                             "record to record and cannot be served as its labels; answer with the label alone, "
                             "or set deploy.constrain: false to serve free text")
        return self


MAX_FAULTS = 8  # validation errors named in the one-line message


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def load_config(path: str | Path) -> LifecycleConfig:
    """Parse and validate a lifecycle YAML; every failure is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    try:
        config = LifecycleConfig.model_validate(raw)
    except ValidationError as exc:
        # every field at fault, so one `check` finds them all; still one line (a whole-config rule has no loc and
        # names its fields in its message)
        faults = [f"{_field_path(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()]
        more = f"; and {len(faults) - MAX_FAULTS} more" if len(faults) > MAX_FAULTS else ""
        raise ConfigError(f"{path}: {'; '.join(faults[:MAX_FAULTS])}{more}") from None
    tasks = [("task", config.task)] + [(f"extra_tasks.{i}", t) for i, t in enumerate(config.extra_tasks)]
    names = [t.name for _, t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: extra_tasks: task names must be unique, got {names}")
    for i, stage in enumerate(config.finetune.stages):
        if stage.task not in names:
            raise ConfigError(f"{path}: finetune.stages.{i}.task: unknown task {stage.task!r}; tasks are {names}")
    if config.finetune.early_stopping_patience and not config.finetune.save_steps:
        raise ConfigError(f"{path}: finetune.early_stopping_patience: needs finetune.save_steps "
                          "(the evaluation interval)")
    for where, task in tasks + ([("align.data", config.align.data)] if config.align else []):
        if task.data.startswith("hf:"):
            continue
        data = (path.parent / task.data).resolve()
        if not data.is_file():
            raise ConfigError(f"{path}: {where}.data: file not found: {data}")
        task.data = str(data)
    for i, suite in enumerate(config.evaluation.general):
        resolved = (path.parent / suite).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{path}: evaluation.general.{i}: file not found: {resolved}")
        config.evaluation.general[i] = str(resolved)
    for i, source in enumerate(config.models.candidates):
        kind, _, ref = source.partition(":")
        if kind == "path" and not Path(ref).is_absolute():
            config.models.candidates[i] = source = f"path:{(path.parent / ref).resolve()}"
        try:
            model_sources.parse(source)  # an unknown shipped name or a missing folder fails here, not in select
        except model_sources.ModelSourceError as exc:
            raise ConfigError(f"{path}: models.candidates.{i}: {exc}") from None
    return config
