"""`tuneline up --database postgresql://… --artifacts-destination s3://…`: the team's shared servers.

A private PostgreSQL 15 cluster (initdb in a temporary folder, on a free loopback port, a role that is not a
superuser) holds both servers' state; artifacts go to an S3-compatible server (moto's server mode: a stand-in for
S3, which cannot be reached from here). A lifecycle runs on the runner; both servers are then stopped and started
again, and the runs, the registry's versions and aliases, the artifacts and Prefect's history are all still there.
Neither the database password nor the S3 secret reaches `up`'s output, the logs, or a client's environment.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tasks.processes import free_port
from tests.conftest import reports_config
from tests.stack import running_stack

pytestmark = pytest.mark.system
PASSWORD, SECRET = "pg-pass-3f9c1a", "s3-secret-8d2e7b"
NAME, MODEL = "shared-demo", "shared-assistant"


def _postgres_bin() -> Path:
    found = shutil.which("postgres") or shutil.which("pg_ctl")
    if not found:
        pytest.skip("PostgreSQL is not installed (`postgres` is not on PATH)")
    return Path(os.path.realpath(found)).parent  # initdb sits beside the real binary, not on PATH


@pytest.fixture(scope="module")
def postgres() -> str:
    """A private cluster, stopped after. initdb refuses to run as root, so as root it runs as `postgres`."""
    bin_dir, port = _postgres_bin(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="tuneline-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    data = folder / "data"
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        # A team's role: may create databases, is no superuser (Prefect's pg_trgm must not need one).
        run(str(bin_dir / "psql"), "-h", str(folder), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
            "-c", f"CREATE ROLE tuneline LOGIN CREATEDB PASSWORD '{PASSWORD}'", "-c",
            "CREATE DATABASE tuneline OWNER tuneline")
        yield f"postgresql://tuneline:{PASSWORD}@127.0.0.1:{port}/tuneline"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """moto's S3 server on loopback (a stand-in for S3) with one bucket; the variables only a server may hold."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "tuneline-test",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="tuneline-test",
                     aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket="team-artifacts")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_lifecycle_on_postgresql_and_s3_survives_restarting_both_servers(postgres, s3, steady_tiny_model,
                                                                          tmp_path):
    import boto3

    from tasks.processes import recorded_pid, stop_started

    config = reports_config(tmp_path, NAME, steady_tiny_model, max_steps=20)
    config["registered_model"] = MODEL
    config["evaluation"]["general_limit"] = 40
    with running_stack(tmp_path, config, "--database", postgres, "--artifacts-destination",
                       "s3://team-artifacts/mlflow", env=s3) as stack:
        assert "state: PostgreSQL postgresql://tuneline:***@127.0.0.1:" in stack.up.stdout, stack.up.stdout
        run = stack.trigger(f"lifecycle/{NAME}", {"serve": False})
        assert run["state"]["type"] == "COMPLETED", stack.logs(run["id"])[-3000:]

        client = stack.mlflow_client()
        experiment = client.get_experiment_by_name(NAME).experiment_id
        runs = {r.info.run_id for r in client.search_runs([experiment])}
        [version] = client.search_model_versions(f"name = '{MODEL}'")
        client.set_registered_model_alias(MODEL, "reviewed", version.version)  # an alias a person set
        aliases = client.get_registered_model(MODEL).aliases
        [stage] = client.search_runs([experiment], "tags.`tuneline.stage` = 'evaluate'")
        report = {a.path for a in client.list_artifacts(stage.info.run_id, "report")}
        bucket = boto3.client("s3", endpoint_url=s3["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="tuneline-test",
                              aws_secret_access_key=SECRET, region_name="us-east-1")
        stored = [o["Key"] for o in bucket.list_objects_v2(Bucket="team-artifacts")["Contents"]]
        assert any(key.startswith("mlflow/") and key.endswith(".md") for key in stored), stored[:20]
        assert not (tmp_path / "mlflow" / "artifacts").exists() and not (tmp_path / "prefect" / "prefect.db").exists()

        # Secrets: the servers hold them, nobody else sees them.
        runner = recorded_pid("runner", tmp_path)
        client_env = Path(f"/proc/{runner}/environ").read_bytes().decode(errors="replace")
        assert PASSWORD not in client_env and SECRET not in client_env
        for log in (tmp_path / "logs").glob("*.log"):
            assert PASSWORD not in log.read_text(errors="replace"), log
        assert PASSWORD not in stack.up.stdout + stack.up.stderr

        for server in ("prefect", "mlflow"):
            assert "stopped" in stop_started(server, tmp_path)
        with pytest.raises(httpx.HTTPError):
            stack.api("GET", "/health")
        again = stack.tuneline("up", "--config", str(stack.config), "--database", postgres,
                               "--artifacts-destination", "s3://team-artifacts/mlflow")
        assert again.returncode == 0 and "prefect: started" in again.stdout and "mlflow: started" in again.stdout, \
            again.stdout + again.stderr

        client = stack.mlflow_client()
        assert {r.info.run_id for r in client.search_runs([experiment])} == runs
        assert client.get_model_version(MODEL, version.version).tags == version.tags
        assert client.get_registered_model(MODEL).aliases == aliases
        assert {a.path for a in client.list_artifacts(stage.info.run_id, "report")} == report
        card = Path(client.download_artifacts(stage.info.run_id, sorted(report)[0], str(tmp_path / "fetched")))
        assert card.stat().st_size > 0  # read back from S3 through the restarted server
        history = stack.api("GET", f"/flow_runs/{run['id']}").json()
        assert history["state"]["type"] == "COMPLETED"
        assert stack.api("GET", f"/deployments/name/lifecycle/{NAME}").json()["status"] == "READY"

