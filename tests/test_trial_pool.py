"""A search's trials on a work pool (`finetune.search.work_pool`): flow runs of the search-trial deployment, each in
a process of its own on one of the pool's workers, `max_parallel` at once."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, reports_config
from tests.stack import running_stack

pytestmark = pytest.mark.system


def test_search_trials_run_at_once_on_a_pool_of_two_workers_as_they_do_one_after_the_other(
        steady_tiny_model, prefect_api, mlflow_sqlite, tmp_path):
    """`finetune.search.work_pool: trials`, `max_parallel: 2`, two process workers: the two trials are flow runs
    that train at the same time, each on a worker, and reach the objectives the same search reaches here with one
    trial after the other."""
    import json
    import os
    import time
    from datetime import datetime
    from pathlib import Path

    import mlflow

    from tasks.processes import spawn
    from tasks.search import search
    from tasks.training_config import FinetuneConfig

    grid = {"sampler": "grid", "trials": 2, "max_parallel": 2, "prune": False, "report_every": 2,
            "space": {"learning_rate": [1e-2, 3e-2]}, "work_pool": "trials"}
    config = reports_config(tmp_path, "searched", steady_tiny_model, max_steps=4, search=grid)
    # Workers ask for runs every 2 s, not 10: a trial of the tiny model can end before a slow poll finds it.
    with running_stack(tmp_path, config, env={"PREFECT_WORKER_QUERY_SECONDS": "2"}) as stack:
        assert "work pool trials: the search's trials wait there" in stack.up.stdout, stack.up.stdout
        first = stack.tuneline("worker", "trials", timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr
        pointed = stack.env | {"PREFECT_API_URL": f"{stack.prefect}/api", "MLFLOW_TRACKING_URI": stack.mlflow}
        # A second worker, as on a second machine; its PID file under the state folder: `down` stops it too.
        spawn("worker-trials-2", [str(Path(os.sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                  "trials", "--type", "process", "--limit", "1"], pointed, tmp_path, cwd=ROOT)
        for _ in range(60):
            workers = stack.api("POST", "/work_pools/trials/workers/filter", json={}).json()
            if [w["status"] for w in workers] == ["ONLINE", "ONLINE"]:
                break
            time.sleep(1)
        assert [w["status"] for w in workers] == ["ONLINE", "ONLINE"], workers
        run = stack.trigger("finetune-model/searched", {"max_steps": 4})
        assert run["state"]["type"] == "COMPLETED", stack.logs(run["id"])[-3000:]
        trials = stack.api("POST", "/flow_runs/filter", json={"work_pools": {"name": {"any_": ["trials"]}}}).json()
        assert sorted(t["state"]["type"] for t in trials) == ["COMPLETED", "COMPLETED"]
        spans = [(datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"])) for t in trials]
        assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans  # they overlapped: at once
        pooled = {t["parameters"]["params"]["learning_rate"]: json.loads(Path(t["parameters"]["handoff"]).read_text())
                  for t in trials}
        inputs = trials[0]["parameters"]

    spec = FinetuneConfig.model_validate(inputs["spec"] | {"search": inputs["spec"]["search"] | {
        "work_pool": None, "max_parallel": 1}})
    with mlflow.start_run() as parent:
        here = search(spec, inputs["base_dir"], inputs["train_path"], inputs["val_path"], str(tmp_path / "here"),
                      parent.info.run_id)
    assert {t.params["learning_rate"]: t.objective for t in here.trials} == pytest.approx(
        {lr: found["objective"] for lr, found in pooled.items()}, rel=1e-6)
