"""Stage 7, promote: every candidate system (a prompt recipe on the base weights, the fine-tuned weights, the
fine-tuned weights with shots) through one gate; the winner is registered with its recipe and becomes
`champion` if it passes. A version that passes the metric rules is then built as a Bento and smoke-tested as a
served service (the slowest rule, so it runs last and only when it can change the outcome). Every rule's
outcome is recorded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import DeployConfig, GateConfig, TaskConfig
from tasks import packaging, registry
from tasks.datasets import Splits, read_examples
from tasks.evidence import table
from tasks.processes import free_port
from tasks.recipes import write_recipe
from tasks.registry import Evaluation, Verdict
from tasks.tracking import artifact_key, publish, stage_run


@flow(name="promote")
def promote_stage(name: str, rules: GateConfig, task: TaskConfig, deploy: DeployConfig, finetune_run_id: str,
                  report: Evaluation, data: Splits, home: str, parent_run_id: str) -> Verdict:
    """Every candidate system through the gate; the best on the gate's metric that passes every rule is
    registered with its recipe, built, smoke-served and promoted. When none passes, the best-scoring one is
    registered as a recorded rejection. `data`: the data stage's result (train split for a retrieval pool, test
    split for the smoke prompts, split keys for the version). `name`: the registered model; `deploy`: how a
    version is served (its limits and answer constraint), for the smoke test."""
    unserved = rules.model_copy(update={"smoke_prompts": 0})  # the metric rules first: only a pass is served
    candidates = report.candidates
    with stage_run("promote", parent_run_id, registered_model=name, gate_metric=rules.metric,
                   confidence=rules.confidence, candidates=",".join(c.system for c in candidates)) as run:
        verdicts = [(c, registry.gate(c.evidence, unserved)) for c in candidates]
        passing = [c for c, verdict in verdicts if verdict.passed]
        # the best score wins; among equals the simpler system (candidates come simplest first). An aligned
        # system that passes wins over the rest: its rules already showed it prefers what reviewers preferred
        # without losing the task, which the task metric alone cannot see.
        chosen = max(passing, key=lambda c: (c.preferred, c.score)) if passing else \
            max((c for c, _ in verdicts), key=lambda c: c.score)
        systems_dir = Path(data.keys).parent.parent / "systems"
        recipe_dir = write_recipe(chosen.recipe, systems_dir / chosen.name, data.shot_pool)
        version = registry.register(name, chosen.weights_dir, run.info.run_id,
                                    chosen.metrics or {rules.metric: chosen.score},
                                    rules.metric, data.keys, str(recipe_dir), chosen.system,
                                    keep_dense=bool(passing))
        evidence, bento = chosen.evidence, None
        if rules.smoke_prompts and passing:
            bento = packaging.build_bento(chosen.weights_dir, name, version, task.system_prompt,
                                          deploy.limits, str(recipe_dir), chosen.system,
                                          packaging.served_answers(task, deploy.constrain))
            prompts = [e.user for e in read_examples(data.test)[: rules.smoke_prompts]]
            evidence = replace(evidence, smoke_failures=packaging.smoke_compare(
                chosen.weights_dir, bento, prompts, task.system_prompt, task.max_answer_tokens,
                home, free_port(), str(recipe_dir)))
        decision = registry.gate(evidence, rules)
        before = registry.champion(name)
        registry.record(name, version, decision)
        registry.describe(name, version, registry.card(
            name, version, chosen.system, f"{chosen.recipe.label}, system prompt {chosen.recipe.system_prompt!r}",
            decision, data.counts, data.fingerprints, before[0] if before else None,
            f".venv/bin/tuneline deploy {version} --config CONFIG.yaml   # CONFIG: the lifecycle config of {name}",
            registry.stored(name, version)))
        mlflow.log_params({"version": version, "system": chosen.system, "finetune_run": finetune_run_id,
                           "decision": "pass" if decision.passed else "fail"})
        mlflow.set_tag(registry.REASONS_TAG, "; ".join(decision.reasons))
        why = (f"the best of {len(passing)} system(s) that passed every rule" if passing
               else "no system passed every rule; the best-scoring one is recorded as rejected")
        others = "\n".join(f"- {c.system}: {'pass' if v.passed else 'FAIL'} ({c.score:.3f}): "
                           + "; ".join(v.reasons) for c, v in verdicts if c is not chosen)
        publish(
            "promote",
            f"## Gate: {name} v{version} ({chosen.system}) — {'PASS' if decision.passed else 'FAIL'}\n\n"
            f"Chosen: **{chosen.system}**, {rules.metric} {chosen.score:.3f} on the test split: {why}."
            "\n\n" + "\n".join(f"- {r}" for r in decision.reasons)
            + f"\n\n{table([(chosen.system, c) for c in decision.comparisons])}\n"
            + (f"\n### The other candidates\n\n{others}\n" if others else ""),
        )
        print(f"promote: {name} v{version} ({chosen.system}, stores {registry.stored(name, version)}) "
              f"{decision.summary}")
    return Verdict(version, chosen.system, decision.passed, decision.reasons, bento)


def _by_hand(model: str, outcome: str) -> None:
    """A decision made by a person: recorded on the registry by `registry`, shown in the Prefect UI here."""
    uri = mlflow.get_tracking_uri()
    link = f"\n\n[{model} in the MLflow registry]({uri.rstrip('/')}/#/models/{model})" if uri.startswith("http") else ""
    create_markdown_artifact(key=artifact_key(model, "champion"), markdown=f"## {outcome}{link}\n")
    print(outcome)


@flow(name="promote-version", log_prints=True)
def promote_version(model: str, version: str, reason: str) -> str:
    """Make `version` of registered `model` the champion by hand, bypassing the gate; `reason` is recorded."""
    outcome = registry.promote_manually(model, version, reason)
    _by_hand(model, outcome)
    return outcome


@flow(name="rollback", log_prints=True)
def rollback_champion(model: str, reason: str) -> str:
    """Move `champion` of registered `model` back to the version it replaced; `reason` is recorded."""
    outcome = registry.rollback(model, reason)
    _by_hand(model, outcome)
    return outcome
