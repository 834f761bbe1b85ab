"""Hyperparameter search: an Optuna study over `finetune.search.space`, each trial one training run.

Each trial is a Prefect task run and a nested MLflow run (its settings, loss curves and objective) under the
finetune stage's run. Trials train on the training split and are judged on the validation split only: the test
split stays the gate's. The study lives in a SQLite file beside the training runs, named by the search's
inputs, so a killed search resumes with its finished trials, and each trial trains in the folder named by its
own inputs, so a finished trial's weights are reused and a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import optuna
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.futures import wait
from transformers import TrainerCallback

from tasks.caching import digest
from tasks.training import TrainResult, run_key, train
from tasks.training_config import FinetuneConfig, SearchConfig, SearchRange


@dataclass(frozen=True)
class Trial:
    """One finished (or pruned, or failed) trial as the report and the next stage see it."""
    number: int
    params: dict
    state: str  # COMPLETE | PRUNED | FAIL
    objective: float | None
    seconds: float | None
    result: TrainResult | None  # the training summary (merged weights, loss, steps); None unless complete
    run_id: str | None  # its nested MLflow run


@dataclass(frozen=True)
class Search:
    """What the search hands on: every trial, the best complete one, and the objective's direction."""
    trials: list[Trial]
    best: Trial
    objective: str
    direction: str  # minimize (validation loss) | maximize (validation score)


class ReportLoss(TrainerCallback):
    """Reports each evaluation's validation loss to the trial; Optuna's median pruner may then stop it."""

    def __init__(self, trial: optuna.Trial):
        self.trial, self.steps = trial, set()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The closing evaluation repeats the last step's: Optuna keeps one value per step.
        if metrics and "eval_loss" in metrics and state.global_step not in self.steps:
            self.steps.add(state.global_step)
            self.trial.report(metrics["eval_loss"], state.global_step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {metrics['eval_loss']:.4f} at step {state.global_step} "
                                         "is worse than the median of earlier trials at that step")


def _sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    if search.sampler == "grid":
        return optuna.samplers.GridSampler(dict(search.space), seed=search.seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    return optuna.samplers.TPESampler(seed=search.seed)


def _pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    """The median rule once two trials have finished: a trial whose validation loss at a step is worse than
    the finished trials' median at that step stops there."""
    return optuna.pruners.MedianPruner(n_startup_trials=2) if search.prune else optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict) -> dict:
    params = {}
    for name, values in space.items():
        if isinstance(values, SearchRange) and values.integers:
            params[name] = trial.suggest_int(name, int(values.low), int(values.high))
        elif isinstance(values, SearchRange):
            params[name] = trial.suggest_float(name, values.low, values.high, log=values.log)
        else:
            params[name] = trial.suggest_categorical(name, values)
    return params


def open_study(spec: FinetuneConfig, base_dir: str, train_path: str, val_path: str, folder: Path
               ) -> tuple[optuna.Study, str]:
    """The study for these inputs, created or resumed, and its storage URL. A trial a killed process left
    running is marked failed (this process is the only one driving the study) and its settings are queued to
    be tried again: the same settings train in the same folder, so it resumes from its last checkpoint."""
    search = spec.search
    # Named by what decides the trials' outcomes; not by `trials` or `max_parallel`, so raising the number of
    # trials continues the same study.
    inputs = [run_key(base_dir, train_path, spec.for_trial({})), digest(val_path),
              search.model_dump_json(exclude={"trials", "max_parallel"})]
    key = hashlib.sha256(":".join(inputs).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / f'search-{key}.db'}"
    study = optuna.create_study(
        study_name=f"search-{key}", storage=storage, load_if_exists=True,
        sampler=_sampler(search), pruner=_pruner(search),
        direction="minimize" if search.objective == "validation_loss" else "maximize")
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(stale._trial_id, optuna.trial.TrialState.FAIL)  # no public API
        if stale.params:
            study.enqueue_trial(stale.params, skip_if_exists=False)
    return study, storage


def trial_here(number: int, study_name: str, storage: str, params: dict, spec: FinetuneConfig, base_dir: str,
               train_path: str, val_path: str, runs_dir: str, parent_run_id: str, tracking_uri: str, score=None
               ) -> Trial:
    """Train with one trial's settings and record its objective; a nested MLflow run holds its curves. Runs
    in a process of its own: `run_trial`'s, or a pool worker's flow run (flows/finetune.search_trial).
    `score(merged_dir) -> float`: the validation score objective (picklable); None: the final validation loss."""
    mlflow.set_tracking_uri(tracking_uri)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=_pruner(spec.search))
    trial = optuna.Trial(study, next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == number))
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"trial {number}", nested=True, parent_run_id=parent_run_id,
                          tags={"tuneline.stage": "finetune-trial", "tuneline.trial": str(number),
                                "tuneline.trial_process": f"{socket.gethostname()}:{os.getpid()}"}) as run:
        mlflow.log_params({f"search_{k}": v for k, v in params.items()})
        try:
            trial_spec = spec.for_trial(params)  # settings a finetune section refuses fail the trial, told so
            # Named by the trial's training inputs and its validation data (the loss it reports is measured on
            # them).
            key = f"{run_key(base_dir, train_path, trial_spec)}-{digest(val_path)[:8]}"
            result = train.fn(base_dir, train_path, str(Path(runs_dir) / "search" / key), trial_spec, val_path,
                              callbacks=[ReportLoss(trial)] if spec.search.prune else None,
                              eval_every=spec.search.report_every)
        except optuna.TrialPruned as pruned:
            seconds = time.perf_counter() - started
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
            mlflow.set_tags({"tuneline.trial_state": "PRUNED", "tuneline.pruned_because": str(pruned)})
            return Trial(number, params, "PRUNED", None, seconds, None, run.info.run_id)
        except Exception as exc:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            mlflow.set_tags({"tuneline.trial_state": "FAIL", "tuneline.error": f"{type(exc).__name__}: {exc}"[:500]})
            raise
        objective = score(result.merged) if score else result.eval_loss
        seconds = time.perf_counter() - started
        trial.set_user_attr("result", asdict(result))  # a resumed search can hand on this trial's weights too
        trial.set_user_attr("run_id", run.info.run_id)
        study.tell(number, objective)
        mlflow.log_metrics({"objective": objective, "eval_loss": result.eval_loss,
                            "train_loss": result.train_loss, "trial_seconds": seconds})
        mlflow.set_tags({"tuneline.trial_state": "COMPLETE", "tuneline.cached": str(result.cached)})
    return Trial(number, params, "COMPLETE", objective, seconds, result, run.info.run_id)


@functools.cache
def _trial_processes() -> multiprocessing.context.BaseContext:
    """Where trials run: each in a fresh process forked from a server that imported the training stack once (a
    trial then starts in well under a second, not the 8 s those imports take). Threads of one process would share
    torch's global RNG, the peak-memory counter and lm-eval's environment, so parallel trials would be neither
    reproducible nor measured right."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tasks.search"])
    return context


# Not cached by Prefect: a trial is reused through the study and its training folder, both named by inputs.
@task(name="trial", task_run_name="trial {number}", cache_policy=NO_CACHE, log_prints=False)  # (as `train`)
def run_trial(number: int, study_name: str, storage: str, params: dict, spec: FinetuneConfig, base_dir: str,
              train_path: str, val_path: str, runs_dir: str, parent_run_id: str, score=None) -> Trial:
    """One trial in a process of its own (`_trial`), waited for; its error, or the process's death, fails it."""
    with ProcessPoolExecutor(1, mp_context=_trial_processes(), max_tasks_per_child=1) as processes:
        return processes.submit(trial_here, number, study_name, storage, params, spec, base_dir, train_path, val_path,
                                runs_dir, parent_run_id, mlflow.get_tracking_uri(), score).result()


@task(name="trial", task_run_name="trial {number} on the pool", cache_policy=NO_CACHE)
def run_trial_on_pool(deployment: str, number: int, study_name: str, storage: str, params: dict, spec: FinetuneConfig,
                      base_dir: str, train_path: str, val_path: str, runs_dir: str, parent_run_id: str,
                      score=None) -> Trial:
    """One trial as a flow run of `deployment` on `search.work_pool` (a process of its own on one of its workers),
    waited for; the trial comes back through the shared runs folder, as its weights do."""
    handoff = Path(runs_dir) / "search" / "handoff" / f"{study_name}-{number}.json"
    handoff.unlink(missing_ok=True)
    run = run_deployment(deployment, timeout=None, parameters={
        "number": number, "study_name": study_name, "storage": storage, "params": params,
        "spec": spec.model_dump(mode="json"), "base_dir": base_dir, "train_path": train_path, "val_path": val_path,
        "runs_dir": runs_dir, "parent_run_id": parent_run_id, "tracking_uri": mlflow.get_tracking_uri(),
        "score": asdict(score) if score else None, "handoff": str(handoff)})
    if not run.state.is_completed() or not handoff.is_file():
        raise RuntimeError(f"flow run {run.name} on work pool {spec.search.work_pool} ended {run.state.name}"
                           f"{': ' + run.state.message if run.state.message else ''}")
    found = json.loads(handoff.read_text())
    return Trial(**found | {"result": TrainResult(**found["result"]) if found["result"] else None})


def _trials(study: optuna.Study, done: dict[int, Trial]) -> list[Trial]:
    """Every finished trial: this process's, and those a killed or earlier search recorded in the study."""
    found = []
    for t in study.get_trials(deepcopy=False):
        if t.number in done:
            found.append(done[t.number])
        elif t.state.is_finished():
            found.append(Trial(t.number, t.params, t.state.name, t.value,
                               t.duration.total_seconds() if t.duration else None,
                               TrainResult(**t.user_attrs["result"]) if "result" in t.user_attrs else None,
                               t.user_attrs.get("run_id")))
    return found


@flow(name="search", validate_parameters=False)  # `score` is a function: nothing for pydantic to check
def search(spec: FinetuneConfig, base_dir: str, train_path: str, val_path: str, runs_dir: str,
           parent_run_id: str, score=None, trial_deployment: str | None = None) -> Search:
    """Run the study until `trials` trials have finished (complete or pruned), `max_parallel` at a time: a
    subflow of the finetune stage whose task runs are the trials, each in a process of its own here or, with
    `trial_deployment` (`search.work_pool`), a flow run of that deployment on the pool's workers."""
    cfg = spec.search
    study, storage = open_study(spec, base_dir, train_path, val_path, Path(runs_dir) / "search")
    done: dict[int, Trial] = {}
    failures: list[str] = []

    def finished() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                   and t.state != optuna.trial.TrialState.FAIL)

    while finished() < cfg.trials:
        queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if cfg.sampler == "grid" and not queued and study.sampler.is_exhausted(study):
            break  # every grid point tried
        wave = [study.ask() for _ in range(min(cfg.max_parallel, cfg.trials - finished()))]
        futures = []
        for t in wave:
            args = (t.number, study.study_name, storage, suggest(t, cfg.space), spec, base_dir, train_path, val_path,
                    runs_dir, parent_run_id, score)
            futures.append(run_trial_on_pool.submit(trial_deployment, *args) if trial_deployment
                           else run_trial.submit(*args))
        wait(futures)
        for asked, future in zip(wave, futures, strict=True):
            outcome = future.result(raise_on_failure=False)  # a failed trial is recorded; the others go on
            if not isinstance(outcome, Trial):
                failures.append(f"trial {asked.number}: {type(outcome).__name__}: {outcome}")
                outcome = Trial(asked.number, asked.params, "FAIL", None, None, None, None)
            done[asked.number] = outcome
        if len(failures) >= cfg.max_failures:  # failed trials do not count towards `trials`: never ask forever
            raise RuntimeError(f"search: {len(failures)} trials failed (search.max_failures is {cfg.max_failures}); "
                               f"the first: {failures[0]}")
    trials = _trials(study, done)
    complete = [t for t in trials if t.state == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"search: none of the {len(trials)} trials completed (pruned or failed); "
                           "see the finetune run's nested trial runs")
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    best = pick(complete, key=lambda t: t.objective)
    return Search(trials, best, cfg.objective, study.direction.name.lower())
