"""`tuneline up --pool NAME`: the deployments go to a process work pool and a `prefect worker` runs them, in its
own process tree, instead of the runner; `down` stops the worker. A run triggered through the API executes on the
pool's worker and does its work (a fine-tune registered as a pending version); a config's finetune stage runs on a
pool of its own (`finetune.work_pool`)."""

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


def test_the_finetune_stage_runs_on_its_own_pool_and_hands_back_the_same_weights(steady_tiny_model, tmp_path):
    """`finetune.work_pool: gpu`: the lifecycle (on the runner) sends its finetune stage to the pool's worker, a
    process tree of its own, waits, and goes on with the weights and MLflow run it hands back; those weights are
    the ones the stage trains in-process from the same inputs."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from tasks.training import train
    from tasks.training_config import FinetuneConfig

    config = reports_config(tmp_path, "staged", steady_tiny_model, max_steps=4, work_pool="gpu")
    config["deploy"]["serve"] = False
    with running_stack(tmp_path, config) as stack:
        assert "work pool gpu: the finetune stage's runs wait there for a worker" in stack.up.stdout, stack.up.stdout
        assert stack.api("GET", "/deployments/name/finetune/staged").json()["work_pool_name"] == "gpu"
        lifecycle = stack.api("GET", "/deployments/name/lifecycle/staged").json()
        assert lifecycle["work_pool_name"] != "gpu"  # only the stage goes there

        worker = stack.tuneline("worker", "gpu", timeout=240)
        assert worker.returncode == 0 and "worker-gpu: started" in worker.stdout, worker.stdout + worker.stderr
        run = stack.trigger("lifecycle/staged")
        assert run["state"]["type"] == "COMPLETED", stack.logs(run["id"])[-3000:]
        [stage] = stack.api("POST", "/flow_runs/filter", json={
            "work_pools": {"name": {"any_": ["gpu"]}}}).json()
        assert stage["state"]["type"] == "COMPLETED"
        parent_task = stack.api("GET", f"/task_runs/{stage['parent_task_run_id']}").json()
        assert parent_task["flow_run_id"] == run["id"]  # a subflow of the lifecycle, in the UI too
        assert recorded_pid("worker-gpu", tmp_path) is not None

        tuned = json.loads(Path(stage["parameters"]["handoff"]).read_text())
        runs = stack.mlflow_client().search_runs([r.experiment_id for r in stack.mlflow_client().search_experiments()],
                                                 f"tags.mlflow.parentRunId = '{stage['parameters']['parent_run_id']}'")
        assert tuned["run_id"] in {r.info.run_id for r in runs}  # the stage's MLflow run, under the lifecycle's
        [version] = stack.mlflow_client().search_model_versions("name = 'staged-model'")
        promoted = stack.mlflow_client().get_run(version.run_id)  # the promote stage records what it judged
        assert promoted.data.params["finetune_run"] == tuned["run_id"]

    spec = FinetuneConfig.model_validate({**stage["parameters"]["config"]["finetune"], "work_pool": None})
    here = train.fn(stage["parameters"]["base_dir"], stage["parameters"]["splits"]["train"], str(tmp_path / "here"),
                    spec, stage["parameters"]["splits"]["validation"])
    pooled, local = (load_file(Path(p) / "model.safetensors") for p in (tuned["merged"], here.merged))
    assert tuned["steps"] == here.steps == 4
    assert all(torch.allclose(pooled[k], local[k], atol=1e-5) for k in local)
    assert recorded_pid("worker-gpu", tmp_path) is None  # `down` stopped it

