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
    """Where the PID of a process this state folder started is recorded (its presence: "ours"), with the
    process's start time: "PID START"."""
    return home / f"{name}.pid"


def recorded_pid(name: str, home: Path) -> int | None:
    """The PID recorded for `name`, if any."""
    recorded = pid_file(name, home)
    return int(recorded.read_text().split()[0]) if recorded.is_file() else None


def _start_time(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (Linux's /proc/PID/stat, field 22); None when there is
    no such process or no /proc. A PID is reused once its process is gone; the pair (PID, start) is not."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after "PID (name)", which begin with field 3 (state, ppid, pgrp, ...); None
    when there is no such process or no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def spawn(name: str, cmd: list[str], env: dict[str, str], home: Path, cwd: Path | None = None):
    """Start a long-running process in its own session, logging to home/logs and recording its PID."""
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with open(home / "logs" / f"{name}.log", "ab") as log:  # the child holds its own copy of the handle
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd)
    pid_file(name, home).write_text(f"{proc.pid} {_start_time(proc.pid) or ''}".strip())
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


def stop_started(name: str, home: Path, grace_s: float = 20.0) -> str:
    """Stop a process this project started (its whole process group), by its recorded PID; nothing else. SIGTERM,
    a second SIGTERM after `grace_s`, SIGKILL half that later."""
    recorded = pid_file(name, home)
    if not recorded.exists():
        return f"{name}: not started by tuneline; left alone"
    pid, _, started = recorded.read_text().strip().partition(" ")
    pid = int(pid)
    recorded.unlink()
    now = _start_time(pid)
    if started and now is not None and now != started:  # a stale file: the PID belongs to another process now
        return f"{name}: pid {pid} is another process now (the one tuneline started has exited); left alone"
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{name}: pid {pid} had already exited"
    if _gone_within(pid, grace_s):
        return f"{name}: stopped (pid {pid})"
    # A second SIGTERM is how Prefect's worker and server are told "now": their handler turns it into SIGKILL of
    # themselves. A process worker on two busy cores was seen still shutting down 30 s after the first (its
    # flow runs run in sessions of their own, so they finish unharmed either way).
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{name}: stopped (pid {pid})"
    if _gone_within(pid, grace_s / 2):
        return f"{name}: stopped (pid {pid}) at a second SIGTERM"
    os.killpg(pid, signal.SIGKILL)
    _group_gone(pid)
    return f"{name}: killed (pid {pid}) after it ignored SIGTERM twice"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _group_gone(pid):
            return True
        time.sleep(0.2)
    return _group_gone(pid)


def _group_gone(pid: int) -> bool:
    """Whether no process of the group is left running; reaps the leader when this process started it. A member
    that has exited but that its parent has not reaped yet (a zombie: a `prefect worker` a test started, stopped
    from a `tuneline down` process) holds nothing and takes no signal, so it counts as gone."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return _only_zombies_in(pid)


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited. One that has exited but that its parent has not reaped yet
    (a zombie: an orphan waits about a second for init here) holds nothing and takes no signal: not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    fields = _stat(pid)
    if fields is None:  # it exited since, or there is no /proc to tell a zombie by (then signal 0's answer stands)
        return not Path("/proc").is_dir()
    return fields[0] != "Z"


def _only_zombies_in(group: int) -> bool:
    """Whether every process of the process group `group` is a zombie (Linux's /proc; False without it)."""
    states = [fields[0] for entry in Path("/proc").glob("[0-9]*")
              if (fields := _stat(entry.name)) and int(fields[2]) == group]
    return bool(states) and all(state == "Z" for state in states)
