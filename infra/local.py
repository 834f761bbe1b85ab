"""The local stack: a Prefect server and an MLflow tracking server on 127.0.0.1, state under one folder.

Their state is SQLite files under that folder by default; a team points both at a shared PostgreSQL server and
the MLflow artifacts at a shared destination (`Stores`). Servers already answering on their port are reused,
never restarted; `down` stops only the processes this module started, by the PIDs it recorded. Nothing here
binds anything but loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from tasks.paths import TELEMETRY_OFF, configure_env, state_dir
from tasks.processes import HOST, pid_file, recorded_pid, running, spawn, stop_started, wait_until


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    health_path: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def healthy(self) -> bool:
        return http_status(self.url + self.health_path, timeout_s=2.0) == 200


def http_status(url: str, timeout_s: float = 10.0) -> int | None:
    """The status `url` answers a GET with, or None when nothing answers."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code
    except httpx.HTTPError:
        return None


def prefect_server() -> Server:
    """The Prefect server, on $TUNELINE_PREFECT_PORT (default 4200): read when asked, never at import."""
    return Server("prefect", int(os.environ.get("TUNELINE_PREFECT_PORT", 4200)), "/api/health")


def mlflow_server() -> Server:
    """The MLflow tracking server, on $TUNELINE_MLFLOW_PORT (default 5000)."""
    return Server("mlflow", int(os.environ.get("TUNELINE_MLFLOW_PORT", 5000)), "/health")


# What only the servers may hold: the database password (inside the URL) and the artifact store's credentials.
# Client processes (the runner, the flows it runs) get an environment without them.
SERVER_SECRETS = ("TUNELINE_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "MLFLOW_S3_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING",
                  "AZURE_STORAGE_ACCESS_KEY")


@dataclass(frozen=True)
class Stores:
    """Where the two servers keep their state. Unset: SQLite files and an artifact folder under the state folder.

    `database` is a PostgreSQL URL (postgresql://user:password@host:port/NAME): Prefect gets the database
    NAME_prefect (through asyncpg) and MLflow NAME_mlflow (through psycopg2), created when missing; they are two
    databases because both keep an `alembic_version` table. `artifacts` is where MLflow stores artifacts (a
    folder or an s3:// URI); clients reach them through the server (proxied), so only the server holds the
    store's credentials. `allowed_hosts` is MLflow's Host-header allow-list, for a server behind a proxy."""

    database: str | None = None
    artifacts: str | None = None
    allowed_hosts: str | None = None

    @classmethod
    def from_env(cls) -> Stores:
        return cls(os.environ.get("TUNELINE_DATABASE_URL") or None,
                   os.environ.get("TUNELINE_ARTIFACTS_DESTINATION") or None,
                   os.environ.get("TUNELINE_MLFLOW_ALLOWED_HOSTS") or None)

    def urls(self) -> dict[str, str]:
        """The SQLAlchemy URL each server uses (with its password): {"prefect": …, "mlflow": …}."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(self.database)
        except ArgumentError as exc:
            raise ValueError(f"--database / TUNELINE_DATABASE_URL: not a database URL ({exc})") from None
        if url.get_backend_name() != "postgresql" or not url.database:
            raise ValueError(f"--database / TUNELINE_DATABASE_URL: expected postgresql://user:password@host:port/"
                             f"NAME, got {url.render_as_string(hide_password=True)}")
        return {"prefect": url.set(drivername="postgresql+asyncpg", database=f"{url.database}_prefect")
                .render_as_string(hide_password=False),
                "mlflow": url.set(drivername="postgresql+psycopg2", database=f"{url.database}_mlflow")
                .render_as_string(hide_password=False)}

    def describe(self) -> str:
        """Where the state lives, as `up` prints it: never a password."""
        if not self.database:
            return ""
        from sqlalchemy.engine import make_url

        where = make_url(self.database).render_as_string(hide_password=True)
        return f"state: PostgreSQL {where} (databases *_prefect, *_mlflow); artifacts: {self.artifacts or 'local'}"


def create_databases(stores: Stores) -> None:
    """Create the two databases on the PostgreSQL server when they are missing; Prefect's migrations then add
    the pg_trgm extension themselves (a trusted extension: the database's owner may create it)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    wanted = stores.urls()  # a URL that is not PostgreSQL is refused before anything connects
    given = make_url(stores.database).set(drivername="postgresql+psycopg2")
    engine = create_engine(given, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for url in wanted.values():
                name = make_url(url).database
                if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        where = given.render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        if "permission denied" in reason:
            reason += (f" (the role needs CREATEDB, or create the databases {given.database}_prefect and "
                       f"{given.database}_mlflow beforehand)")
        raise RuntimeError(f"PostgreSQL at {where}: {reason}") from None
    finally:
        engine.dispose()


def _command(server: Server, home: Path, stores: Stores) -> tuple[list[str], dict[str, str]]:
    """The server's command line and environment. Connection URLs travel in the environment, never on the
    command line, where `ps` would show their passwords to every user of the machine."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **TELEMETRY_OFF}
    env.pop("TUNELINE_DATABASE_URL", None)  # each server gets its own database's URL below, and only that
    urls = stores.urls() if stores.database else {}
    if server.name == "prefect":
        env["PREFECT_HOME"] = str(home / "prefect")
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = urls.get(
            "prefect", f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}")
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
        env["PREFECT_UI_API_URL"] = f"{server.url}/api"  # else the UI's browser side calls port 4200
        return [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(server.port)], env
    # The server's job executor (huey consumers for GenAI scorers) busy-polls several cores; tuneline needs none.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_BACKEND_STORE_URI"] = urls.get("mlflow", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    env["MLFLOW_ARTIFACTS_DESTINATION"] = stores.artifacts or str(home / "mlflow" / "artifacts")
    hosts = ["--allowed-hosts", stores.allowed_hosts] if stores.allowed_hosts else []
    return [str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(server.port), "--workers", "1",
            *hosts], env


def _launch(server: Server, home: Path, stores: Stores):
    """Spawn `server` unless one already answers on its port (then None: it is reused)."""
    if server.healthy():
        return None
    (home / server.name).mkdir(parents=True, exist_ok=True)
    cmd, env = _command(server, home, stores)
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
    return _ready(server, _launch(server, home, Stores.from_env()), home, timeout_s)


def client_env() -> dict[str, str]:
    """What a client process needs to talk to the local stack."""
    return {
        "PREFECT_API_URL": f"{prefect_server().url}/api",
        "MLFLOW_TRACKING_URI": mlflow_server().url,
    }


def _client_process_env(home: Path) -> dict[str, str]:
    """The environment of a process that runs flows against the stack (the runner, a worker): pointed at the
    servers, without what only the servers may hold."""
    own = {k: v for k, v in os.environ.items() if k not in SERVER_SECRETS}
    return {**TELEMETRY_OFF, **client_env(), **own, "TUNELINE_HOME": str(home),
            "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(home / "bentoml"))}


ROOT = Path(__file__).resolve().parent.parent  # the checkout: deployments' entrypoints are paths under it


def prefect_request(method: str, path: str, base: str | None = None, **kwargs) -> httpx.Response:
    """A call to the Prefect server's REST API (`base`: the server's URL, default the local stack's), repeated while
    the server answers 503: its answer to an error a client may retry, such as SQLite busy on loaded cores (seen
    on `create_flow_run` here), which Prefect's own client retries too. Five tries, 1 to 8 s apart."""
    for wait in (1, 2, 4, 8, None):
        reply = httpx.request(method, f"{base or prefect_server().url}/api{path}", **{"timeout": 30, **kwargs})
        if reply.status_code != 503 or wait is None:
            return reply
        time.sleep(wait)


def _deployments(names: list[str]) -> list[dict]:
    reply = prefect_request("POST", "/deployments/filter", json={"deployments": {"name": {"any_": names}}})
    reply.raise_for_status()
    return reply.json()


def start_runner(configs: list[str], home: Path, timeout_s: float = 180.0) -> str:
    """(Re)start the process that registers and executes the configs' Prefect deployments; wait until it polls.

    Restarted on every `up`, so a changed config or schedule takes effect."""
    from infra.deployments import deployments  # imports every flow: only when a runner is wanted

    stop_started("runner", home)
    for stage_pool in _stage_pools(configs):
        _create_pool(stage_pool)
    expected = {(d.name, d.flow_name) for path in configs for d in deployments(path)}
    env = _client_process_env(home)
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


def _create_pool(pool: str) -> None:
    """The process work pool `pool`, created unless it exists (of any type: a Kubernetes pool stays one)."""
    created = prefect_request("POST", "/work_pools/", json={"name": pool, "type": "process"})
    if created.status_code not in (201, 409):  # 409: it exists already
        raise RuntimeError(f"work pool {pool}: the Prefect server refused it ({created.status_code}: {created.text})")


def start_worker(pool: str, home: Path, timeout_s: float = 180.0) -> str:
    """A `prefect worker` for the process pool `pool` (created if missing), under the state folder (`down` stops
    it), once it is online."""
    _create_pool(pool)
    name = f"worker-{pool}"
    stop_started(name, home)
    proc = spawn(name, [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type",
                        "process", "--limit", "1"], _client_process_env(home), home, cwd=ROOT)

    def online() -> bool:
        try:
            reply = prefect_request("POST", f"/work_pools/{pool}/workers/filter", json={}, timeout=5)
            workers = reply.raise_for_status().json()
        except httpx.HTTPError:
            return False
        return any(w.get("status") == "ONLINE" for w in workers)

    wait_until(name, online, proc, home, timeout_s)
    return f"{name}: started (pid {proc.pid})"


def start_pool(pool: str, configs: list[str], home: Path, timeout_s: float = 180.0) -> str:
    """Register the configs' deployments on the process work pool `pool` (created if missing) and start a
    worker for it; the runner, if one ran, is stopped (its deployments now belong to the pool).

    Other workers on other machines (`prefect worker start --pool NAME`) then share the pool's runs."""
    stop_started("runner", home)
    _create_pool(pool)
    for stage_pool in _stage_pools(configs):
        _create_pool(stage_pool)
    done = subprocess.run([sys.executable, "-m", "infra.deployments", "--pool", pool, *configs],
                          env=_client_process_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"registering the deployments on work pool {pool} failed: {done.stderr[-2000:]}")
    count = done.stdout.count(f" -> work pool {pool}\n")
    return f"{start_worker(pool, home, timeout_s)}; {count} deployments on work pool {pool}"


def _stage_pools(configs: list[str]) -> dict[str, str]:
    """The work pools the configs send runs to, each with what it runs there."""
    from flows.config import load_config

    pools: dict[str, list[str]] = {}
    for finetune in (load_config(c).finetune for c in configs):
        if finetune.work_pool:
            pools.setdefault(finetune.work_pool, []).append("the finetune stage's runs")
        if finetune.search and finetune.search.work_pool:
            pools.setdefault(finetune.search.work_pool, []).append("the search's trials")
    return {pool: " and ".join(sorted(set(what))) for pool, what in pools.items()}


def up(home: Path | None = None, configs: list[str] = (), pool: str | None = None) -> list[str]:
    home = configure_env(home)
    stores = Stores.from_env()
    if stores.database:
        create_databases(stores)
    # Both start at once, then both are awaited: their imports and database migrations overlap (~30 s saved).
    launched = [(server, _launch(server, home, stores)) for server in (prefect_server(), mlflow_server())]
    lines = [_ready(server, proc, home, 180.0) for server, proc in launched]
    if stores.database:
        lines.append(stores.describe())
    if configs:
        paths = [str(Path(c).resolve()) for c in configs]
        lines.append(start_pool(pool, paths, home) if pool else start_runner(paths, home))
        lines += [f"work pool {p}: {what} wait there for a worker (`tuneline worker {p}` here, or "
                  f"`prefect worker start --pool {p}` where the GPUs are)"
                  for p, what in sorted(_stage_pools(paths).items())]
    return lines


def status(home: Path | None = None) -> tuple[list[str], bool]:
    """A line for each process this state folder started (servers, runner, workers, each model's front and
    services), what it serves, and whether it still runs; with whether all of them do. A server on the stack's
    port that another state folder started is named too."""
    home = home or state_dir()
    lines, all_running = [], True
    servers = {s.name: s for s in (prefect_server(), mlflow_server())}
    for server in servers.values():
        if pid_file(server.name, home).is_file():
            continue  # with the processes below
        if server.healthy():
            lines.append(f"{server.name}: {server.url} answers (not started from {home})")
    for recorded in sorted(home.glob("*.pid"), key=_status_order):
        name = recorded.stem
        pid = recorded_pid(name, home)
        alive = running(pid)
        all_running &= alive
        state = f"running (pid {pid})" if alive else f"exited (pid {pid}; see {home / 'logs' / (name + '.log')})"
        if server := servers.get(name):
            state += f", {server.url} {'answering' if server.healthy() else 'not answering'}"
        if name.startswith("front-"):
            from tasks.packaging import routes  # the deploy's record of what the front forwards to (BentoML: slow)

            served = routes(home, name.removeprefix("front-"))
            champion, challenger = served.get("champion") or {}, served.get("challenger") or {}
            state += f", {served.get('front', 'port unknown')}: champion {champion.get('model', 'none')}"
            if challenger:
                roles = [f"{served.get('canary', 0.0):.0%} of chat requests"] * bool(served.get("canary")) + [
                    "shadow"] * bool(served.get("shadow"))
                state += f", challenger {challenger['model']} ({', '.join(roles) or 'idle'})"
        lines.append(f"{name}: {state}")
    return lines or [f"nothing started from {home} (`tuneline up` starts the stack)"], all_running


def _status_order(recorded: Path) -> tuple[int, str]:
    """Servers, then the runner and workers, then each model's front and services."""
    order = {prefect_server().name: 0, mlflow_server().name: 1, "runner": 2}
    rank = 3 if recorded.stem.startswith("worker-") else 4 if recorded.stem.startswith("front-") else 5
    return order.get(recorded.stem, rank), recorded.stem


def down(home: Path | None = None) -> list[str]:
    home = home or state_dir()
    # every registered model's front, then the Bento services behind them
    services = sorted(p.stem for p in home.glob("front-*.pid")) + sorted(p.stem for p in home.glob("bento*.pid"))
    workers = sorted(p.stem for p in home.glob("worker-*.pid"))
    return [stop_started(name, home)
            for name in (*services, "runner", *workers, prefect_server().name, mlflow_server().name)]
