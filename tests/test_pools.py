"""The GPU work pools' base job templates (infra/pools/): rendered through prefect-kubernetes's and prefect-docker's
own job-configuration code with a team's values, the GPU request, node placement, volumes and environment reach
the manifest; a real Prefect server accepts each as a work pool; and no variable is one the template never uses
(Prefect drops those silently)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest

from tests.conftest import ROOT

POOLS = ROOT / "infra" / "pools"
VALUES = {"image": "registry.example.com/ml/tuneline:2026-12", "env": {"TUNELINE_HOME": "/tuneline", "HF_TOKEN": "t"}}


def template(name: str) -> dict:
    return json.loads((POOLS / f"{name}.json").read_text())


def flow_run():
    from prefect.client.schemas.objects import Flow, FlowRun

    flow = Flow(id=uuid.uuid4(), name="finetune-model")
    return FlowRun(id=uuid.uuid4(), name="gentle-heron", flow_id=flow.id), flow


@pytest.mark.parametrize("name", ["kubernetes-gpu", "docker-gpu"])
def test_every_variable_of_a_pool_template_is_used(name):
    found = template(name)
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(found["job_configuration"])))
    assert set(found["variables"]["properties"]) <= used, set(found["variables"]["properties"]) - used


def test_the_kubernetes_template_requests_gpus_on_gpu_nodes_with_the_state_mounted(prefect_api):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    values = {**VALUES, "gpu_count": 2, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
              "models_claim": "team-state"}
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        template("kubernetes-gpu"), values))
    run, flow = flow_run()
    config.prepare_for_flow_run(run, flow=flow)
    pod = config.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == VALUES["image"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]  # default
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims == {"state": "team-state", "cache": "tuneline-cache"}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {"state": "/tuneline", "cache": "/cache"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TUNELINE_HOME"] == "/tuneline" and env["HF_TOKEN"] == "t"
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)  # the worker's own variables are still added


def test_the_docker_template_hands_the_container_the_gpus_and_the_state(prefect_api):
    from prefect_docker.worker import DockerWorkerJobConfiguration

    config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
        template("docker-gpu"), VALUES))
    run, flow = flow_run()
    config.prepare_for_flow_run(run, flow=flow)
    assert config.container_create_kwargs["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert config.volumes == ["/srv/tuneline:/tuneline", "/srv/tuneline-cache:/cache"]
    assert config.image == VALUES["image"] and config.env["HF_TOKEN"] == "t"
    assert config.env["PREFECT__FLOW_RUN_ID"] == str(run.id)


@pytest.mark.parametrize(("name", "kind"), [("kubernetes-gpu", "kubernetes"), ("docker-gpu", "docker")])
def test_a_prefect_server_accepts_the_template_as_a_work_pool(prefect_api, name, kind):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def create() -> dict:
        async with get_client() as client:
            pool = await client.create_work_pool(WorkPoolCreate(name=f"gpu-{kind}-{uuid.uuid4().hex[:6]}", type=kind,
                                                                base_job_template=template(name)))
            return pool.base_job_template

    assert asyncio.run(create()) == template(name)
