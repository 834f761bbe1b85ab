"""Stage 6, align: preference tuning (DPO or KTO) of the fine-tuned weights on judged answers, tracked in MLflow.

The aligned weights go on to evaluation as one more candidate system; the gate also requires them to beat the
weights they were aligned from on held-out preference pairs, and not to lose the task beyond align.max_task_drop.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from evals.runner import write_preference_task
from flows.config import ConfigError, LifecycleConfig, load_config
from flows.data import lengths_stage, prepare
from tasks import registry, tracking
from tasks.alignment import Aligned, align
from tasks.datasets import Splits, read_examples, token_counter
from tasks.evidence import compare, table
from tasks.paths import run_folder
from tasks.preferences import held_out_prompts, prepare_preferences
from tasks.scoring import score_preferences
from tasks.tracking import publish, stage_run
from tasks.training import run_key


@flow(name="align")
def align_stage(config: LifecycleConfig, tuned_dir: str, splits: Splits, runs_dir: str, parent_run_id: str,
                tasks_dir: str) -> Aligned:
    """The preference data read and checked with the fine-tuned model's tokenizer, split by prompt; a LoRA adapter
    trained on its training split (the reference: the same weights without it); the held-out pairs written as the
    lm-eval task evaluation scores preference accuracy on. A killed run resumes; a finished one is reused."""
    spec, d = config.align, config.data
    # named apart from the trainer's own parameters, which its MLflow callback logs into this run (TRL's DPO
    # `loss_type` is a list): MLflow refuses a parameter logged twice with two values
    with stage_run("align", parent_run_id, align_method=spec.method, align_beta=spec.beta, align_loss=spec.loss,
                   base=tuned_dir, data=spec.data.data) as run:
        data = prepare_preferences(spec.data, Path(tasks_dir).parent / "preferences", validation=d.validation,
                                   test=d.test, seed=d.seed, on_bad_rows=d.on_bad_rows,
                                   held_out=held_out_prompts(
                                       {name: [e for files in splits.per_task.values()
                                               for e in read_examples(files[name])]
                                        for name in ("validation", "test")}),
                                   count=token_counter(tuned_dir),
                                   max_tokens=spec.max_seq_length, max_test_pairs=spec.max_test_pairs)
        mlflow.log_metrics({f"preferences_{k}": v for k, v in data.counts.items()})
        mlflow.log_params({f"preferences_fingerprint_{k}": v for k, v in data.fingerprints.items()})
        mlflow.log_artifact(data.rejects, "preferences")
        task = write_preference_task(config.task.name, data.test_choices, tasks_dir)
        result = align(tuned_dir, data.train, str(Path(runs_dir) / run_key(tuned_dir, data.train, spec)), spec)
        mlflow.log_metrics({k: getattr(result, k) for k in ("train_loss", "train_seconds", "tokens_per_second",
                                                            "peak_memory_mb")})
        mlflow.log_metrics({f"final_{k.replace('/', '_')}": v for k, v in result.rewards.items()})
        mlflow.set_tags({"tuneline.resumed_from": str(result.resumed_from),
                         "tuneline.cached": str(result.cached)})
        mlflow.log_artifacts(result.adapter, "adapter")
        how = "reused a finished run" if result.cached else \
            f"resumed from {result.resumed_from}" if result.resumed_from else "trained"
        final = ", ".join(f"{k.removeprefix('rewards/')} {v:+.3f}" for k, v in result.rewards.items())
        c = data.counts
        publish("align", f"## Preference tuning ({spec.method.upper()}, loss {spec.loss}, beta {spec.beta:g})\n\n"
                         f"Data: {c['train']} training, {c['validation']} validation and {c['test']} test rows "
                         f"({c['test_pairs']} held-out pairs scored), {c['rejected']} rejected (preferences/"
                         f"rejects.jsonl, with reasons).\n\nRun: {how}, {result.steps} steps, loss "
                         f"{result.train_loss:.3f}, {result.train_seconds:.0f} s; last logged rewards: "
                         f"{final or 'none'}.\n\nThe reference was the fine-tuned weights themselves (the adapter "
                         "disabled); the reward curves are in the MLflow run.")
        print(f"align: {spec.method} {how}: {result.steps} steps, loss {result.train_loss:.3f}, "
              f"{result.train_seconds:.0f}s; preferences {c}")
    return Aligned(result.merged, run.info.run_id, spec.method, result.steps, result.train_loss,
                   result.train_seconds, result.tokens_per_second, data, task)


@flow(name="align-model", log_prints=True)
def align_model(config_path: str, version: str | None = None, preferences: str | None = None) -> dict:
    """Preference tuning alone, on a registered version (default: the champion) with the config's `align`
    settings, and `preferences` (a file of the align.data shape) in place of align.data's file when given. The
    version and its aligned weights are compared on held-out pairs; the aligned weights are registered as a new
    version with decision `pending` (evaluate-version, then promote-version, take it from there)."""
    config = load_config(config_path)
    if config.align is None:
        raise ConfigError(f"{config_path}: no `align` section: nothing says how to tune on preferences")
    if preferences:
        if not Path(preferences).is_file():
            raise ConfigError(f"preferences file not found: {preferences}")
        config.align.data.data = str(Path(preferences).resolve())
    name = config.registered_model
    version = version or (registry.champion(name) or (None,))[0]
    if version is None:
        raise ValueError(f"{name} has no champion; name a version to align")
    home = tracking.open_experiment(config.name)
    run_dir = run_folder(home, config.name)
    with mlflow.start_run(run_name=f"align {name} v{version}", tags={"tuneline.kind": "align-model"}) as parent:
        pid = parent.info.run_id
        splits, tasks_dir = prepare(config, run_dir, pid)
        folder = str(registry.download(name, version, run_dir / "model"))
        lengths_stage(config.tasks, config.finetune, splits, folder, pid)
        aligned = align_stage(config, folder, splits, str(home / "finetune"), pid, tasks_dir)
        found = {label: score_preferences(weights, tasks_dir, aligned.task,
                                          system_prompt=config.align.data.system_prompt, limit=None,
                                          batch_size=config.evaluation.batch_size)
                 for label, weights in ((f"v{version}", folder), ("aligned", aligned.merged))}
        c = compare("preferences vs the version", found["aligned"]["items"], found[f"v{version}"]["items"],
                    threshold=config.align.min_improvement, direction="above", confidence=config.gate.confidence)
        new = registry.register(name, aligned.merged, aligned.run_id,
                                {"preference_accuracy": found["aligned"]["accuracy"]}, "preference_accuracy",
                                splits.keys, system=f"v{version} + {aligned.method.upper()}")
        registry.mark_pending(name, new)
        with stage_run("compare", pid, version=version, aligned_version=new):
            mlflow.log_metrics({f"{k}_preference_accuracy": v["accuracy"] for k, v in found.items()})
            rows = "\n".join(f"| {k} | {v['accuracy']:.3f} ± {v['stderr']:.3f} | {v['n']} |" for k, v in found.items())
            publish("align-model", f"## {name} v{version} aligned ({aligned.method.upper()}): v{new}, pending\n\n"
                                   f"| weights | preference accuracy ± se | pairs |\n|---|---|---|\n{rows}\n\n"
                                   f"{table([(f'v{new}', c)])}\n\nChampion unchanged: evaluate-version, then "
                                   "promote-version.")
    print(f"align-model: {name} v{new} registered (pending) from v{version}: preference accuracy "
          f"{found[f'v{version}']['accuracy']:.3f} -> {found['aligned']['accuracy']:.3f}; {c.describe()}")
    return {"version": new, "from": version, "preference_accuracy": {k: v["accuracy"] for k, v in found.items()},
            "passed": c.passed, "mlflow_run_id": pid}
