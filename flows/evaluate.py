"""Stage 6, evaluate: base, best prompt baseline, fine-tuned and current champion side by side on the unseen
test split, plus the general benchmark for forgetting. A crashed evaluation is recorded, never hidden.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: plots are files for MLflow
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from prefect import flow  # noqa: E402

from evals import runner  # noqa: E402
from flows.config import LifecycleConfig, load_config  # noqa: E402
from flows.data import prepare  # noqa: E402
from tasks import registry, tracking  # noqa: E402
from tasks.scoring import score, score_builtin, score_general  # noqa: E402
from tasks.tracking import log_eval, publish, stage_run  # noqa: E402

TEXT_METRICS = ("exact_match", "field_f1", "rougeL")


def _wins_and_losses(before: dict, after: dict) -> list[dict]:
    """Per test example: what fine-tuning fixed (wrong → right) and what it broke (right → wrong)."""
    old = {s["doc_id"]: s for s in before["samples"]}
    changes = []
    for new in after["samples"]:
        prev = old.get(new["doc_id"])
        if prev is not None and prev["exact_match"] != new["exact_match"]:
            changes.append({"change": "fixed" if new["exact_match"] else "broke", "prompt": new["prompt"],
                            "target": new["target"], "before": prev["response"], "after": new["response"]})
    return changes


def _plot(rows: dict[str, dict], metric: str):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rows)
    ax.bar(names, [rows[n].get(metric, 0.0) for n in names],
           yerr=[rows[n].get("stderr", 0.0) if metric == "exact_match" else 0.0 for n in names], capsize=4)
    ax.set_ylabel(f"{metric} (test split)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


@flow(name="evaluate")
def evaluate_stage(config: LifecycleConfig, base_dir: str, tuned_dir: str, baseline: dict, tasks_dir: str,
                   parent_run_id: str, champion: bool = False) -> dict:
    """Each model in the plan on the test split; `champion`: also the registry's current champion, if any."""
    task, gate_metric = config.task, config.gate.metric
    common = dict(system_prompt=task.system_prompt, limit=task.max_test_examples,
                  batch_size=config.evaluation.batch_size)
    plain = {"kind": "fewshot", "shots": 0, "suffix": "", "chat": True}  # the prompt training and serving use
    prompt = baseline["variant"]
    plan = {"base": (base_dir, plain)}
    if prompt != {**prompt, **plain}:  # the best baseline is not simply the base model zero-shot
        plan["baseline"] = (base_dir, prompt)
    plan["finetuned"] = (tuned_dir, plain)

    results, general, crashed = {}, {}, {}
    with stage_run("evaluate", parent_run_id, split="test", gate_metric=gate_metric):
        current = registry.champion(config.registered_model) if champion else None
        if current:  # downloaded inside the stage: its time is the stage's, not unaccounted orchestration
            plan["champion"] = (str(registry.download(config.registered_model, current[0],
                                                      Path(tasks_dir).parent / "champion")), plain)
        for name, (folder, v) in plan.items():
            try:
                results[name] = score(folder, tasks_dir, f"{task.name}_test{v['suffix']}", shots=v["shots"],
                                      chat=v["chat"], **common)
            except Exception as exc:  # recorded for the gate, which fails on any crash; the report goes on
                crashed[name] = f"{type(exc).__name__}: {exc}"
                continue
            log_eval(f"test {name}", results[name], prompt=v.get("name", "0-shot, chat"), shots=v["shots"],
                     chat_template=v["chat"], split="test")
            if name != "baseline":
                try:
                    general[name] = score_general(folder, tasks_dir, limit=config.evaluation.general_limit,
                                                  batch_size=config.evaluation.batch_size)
                except Exception as exc:  # same rule as above
                    crashed[f"{name} (general)"] = f"{type(exc).__name__}: {exc}"
        builtin = _builtin_benchmarks(config, {n: plan[n][0] for n in ("base", "finetuned") if n in results})
        if "baseline" not in plan and "base" in results:  # the best prompt was zero-shot: the base run is it
            results["baseline"] = results["base"]

        rows = {name: {**r["metrics"], "stderr": r["stderr"], "general_acc": general.get(name, {}).get("acc")}
                for name, r in results.items()}
        for name, row in rows.items():
            mlflow.log_metrics({f"{name}_{k}": v for k, v in row.items() if v is not None})
        changes = _wins_and_losses(results["baseline"], results["finetuned"]) \
            if {"baseline", "finetuned"} <= results.keys() else []
        fixed, broke = sum(c["change"] == "fixed" for c in changes), sum(c["change"] == "broke" for c in changes)
        mlflow.log_metrics({"fixed_by_finetuning": fixed, "broken_by_finetuning": broke})
        mlflow.log_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in changes), "report/wins_losses.jsonl")
        mlflow.log_figure(_plot(rows, gate_metric), "report/comparison.png")
        markdown = _report(rows, crashed, fixed, broke, baseline)
        mlflow.log_text(markdown, "report/report.md")
        publish("evaluate", markdown)
        print("evaluate: " + ", ".join(f"{n} {r.get(gate_metric, 0):.3f}" for n, r in rows.items())
              + (f"; crashed: {list(crashed)}" if crashed else ""))
    return {"scores": rows, "crashed": crashed, "fixed": fixed, "broke": broke, "builtin": builtin}


def _builtin_benchmarks(config: LifecycleConfig, models: dict[str, str]) -> dict:
    """lm-eval built-in tasks for users who are online; informative only, the gate does not read them."""
    tasks = config.evaluation.builtin_tasks
    if not tasks:
        return {}
    blocked = runner.offline()
    if blocked:
        message = f"skipped built-in lm-eval tasks {tasks}: {blocked} is set and they load their data from the hub"
        print(f"evaluate: {message}")
        mlflow.set_tag("tuneline.builtin_tasks", message)
        return {"skipped": message}
    scores = {}
    for name, folder in models.items():
        scores[name] = score_builtin(folder, tasks, limit=config.evaluation.builtin_limit,
                                     batch_size=config.evaluation.batch_size)
        for task, metrics in scores[name].items():
            mlflow.log_metrics({f"{name}_{task}_{k}": v for k, v in metrics.items()})
    return scores


def _report(rows: dict, crashed: dict, fixed: int, broke: int, baseline: dict) -> str:
    lines = ["## Evaluation on the test split", "",
             "| model | exact match ± se | field F1 | ROUGE-L | general acc |", "|---|---|---|---|---|"]
    label = {"baseline": f"best baseline ({baseline['best']})", "base": "base (0-shot, chat)"}
    for name, r in rows.items():
        general = "–" if r["general_acc"] is None else f"{r['general_acc']:.3f}"
        lines.append(f"| {label.get(name, name)} | {r['exact_match']:.3f} ± {r['stderr']:.3f} | "
                     f"{r['field_f1']:.3f} | {r['rougeL']:.3f} | {general} |")
    lines += ["", f"Fine-tuning fixed **{fixed}** test examples and broke **{broke}** "
                  "(report/wins_losses.jsonl in the MLflow run)."]
    if crashed:
        lines += ["", "**Crashed evaluations:**"] + [f"- {k}: {v}" for k, v in crashed.items()]
    return "\n".join(lines) + "\n"


@flow(name="evaluate-version", log_prints=True)
def evaluate_version(config_path: str, version: str | None = None) -> dict:
    """Score one registered version (default: the champion) on the config's test split and the general
    benchmark; the scores are written on the version, so a pending fine-tune can be judged before promotion."""
    config = load_config(config_path)
    name, task = config.registered_model, config.task
    home = tracking.open_experiment(config.name)
    version = version or (registry.champion(name) or (None,))[0]
    if version is None:
        raise ValueError(f"{name} has no champion; name a version to evaluate")
    run_dir = home / "runs" / config.name / time.strftime("%Y%m%d-%H%M%S")
    with mlflow.start_run(run_name=f"evaluate {name} v{version}", tags={"tuneline.kind": "evaluate-version"}) as parent:
        _, tasks_dir = prepare(config, run_dir, str(home / "models"), parent.info.run_id)
        folder = str(registry.download(name, version, run_dir / "model"))
        with stage_run("evaluate", parent.info.run_id, registered_model=name, version=version, split="test"):
            result = score(folder, tasks_dir, f"{task.name}_test", system_prompt=task.system_prompt, shots=0,
                           limit=task.max_test_examples, batch_size=config.evaluation.batch_size)
            general = score_general(folder, tasks_dir, limit=config.evaluation.general_limit,
                                    batch_size=config.evaluation.batch_size)
            log_eval(f"test v{version}", result, metrics={"general_acc": general["acc"]}, version=version,
                     split="test")
            client = MlflowClient()
            for metric, value in {**result["metrics"], "general_acc": general["acc"]}.items():
                client.set_model_version_tag(name, version, f"tuneline.metric.{metric}", f"{value:.6f}")
            client.set_model_version_tag(name, version, registry.SCORE_TAG,
                                         f"{result['metrics'][config.gate.metric]:.6f}")
            rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in {**result["metrics"], "general acc": general["acc"]}.items())
            publish("evaluate-version", f"## {name} v{version} on the test split\n\n| metric | value |\n|---|---|\n{rows}")
    print(f"evaluate-version: {name} v{version}: {config.gate.metric} {result['metrics'][config.gate.metric]:.3f}, "
          f"general {general['acc']:.3f}")
    return {"version": version, **result["metrics"], "general_acc": general["acc"]}
