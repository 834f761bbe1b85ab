"""What a registry version stores of its weights (a base reference, adapters on it, or dense weights) and the
dense model made again from it. LoRA and QLoRA versions and a chain of adapters are checked where they are
trained: tests/test_training.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from tasks import registry
from tasks.caching import digest
from tasks.models import META_FILE
from tasks.stored_weights import WeightsError
from tests.conftest import ROOT

NAME = "reviews-assistant"  # configs/demo.yaml's registered model: the CLI test exports through that config


@pytest.fixture
def experiment(mlflow_sqlite, tmp_path):
    mlflow.create_experiment("stored", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("stored")


def _register(folder: str | Path, **options) -> str:
    with mlflow.start_run() as run:
        return registry.register.fn(NAME, str(folder), run.info.run_id, {"exact_match": 0.5}, "exact_match",
                                    **options)


def _stored_files(version: str, tmp_path: Path) -> set[str]:
    """The files the registry holds for a version, as logged (not made dense)."""
    run_id = MlflowClient().get_model_version(NAME, version).run_id
    raw = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model",
                                                   dst_path=str(tmp_path / f"raw{version}")))
    return {str(f.relative_to(raw)) for f in raw.rglob("*") if f.is_file()}


def _snapshot(tiny_model: str, folder: Path) -> Path:
    """A private copy of the tiny model's store folder, which a test may change or delete."""
    shutil.copytree(tiny_model, folder)
    return folder


def test_a_prompt_system_stores_a_reference_to_its_base_and_downloads_its_very_weights(tiny_model, experiment,
                                                                                     tmp_path):
    version = _register(tiny_model)
    stored = _stored_files(version, tmp_path)
    assert "weights.json" in stored and "tokenizer.json" in stored and META_FILE in stored
    assert not [f for f in stored if f.endswith(".safetensors")]  # no copy of the base's weights
    tags = MlflowClient().get_model_version(NAME, version).tags
    assert tags[registry.STORED_TAG].startswith("a reference to tiny:0 (sha256 ")
    besides_weights = sum(f.stat().st_size for f in Path(tiny_model).iterdir() if f.suffix != ".safetensors")
    assert int(tags[registry.STORED_TAG + "_bytes"]) == besides_weights  # the tokenizer, config and metadata
    folder = registry.download(NAME, version, tmp_path / "dl")
    assert digest(folder / "model.safetensors") == digest(Path(tiny_model) / "model.safetensors")


def test_a_version_whose_base_changed_or_is_gone_is_refused_naming_the_base(tiny_model, experiment, tmp_path):
    base = _snapshot(tiny_model, tmp_path / "models" / "tiny-copy")
    version = _register(base)
    weights = load_file(base / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-3  # pulled again, and the source's weights had changed
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=rf"{NAME} v{version}: the base tiny:0 at .* is not the snapshot the "
                                           r"version was made from \(sha256 \w{12}, recorded \w{12}\)"):
        registry.download(NAME, version, tmp_path / "changed")
    shutil.rmtree(base)
    with pytest.raises(WeightsError, match=r"base tiny:0 is not in this model store .*: pull it first"):
        registry.download(NAME, version, tmp_path / "gone")


def test_a_rejected_full_fine_tune_keeps_its_scores_and_recipe_not_its_weights(tiny_model, experiment, tmp_path):
    merged = _snapshot(tiny_model, tmp_path / "run" / "merged")  # a full fine-tune: no adapter beside it
    meta = json.loads((merged / META_FILE).read_text())
    (merged / META_FILE).write_text(json.dumps({**meta, "source": "full:tiny:0", "base": tiny_model}))
    rejected = _register(merged, keep_dense=False)
    assert not [f for f in _stored_files(rejected, tmp_path) if f.endswith(".safetensors")]
    tags = MlflowClient().get_model_version(NAME, rejected).tags
    assert tags[registry.STORED_TAG].startswith("no weights (the gate rejected it")
    assert tags[registry.SCORE_TAG] == "0.500000"
    with pytest.raises(WeightsError, match=rf"{NAME} v{rejected}: it stores no weights: the gate rejected it"):
        registry.download(NAME, rejected, tmp_path / "dl")
    kept = _register(merged)  # one that passed the metric rules keeps its dense weights
    assert "model.safetensors" in _stored_files(kept, tmp_path)
    assert registry.stored(NAME, kept).startswith("dense weights, ")
    loaded = load_file(registry.download(NAME, kept, tmp_path / "kept") / "model.safetensors")
    assert all(torch.equal(t, load_file(merged / "model.safetensors")[k]) for k, t in loaded.items())


def test_cli_export_writes_the_dense_model_and_refuses_a_folder_in_use(tiny_model, experiment, tmp_path):
    version = _register(tiny_model)
    env = {**os.environ, "TUNELINE_HOME": str(tmp_path / "state")}
    out = tmp_path / "exported"
    command = [sys.executable, "-m", "flows.cli", "export", version, "--merged", str(out),
               "--config", str(ROOT / "configs" / "demo.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert f"{NAME} {version} (stored as a reference to tiny:0" in done.stdout
    assert digest(out / "model.safetensors") == digest(Path(tiny_model) / "model.safetensors")
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1] == f"error: --merged {out}: the folder is not empty; name a new one"
