"""Shared fixtures: an isolated state folder, a real ephemeral Prefect, a real MLflow on SQLite, the tiny model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from tasks.schema import TaskConfig

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "reviews.jsonl"
# The demo reviews' sentiment as a one-word reply: the small task most unit tests split and score.
SENTIMENT = TaskConfig(name="reviews", data=str(DEMO_DATA), system_prompt="sys", prompt="Review: {{ review }}",
                       answer="{{ sentiment }}")


def varied_tiny(folder: Path, store: Path) -> str:
    """The tiny model with one attention head of 64 (vLLM's CPU attention runs no smaller head), its matrices
    drawn wide enough that greedy replies vary from token to token (at the usual scale a random model repeats
    one token, and any engine would "agree")."""
    from tasks.models import build_tiny, load

    build_tiny(folder, store=store, head_size=64)
    model, tokenizer = load(folder)
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for weights in model.parameters():
            if weights.dim() == 2:
                weights.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def lora_run(base_dir: str | Path, folder: Path, seed: int = 1) -> Path:
    """A LoRA training run's folder as fine-tuning leaves it (adapter/ beside merged/, the merged folder naming its
    base), with an adapter drawn at random wide enough that the merged model answers unlike its base. The base
    gets the model store's metadata it lacks. Returns the merged folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.models import META_FILE, load

    base_dir = Path(base_dir)
    if not (base_dir / META_FILE).is_file():
        (base_dir / META_FILE).write_text(json.dumps({"source": f"path:{base_dir}"}))
    model, tokenizer = load(base_dir)
    tuned = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weights in tuned.named_parameters():
            if "lora_B" in name:
                weights.normal_(0, 0.3)
    tuned.save_pretrained(folder / "adapter")
    merged = folder / "merged"
    tuned.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    tokenizer.save_pretrained(merged)
    (merged / META_FILE).write_text(json.dumps({"source": f"lora:path:{base_dir}", "base": str(base_dir)}))
    return merged


# The files that take longest, longest first (measured on 2 cores): the workers start on them and the short
# files fill in the ends, so neither worker is left with a long file at the end of the run.
LONGEST = ("test_deployments.py", "test_shared_servers.py",  # system tests only: make test-system's longest
           "test_search.py", "test_training.py", "test_registry.py", "test_chat_template.py", "test_stage_flows.py",
           "test_alignment.py", "test_systems.py", "test_packaging.py", "test_service.py", "test_baseline.py",
           "test_selection.py", "test_distributed.py", "test_infra.py", "test_config.py", "test_stored_weights.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST.index(item.path.name) if item.path.name in LONGEST else len(LONGEST))


def killed_at_checkpoint(script: Path, checkpoints: Path, at: int = 3) -> int:
    """Run `script` (a training process) and SIGKILL it once a checkpoint of step `at` or later is whole, possibly
    in the middle of writing the next one; returns the last whole checkpoint's step."""
    import subprocess
    import sys
    import time

    from tasks.training import last_complete_checkpoint

    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "training ended before it could be killed"
            last = last_complete_checkpoint(checkpoints)
            if last and int(last.rsplit("-", 1)[1]) >= at:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    return int(last_complete_checkpoint(checkpoints).rsplit("-", 1)[1])


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
def steady_tiny_model(tiny_model, store) -> str:
    """The tiny model with its own output layer, started at zero, for tests that keep the gate's default rules.

    The random tiny model ties its output layer to its input embeddings, so Adam moves every token's row at
    every step and its general-suite answers (random ties between choices) flip under any training: on a model
    with nothing to forget, the forgetting bound read 0.092 (drop 0.055) after the lifecycle test's training.
    With a separate output layer at zero, every token it is never taught keeps exactly the same logit as the
    others (their rows start equal and get equal updates), so a general item's answer moves only where training
    touches its tokens. It still learns a task: the head learns from the first step, the layers below from the
    second."""
    import torch

    from tasks.models import load

    folder = store / "steady-tiny"
    if not (folder / "config.json").is_file():
        model, tok = load(Path(tiny_model))
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.model.embed_tokens.weight))
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        assert not load(folder)[0].lm_head.weight.any(), "the output layer must reload untied, at zero"
    return str(folder)


NOUNS = ["kettle", "lamp", "chair", "phone", "bag", "shoe", "mug", "clock", "desk", "pen", "book", "fan"]


def reports_config(folder: Path, name: str, model: str, **finetune) -> dict:
    """The shipped demo config with its gate rules untouched, on a task the steady tiny model learns: short
    reports whose answer has a fixed form ("label: yes/no"), answered by none before training and learned (the
    form, and the majority label at least) in 40 steps of full fine-tuning; scored on all general items."""
    rng = random.Random(0)
    rows = [{"text": f"The {rng.choice(NOUNS)} is {'great' if good else 'broken'} ({i})",
             "label": "yes" if good else "no"} for i, good in enumerate(rng.random() < 0.5 for _ in range(400))]
    data = folder / "reports.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo.update(name=name, registered_model=f"{name}-model")
    demo["data"].update(validation=0.1, test=0.15, on_bad_rows="error")
    demo["task"] = {"name": "reports", "data": str(data), "system_prompt": "", "prompt": "{{ text }}",
                    "answer": "label: {{ label }}", "max_validation_examples": 8, "max_test_examples": 48,
                    "max_answer_tokens": 6}
    demo["models"]["candidates"] = [f"path:{model}"]
    demo["baseline"].update(shots=[0], chain_of_thought=False, retrieval_shots=0, without_chat_template=False)
    demo["finetune"].update({"method": "full", "learning_rate": 1e-2, "max_steps": 40, "batch_size": 8,
                             "max_seq_length": 64, "save_steps": None, **finetune})
    demo["evaluation"].update(general_limit=None, batch_size=16)
    return demo


@pytest.fixture(scope="session")
def prefect_api(home):
    """A real Prefect API: the ephemeral server with a throwaway database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory) -> Path:
    """An empty MLflow database with its schema made once: creating one runs MLflow's forty-odd migrations, 3 to
    7 s on 2 cores, and some thirty tests each need a fresh store."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{path}")
    mlflow.search_experiments()
    mlflow.set_tracking_uri(None)
    return path


@pytest.fixture()
def mlflow_sqlite(mlflow_schema, tmp_path, monkeypatch) -> str:
    """A real MLflow tracking store and registry on SQLite in a temp folder (a copy of the empty schema)."""
    import shutil

    import mlflow

    shutil.copyfile(mlflow_schema, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    # The process remembers the last experiment a test set; its id means nothing in this new store. The store's
    # "Default" experiment keeps its artifacts in the working folder's ./mlruns, so runs a test logs outside an
    # experiment of ours go to one whose artifacts stay in the temp folder.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "tests", artifact_location=(tmp_path / "mlflow-artifacts").as_uri()))
    yield uri
    mlflow.set_tracking_uri(None)

