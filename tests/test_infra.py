"""The local stack: a real MLflow server started on loopback, reused when already up, stopped by its PID only."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from infra import local
from tasks.processes import free_port, stop_started


def test_server_starts_is_reused_and_stops_by_pid(tmp_path):
    server = local.Server("mlflow", free_port(), "/health")
    assert not server.healthy()
    try:
        assert "started" in local.start(server, tmp_path)
        pid = int((tmp_path / "mlflow.pid").read_text())
        assert server.healthy() and (tmp_path / "mlflow" / "mlflow.db").is_file()
        assert httpx.get(server.url + "/", timeout=5).status_code == 200  # the UI

        assert "reusing" in local.start(server, tmp_path)
        assert int((tmp_path / "mlflow.pid").read_text()) == pid
    finally:
        message = stop_started("mlflow", tmp_path)
    assert "stopped" in message or "killed" in message
    assert not server.healthy()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "left alone" in stop_started("mlflow", tmp_path)


def test_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with socket.socket() as blocker:  # the port is taken, so the server exits instead of becoming healthy
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = local.Server("mlflow", blocker.getsockname()[1], "/health")
        with pytest.raises(RuntimeError, match=r"mlflow exited with code .* see .*logs/mlflow.log"):
            local.start(server, tmp_path, timeout_s=120)
    assert not (tmp_path / "mlflow.pid").exists()
