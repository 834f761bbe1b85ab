"""Long-running processes this project starts (servers, the runner, Bento services): started in their own
session with their PID recorded under the state folder, stopped only by that PID; nothing binds but loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something on 127.0.0.1 accepts connections on `port` (a connect, so TIME_WAIT does not count)."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def pid_file(name: str, home: Path) -> Path:
    """Where the PID of a process this state folder started is recorded (its presence: "ours")."""
    return home / f"{name}.pid"


def spawn(name: str, cmd: list[str], env: dict[str, str], home: Path, cwd: Path | None = None):
    """Start a long-running process in its own session, logging to home/logs and recording its PID."""
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with open(home / "logs" / f"{name}.log", "ab") as log:  # the child holds its own copy of the handle
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd)
    pid_file(name, home).write_text(str(proc.pid))
    return proc


def wait_until(name: str, ready, proc, home: Path, timeout_s: float) -> None:
    """Poll `ready()` until it is true; fail early if the process died, and stop it on a timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file(name, home).unlink(missing_ok=True)
            raise RuntimeError(
                f"{name} exited with code {proc.returncode} before it was ready; see {home / 'logs' / (name + '.log')}"
            )
        if ready():
            return
        time.sleep(1.0)
    stop_started(name, home)
    raise TimeoutError(f"{name} was not ready within {timeout_s:.0f}s; see {home / 'logs' / (name + '.log')}")


def stop_started(name: str, home: Path) -> str:
    """Stop a process this project started (its whole process group), by its recorded PID; nothing else."""
    recorded = pid_file(name, home)
    if not recorded.exists():
        return f"{name}: not started by tuneline; left alone"
    pid = int(recorded.read_text())
    recorded.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{name}: pid {pid} had already exited"
    for _ in range(50):
        if _group_gone(pid):
            return f"{name}: stopped (pid {pid})"
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)  # a Prefect process worker has been seen ignoring SIGTERM and SIGINT
    _group_gone(pid)
    return f"{name}: killed (pid {pid}) after it ignored SIGTERM"


def _group_gone(pid: int) -> bool:
    """Whether no process of the group is left; reaps the leader when this process started it (an unreaped
    child stays in its group as a zombie, which would read as "still running")."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False
