"""The lifecycle YAML schema: one file scopes one iteration, from candidate models to a served champion.

Unknown keys are errors (a typo must not silently fall back to a default). Relative paths resolve against
the YAML file's own folder, so a config means the same thing from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(_Strict):
    validation: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 13


class TaskConfig(_Strict):
    """What the model must learn: the data, how a record becomes a chat turn, and how answers are scored."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    data: Path
    system_prompt: str = ""
    prompt: str = Field(min_length=1, description="Jinja template over a record's fields: the user message")
    answer: str = Field(min_length=1, description="Jinja template over a record's fields: the assistant reply")
    splits: SplitConfig = SplitConfig()
    max_validation_examples: int = Field(32, gt=0)
    max_test_examples: int = Field(48, gt=0)
    max_answer_tokens: int = Field(64, gt=0)


class ModelsConfig(_Strict):
    candidates: list[str] = Field(min_length=1)

    @field_validator("candidates")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        for source in value:
            if source.partition(":")[0] not in {"gguf", "hf", "path", "tiny"}:
                raise ValueError(f"{source!r}: expected gguf:<name>, hf:<org/id>, path:<dir> or tiny:<seed>")
        return value


class BaselineConfig(_Strict):
    shots: list[int] = Field(default_factory=lambda: [0, 3])

    @field_validator("shots")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if not value or any(k < 0 for k in value):
            raise ValueError("shots must be a non-empty list of counts >= 0")
        return value


class LoraConfig(_Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class FinetuneConfig(_Strict):
    method: Literal["lora"] = "lora"
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(40, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_length: int = Field(256, gt=16)
    seed: int = 42


class EvalConfig(_Strict):
    batch_size: int = Field(8, gt=0)


class GateConfig(_Strict):
    min_improvement: float = Field(
        0.0, description="the fine-tuned score must exceed the best baseline by more than this (negative: tolerate)"
    )


class DeployConfig(_Strict):
    serve: bool = True
    port: int = Field(3000, gt=0, lt=65536)


class LifecycleConfig(_Strict):
    """One iteration of the lifecycle."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow experiment name")
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: TaskConfig
    models: ModelsConfig
    baseline: BaselineConfig = BaselineConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluation: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    deploy: DeployConfig = DeployConfig()


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


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
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: {_field_path(first['loc'])}: {first['msg']}{more}") from None
    data = config.task.data if config.task.data.is_absolute() else (path.parent / config.task.data).resolve()
    if not data.is_file():
        raise ConfigError(f"{path}: task.data: file not found: {data}")
    config.task.data = data
    for i, source in enumerate(config.models.candidates):
        kind, _, ref = source.partition(":")
        if kind == "path" and not Path(ref).is_absolute():
            config.models.candidates[i] = f"path:{(path.parent / ref).resolve()}"
    return config
