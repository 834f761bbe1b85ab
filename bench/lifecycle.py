"""The demo lifecycle timed end to end, in one run: first the one-time provisioning of the candidate models
(GGUF converted into the model store: what a hub user's download is), then the lifecycle cold (nothing of
it cached: no scores, no fine-tuning, empty Prefect and MLflow) and warm (the same config again at once),
each stage's own time, and the orchestration overhead (the flow's wall time against the sum of its stages'
MLflow run durations).

    .venv/bin/python bench/lifecycle.py [--config configs/demo.yaml] [--json out.json]

Goals on a 2-core CPU: cold <= 10 min, warm <= 5 min, overhead <= 10 %. It starts its own Prefect and MLflow
servers on free loopback ports with a temporary state folder and stops them (by PID) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from flows.config import load_config
from infra import local
from tasks.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("data", "select", "baseline", "finetune", "evaluate", "promote", "deploy")


def _stage_seconds(client, run_id: str) -> dict[str, float]:
    experiment = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'")
    return {r.data.tags["tuneline.stage"]: (r.info.end_time - r.info.start_time) / 1000
            for r in runs if "tuneline.stage" in r.data.tags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tuneline-bench-"))
    os.environ.update(TUNELINE_HOME=str(home), BENTOML_HOME=str(home / "bentoml"),
                      TUNELINE_PREFECT_PORT=str(free_port()), TUNELINE_MLFLOW_PORT=str(free_port()))

    config = load_config(args.config)  # paths resolved; served on a free port, beside any demo already running
    config.deploy.port = free_port()
    config_path = home / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    local.configure_env(home)
    started = time.perf_counter()
    for line in local.up(home):
        print(line)
    stack_s = time.perf_counter() - started
    os.environ.update(local.client_env())
    try:
        from mlflow import MlflowClient  # after MLFLOW_TRACKING_URI is set

        from flows.lifecycle import lifecycle
        from tasks.models import provision

        started = time.perf_counter()
        for source in config.models.candidates:
            provision(source, home / "models")
        provision_s = time.perf_counter() - started
        print(f"provisioning {len(config.models.candidates)} models: {provision_s:.0f}s")
        rows = {}
        for label in ("cold", "warm"):
            started = time.perf_counter()
            summary = lifecycle(str(config_path))
            wall = time.perf_counter() - started
            stages = _stage_seconds(MlflowClient(), summary["mlflow_run_id"])
            rows[label] = {"wall_s": wall, "stages_s": stages, "overhead": 1 - sum(stages.values()) / wall,
                           "gate": summary["promotion"]["passed"], "test": summary["test"]}
            print(f"{label}: {wall:.0f}s, stages {({k: round(v) for k, v in stages.items()})}")
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # else the last run logs are sent at exit, to a stopped server
        for line in local.down(home):
            print(line)

    print(f"\nstack start (Prefect + MLflow, not counted below): {stack_s:.0f}s; provisioning the models "
          f"(once per machine, not counted below): {provision_s:.0f}s\n")
    print("| run | wall | " + " | ".join(STAGES) + " | overhead |")
    print("|---|---|" + "---|" * len(STAGES) + "---|")
    for label, row in rows.items():
        cells = " | ".join(f"{row['stages_s'].get(s, 0):.0f}s" for s in STAGES)
        print(f"| {label} | {row['wall_s'] / 60:.1f} min | {cells} | {row['overhead']:.1%} |")
    cold, warm = rows["cold"]["wall_s"], rows["warm"]["wall_s"]
    print(f"\ncold {cold / 60:.1f} min (goal <= 10), warm {warm / 60:.1f} min (goal <= 5), "
          f"warm/cold {warm / cold:.2f}; "
          f"a machine's first run, provisioning included: {(provision_s + cold) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"stack_s": stack_s, "provision_s": provision_s, **rows}, indent=2,
                                              default=str))


if __name__ == "__main__":
    main()
