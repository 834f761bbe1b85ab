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
from flows.data import general_suites, power, prepare  # noqa: E402
from tasks import registry, tracking  # noqa: E402
from tasks.evidence import TABLE_HEADER  # noqa: E402
from tasks.scoring import score, score_builtin, score_general  # noqa: E402
from tasks.tracking import log_eval, publish, stage_run  # noqa: E402

# The champion is compared on the test items it never trained on when they are at least this share of the
# test split (its smallest detectable difference then grows by at most 12 %); otherwise it is not comparable.
CLEAN_SHARE = 0.8


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
    """Each model in the plan on the test split, item by item; `champion`: also the registry's current champion,
    on the test items it never trained on. Returns the scores, the gate's evidence and its comparisons."""
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
            if name in ("base", "finetuned"):  # forgetting: the candidate's weights against the base's
                for path in general_suites(config):
                    suite = runner.suite_task(path)
                    try:
                        general.setdefault(name, {})[suite] = score_general(
                            folder, tasks_dir, suite, limit=config.evaluation.general_limit,
                            batch_size=config.evaluation.batch_size)
                    except Exception as exc:  # same rule as above
                        crashed[f"{name} ({suite})"] = f"{type(exc).__name__}: {exc}"
        builtin = _builtin_benchmarks(config, {n: plan[n][0] for n in ("base", "finetuned") if n in results})
        if "baseline" not in plan and "base" in results:  # the best prompt was zero-shot: the base run is it
            results["baseline"] = results["base"]

        evidence = _evidence(config, baseline, results, general, crashed, current)
        compared = registry.comparisons(evidence, registry.Rules.of(config.gate))
        rows = {name: {**r["metrics"], "stderr": r["stderr"],
                       "general_acc": _mean([g["acc"] for g in general.get(name, {}).values()])}
                for name, r in results.items()}
        for name, row in rows.items():
            mlflow.log_metrics({f"{name}_{k}": v for k, v in row.items() if v is not None})
        for c in compared:
            slug = c.rule.replace(" ", "_")
            mlflow.log_metrics({f"{slug}_difference": c.difference, f"{slug}_low": c.low, f"{slug}_high": c.high,
                                f"{slug}_p": c.p_value})
        changes = _wins_and_losses(results["baseline"], results["finetuned"]) \
            if {"baseline", "finetuned"} <= results.keys() else []
        fixed, broke = sum(c["change"] == "fixed" for c in changes), sum(c["change"] == "broke" for c in changes)
        mlflow.log_metrics({"fixed_by_finetuning": fixed, "broken_by_finetuning": broke})
        mlflow.log_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in changes), "report/wins_losses.jsonl")
        mlflow.log_figure(_plot(rows, gate_metric), "report/comparison.png")
        bar_rate = rows.get("baseline", {}).get("exact_match", 0.5)
        note, warnings = power(config, len(evidence.bar or {}) or task.max_test_examples, bar_rate)
        markdown = _report(rows, crashed, fixed, broke, baseline, compared, evidence, note, warnings)
        mlflow.log_text(markdown, "report/report.md")
        publish("evaluate", markdown)
        print("evaluate: " + ", ".join(f"{n} {r.get(gate_metric, 0):.3f}" for n, r in rows.items())
              + "".join(f"\n  {c.rule}: {c.describe()}" for c in compared)
              + (f"; crashed: {list(crashed)}" if crashed else ""))
    return {"scores": rows, "crashed": crashed, "fixed": fixed, "broke": broke, "builtin": builtin,
            "evidence": evidence}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _items(result: dict | None, metric: str) -> dict[str, float] | None:
    """Per test item (lm-eval's doc id: the same item in every task over the test split) -> its score."""
    return None if result is None else {str(s["doc_id"]): float(s[metric]) for s in result["samples"]}


def _evidence(config: LifecycleConfig, baseline: dict, results: dict, general: dict, crashed: dict,
              current: tuple | None) -> registry.Evidence:
    """The gate's evidence, item by item. The champion is compared only on test items outside its training
    split; when too many were inside it (more than CLEAN_SHARE lost), it is not comparable, and says why."""
    metric = config.gate.metric
    champion_items, note = None, None
    if current and "champion" in results:
        seen = registry.training_keys(config.registered_model, current[0])
        samples = results["champion"]["samples"]
        if seen is None:
            note = (f"champion v{current[0]} not comparable: its training split was not recorded "
                    "(promote by hand with promote-version to replace it)")
        else:
            clean = {str(s["doc_id"]): float(s[metric]) for s in samples if s["key"] not in seen}
            inside = len(samples) - len(clean)
            if inside and len(clean) < CLEAN_SHARE * len(samples):
                note = (f"champion v{current[0]} not comparable: {inside} of {len(samples)} test items were in "
                        "its training data")
            else:
                champion_items = clean
                if inside:
                    print(f"evaluate: champion v{current[0]} compared on {len(clean)} test items; {inside} were "
                          "in its training data")
    suites = {suite: (general["base"][suite]["items"], general["finetuned"][suite]["items"])
              for suite in general.get("base", {}) if suite in general.get("finetuned", {})}
    return registry.Evidence(
        metric=metric, candidate=_items(results.get("finetuned"), metric), bar=_items(results.get("baseline"), metric),
        bar_name=baseline["best"], champion=champion_items, champion_version=current[0] if current else None,
        champion_note=note, general=suites, crashed=crashed,
    )


def evidence_table(compared: list) -> str:
    """The per-rule statistics as a markdown table (the evaluate report and the promote artifact)."""
    return "\n".join([TABLE_HEADER, *(c.as_row() for c in compared)]) if compared else "(no comparison possible)"


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


def _report(rows: dict, crashed: dict, fixed: int, broke: int, baseline: dict, compared: list,
            evidence: registry.Evidence, note: str, warnings: list[str]) -> str:
    lines = ["## Evaluation on the test split", "",
             "| model | exact match ± se | field F1 | ROUGE-L | general acc |", "|---|---|---|---|---|"]
    label = {"baseline": f"best baseline ({baseline['best']})", "base": "base (0-shot, chat)"}
    for name, r in rows.items():
        general = "–" if r["general_acc"] is None else f"{r['general_acc']:.3f}"
        lines.append(f"| {label.get(name, name)} | {r['exact_match']:.3f} ± {r['stderr']:.3f} | "
                     f"{r['field_f1']:.3f} | {r['rougeL']:.3f} | {general} |")
    lines += ["", f"Fine-tuning fixed **{fixed}** test examples and broke **{broke}** "
                  "(report/wins_losses.jsonl in the MLflow run).", "",
              f"### Paired comparisons (fine-tuned minus the other, on {evidence.metric}; forgetting: base minus "
              "fine-tuned accuracy)", "", evidence_table(compared), "", f"Power: {note}."]
    lines += [f"**Warning:** {w}." for w in warnings]
    if evidence.champion_note:
        lines += ["", f"**{evidence.champion_note}.**"]
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
        _, tasks_dir = prepare(config, run_dir, parent.info.run_id)
        folder = str(registry.download(name, version, run_dir / "model"))
        with stage_run("evaluate", parent.info.run_id, registered_model=name, version=version, split="test"):
            result = score(folder, tasks_dir, f"{task.name}_test", system_prompt=task.system_prompt, shots=0,
                           limit=task.max_test_examples, batch_size=config.evaluation.batch_size)
            general = {"acc": _mean([score_general(folder, tasks_dir, runner.suite_task(path),
                                                   limit=config.evaluation.general_limit,
                                                   batch_size=config.evaluation.batch_size)["acc"]
                                     for path in general_suites(config)])}
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
