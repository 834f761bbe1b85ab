"""The local stack's failure path: a server that cannot start is reported with its log. Starting, reusing and
stopping by PID are exercised on the real stack by tests/test_deployments.py (`tuneline up`, a Prefect restart)."""

from __future__ import annotations

import socket

import pytest

from infra import local


def test_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with socket.socket() as blocker:  # the port is taken, so the server exits instead of becoming healthy
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = local.Server("mlflow", blocker.getsockname()[1], "/health")
        with pytest.raises(RuntimeError, match=r"mlflow exited with code .* see .*logs/mlflow.log"):
            local.start(server, tmp_path, timeout_s=120)
    assert not (tmp_path / "mlflow.pid").exists()
