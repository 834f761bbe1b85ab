"""The fine-tuning config beside the unit it configures (tasks/training.py), as TRL keeps SFTConfig beside
SFTTrainer: the lifecycle YAML's `finetune` section is this model, and `train` takes it as is. Kept apart from
training.py so reading a config never imports torch."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from tasks.schema import Strict


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


class SearchRange(Strict):
    """A numeric range to sample from (random, tpe); integers when both ends are integers."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _not_empty(self) -> SearchRange:
        if not self.high > self.low:
            raise ValueError(f"empty range: high {self.high:g} must exceed low {self.low:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}")
        return self

    @property
    def integers(self) -> bool:
        return float(self.low).is_integer() and float(self.high).is_integer() and not self.log


class SearchConfig(Strict):
    """A hyperparameter search over `finetune` fields: an Optuna study, each trial one training run on the
    training split, judged on the validation split (the test split is the gate's alone)."""

    sampler: Literal["grid", "random", "tpe"] = "tpe"
    trials: int = Field(6, gt=0, description="grid: at most the number of grid points")
    objective: Literal["validation_loss", "validation_score"] = "validation_loss"
    space: dict[str, SearchRange | list[float | int | str | bool]] = Field(
        min_length=1, description="finetune field (lora.r for a LoRA field) -> values to try, or {low, high, log}")
    max_parallel: int = Field(1, gt=0, description="trials training at once")
    work_pool: str | None = Field(None, description="the work pool whose workers run the trials as flow runs; "
                                                    "default: processes on this machine")
    max_failures: int = Field(3, gt=0, description="failed trials after which the search stops, naming the first")
    prune: bool = True
    report_every: int = Field(5, gt=0, description="steps between validation-loss reports (for pruning)")
    seed: int = 13

    @model_validator(mode="after")
    def _usable_space(self) -> SearchConfig:
        for name, values in self.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"space.{name}: empty list of values")
            if self.sampler == "grid" and not isinstance(values, list):
                raise ValueError(f"space.{name}: the grid sampler needs a list of values, not a range")
        return self


class DistributedConfig(Strict):
    """Fine-tuning over several processes, on one machine or several, through `accelerate launch`. Each
    machine runs the same number of processes; machine 0 runs the lifecycle, the others join with
    `tuneline finetune-rank RUN_FOLDER --machine-rank K` on a shared filesystem."""

    num_processes: int = Field(2, gt=0, description="processes on all machines together (one per GPU)")
    num_machines: int = Field(1, gt=0)
    machine_rank: int = Field(0, ge=0, description="this machine's rank; 0 runs the lifecycle")
    main_process_ip: str = Field("127.0.0.1", description="machine 0's address, reachable from the others")
    main_process_port: int = Field(29500, gt=0, lt=65536)
    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"  # on a CPU, ddp over gloo
    network_interface: str | None = Field(None, description="the NIC the ranks talk over (GLOO/NCCL_SOCKET_IFNAME)")

    @model_validator(mode="after")
    def _even(self) -> DistributedConfig:
        if self.num_processes % self.num_machines:
            raise ValueError(f"num_processes {self.num_processes} must be a multiple of num_machines "
                             f"{self.num_machines} (each machine runs the same number)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        return self


class FinetuneConfig(Strict):
    """One fine-tuning run's method and hyperparameters: the `finetune` section of a lifecycle YAML, and what
    tasks/training.py's `train` takes (a sequential stage is this config with the stage's overrides)."""

    # qlora: 4-bit NF4 base (bitsandbytes), CPU or CUDA; none: fine-tuning off (the chosen weights go on, to `align`)
    method: Literal["lora", "qlora", "dora", "full", "none"] = "lora"
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
    search: SearchConfig | None = Field(None, description="hyperparameter search; the best trial goes on")
    distributed: DistributedConfig | None = Field(None, description="several processes or machines (accelerate)")
    work_pool: str | None = Field(None, description="the Prefect work pool whose workers run this stage (the GPU "
                                                    "machines); default: where the lifecycle runs")

    @model_validator(mode="after")
    def _searchable(self) -> FinetuneConfig:
        """Every searched field exists and every value it may take is valid for it."""
        if self.method == "none" and (self.search or self.distributed or self.stages):
            raise ValueError("method none turns fine-tuning off: nothing to search, distribute or stage")
        if self.distributed and self.search:
            raise ValueError("distributed: not with search (each trial trains in a process of its own; search "
                             "first, then train the best settings distributed)")
        if self.distributed and self.method == "qlora" and self.distributed.strategy != "ddp":
            raise ValueError(f"distributed.strategy {self.distributed.strategy}: QLoRA's 4-bit base trains with "
                             "ddp only here")
        if self.search is None:
            return self
        if self.stages:
            raise ValueError("search: not with sequential stages (search one stage's task at a time)")
        for name, values in self.search.space.items():
            head, _, tail = name.partition(".")
            known = head in SEARCHABLE and (not tail or (head == "lora" and tail in LoraConfig.model_fields))
            if not known or (head == "lora" and not tail):
                raise ValueError(f"search.space.{name}: not a finetune field that can be searched; searchable: "
                                 f"{', '.join(SEARCHABLE)}, lora.<r|alpha|dropout>")
            for value in values if isinstance(values, list) else (values.low, values.high):
                try:
                    self.for_trial({name: value})
                except ValidationError as exc:
                    raise ValueError(f"search.space.{name}: {value!r} is not valid: "
                                     f"{exc.errors()[0]['msg']}") from None
        return self

    def for_trial(self, params: dict) -> FinetuneConfig:
        """One trial's run: these settings (`lora.r` names a LoRA field) over the rest, without the search."""
        fields = self.model_dump()
        fields.update(search=None)
        for name, value in params.items():
            head, _, tail = name.partition(".")
            if tail:
                fields[head][tail] = value
            else:
                fields[head] = value
        return FinetuneConfig.model_validate(fields)

    def for_stage(self, stage: FinetuneStage) -> FinetuneConfig:
        """The run of one sequential stage: its own steps and learning rate where it sets them."""
        return self.model_copy(update={"max_steps": stage.max_steps or self.max_steps,
                                       "learning_rate": stage.learning_rate or self.learning_rate, "stages": []})


def training_plan(ft: FinetuneConfig, train_examples: int, step_seconds: float | None = None
                  ) -> tuple[str, list[str]]:
    """How much of the training split fine-tuning will see (and, given the measured `step_seconds` of the chosen
    model here, how long it takes), and a warning naming the fraction when `max_steps` covers less than half
    an epoch: such a run usually learns little."""
    if ft.method == "none":
        return "fine-tuning is off (finetune.method none): the chosen model's weights go on as they are", []
    per_step = ft.batch_size * ft.gradient_accumulation_steps
    epoch = max(1, math.ceil(train_examples / per_step))
    steps = ft.max_steps or math.ceil(epoch * ft.epochs)
    note = (f"fine-tuning runs {steps} steps of {per_step} examples: {steps / epoch:.2f} epochs of the "
            f"{train_examples} training examples" + (" (before packing)" if ft.packing else ""))
    if step_seconds:
        trials = ft.search.trials if ft.search else 1
        note += (f", about {steps * step_seconds * trials / 60:.0f} min on this machine"
                 + (f" for its {trials} trials" if ft.search else "")
                 + f" ({step_seconds:.1f} s a step in the last run of this model here)")
    warnings = []
    if ft.max_steps and not ft.stages and ft.max_steps < epoch / 2:
        warnings.append(f"finetune.max_steps {ft.max_steps} covers {ft.max_steps / epoch:.0%} of an epoch "
                        f"({epoch} steps at {per_step} examples a step); set it to null to train for "
                        f"finetune.epochs ({ft.epochs:g})")
    return note, warnings


# What a search may vary: every scalar training setting (not the device, the stages or the search itself).
SEARCHABLE = ("method", "lora", "learning_rate", "lr_scheduler", "warmup_ratio", "max_steps", "epochs", "batch_size",
              "gradient_accumulation_steps", "weight_decay", "max_seq_length", "seed", "packing")
