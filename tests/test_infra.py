"""The local stack's edges: a server that cannot start is reported with its log; a server another state folder
started is reused saying so. Starting, reusing and stopping by PID are exercised on the real stack by
tests/test_deployments.py (`tuneline up`, a Prefect restart)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra import local
from tasks.processes import free_port, running, spawn, stop_started, wait_until
from tests.conftest import ROOT


def test_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with socket.socket() as blocker:  # the port is taken, so the server exits instead of becoming healthy
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = local.Server("mlflow", blocker.getsockname()[1], "/health")
        with pytest.raises(RuntimeError, match=r"mlflow exited with code .* see .*logs/mlflow.log"):
            local.start(server, tmp_path, timeout_s=120)
    assert not (tmp_path / "mlflow.pid").exists()


def test_a_server_another_state_folder_started_is_reused_saying_whose_it_is(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    server = local.Server("mlflow", free_port(), "/health")
    assert "started" in local.start(server, theirs)
    try:
        reused = local.start(server, ours)
        assert f"which {ours} did not start" in reused and "TUNELINE_MLFLOW_PORT" in reused, reused
        assert "did not start" not in local.start(server, theirs)
        assert not (ours / "mlflow.pid").exists()  # `tuneline down` from `ours` leaves it alone
    finally:
        stop_started("mlflow", theirs)


def test_a_spawned_process_leaves_no_log_handle_open_in_this_one(tmp_path):
    log = tmp_path / "logs" / "sleeper.log"
    proc = spawn("sleeper", [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(30)"],
                 dict(os.environ), tmp_path)
    try:
        held = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert str(log) not in held
        wait_until("sleeper", lambda: log.read_text() == "up\n", proc, tmp_path, timeout_s=60)  # it logs
    finally:  # a child of this process stops at once (reaped, not mistaken for one that ignored SIGTERM)
        assert stop_started("sleeper", tmp_path) == f"sleeper: stopped (pid {proc.pid})"


def test_a_process_that_waits_out_the_first_sigterm_is_stopped_by_the_second_as_prefect_expects(tmp_path):
    """Prefect's worker takes a first SIGTERM as "finish up" and a second as "now"; `down` sends both before it
    resorts to SIGKILL, and says which stopped it."""
    log = tmp_path / "logs" / "stubborn.log"
    code = ("import signal, sys, time\n"
            "def first(*_): signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            "signal.signal(signal.SIGTERM, first)\nprint('up', flush=True)\ntime.sleep(60)")
    proc = spawn("stubborn", [sys.executable, "-c", code], dict(os.environ), tmp_path)
    wait_until("stubborn", lambda: log.read_text() == "up\n", proc, tmp_path, timeout_s=60)
    assert stop_started("stubborn", tmp_path, grace_s=1) == f"stubborn: stopped (pid {proc.pid}) at a second SIGTERM"
    assert proc.poll() == 0


def test_a_process_stopped_from_another_process_than_its_parent_is_stopped_not_killed(tmp_path):
    """`tuneline down` is not the parent of what a test (or a flow) started: the exited process stays a zombie
    until its parent reaps it, which is stopped, not a process that ignored SIGTERM."""
    proc = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path)
    assert running(proc.pid)
    down = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tasks.processes import "
                           "stop_started; print(stop_started('sleeper', Path(sys.argv[1]), grace_s=1))", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert down.stdout.strip() == f"sleeper: stopped (pid {proc.pid})", down.stdout + down.stderr
    assert not running(proc.pid)  # a zombie of this process until the wait below reaps it
    assert proc.wait(5) == -15  # it ended at the SIGTERM


def test_status_names_what_this_state_folder_started_and_exits_1_when_one_has_exited(tmp_path):
    env = {**os.environ, "TUNELINE_HOME": str(tmp_path), "TUNELINE_PREFECT_PORT": str(free_port()),
           "TUNELINE_MLFLOW_PORT": str(free_port())}

    def status() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "status"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    assert status().stdout == f"nothing started from {tmp_path} (`tuneline up` starts the stack)\n"
    runner = spawn("runner", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path)
    worker = spawn("worker-gpu", [sys.executable, "-c", "pass"], dict(os.environ), tmp_path)
    worker.wait(30)
    try:
        shown = status()
        assert shown.returncode == 1, shown.stderr  # a worker that died is what an operator must see
        assert shown.stdout.splitlines() == [
            f"runner: running (pid {runner.pid})",
            f"worker-gpu: exited (pid {worker.pid}; see {tmp_path / 'logs' / 'worker-gpu.log'})"]
    finally:
        stop_started("runner", tmp_path, grace_s=1)


def test_a_stale_pid_file_never_signals_the_process_that_reused_its_pid(tmp_path):
    """The recorded start time tells the process tuneline started from another that got its PID later."""
    from tasks.processes import pid_file, recorded_pid

    proc = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path)
    try:
        assert recorded_pid("sleeper", tmp_path) == proc.pid
        pid_file("sleeper", tmp_path).write_text(f"{proc.pid} 1")  # as if the PID were another process's now
        assert "is another process now" in stop_started("sleeper", tmp_path)
        assert proc.poll() is None  # not signalled
    finally:
        proc.kill()
        proc.wait()


def test_a_database_url_that_is_not_postgresql_is_refused_naming_the_option(tmp_path):
    env = {**os.environ, "TUNELINE_HOME": str(tmp_path), "TUNELINE_PREFECT_PORT": str(free_port()),
           "TUNELINE_MLFLOW_PORT": str(free_port())}
    done = subprocess.run([str(Path(sys.executable).parent / "tuneline"), "up", "--no-runner", "--database",
                           "mysql://me:hunter2@db/x"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--database / TUNELINE_DATABASE_URL: expected postgresql://" in done.stderr, done.stderr
    assert "hunter2" not in done.stdout + done.stderr and not (tmp_path / "prefect.pid").exists()


def test_the_cli_points_prefect_at_the_stack_it_connects_to(tmp_path):
    """The config schema imports Prefect before `_connect` names the servers; Prefect, which reads its settings
    on import, must read them again, or a flow runs on a temporary server while its tasks report to the stack
    (a 409 on the first subflow: `tuneline run` failed so from a fresh clone)."""
    code = ("import os, flows.cli as cli; from prefect.settings import get_current_settings; "
            "cli._connect(prefect=False); print(get_current_settings().api.url, os.environ['PREFECT_API_URL'])")
    env = {**os.environ, "TUNELINE_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    used, named = done.stdout.split()
    assert used == named == f"{local.prefect_server().url}/api"


class _WantsCredentials(BaseHTTPRequestHandler):
    def do_GET(self):  # a shared server behind a proxy: every path asks for credentials
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_servers_the_environment_names_are_checked_before_a_run_and_one_that_is_down_is_named(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "TUNELINE_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": down, "PREFECT_API_URL": f"{down}/api"}
    done = subprocess.run([str(Path(sys.executable).parent / "tuneline"), "run", str(ROOT / "configs" / "demo.yaml")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: no MLflow server answers at {down} (MLFLOW_TRACKING_URI); check the "
                                   "address, or unset MLFLOW_TRACKING_URI to use the local stack")
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _WantsCredentials)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        up = f"http://127.0.0.1:{proxy.server_port}"
        code = "import flows.cli as cli; cli._connect(prefect=True); print('connected')"
        for mlflow, prefect, fault in ((up, f"{down}/api", "no Prefect server answers at"), (up, f"{up}/api", None)):
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                  env={**env, "MLFLOW_TRACKING_URI": mlflow, "PREFECT_API_URL": prefect})
            if fault:  # the MLflow address answers (401 is an answer), the Prefect one does not
                assert f"error: {fault} {down}/api (PREFECT_API_URL)" in done.stderr and not done.stdout
            else:
                assert done.returncode == 0 and done.stdout.strip() == "connected", done.stderr[-2000:]
    finally:
        proxy.shutdown()
