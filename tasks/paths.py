"""Where local state lives: one folder ($TUNELINE_HOME, default .tuneline) holds the servers' databases, the
model store, Bentos, run folders and the feedback database; and the environment every process using it needs."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

# Every outbound lookup these libraries make unless told not to.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
}


def state_dir() -> Path:
    """The one folder that holds every piece of local state (servers, model store, bentos, runs)."""
    return Path(os.environ.get("TUNELINE_HOME", ".tuneline")).resolve()


def configure_env(home: Path | None = None) -> Path:
    """Telemetry off and BentoML's store under the state folder, for this process and all it starts."""
    home = home or state_dir()
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("BENTOML_HOME", str(home / "bentoml"))
    # Persisted task results (the cache of scores and cost measurements) live with the rest of the state.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "prefect" / "results"))
    return home


def run_folder(home: Path, config_name: str, label: str | None = None) -> Path:
    """A folder for one run of a config (its splits, lm-eval tasks, downloaded versions): a new one per run
    unless `label` names a lasting one."""
    return Path(home) / "runs" / config_name / (label or time.strftime("%Y%m%d-%H%M%S"))


def prune_run_folders(home: Path, config_name: str, keep: int) -> list[Path]:
    """Delete a config's run folders (splits, lm-eval tasks, downloaded versions' dense weights) but the newest
    `keep` (at least one: the run deploying now); folders with a lasting name (`feedback`) stay."""
    runs = sorted((p for p in (Path(home) / "runs" / config_name).glob("*")
                   if p.is_dir() and re.fullmatch(r"\d{8}-\d{6}", p.name)), reverse=True)
    for folder in runs[max(keep, 1):]:
        shutil.rmtree(folder, ignore_errors=True)
    return runs[max(keep, 1):]


def feedback_db(home: Path | None = None) -> Path:
    """Where the service records answers and feedback: $TUNELINE_FEEDBACK_DB, else feedback.db in the state
    folder. The service decides the same way on its own (it runs from its Bento, without this package)."""
    return Path(os.environ.get("TUNELINE_FEEDBACK_DB") or (home or state_dir()) / "feedback.db")


def vllm_python() -> Path:
    """The Python of the vLLM environment (deploy.engine vllm): $TUNELINE_VLLM_PYTHON, else the project's
    `.venv-vllm` (`make install-vllm`). vLLM pins transformers below the version tuneline trains with, so it
    lives in an environment of its own."""
    root = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("TUNELINE_VLLM_PYTHON") or root / ".venv-vllm" / "bin" / "python")


def vllm_missing(setting: str) -> str | None:
    """Why `setting` (deploy.engine or evaluation.engine) cannot run on vLLM here, in one line; None if it can."""
    python = vllm_python()
    if python.is_file():
        return None
    return f"{setting} vllm: no vLLM environment at {python}; run `make install-vllm` or set TUNELINE_VLLM_PYTHON"
