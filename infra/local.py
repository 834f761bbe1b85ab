"""The local stack: a Prefect server and an MLflow tracking server on 127.0.0.1, state under one folder.

Servers already answering on their port are reused, never restarted; `down` stops only the processes this
module started, by the PIDs it recorded. Nothing here binds anything but loopback.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from tasks.paths import TELEMETRY_OFF, configure_env, state_dir
from tasks.processes import HOST, pid_file, spawn, stop_started, wait_until


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    health_path: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + self.health_path, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def prefect_server() -> Server:
    """The Prefect server, on $TUNELINE_PREFECT_PORT (default 4200): read when asked, never at import."""
    return Server("prefect", int(os.environ.get("TUNELINE_PREFECT_PORT", 4200)), "/api/health")


def mlflow_server() -> Server:
    """The MLflow tracking server, on $TUNELINE_MLFLOW_PORT (default 5000)."""
    return Server("mlflow", int(os.environ.get("TUNELINE_MLFLOW_PORT", 5000)), "/health")


def _command(server: Server, home: Path) -> tuple[list[str], dict[str, str]]:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **TELEMETRY_OFF}
    if server.name == "prefect":
        env["PREFECT_HOME"] = str(home / "prefect")
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
        env["PREFECT_UI_API_URL"] = f"{server.url}/api"  # else the UI's browser side calls port 4200
        return [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(server.port)], env
    # The server's job executor (huey consumers for GenAI scorers) busy-polls several cores; tuneline needs none.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    db = home / "mlflow" / "mlflow.db"
    return [
        str(bin_dir / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", str(home / "mlflow" / "artifacts"),
        "--host", HOST, "--port", str(server.port), "--workers", "1",
    ], env


def _launch(server: Server, home: Path):
    """Spawn `server` unless one already answers on its port (then None: it is reused)."""
    if server.healthy():
        return None
    (home / server.name).mkdir(parents=True, exist_ok=True)
    cmd, env = _command(server, home)
    return spawn(server.name, cmd, env, home)


def _ready(server: Server, proc, home: Path, timeout_s: float) -> str:
    if proc is None:
        if pid_file(server.name, home).is_file():
            return f"{server.name}: reusing the server already running at {server.url}"
        # Reusing is right for a shared team server, but a user who meant a stack of their own should know.
        return (f"{server.name}: reusing the server already running at {server.url}, which {home} did not start: "
                f"its runs and registry are shared with whoever did, and `tuneline down` leaves it running "
                f"(set TUNELINE_{server.name.upper()}_PORT for a server of this state folder's own)")
    wait_until(server.name, server.healthy, proc, home, timeout_s)
    return f"{server.name}: started (pid {proc.pid}) at {server.url}"


def start(server: Server, home: Path | None = None, timeout_s: float = 180.0) -> str:
    """Start `server` unless one already answers on its port; wait until healthy."""
    home = home or state_dir()
    return _ready(server, _launch(server, home), home, timeout_s)


def client_env() -> dict[str, str]:
    """What a client process needs to talk to the local stack."""
    return {
        "PREFECT_API_URL": f"{prefect_server().url}/api",
        "MLFLOW_TRACKING_URI": mlflow_server().url,
    }


ROOT = Path(__file__).resolve().parent.parent  # the checkout: deployments' entrypoints are paths under it


def _deployments(names: list[str]) -> list[dict]:
    reply = httpx.post(f"{prefect_server().url}/api/deployments/filter", timeout=10,
                       json={"deployments": {"name": {"any_": names}}})
    reply.raise_for_status()
    return reply.json()


def start_runner(configs: list[str], home: Path, timeout_s: float = 180.0) -> str:
    """(Re)start the process that registers and executes the configs' Prefect deployments; wait until it polls.

    Restarted on every `up`, so a changed config or schedule takes effect."""
    from infra.deployments import deployments  # imports every flow: only when a runner is wanted

    stop_started("runner", home)
    expected = {(d.name, d.flow_name) for path in configs for d in deployments(path)}
    env = {**TELEMETRY_OFF, **client_env(), **os.environ, "TUNELINE_HOME": str(home),
           "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(home / "bentoml"))}
    started = time.time()
    proc = spawn("runner", [sys.executable, "-m", "infra.deployments", *configs], env, home, cwd=ROOT)

    def polling() -> bool:  # every deployment registered, and this runner has asked the server for work
        try:
            found = _deployments(sorted({n for n, _ in expected}))
        except httpx.HTTPError:
            return False
        polled = [d for d in found if d.get("last_polled")
                  and datetime.fromisoformat(d["last_polled"]).timestamp() >= started - 1]
        return len(polled) >= len(expected)

    wait_until("runner", polling, proc, home, timeout_s)
    return f"runner: started (pid {proc.pid}); {len(expected)} deployments: " + \
        ", ".join(sorted(f"{flow}/{name}" for name, flow in expected))


def up(home: Path | None = None, configs: list[str] = ()) -> list[str]:
    home = configure_env(home)
    # Both start at once, then both are awaited: their imports and database migrations overlap (~30 s saved).
    launched = [(server, _launch(server, home)) for server in (prefect_server(), mlflow_server())]
    lines = [_ready(server, proc, home, 180.0) for server, proc in launched]
    if configs:
        lines.append(start_runner([str(Path(c).resolve()) for c in configs], home))
    return lines


def down(home: Path | None = None) -> list[str]:
    home = home or state_dir()
    return [stop_started(name, home) for name in ("bento", "runner", prefect_server().name, mlflow_server().name)]
