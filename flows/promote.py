"""Stage 7, promote: register the fine-tuned model; the gate decides whether it becomes `champion`."""

from __future__ import annotations

import mlflow
from prefect import flow

from flows.config import LifecycleConfig
from tasks import registry
from tasks.tracking import stage_run


@flow(name="promote")
def promote_stage(config: LifecycleConfig, tuned_dir: str, finetune_run_id: str, scores: dict,
                  parent_run_id: str) -> dict:
    name = config.registered_model
    with stage_run("promote", parent_run_id, registered_model=name):
        current = registry.champion(name)
        version = registry.register(name, tuned_dir, finetune_run_id, scores["finetuned"])
        decision = registry.gate(scores["finetuned"], scores["baseline"], current[1] if current else None,
                                 config.gate.min_improvement)
        registry.record(name, version, decision)
        mlflow.log_params({"version": version, "decision": "pass" if decision.passed else "fail"})
        mlflow.set_tag("tuneline.reasons", "; ".join(decision.reasons))
        print(f"promote: {name} v{version} {decision.summary}")
    return {"version": version, "passed": decision.passed, "reasons": decision.reasons}
