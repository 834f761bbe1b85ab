"""`tuneline up --pool NAME`: the deployments go to a process work pool and a `prefect worker` runs them, in its
own process tree, instead of the runner; `down` stops the worker. A run triggered through the API executes on the
pool's worker and does its work (a fine-tune registered as a pending version)."""

from __future__ import annotations

import pytest

from tasks.processes import recorded_pid
from tests.conftest import reports_config
from tests.stack import running_stack

pytestmark = pytest.mark.system
NAME, MODEL = "pooled", "pooled-assistant"


def test_deployments_on_a_work_pool_run_on_its_worker(steady_tiny_model, tmp_path):
    config = reports_config(tmp_path, NAME, steady_tiny_model, max_steps=4)
    config["registered_model"] = MODEL
    with running_stack(tmp_path, config, "--pool", "team") as stack:
        assert "worker-team: started" in stack.up.stdout and "7 deployments on work pool team" in stack.up.stdout, \
            stack.up.stdout
        assert recorded_pid("runner", tmp_path) is None  # the worker runs them, not a runner
        deployment = stack.api("GET", f"/deployments/name/finetune-model/{NAME}").json()
        assert deployment["work_pool_name"] == "team"

        run = stack.trigger(f"finetune-model/{NAME}", {"max_steps": 2})
        assert run["state"]["type"] == "COMPLETED", stack.logs(run["id"])[-3000:]
        assert run["work_pool_name"] == "team"
        worker = stack.api("POST", "/work_pools/team/workers/filter", json={}).json()
        assert [w["status"] for w in worker] == ["ONLINE"]
        [version] = stack.mlflow_client().search_model_versions(f"name = '{MODEL}'")
        assert version.tags["tuneline.decision"] == "pending"
    assert recorded_pid("worker-team", tmp_path) is None  # `down` stopped it
