"""A stack `tuneline up` started, driven as a user or a script drives it: the CLI, Prefect's REST API, MLflow."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from mlflow import MlflowClient

from infra.local import prefect_request
from tasks.processes import free_port
from tests.conftest import ROOT


class Stack:
    """The servers `tuneline up` started for this module, and the calls a user or a script makes on them."""

    def __init__(self, home: Path, config: Path, env: dict[str, str]):
        self.home, self.config, self.env = home, config, env
        self.prefect = f"http://127.0.0.1:{env['TUNELINE_PREFECT_PORT']}"
        self.mlflow = f"http://127.0.0.1:{env['TUNELINE_MLFLOW_PORT']}"
        self.service = f"http://127.0.0.1:{yaml.safe_load(config.read_text())['deploy']['port']}"
        self.runs: dict[str, str] = {}  # what earlier tests ran: name -> Prefect flow run id
        self.up: subprocess.CompletedProcess | None = None  # what `tuneline up` printed

    def tuneline(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "tuneline"), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        return prefect_request(method, path, base=self.prefect, **kwargs).raise_for_status()

    def trigger(self, deployment: str, parameters: dict | None = None, timeout_s: float = 900) -> dict:
        """Create a flow run of `<flow>/<deployment>` through the REST API and wait until it is final."""
        found = self.api("GET", f"/deployments/name/{deployment}").json()
        run = self.api("POST", f"/deployments/{found['id']}/create_flow_run",
                       json={"parameters": parameters or {}}).json()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.api("GET", f"/flow_runs/{run['id']}").json()
            if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return run
            time.sleep(3)
        raise TimeoutError(f"{deployment}: flow run {run['id']} still {run['state']['type']} after {timeout_s}s")

    def logs(self, flow_run_id: str, expect: str = "", timeout_s: float = 60) -> str:
        """The run's log lines; they reach the API in batches, so wait (a while) until `expect` is among them."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.api("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
            text = "\n".join(row["message"] for row in rows)
            if expect in text or time.monotonic() > deadline:
                return text
            time.sleep(2)

    def mlflow_client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow, registry_uri=self.mlflow)


@contextlib.contextmanager
def running_stack(home: Path, config: dict, *up_args: str, env: dict[str, str] | None = None):
    """`tuneline up` for `config` (written to home/stack.yaml) on free ports with its own state folder; `down`
    after. `up_args` and `env` are what the user adds (e.g. a shared database)."""
    path = home / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    clean = {k: v for k, v in os.environ.items()
             if k not in {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "TUNELINE_FEEDBACK_DB"}}
    clean.update(TUNELINE_HOME=str(home), BENTOML_HOME=str(home / "bentoml"), TUNELINE_PREFECT_PORT=str(free_port()),
                 TUNELINE_MLFLOW_PORT=str(free_port()), **(env or {}))
    stack = Stack(home, path, clean)
    stack.up = stack.tuneline("up", "--config", str(path), *up_args)
    assert stack.up.returncode == 0, stack.up.stdout + stack.up.stderr
    try:
        yield stack
    finally:
        down = stack.tuneline("down", timeout=120)
        assert down.returncode == 0 and "killed" not in down.stdout, down.stdout + down.stderr
