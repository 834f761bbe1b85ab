"""Stage 5, finetune: SFT of the chosen model through TRL + peft (LoRA, QLoRA, DoRA or full), tracked in MLflow."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from matplotlib.figure import Figure
from prefect import flow, get_client
from prefect.client.schemas.objects import WorkerStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from evals.variants import ZERO_SHOT
from flows.config import LifecycleConfig, load_config
from flows.data import lengths_stage, prepare
from tasks import registry, tracking
from tasks.datasets import Splits, read_examples, write_examples
from tasks.models import provision_model
from tasks.paths import run_folder
from tasks.scoring import score
from tasks.search import Search, search, trial_here
from tasks.tracking import publish, stage_run
from tasks.training import FineTuned, TrainResult, run_key, train
from tasks.training_config import FinetuneConfig, training_plan


def _objective_plot(found: Search) -> Figure:
    """The objective against each searched setting, one panel per setting (complete trials; the best ringed)."""
    names = list(found.best.params)
    fig = Figure(figsize=(3.2 * len(names), 3.2))  # no pyplot: no display backend, the plot is a file for MLflow
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        done = [t for t in found.trials if t.state == "COMPLETE"]
        ax.scatter([str(t.params[name]) if isinstance(t.params[name], str | bool) else t.params[name] for t in done],
                   [t.objective for t in done])
        best = found.best.params[name]
        ax.scatter([str(best) if isinstance(best, str | bool) else best], [found.best.objective], s=160,
                   facecolors="none", edgecolors="red", label="best")
        ax.set_xlabel(name)
        ax.set_ylabel(found.objective.replace("_", " "))
        if name == "learning_rate":
            ax.set_xscale("log")
    fig.tight_layout()
    return fig


def _search_table(found: Search) -> str:
    names = list(found.best.params)
    rows = "\n".join(
        f"| {t.number}{' (best)' if t.number == found.best.number else ''} | "
        + " | ".join(f"{t.params.get(n, '')}" for n in names)
        + f" | {'' if t.objective is None else f'{t.objective:.4f}'} | {t.state.lower()} | "
        + ("" if t.seconds is None else f"{t.seconds:.0f}") + " |"
        for t in found.trials)
    return (f"| trial | {' | '.join(names)} | {found.objective.replace('_', ' ')} | state | seconds |\n"
            f"|---|{'---|' * len(names)}---|---|---|\n{rows}")


@dataclass(frozen=True)
class ValidationScore:
    """A trial's validation score objective: the gate's metric of its weights on the validation items that
    selection scores, with lm-eval. A dataclass, not a closure: it travels to the trial's own process."""
    tasks_dir: str
    task_name: str
    system_prompt: str
    limit: int | None
    batch_size: int
    kind: str
    metric: str
    generate: int | None = None

    def __call__(self, merged: str) -> float:
        found = score.fn(merged, self.tasks_dir, self.task_name, system_prompt=self.system_prompt, shots=0,
                         limit=self.limit, batch_size=self.batch_size, kind=self.kind, generate=self.generate)
        return found.metrics[self.metric]


def _search(config: LifecycleConfig, base_dir: str, files: dict[str, str], runs_dir: str, run_id: str,
            tasks_dir: str | None) -> TrainResult:
    """The search's trials on the training and validation splits (never the test split); its report in the
    finetune run and artifact; the best trial's training summary."""
    spec, task = config.finetune, config.task
    scorer = None
    if spec.search.objective == "validation_score":
        if tasks_dir is None:
            raise ValueError("finetune.search.objective validation_score needs the lm-eval tasks (run the lifecycle)")
        scorer = ValidationScore(tasks_dir, ZERO_SHOT.task(task.name, "validation"), task.system_prompt,
                                 task.max_validation_examples, config.evaluation.batch_size, task.kind,
                                 config.gate.metric, config.evaluation.generate_sample)

    # Each trial's validation loss is computed on the validation items selection scores (the first
    # max_validation_examples): on a CPU a pass over a whole validation split can cost more than the training.
    validation = Path(files["validation"]).with_name("validation_search.jsonl")
    write_examples(validation, read_examples(files["validation"])[: task.max_validation_examples])
    found = search(spec, base_dir, files["train"], str(validation), runs_dir, run_id, scorer,
                   f"search-trial/{config.name}" if spec.search.work_pool else None)
    best = found.best
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.log_metrics({"best_objective": best.objective, "search_trials": len(found.trials),
                        "search_pruned": sum(t.state == "PRUNED" for t in found.trials)})
    mlflow.log_figure(_objective_plot(found), "search/objective.png")
    mlflow.log_dict({"objective": found.objective, "direction": found.direction, "best": best.number,
                     "trials": [{"number": t.number, "params": t.params, "state": t.state, "objective": t.objective,
                                 "seconds": t.seconds, "run_id": t.run_id} for t in found.trials]},
                    "search/trials.json")
    publish("search", f"## Hyperparameter search ({spec.search.sampler}, {found.objective.replace('_', ' ')}, "
                      f"{found.direction})\n\n{_search_table(found)}\n\nBest: trial {best.number} "
                      f"({', '.join(f'{k}={v}' for k, v in best.params.items())}), {found.objective.replace('_', ' ')} "
                      f"{best.objective:.4f}: its weights go on to evaluation. Each trial is a nested MLflow run "
                      "under the finetune run; the objective per setting is search/objective.png.")
    print(f"search: {len(found.trials)} trials ({sum(t.state == 'PRUNED' for t in found.trials)} pruned); best "
          f"trial {best.number} {best.params}: {found.objective} {best.objective:.4f}")
    return best.result


@flow(name="search-trial", log_prints=False)  # (as `train`)
def search_trial(number: int, study_name: str, storage: str, params: dict, spec: FinetuneConfig, base_dir: str,
                 train_path: str, val_path: str, runs_dir: str, parent_run_id: str, tracking_uri: str,
                 score: dict | None, handoff: str) -> None:
    """One search trial on a pool worker (`finetune.search.work_pool`), started by the search with its study and
    settings; the trial goes back through `handoff` in the shared runs folder."""
    trial = trial_here(number, study_name, storage, params, spec, base_dir, train_path, val_path, runs_dir,
                       parent_run_id, tracking_uri, ValidationScore(**score) if score else None)
    Path(handoff).parent.mkdir(parents=True, exist_ok=True)
    Path(handoff).write_text(json.dumps(asdict(trial)))


@flow(name="finetune")
def finetune_stage(config: LifecycleConfig, base_dir: str, splits: Splits, runs_dir: str, parent_run_id: str,
                   tasks_dir: str | None = None, handoff: str | None = None) -> FineTuned:
    """One run on the task mixture, sequential stages each starting from the previous stage's weights, or a
    hyperparameter search whose best trial goes on (`finetune.search`; `tasks_dir` scores a validation_score
    objective with lm-eval, as selection does). `handoff`: also write the result there as JSON (run on a work
    pool, the stage hands its result back to the lifecycle through the shared state folder, as its weights).

    Each run trains in a folder named by its inputs, so a killed run resumes from its checkpoint when
    started again and a finished one is reused.
    """
    if config.finetune.method == "none":
        return _untouched(base_dir, parent_run_id, handoff, aligning=config.align is not None)
    plan = [(stage.task, stage) for stage in config.finetune.stages] or [(None, None)]
    rows = []
    with stage_run("finetune", parent_run_id, method=config.finetune.method, base=base_dir,
                   stages=",".join(task or "mixture" for task, _ in plan)) as run:
        current = base_dir
        for step, (task, stage) in enumerate(plan):
            files = splits.per_task[task] if task else splits.files
            spec = config.finetune.for_stage(stage) if stage else config.finetune
            if spec.search:
                result = _search(config, current, files, runs_dir, run.info.run_id, tasks_dir)
            else:
                out_dir = str(Path(runs_dir) / run_key(current, files["train"], spec))
                result = train(current, files["train"], out_dir, spec, files["validation"])
            prefix = f"stage{step}_" if task else ""
            mlflow.log_metrics({prefix + k: getattr(result, k) for k in ("train_loss", "train_seconds",
                                                                         "tokens_per_second", "peak_memory_mb")})
            mlflow.set_tags({f"tuneline.{prefix}resumed_from": str(result.resumed_from),
                             f"tuneline.{prefix}cached": str(result.cached)})
            if result.adapter:
                mlflow.log_artifacts(result.adapter, f"{prefix}adapter")
            how = "reused a finished run" if result.cached else \
                f"resumed from {result.resumed_from}" if result.resumed_from else "trained"
            print(f"finetune{' stage ' + str(step) + ' (' + task + ')' if task else ''}: {how}: {result.steps} "
                  f"steps, loss {result.train_loss:.3f}, {result.train_seconds:.0f}s")
            rows.append(f"| {task or 'mixture'} | {how} | {result.steps} | {result.train_loss:.3f} "
                        f"| {result.train_seconds:.0f} | {result.tokens_per_second:.0f} |")
            current = result.merged
        plan, warnings = training_plan(config.finetune, sum(splits.mixed_train.values()))
        for warning in warnings:
            print(f"WARNING: {warning}")
        publish("finetune", f"## Fine-tuning ({config.finetune.method})\n\n| data | run | steps | final loss | "
                            "seconds | tokens/s |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
                            + f"\n\nPlanned: {plan}." + "".join(f"\n\n**Warning:** {w}." for w in warnings)
                            + "\n\nThe adapter and the loss curve are in the MLflow run.")
    return _handed(FineTuned(result.merged, run.info.run_id, result.steps, result.train_loss,
                             result.train_seconds, result.tokens_per_second), handoff)


def _handed(tuned: FineTuned, handoff: str | None) -> FineTuned:
    if handoff:
        Path(handoff).parent.mkdir(parents=True, exist_ok=True)
        Path(handoff).write_text(json.dumps(asdict(tuned)))
    return tuned


def _untouched(base_dir: str, parent_run_id: str, handoff: str | None, aligning: bool) -> FineTuned:
    """Fine-tuning off (`finetune.method: none`): the chosen weights go on as they are (to `align`, when set)."""
    with stage_run("finetune", parent_run_id, method="none", base=base_dir) as run:
        publish("finetune", "## Fine-tuning is off\n\n`finetune.method: none`: the chosen model's weights go on "
                            "unchanged" + ("; preference tuning starts from them." if aligning else "."))
        print("finetune: off (finetune.method none): the chosen weights go on")
    return _handed(FineTuned(base_dir, run.info.run_id, 0, 0.0, 0.0, 0.0), handoff)


def finetune_on_pool(config: LifecycleConfig, base_dir: str, splits: Splits, runs_dir: str, parent_run_id: str,
                     tasks_dir: str | None = None) -> FineTuned:
    """The finetune stage as a run of its deployment on `finetune.work_pool` (the GPU machines' workers), waited
    for as a subflow of the lifecycle. Paths and MLflow run ids go both ways: the pool's machines share the state
    folder (the model store, the splits, the runs), as every stage's files are shared."""
    pool = config.finetune.work_pool
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise RuntimeError(f"finetune.work_pool {pool}: no such work pool; `tuneline up` creates it with the "
                               "config's deployments") from None
        workers = client.read_workers_for_work_pool(pool)
    if not any(w.status == WorkerStatus.ONLINE for w in workers):  # else the run would wait for ever
        raise RuntimeError(f"finetune.work_pool {pool}: no worker is online; start one where the GPUs are "
                           f"(`prefect worker start --pool {pool}`, or `tuneline worker {pool}` on this machine)")
    handoff = Path(runs_dir) / "handoff" / f"{parent_run_id}.json"
    handoff.unlink(missing_ok=True)
    print(f"finetune: on work pool {pool}")
    run = run_deployment(f"finetune/{config.name}", timeout=None, parameters={
        "config": config.model_dump(mode="json"), "base_dir": base_dir, "splits": asdict(splits),
        "runs_dir": runs_dir, "parent_run_id": parent_run_id, "tasks_dir": tasks_dir, "handoff": str(handoff)})
    if not run.state.is_completed() or not handoff.is_file():
        raise RuntimeError(f"finetune on work pool {pool}: flow run {run.name} ended {run.state.name}"
                           f"{': ' + run.state.message if run.state.message else ''}")
    return FineTuned(**json.loads(handoff.read_text()))


@flow(name="finetune-model", log_prints=True)
def finetune_model(config_path: str, model: str | None = None, max_steps: int | None = None) -> dict:
    """Fine-tune alone: the config's data and method on `model` (default: its first candidate), without
    selection, baselines or the gate. The result is registered as a new version with decision `pending`;
    `champion` does not move (evaluate-version, then promote-version, take it from there)."""
    config = load_config(config_path)
    if config.finetune.method == "none":
        raise ValueError(f"{config_path}: finetune.method is none: nothing to fine-tune")
    if max_steps is not None:
        config.finetune.max_steps = max_steps
    source = model or config.models.candidates[0]
    home = tracking.open_experiment(config.name)
    run_dir = run_folder(home, config.name)
    store = str(home / "models")
    with mlflow.start_run(run_name=f"finetune {source}", tags={"tuneline.kind": "finetune-model"}) as parent:
        splits, tasks_dir = prepare(config, run_dir, parent.info.run_id)
        base = provision_model(source, store)
        lengths_stage(config.tasks, config.finetune, splits, base, parent.info.run_id, str(home / "finetune"))
        tuned = finetune_stage(config, base, splits, str(home / "finetune"), parent.info.run_id, tasks_dir)
        version = registry.register(config.registered_model, tuned.merged, tuned.run_id, {}, config.gate.metric,
                                    splits.keys)
        registry.mark_pending(config.registered_model, version)
    print(f"finetune-model: {config.registered_model} v{version} registered from {source}; champion unchanged")
    return {"version": version, "model": source, "steps": tuned.steps, "train_loss": tuned.train_loss,
            "mlflow_run_id": parent.info.run_id}
