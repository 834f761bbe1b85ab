"""Stage 2, data: raw records → chat-format train/validation/test splits, with a data card in MLflow."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure
from prefect import flow

from evals.runner import general_suites, write_tasks
from flows.config import FinetuneConfig, LifecycleConfig, TaskConfig
from tasks.datasets import Lengths, Splits, fit_lengths, prepare_data, read_examples
from tasks.evidence import gate_power
from tasks.tracking import publish, stage_run
from tasks.training import measured_step_seconds
from tasks.training_config import training_plan


def _length_plot(lengths: dict[str, list[int]], limit: int):
    fig = Figure(figsize=(6, 3.5))  # no pyplot: no display backend to choose, the plot is a file for MLflow
    ax = fig.subplots()
    for name, values in lengths.items():
        ax.hist(values, bins=30, alpha=0.6, label=name)
    ax.axvline(limit, color="red", linestyle="--", label=f"max tokens {limit}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    return fig


def _balance(answers: dict[str, Counter]) -> str:
    """The right answers' counts per split and each split's majority rate: "0.552 on a set that is 52.5 % one
    class" must read as what it is."""
    if not answers:
        return ""
    names = sorted(set().union(*answers.values()), key=lambda a: -answers["train"][a])
    rows = "\n".join(f"| {a} | " + " | ".join(str(answers[s][a]) for s in answers) + " |" for a in names)
    majority = " | ".join(f"{max(c.values()) / sum(c.values()):.3f}" for c in answers.values())
    return (f"| right answer | {' | '.join(answers)} |\n|---|{'---|' * len(answers)}\n{rows}\n"
            f"| *majority rate* | {majority} |\n\n")


@flow(name="data")
def data_stage(config: LifecycleConfig, out_dir: str, parent_run_id: str, corrections: list[str] | None = None
               ) -> Splits:
    """Splits for every task, the mixed training file, and a data card: counts, fingerprints, power, rejects,
    samples. `corrections`: chat-example files from production feedback, added to the training file only."""
    d = config.data
    tasks = config.tasks
    with stage_run("data", parent_run_id, seed=d.seed, on_bad_rows=d.on_bad_rows,
                   tasks=",".join(t.name for t in tasks)):
        result = prepare_data(tasks, d.validation, d.test, d.seed, out_dir, d.on_bad_rows, corrections or [],
                              config.feedback.into_pool)
        for name, counts in result.counts.items():
            mlflow.log_metrics({f"{name}_{split}": n for split, n in counts.items()})
        mlflow.log_metrics({f"mixed_train_{name}": n for name, n in result.mixed_train.items()})
        mlflow.log_metric("rejected_rows", sum(c["rejected"] for c in result.counts.values()))
        mlflow.log_params({f"fingerprint_{split}": value for split, value in result.fingerprints.items()})
        mlflow.log_artifact(result.rejects, "data_card")
        mlflow.log_artifact(result.keys, "data_card")
        mlflow.log_text(json.dumps({"counts": result.counts, "mixed_train": result.mixed_train}, indent=2),
                        "data_card/counts.json")
        answers = {}  # classify / choice: how often each answer is the right one, per split (class balance)
        for split_name in ("train", "validation", "test"):
            examples = read_examples(result.files[split_name])
            if config.task.ranked:
                answers[split_name] = Counter(e.assistant for e in examples if e.task == config.task.name)
            if split_name == "train":
                mlflow.log_text("".join(e.to_json() + "\n" for e in examples[:10]), "data_card/samples.jsonl")
            # as the split file holds them (choices a list, absent for generated tasks): MLflow infers no schema
            # from tuples or empty lists
            frame = pd.DataFrame([json.loads(e.to_json()) for e in examples])
            mlflow.log_input(mlflow.data.from_pandas(frame, source=result.files[split_name], name=split_name),
                             context=split_name)
        note, warnings = gate_power(config.gate, config.task, result.counts[config.task.name]["test"])
        plan, plan_warnings = training_plan(config.finetune, sum(result.mixed_train.values()))
        warnings += plan_warnings
        mlflow.set_tag("tuneline.power", note)
        mlflow.set_tag("tuneline.training_plan", plan)
        rows = "\n".join(f"| {name} | {c['train']} | {c['validation']} | {c['test']} | {c['rejected']} |"
                         for name, c in result.counts.items())
        balance = _balance(answers)
        if answers:
            mlflow.log_dict({split: dict(c) for split, c in answers.items()}, "data_card/answers.json")
        publish("data", "## Data\n\n| task | train | validation | test | rejected |\n|---|---|---|---|---|\n"
                        f"{rows}\n\nTraining mixture: {result.mixed_train}. Split fingerprints: "
                        f"{result.fingerprints}.\n\n{balance}**Power:** {note}.\n\n**Training:** {plan}."
                        + "".join(f"\n\n**Warning:** {w}." for w in warnings)
                        + "\n\nData card, rejects, split keys and samples are in the MLflow run.")
        print(f"data: {result.counts}; mixed train {result.mixed_train} ({Path(result.rejects).name}); "
              f"{note}; {plan}" + "".join(f"\nWARNING: {w}" for w in warnings))
    return result


@flow(name="lengths")
def lengths_stage(tasks: list[TaskConfig], finetune: FinetuneConfig, splits: Splits, model_dir: str,
                  parent_run_id: str, runs_dir: str | None = None) -> Lengths:
    """The length limit checked with the model that will be trained and served, after selection: its tokenizer
    and chat template decide what "too long" means. Over-long examples leave every split (rejects.jsonl). With
    the model known, the training plan gets its time on this machine (from `runs_dir`'s earlier runs of it)."""
    limits = {t.name: t.max_tokens or finetune.max_seq_length for t in tasks}
    limits["*"] = limits[tasks[0].name]  # production corrections follow the primary task
    with stage_run("lengths", parent_run_id, model=model_dir):
        fitted = fit_lengths(splits, model_dir, limits)
        mlflow.log_metric("over_long_removed", fitted.removed)
        mlflow.log_figure(_length_plot(fitted.lengths, finetune.max_seq_length),
                          "data_card/token_lengths.png")
        step = measured_step_seconds(runs_dir, model_dir, finetune) if runs_dir else None
        plan, _ = training_plan(finetune, sum(splits.mixed_train.values()), step)
        mlflow.set_tag("tuneline.training_plan", plan)
        publish("lengths", f"## Lengths with the chosen model\n\n{fitted.removed} example(s) longer than max_tokens "
                           "with its tokenizer and chat template left every split (data card: rejects.jsonl); "
                           f"the token-length histogram is in the MLflow run.\n\n**Training:** {plan}"
                           + ("" if step else " (no earlier run of this model here to time it)") + ".")
        print(f"lengths: removed {fitted.removed} over-long examples (see rejects.jsonl); {plan}")
    return fitted


def prepare(config: LifecycleConfig, run_dir: Path, parent_run_id: str,
            corrections: list[str] | None = None) -> tuple[Splits, str]:
    """The data stage, then lm-eval tasks over its splits: where every stage that trains or scores starts."""
    splits = data_stage(config, str(run_dir / "data"), parent_run_id, corrections)
    tasks_dir = write_tasks(config.task.name, splits.files, run_dir / "eval_tasks",
                            config.task.max_answer_tokens, config.baseline.reasoning_tokens,
                            general_suites(config.evaluation.general), ranked=config.task.ranked)
    return splits, str(tasks_dir)
