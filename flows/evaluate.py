"""Stage 6, evaluate: every candidate system (prompt recipe on the base weights, fine-tuned, fine-tuned with
shots) beside the base, the bar and the champion on the unseen test split, item by item, plus the general suites
for forgetting; the gate's evidence per candidate. A crashed evaluation is recorded, never hidden.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import mlflow
from matplotlib.figure import Figure
from prefect import flow

from evals import runner
from evals.runner import ScoreResult, general_suites, write_listed_tasks
from evals.variants import ZERO_SHOT, Variant
from flows.config import LifecycleConfig, load_config
from flows.data import lengths_stage, prepare
from tasks import packaging, registry, scoring, tracking
from tasks.alignment import Aligned
from tasks.datasets import fingerprint, read_examples
from tasks.evidence import gate_power, table, wilson
from tasks.paths import run_folder, vllm_missing
from tasks.recipes import POOL_FILE, Baselines, Recipe, read_recipe
from tasks.registry import Evaluation
from tasks.retrieval import attach_fixed, attach_shots
from tasks.scoring import score, score_builtin, score_general, score_preferences
from tasks.tracking import log_eval, publish, stage_run

# The champion is compared on the test items it never trained on when they are at least this share of the
# test split (its smallest detectable difference then grows by at most 12 %); otherwise it is not comparable.
CLEAN_SHARE = 0.8


def _wins_and_losses(before: dict, after: dict, metric: str) -> list[dict]:
    """Per test example: what fine-tuning fixed (wrong → right on the gate's metric) and what it broke."""
    old = {s["doc_id"]: s for s in before.samples}
    changes = []
    for new in after.samples:
        prev = old.get(new["doc_id"])
        if prev is not None and prev[metric] != new[metric]:
            changes.append({"change": "fixed" if new[metric] > prev[metric] else "broke", "prompt": new["prompt"],
                            "target": new["target"], "before": prev.get("prediction", prev["response"]),
                            "after": new.get("prediction", new["response"])})
    return changes


def _confusion_plot(confusion: dict, title: str):
    """A classifier's confusion matrix: true label by row, predicted by column, counts in the cells."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    fig = Figure(figsize=(1.2 + 0.7 * len(labels), 1.0 + 0.6 * len(labels)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot(rows: dict[str, dict], metric: str):
    fig = Figure(figsize=(6, 3.5))  # no pyplot: no display backend to choose, the plot is a file for MLflow
    ax = fig.subplots()
    names = list(rows)
    ax.bar(names, [rows[n].get(metric, 0.0) for n in names],
           yerr=[rows[n].get("stderr", 0.0) if metric in ("exact_match", "accuracy") else 0.0 for n in names],
           capsize=4)
    ax.set_ylabel(f"{metric} (test split)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


class System(NamedTuple):
    folder: str  # its weights
    variant: Variant  # its prompt


@dataclass
class Scored:
    """What scoring found, by system name: test results, general-suite results, crashes (one line each)."""
    results: dict[str, ScoreResult] = field(default_factory=dict)
    general: dict[str, dict[str, dict]] = field(default_factory=dict)
    crashed: dict[str, str] = field(default_factory=dict)
    preferences: dict[str, dict] = field(default_factory=dict)  # held-out pairs: base, finetuned, aligned


@flow(name="evaluate")
def evaluate_stage(config: LifecycleConfig, base_dir: str, tuned_dir: str, baseline: Baselines, tasks_dir: str,
                   parent_run_id: str, champion: bool = False, aligned: Aligned | None = None) -> Evaluation:
    """Every candidate system on the test split, item by item: the best prompt recipe on the base weights, the
    fine-tuned weights zero-shot, the fine-tuned weights with the best recipe that uses shots, and the `aligned`
    weights (preference tuning) zero-shot; beside them the base zero-shot, the bar (best prompt of all) and, with
    `champion`, the registry's champion system on the test items it never trained on. With `aligned`, the base,
    fine-tuned and aligned weights are also scored on the held-out preference pairs. Returns the scores and one
    piece of gate evidence per candidate."""
    with stage_run("evaluate", parent_run_id, split="test", gate_metric=config.gate.metric):
        current = registry.champion(config.registered_model) if champion else None
        plan = _plan(config, base_dir, tuned_dir, baseline, tasks_dir, current, aligned)
        scored = _score(config, plan, tasks_dir)
        if aligned:
            _score_preferences(config, plan, aligned, tasks_dir, scored)
        builtin = _builtin_benchmarks(config, {n: plan[n].folder for n in ("base", "finetuned") if n in scored.results})
        champion_items, note = _champion_items(config, scored.results, current)
        candidates = _candidates(config, plan, scored, baseline, champion_items, current, note)
        rows, fixed, broke = _report(config, plan, scored, candidates, note)
    return Evaluation(candidates, rows, scored.crashed, fixed, broke, builtin,
                      {n: {k: r[k] for k in ("accuracy", "stderr", "n")} for n, r in scored.preferences.items()})


def _plan(config: LifecycleConfig, base_dir: str, tuned_dir: str, baseline: Baselines, tasks_dir: str,
          current: tuple | None, aligned: Aligned | None = None) -> dict[str, System]:
    """The systems to score, by role: the base zero-shot, the bar, the best servable prompt, the fine-tuned
    weights zero-shot and with the best shots, the aligned weights zero-shot; the champion's own system when there
    is one."""
    servable = [v for v in baseline.variants if v.servable]  # in order: simplest first
    plan = {"base": System(base_dir, ZERO_SHOT), "baseline": System(base_dir, baseline.best),
            "prompt": System(base_dir, baseline.best_of(servable))}
    with_shots = baseline.best_of([v for v in servable if v.shots])
    if config.finetune.method != "none":  # with fine-tuning off, the weights are the base's: nothing new to score
        plan["finetuned"] = System(tuned_dir, ZERO_SHOT)
        if with_shots:
            plan["finetuned+shots"] = System(tuned_dir, with_shots)
    if aligned:
        plan["aligned"] = System(aligned.merged, ZERO_SHOT)
    if current:  # downloaded inside the stage: its time is the stage's, not unaccounted orchestration
        folder = str(registry.download(config.registered_model, current[0], Path(tasks_dir).parent / "champion"))
        plan["champion"] = System(folder, _system_variant(config, folder, tasks_dir))
    return plan


def _score(config: LifecycleConfig, plan: dict[str, System], tasks_dir: str) -> Scored:
    """Each distinct system once on the test split (the bar is often also the best recipe); the base and the
    fine-tuned weights on the general suites too. A crash is recorded for the gate, which fails on any; the
    report goes on."""
    task, scored, done = config.task, Scored(), {}
    engine = scoring_engine(config)
    for name, (folder, v) in plan.items():
        test_task = v.task(task.name, "test")
        if (folder, test_task, v.chat) in done:
            if done[folder, test_task, v.chat] in scored.results:
                scored.results[name] = scored.results[done[folder, test_task, v.chat]]
            continue
        done[folder, test_task, v.chat] = name
        try:
            scored.results[name] = score(folder, tasks_dir, test_task, shots=v.shots, chat=v.chat, kind=task.kind,
                                         system_prompt=task.system_prompt, limit=task.max_test_examples,
                                         batch_size=config.evaluation.batch_size,
                                         generate=config.evaluation.generate_sample, engine=engine)
        except Exception as exc:
            scored.crashed[name] = _crash(name, exc)
            continue
        log_eval(f"test {name}", scored.results[name], prompt=v.name, shots=v.shots, chat_template=v.chat,
                 split="test")
        if name in ("base", "finetuned", "aligned"):  # forgetting: the trained weights against the base's
            for path in general_suites(config.evaluation.general):
                suite = runner.suite_task(path)
                try:
                    scored.general.setdefault(name, {})[suite] = score_general(
                        folder, tasks_dir, suite, limit=config.evaluation.general_limit,
                        batch_size=config.evaluation.batch_size)
                except Exception as exc:
                    scored.crashed[f"{name} ({suite})"] = _crash(f"{name} ({suite})", exc)
    return scored


def scoring_engine(config: LifecycleConfig) -> str:
    """The engine every system answers the test split with (one for all: the gate compares like with like)."""
    choice = config.evaluation.engine
    engine = packaging.resolve_engine(config.deploy.engine if choice == "auto" else choice)
    if engine == "vllm" and (missing := vllm_missing("evaluation.engine")):
        raise ValueError(missing)
    return engine


def _score_preferences(config: LifecycleConfig, plan: dict[str, System], aligned: Aligned, tasks_dir: str,
                       scored: Scored) -> None:
    """The base, fine-tuned and aligned weights on the held-out preference pairs (the same pairs for each)."""
    for name in (n for n in ("base", "finetuned", "aligned") if n in plan):
        try:
            scored.preferences[name] = score_preferences(
                plan[name].folder, tasks_dir, aligned.task, system_prompt=config.align.data.system_prompt,
                limit=None, batch_size=config.evaluation.batch_size)
        except Exception as exc:
            scored.crashed[f"{name} (preferences)"] = _crash(f"{name} (preferences)", exc)


def _candidates(config: LifecycleConfig, plan: dict[str, System], scored: Scored, baseline: Baselines,
                champion_items: dict | None, current: tuple | None, note: str | None) -> list[registry.Candidate]:
    """One candidate per system that could replace the champion, with its paired evidence: a prompt recipe on
    the base weights (unless it is the base zero-shot itself) against the base; fine-tuned systems against the
    bar, and for forgetting against the base on the general suites."""
    metric, results, general, candidates = config.gate.metric, scored.results, scored.general, []
    start = "finetuned" if "finetuned" in plan else "base"  # the weights preference tuning started from
    aligned = f"{'fine-tuned' if start == 'finetuned' else 'base'} + {config.align.method.upper()}" \
        if config.align else ""
    for name, weights in (("prompt", "base"), ("finetuned", "fine-tuned"), ("finetuned+shots", "fine-tuned"),
                          ("aligned", aligned)):
        if name not in plan or (name == "prompt" and plan[name].variant == ZERO_SHOT):
            continue
        folder, v = plan[name]
        recipe = Recipe.of(v, config.task.system_prompt, baseline.fixed)
        bar = "base" if weights == "base" else "baseline"
        trained = "aligned" if name == "aligned" else "finetuned"  # whose general-suite items
        suites = {} if weights == "base" else {
            suite: (general["base"][suite]["items"], general[trained][suite]["items"])
            for suite in general.get("base", {}) if suite in general.get(trained, {})}
        preference = scored.preferences if name == "aligned" else {}
        evidence = registry.Evidence(
            metric=metric, candidate=_items(results.get(name), metric), bar=_items(results.get(bar), metric),
            bar_name=f"{plan[bar].variant.name} on the base weights", champion=champion_items,
            champion_version=current[0] if current else None, champion_note=note, general=suites,
            weights_changed=weights != "base",
            crashed={k: e for k, e in scored.crashed.items()
                     if k.split(" ")[0] in (name, bar, "champion", "base", *((start,) if preference else ()))},
            aligned=registry.AlignedEvidence(
                (preference[start]["items"] if start in preference else None),
                (preference["aligned"]["items"] if "aligned" in preference else None),
                _items(results.get(start), metric), config.align.min_improvement,
                config.align.max_task_drop, "fine-tuned" if start == "finetuned" else "base")
            if name == "aligned" else None)
        candidates.append(registry.Candidate(
            name, recipe.describe(weights), folder, recipe, evidence,
            score=_mean(list((evidence.candidate or {}).values())) or 0.0,
            metrics=results[name].metrics if name in results else {}, preferred=name == "aligned"))
    return candidates


def _report(config: LifecycleConfig, plan: dict[str, System], scored: Scored, candidates: list[registry.Candidate],
            champion_note: str | None) -> tuple[dict[str, dict], int, int]:
    """The stage's MLflow metrics, figures and markdown report; returns each system's row, and what
    fine-tuning alone fixed and broke against the bar."""
    metric, results = config.gate.metric, scored.results
    rows = {name: {**r.metrics, "stderr": r.stderr,
                   "general_acc": _mean([g["acc"] for g in scored.general.get(name, {}).values()])}
            for name, r in results.items()}
    for name, row in rows.items():
        mlflow.log_metrics({f"{name.replace('+', '_')}_{k}": v for k, v in row.items() if v is not None})
    compared = {c.name: registry.comparisons(c.evidence, config.gate) for c in candidates}
    for name, found in compared.items():
        for c in found:
            slug = f"{name}_{c.rule}".replace(" ", "_").replace("+", "_")
            mlflow.log_metrics({f"{slug}_difference": c.difference, f"{slug}_low": c.low, f"{slug}_high": c.high,
                                f"{slug}_p": c.p_value})
    changes = _wins_and_losses(results["baseline"], results["finetuned"], metric) \
        if {"baseline", "finetuned"} <= results.keys() else []
    fixed, broke = sum(c["change"] == "fixed" for c in changes), sum(c["change"] == "broke" for c in changes)
    mlflow.log_metrics({"fixed_by_finetuning": fixed, "broken_by_finetuning": broke})
    mlflow.log_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in changes), "report/wins_losses.jsonl")
    mlflow.log_figure(_plot(rows, metric), "report/comparison.png")
    for name, r in results.items():
        if r.confusion:
            mlflow.log_figure(_confusion_plot(r.confusion, name), f"report/confusion_{name}.png")
            mlflow.log_dict({"classes": r.classes, "confusion": r.confusion}, f"report/classes_{name}.json")
    note_power, warnings = gate_power(config.gate, config.task, len(_items(results.get("baseline"), metric) or {})
                                 or config.task.max_test_examples, rows.get("baseline", {}).get(metric, 0.5))
    markdown = _markdown(rows, scored.crashed, fixed, broke, plan, candidates, compared, champion_note, note_power,
                         warnings, metric, results) + _preference_section(scored)
    mlflow.log_text(markdown, "report/report.md")
    publish("evaluate", markdown)
    print("evaluate: " + ", ".join(f"{n} {r.get(metric, 0):.3f}" for n, r in rows.items())
          + "".join(f"\n  {n} {c.rule}: {c.describe()}" for n, found in compared.items() for c in found)
          + (f"; crashed: {list(scored.crashed)}" if scored.crashed else ""))
    return rows, fixed, broke


def reply_length(result: ScoreResult | None) -> float | None:
    """Mean characters of a system's generated replies on the test items (preference tuning is known to lengthen
    answers: the report shows it before and after)."""
    return _mean([len(str(s["response"])) for s in result.samples if s["response"] is not None]) if result else None


def _preference_section(scored: Scored) -> str:
    """The held-out preference pairs: each weights' preference accuracy with its interval, and reply lengths."""
    if not scored.preferences:
        return ""
    label = {"base": "base", "finetuned": "fine-tuned", "aligned": "aligned"}
    lines = ["", "### Held-out preferences", "",
             "How often each model finds the chosen answer of a held-out pair more likely than the rejected one "
             "(chance: 0.5), and the mean length of its replies on the test items (characters).", "",
             "| weights | preference accuracy ± se | 95 % interval | pairs | reply length |", "|---|---|---|---|---|"]
    for name, r in scored.preferences.items():
        low, high = wilson(r["accuracy"], r["n"])
        length = reply_length(scored.results.get(name))
        lines.append(f"| {label[name]} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | [{low:.3f}, {high:.3f}] | {r['n']} "
                     f"| {'–' if length is None else f'{length:.0f}'} |")
        mlflow.log_metrics({f"{name}_preference_accuracy": r["accuracy"]}
                           | ({f"{name}_reply_chars": length} if length is not None else {}))
    return "\n".join(lines) + "\n\nThe gate compares the aligned and the fine-tuned weights pair by pair (rule " \
                              "`preferences vs fine-tuned` above).\n"


def _system_variant(config: LifecycleConfig, folder: str, tasks_dir: str) -> Variant:
    """A registered system's own recipe as an lm-eval task over this run's test split: its fixed shots, or
    shots retrieved from its own pool."""
    recipe = read_recipe(folder)
    variant = recipe.variant(owner="champion")
    if recipe.shots != "none":
        test = {"test": str(Path(tasks_dir).parent / "data" / "test.jsonl")}
        files = attach_shots(str(Path(folder) / POOL_FILE), test, recipe.k, tasks_dir, prefix="champion") \
            if recipe.shots == "retrieved" else attach_fixed(list(recipe.fixed), test, tasks_dir, "champion")
        write_listed_tasks(config.task.name, files, tasks_dir, config.task.max_answer_tokens, variant,
                           ranked=config.task.ranked)
    return variant


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _items(result: ScoreResult | None, metric: str) -> dict[str, float] | None:
    """Per test item (lm-eval's doc id: the same item in every task over the test split) -> its score."""
    return None if result is None else {str(s["doc_id"]): float(s[metric]) for s in result.samples}


def _champion_items(config: LifecycleConfig, results: dict, current: tuple | None) -> tuple[dict | None, str | None]:
    """The champion's per-item scores on the test items outside its training split, or why it is not comparable:
    when more than 1 - CLEAN_SHARE of the test items were inside it."""
    if not current or "champion" not in results:
        return None, None
    seen = registry.training_keys(config.registered_model, current[0])
    samples = results["champion"].samples
    if seen is None:
        return None, (f"champion v{current[0]} not comparable: its training split was not recorded "
                      "(promote by hand with promote-version to replace it)")
    clean = {str(s["doc_id"]): float(s[config.gate.metric]) for s in samples if s["key"] not in seen}
    inside = len(samples) - len(clean)
    if inside and len(clean) < CLEAN_SHARE * len(samples):
        return None, (f"champion v{current[0]} not comparable: {inside} of {len(samples)} test items were in its "
                      "training data")
    if inside:
        print(f"evaluate: champion v{current[0]} compared on {len(clean)} test items; {inside} were in its "
              "training data")
    return clean, None


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


def _crash(what: str, exc: Exception) -> str:
    """A crashed scoring's one line for the gate and the report; its traceback goes to the run's log."""
    print(f"evaluate: scoring {what} crashed:\n{traceback.format_exc()}")
    return f"{type(exc).__name__}: {exc}"


def _markdown(rows: dict, crashed: dict, fixed: int, broke: int, plan: dict[str, System],
              candidates: list[registry.Candidate], compared: dict, champion_note: str | None, power_note: str,
              warnings: list[str], metric: str, results: dict) -> str:
    label = {"base": "base, 0-shot chat", "finetuned": "fine-tuned",
             "baseline": f"bar: {plan['baseline'].variant.name} on the base weights",
             "prompt": f"base + {plan['prompt'].variant.name}"}
    if "finetuned+shots" in plan:
        label["finetuned+shots"] = f"fine-tuned + {plan['finetuned+shots'].variant.name}"
    if "champion" in plan:
        label["champion"] = f"champion ({plan['champion'].variant.name})"
    if "aligned" in plan:
        label["aligned"] = "aligned (preference-tuned)"
    ranked = metric == "accuracy"
    lines = ["## Evaluation on the test split", "",
             scoring.table({label.get(name, name): r for name, r in rows.items()}, ranked,
                           extra=(("general_acc", "general acc"),))]
    majority = next((r.majority for r in results.values() if r.majority), None)
    if majority:  # the same test items for every system
        lines += ["", f"Majority answer of the scored test items: **{majority['answer']}**, "
                      f"{majority['rate']:.3f} of them: what always giving that answer scores."]
    for name, r in results.items():
        if r.classes and name in ("finetuned", "baseline"):
            lines += ["", f"Per class, {label.get(name, name)} (confusion matrix: report/confusion_{name}.png):", "",
                      "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                      for c, m in r.classes.items()]
    lines += ["", f"Fine-tuning fixed **{fixed}** test examples of the bar's and broke **{broke}** "
                  "(report/wins_losses.jsonl in the MLflow run).", "",
              f"### Candidate systems, paired on {metric} (candidate minus the other; forgetting: base minus "
              "fine-tuned accuracy)", ""]
    lines.append(table([(k.system, c) for k in candidates for c in compared[k.name]]))
    lines += ["", f"Power: {power_note}."] + [f"**Warning:** {w}." for w in warnings]
    if champion_note:
        lines += ["", f"**{champion_note}.**"]
    if crashed:
        lines += ["", "**Crashed evaluations:**"] + [f"- {k}: {v}" for k, v in crashed.items()]
    return "\n".join(lines) + "\n"


@flow(name="evaluate-version", log_prints=True)
def evaluate_version(config_path: str, version: str | None = None) -> dict:
    """Score one registered version (default: the champion) on the config's test split and the general
    benchmark, through the lifecycle's data path (the data stage, then the lengths check with the version's own
    tokenizer); so that a pending fine-tune can be judged before promotion. The scores are written on the version
    as `tuneline.evaluated.*` with the fingerprint of the test items scored, beside the gate's (never over them:
    the gate scored its own split, perhaps of other data)."""
    config = load_config(config_path)
    name, task = config.registered_model, config.task
    home = tracking.open_experiment(config.name)
    version = version or (registry.champion(name) or (None,))[0]
    if version is None:
        raise ValueError(f"{name} has no champion; name a version to evaluate")
    run_dir = run_folder(home, config.name)
    with mlflow.start_run(run_name=f"evaluate {name} v{version}", tags={"tuneline.kind": "evaluate-version"}) as parent:
        splits, tasks_dir = prepare(config, run_dir, parent.info.run_id)
        folder = str(registry.download(name, version, run_dir / "model"))
        # rewrites the split files the tasks read
        lengths_stage(config.tasks, config.finetune, splits, folder, parent.info.run_id)
        with stage_run("evaluate", parent.info.run_id, registered_model=name, version=version, split="test"):
            v = _system_variant(config, folder, tasks_dir)  # the version's own recipe
            result = score(folder, tasks_dir, v.task(task.name, "test"), system_prompt=task.system_prompt,
                           shots=v.shots, chat=v.chat, limit=task.max_test_examples,
                           batch_size=config.evaluation.batch_size, kind=task.kind,
                           generate=config.evaluation.generate_sample, engine=scoring_engine(config))
            general = {"acc": _mean([score_general(folder, tasks_dir, runner.suite_task(path),
                                                   limit=config.evaluation.general_limit,
                                                   batch_size=config.evaluation.batch_size)["acc"]
                                     for path in general_suites(config.evaluation.general)])}
            log_eval(f"test v{version}", result, metrics={"general_acc": general["acc"]}, version=version,
                     split="test")
            registry.record_scores(name, version, {**result.metrics, "general_acc": general["acc"]},
                                   fingerprint(read_examples(splits.test)))
            shown = {**result.metrics, "general acc": general["acc"]}
            rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in shown.items())
            publish("evaluate-version",
                    f"## {name} v{version} on the test split\n\n| metric | value |\n|---|---|\n{rows}")
    print(f"evaluate-version: {name} v{version}: {config.gate.metric} {result.metrics[config.gate.metric]:.3f}, "
          f"general {general['acc']:.3f}")
    return {"version": version, **result.metrics, "general_acc": general["acc"]}
