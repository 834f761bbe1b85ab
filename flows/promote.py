"""Stage 7, promote: register the fine-tuned model and let the gate decide whether it becomes `champion`. A
version that passes the metric rules is then built as a Bento and smoke-tested as a served service (the
slowest rule, so it runs last and only when it can change the outcome). Every rule's outcome is recorded."""

from __future__ import annotations

from dataclasses import replace

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import LifecycleConfig
from flows.evaluate import evidence_table
from infra.local import free_port
from tasks import packaging, registry
from tasks.datasets import read_examples
from tasks.tracking import artifact_key, publish, stage_run


@flow(name="promote")
def promote_stage(config: LifecycleConfig, tuned_dir: str, finetune_run_id: str, report: dict, data: dict,
                  home: str, parent_run_id: str) -> dict:
    """`data`: the data stage's result (the test split for the smoke prompts, the split keys for the version)."""
    name = config.registered_model
    rules = registry.Rules.of(config.gate)
    evidence = report["evidence"]
    with stage_run("promote", parent_run_id, registered_model=name, gate_metric=config.gate.metric,
                   confidence=rules.confidence):
        finetuned = {k: v for k, v in report["scores"].get("finetuned", {}).items() if k != "general_acc"}
        version = registry.register(name, tuned_dir, finetune_run_id, finetuned, config.gate.metric, data["keys"])
        bento = None
        passes_the_rest = registry.gate(evidence, replace(rules, require_smoke=False)).passed
        if config.gate.smoke_prompts and passes_the_rest:
            bento = packaging.build_bento(tuned_dir, name, version, config.task.system_prompt, config.deploy.limits)
            prompts = [e.user for e in read_examples(data["test"])[: config.gate.smoke_prompts]]
            evidence = replace(evidence, smoke_failures=packaging.smoke_compare(
                tuned_dir, bento, prompts, config.task.system_prompt, config.task.max_answer_tokens, home, free_port()))
        decision = registry.gate(evidence, rules)
        registry.record(name, version, decision)
        mlflow.log_params({"version": version, "decision": "pass" if decision.passed else "fail"})
        mlflow.set_tag(registry.REASONS_TAG, "; ".join(decision.reasons))
        publish(
            "promote",
            f"## Gate: {name} v{version} — {'PASS' if decision.passed else 'FAIL'}\n\n"
            + "\n".join(f"- {r}" for r in decision.reasons)
            + f"\n\n{evidence_table(decision.comparisons)}\n",
        )
        print(f"promote: {name} v{version} {decision.summary}")
    return {"version": version, "passed": decision.passed, "reasons": decision.reasons, "bento": bento}


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
