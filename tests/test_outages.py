"""Fault tests of the lifecycle (marked `faults`; `make test-faults`, run by CI after `make test`):
the MLflow server stopped mid-run, and the lifecycle killed during fine-tuning then started again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect import task

from infra.local import Server, start
from tasks.processes import free_port, stop_started
from tests.conftest import ROOT, reports_config

pytestmark = pytest.mark.faults


def _config(tmp_path, name: str, model: str, **finetune) -> str:
    """A lifecycle that, not interrupted, passes the shipped gate rules on its own evidence."""
    demo = reports_config(tmp_path, name, model, **finetune)
    demo["deploy"]["serve"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(demo))
    return str(path)


def test_mlflow_stopping_mid_run_fails_the_flow_naming_the_server_and_moves_no_alias(tmp_path, home, prefect_api,
                                                                                       monkeypatch, steady_tiny_model):
    from flows.lifecycle import lifecycle
    from tasks import registry

    server_home = tmp_path / "mlflow-home"
    server = Server("mlflow", free_port(), "/health")
    start(server, server_home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail in seconds, not after minutes of back-off
    mlflow.set_tracking_uri(server.url)
    original = registry.record

    @task(name="record-decision")
    def record_after_an_outage(name, version, decision):  # the moment a passing gate would move `champion`
        stop_started("mlflow", server_home)
        return original.fn(name, version, decision)

    monkeypatch.setattr(registry, "record", record_after_an_outage)
    try:
        with pytest.raises(Exception) as failure:
            lifecycle(_config(tmp_path, "outage", steady_tiny_model))
        assert f"127.0.0.1:{server.port}" in str(failure.value), str(failure.value)[:500]

        start(server, server_home)  # the same database: what was recorded before the outage is still there
        client = MlflowClient(server.url)
        [found] = client.search_model_versions("name = 'outage-model'")
        version = client.get_model_version("outage-model", found.version)
        assert version.aliases == ["challenger"] and "tuneline.decision" not in version.tags
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias("outage-model", "champion")
    finally:
        stop_started("mlflow", server_home)
        mlflow.set_tracking_uri(None)


def test_mlflow_unreachable_when_evaluate_asks_for_the_champion_fails_the_run_instead_of_skipping_the_rule(
        tmp_path, home, prefect_api, monkeypatch, steady_tiny_model):
    """An outage is not "no champion": the champion rule must not be skipped and nothing may be promoted.

    The server is down only while evaluate asks the registry for the champion, and back right after, so a
    lifecycle that swallowed the error would go on to register and promote (what this test catches)."""
    from flows.lifecycle import lifecycle
    from tasks import registry

    server_home = tmp_path / "mlflow-home"
    server = Server("mlflow", free_port(), "/health")
    start(server, server_home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    mlflow.set_tracking_uri(server.url)
    original = registry.champion

    def champion_during_an_outage(name):
        stop_started("mlflow", server_home)
        try:
            return original(name)
        finally:
            start(server, server_home)

    monkeypatch.setattr(registry, "champion", champion_during_an_outage)
    try:
        with pytest.raises(Exception) as failure:
            lifecycle(_config(tmp_path, "blip", steady_tiny_model))
        assert f"127.0.0.1:{server.port}" in str(failure.value), str(failure.value)[:500]
        assert MlflowClient(server.url).search_model_versions("name = 'blip-model'") == []  # nothing registered
    finally:
        stop_started("mlflow", server_home)
        mlflow.set_tracking_uri(None)


def test_lifecycle_killed_during_finetuning_resumes_and_ends_as_an_uninterrupted_run(
        tmp_path, home, prefect_api, mlflow_sqlite, steady_tiny_model):
    from safetensors.torch import load_file

    from flows.lifecycle import lifecycle
    from tasks import registry
    from tasks.training import last_complete_checkpoint

    killed = _config(tmp_path, "killed", steady_tiny_model, save_steps=1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_sqlite}
    env.pop("PREFECT_API_URL", None)  # the child runs its own ephemeral Prefect
    child = subprocess.Popen([sys.executable, "-c", f"from flows.lifecycle import lifecycle; lifecycle({killed!r})"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    runs = home / "finetune"
    try:
        deadline, saved = time.monotonic() + 600, None
        while time.monotonic() < deadline and child.poll() is None:
            found = [last_complete_checkpoint(d / "checkpoints") for d in runs.glob("*")
                     if (d / "checkpoints").exists()]
            saved = next((c for c in found if c and int(c.rsplit("-", 1)[1]) >= 5), None)
            if saved:
                break
            time.sleep(0.1)
        assert saved, "fine-tuning never reached step 5 before the run ended"
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # no clean-up, as when a machine goes away
        child.wait()
    run_dir = Path(saved).parent.parent
    saved = Path(last_complete_checkpoint(run_dir / "checkpoints")).name  # it may have written more meanwhile

    resumed = lifecycle(killed)
    assert resumed["promotion"]["passed"] and resumed["promotion"]["version"] == "1"
    finetune = MlflowClient().search_runs([mlflow.get_experiment_by_name("killed").experiment_id],
                                          "tags.`tuneline.stage` = 'finetune'")
    assert [r.data.tags["tuneline.resumed_from"] for r in finetune if r.info.status == "FINISHED"] == [saved]

    # The same config never interrupted (another name: its own experiment and registered model), with the
    # finished run removed so that it trains from the start rather than reusing the resumed result.
    shutil.rmtree(run_dir)
    whole = lifecycle(_config(tmp_path, "whole", steady_tiny_model, save_steps=1))
    assert whole["promotion"]["passed"] and whole["promotion"]["version"] == "1"
    weights = [load_file(registry.download(f"{name}-model", "1", tmp_path / name) / "model.safetensors")
               for name in ("killed", "whole")]
    assert weights[0].keys() == weights[1].keys()
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5
    assert whole["test"]["finetuned"] == resumed["test"]["finetuned"]
