"""Stage 2, data: raw records → chat-format train/validation/test splits, with a data card in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: plots are files for MLflow
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import flow  # noqa: E402

from flows.config import LifecycleConfig, TaskConfig  # noqa: E402
from evals.runner import write_tasks  # noqa: E402
from tasks.datasets import SPLITS, TaskSpec, prepare_data, read_examples  # noqa: E402
from tasks.models import provision_model  # noqa: E402
from tasks.tracking import publish, stage_run  # noqa: E402


def task_spec(task: TaskConfig, seed: int, default_max_tokens: int) -> TaskSpec:
    return TaskSpec(
        name=task.name, source=task.data, system=task.system_prompt, prompts=task.prompts, answer=task.answer,
        fields=dict(task.fields), labels={k: tuple(v) for k, v in task.labels.items()},
        prompt_choice=task.prompt_choice, max_tokens=task.max_tokens or default_max_tokens, seed=seed,
    )


def _length_plot(lengths: dict[str, list[int]], limit: int):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in lengths.items():
        ax.hist(values, bins=30, alpha=0.6, label=name)
    ax.axvline(limit, color="red", linestyle="--", label=f"max tokens {limit}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    return fig


@flow(name="data")
def data_stage(config: LifecycleConfig, out_dir: str, store: str, parent_run_id: str,
               corrections: list[str] | None = None) -> dict:
    """Splits for every task, the mixed training file, and a data card: counts, lengths, rejects, samples.

    Token lengths are counted with the first candidate's tokenizer (provisioned into `store` here; selection
    reuses it). `corrections`: chat-example files from production feedback, added to the training file only."""
    d = config.data
    tasks = [config.task, *config.extra_tasks]
    specs = [task_spec(t, d.seed, config.finetune.max_seq_length) for t in tasks]
    with stage_run("data", parent_run_id, seed=d.seed, on_bad_rows=d.on_bad_rows,
                   tasks=",".join(t.name for t in tasks)):
        tokenizer_dir = provision_model(config.models.candidates[0], store)
        result = prepare_data(specs, {t.name: t.weight for t in tasks}, d.validation, d.test, d.seed, out_dir,
                              d.on_bad_rows, tokenizer_dir, corrections or [])
        for name, counts in result["counts"].items():
            mlflow.log_metrics({f"{name}_{split}": n for split, n in counts.items()})
        mlflow.log_metrics({f"mixed_train_{name}": n for name, n in result["mixed_train"].items()})
        mlflow.log_metric("rejected_rows", sum(c["rejected"] for c in result["counts"].values()))
        mlflow.log_artifact(result["rejects"], "data_card")
        mlflow.log_figure(_length_plot(result["lengths"], config.finetune.max_seq_length),
                          "data_card/token_lengths.png")
        mlflow.log_text(json.dumps({"counts": result["counts"], "mixed_train": result["mixed_train"]}, indent=2),
                        "data_card/counts.json")
        for split_name in ("train", "validation", "test"):
            examples = read_examples(result[split_name])
            if split_name == "train":
                mlflow.log_text("".join(e.to_json() + "\n" for e in examples[:10]), "data_card/samples.jsonl")
            frame = pd.DataFrame([e.__dict__ for e in examples])
            mlflow.log_input(mlflow.data.from_pandas(frame, source=result[split_name], name=split_name),
                             context=split_name)
        rows = "\n".join(f"| {name} | {c['train']} | {c['validation']} | {c['test']} | {c['rejected']} |"
                         for name, c in result["counts"].items())
        publish("data", "## Data\n\n| task | train | validation | test | rejected |\n|---|---|---|---|---|\n"
                        f"{rows}\n\nTraining mixture: {result['mixed_train']}. Data card, rejects and samples "
                        "are in the MLflow run.")
        print(f"data: {result['counts']}; mixed train {result['mixed_train']} ({Path(result['rejects']).name})")
    return result


def prepare(config: LifecycleConfig, run_dir: Path, store: str, parent_run_id: str,
            corrections: list[str] | None = None) -> tuple[dict, str]:
    """The data stage, then lm-eval tasks over its splits: where every stage that trains or scores starts."""
    splits = data_stage(config, str(run_dir / "data"), store, parent_run_id, corrections)
    tasks_dir = write_tasks(config.task.name, {name: splits[name] for name in SPLITS}, run_dir / "eval_tasks",
                            config.task.max_answer_tokens, config.baseline.reasoning_tokens)
    return splits, str(tasks_dir)
