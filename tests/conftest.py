"""Shared fixtures: an isolated state folder, a real ephemeral Prefect, a real MLflow on SQLite, the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.schema import TaskConfig

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "reviews.jsonl"
# The demo reviews' sentiment as a one-word reply: the small task most unit tests split and score.
SENTIMENT = TaskConfig(name="reviews", data=str(DEMO_DATA), system_prompt="sys", prompt="Review: {{ review }}",
                       answer="{{ sentiment }}")


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """One state folder for the whole session (BentoML fixes its home on first use)."""
    path = tmp_path_factory.mktemp("tuneline-home")
    os.environ["TUNELINE_HOME"] = str(path)
    os.environ["BENTOML_HOME"] = str(path / "bentoml")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(path / "prefect-results")
    for key, value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "BENTOML_DO_NOT_TRACK": "true",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
        os.environ[key] = value
    return path


@pytest.fixture(scope="session")
def store(home) -> Path:
    return home / "models"


@pytest.fixture(scope="session")
def tiny_model(store) -> str:
    from tasks.models import provision

    return str(provision("tiny:0", store))


@pytest.fixture(scope="session")
def prefect_api(home):
    """A real Prefect API: the ephemeral server with a throwaway database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture()
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A real MLflow tracking store and registry on SQLite in a temp folder."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    # The process remembers the last experiment a test set; its id means nothing in this new store.
    mlflow.set_experiment("Default")
    yield uri
    mlflow.set_tracking_uri(None)

