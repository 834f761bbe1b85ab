"""Prefect deployments of the lifecycle and of each stage that makes sense alone, served by one runner process
or sent to a work pool.

`tuneline up` starts this module (`python -m infra.deployments CONFIG...`) beside the servers. It registers one
deployment per flow and config, named `<flow>/<config name>`, whose typed parameters are the forms in the
Prefect UI, with the schedules the config asks for; then it executes the runs that the UI, the API or a
schedule create, one at a time (on two cores, two trainings at once would only slow both down). With
`--pool NAME` first it registers the same deployments on that work pool and exits: the pool's workers run them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron

from flows.align import align_model
from flows.config import LifecycleConfig, load_config
from flows.deploy import deploy_version
from flows.evaluate import evaluate_version
from flows.feedback import retrain_from_feedback
from flows.finetune import finetune_model, finetune_stage, search_trial
from flows.lifecycle import lifecycle
from flows.promote import promote_version, rollback_champion

TAG = "tuneline"


def _schedule(cron: str | None, config: LifecycleConfig) -> dict:
    return {"schedules": [Cron(cron, timezone=config.schedule.timezone)]} if cron else {}


def deployments(config_path: str) -> list:
    """Every deployment of one config: its path (or registered model) is the default of each form."""
    config = load_config(config_path)
    path, name = str(Path(config_path).resolve()), config.name
    # Module entrypoints: a file-path entrypoint puts flows/ on sys.path, where flows/evaluate.py would
    # shadow Hugging Face's `evaluate` package.
    common = {"tags": [TAG, name], "entrypoint_type": EntrypointType.MODULE_PATH}
    on_config = {"parameters": {"config_path": path}, **common}
    on_model = {"parameters": {"model": config.registered_model}, **common}
    return [
        lifecycle.to_deployment(name, **on_config, **_schedule(config.schedule.lifecycle, config),
                                description="One full iteration: data → select → baseline → finetune → evaluate "
                                            "→ promote → deploy."),
        retrain_from_feedback.to_deployment(name, **on_config, **_schedule(config.schedule.feedback, config),
                                            description="The service's corrections since the last round → "
                                                        "training data → one lifecycle iteration."),
        finetune_model.to_deployment(name, **on_config,
                                     description="Fine-tune one model on the config's data; registers a pending "
                                                 "version, champion unchanged."),
        *([align_model.to_deployment(name, **on_config,
                                     description="Preference-tune a registered version (default: champion) on "
                                                 "a preference file; registers a pending version.")]
          if config.align else []),
        evaluate_version.to_deployment(name, **on_config,
                                       description="Score a registered version (default: champion) on the test split."),
        deploy_version.to_deployment(name, **on_config,
                                     description="Serve a registered version (default: champion) on 127.0.0.1."),
        promote_version.to_deployment(name, **on_model, description="Make a version champion by hand, with a reason."),
        rollback_champion.to_deployment(name, **on_model, description="Move champion back to the version it replaced."),
    ]


def stage_deployments(config_path: str) -> list[tuple]:
    """The runs a config sends to work pools of their own, each with its pool: the finetune stage
    (`finetune.work_pool`: the GPU machines) and the search's trials (`finetune.search.work_pool`). The lifecycle
    and the search start them there and wait."""
    config = load_config(config_path)
    common = {"tags": [TAG, config.name, "stage"], "entrypoint_type": EntrypointType.MODULE_PATH}
    found = []
    if config.finetune.work_pool:
        found.append((finetune_stage.to_deployment(
            config.name, **common, description="The lifecycle's finetune stage on the GPU pool: started by the "
                                               "lifecycle with its data and model, not by hand."),
            config.finetune.work_pool))
    if config.finetune.search and config.finetune.search.work_pool:
        found.append((search_trial.to_deployment(
            config.name, **common, description="One trial of the finetune stage's search: started by the search, "
                                               "not by hand."),
            config.finetune.search.work_pool))
    return found


def _apply(found, pool: str) -> None:
    found.apply(work_pool_name=pool)  # its path is this checkout: a process worker runs it from there
    print(f"{found.flow_name}/{found.name} -> work pool {pool}")


if __name__ == "__main__":
    pooled = sys.argv[1:2] == ["--pool"]
    configs = sys.argv[3:] if pooled else sys.argv[1:]
    for found, pool in (pair for path in configs for pair in stage_deployments(path)):
        _apply(found, pool)
    if pooled:
        for found in (d for path in configs for d in deployments(path)):
            _apply(found, sys.argv[2])
    else:
        serve(*[d for path in configs for d in deployments(path)], limit=1, print_starting_message=True)
