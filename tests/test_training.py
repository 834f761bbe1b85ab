"""Fine-tuning methods through TRL + peft on the tiny model: each CPU method trains and yields a dense model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.datasets import TaskSpec, prepare_data
from tasks.models import META_FILE, load
from tasks.training import TrainSpec, require_device, train
from tests.conftest import DEMO_DATA


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    spec = TaskSpec("reviews", str(DEMO_DATA), "sys", ("Review: {{ review }}",), "{{ sentiment }}")
    out = tmp_path_factory.mktemp("data")
    return prepare_data.fn([spec], {"reviews": 1.0}, 0.1, 0.1, 13, str(out), "skip")["train"]


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_method_trains_and_writes_a_changed_dense_model(method, tiny_model, train_file, tmp_path):
    spec = TrainSpec(method=method, r=4, alpha=8, learning_rate=1e-2, max_steps=2, batch_size=2,
                     max_seq_length=64, lr_scheduler="linear", warmup_ratio=0.5, weight_decay=0.01)
    result = train.fn(tiny_model, train_file, str(tmp_path), spec)
    assert result["steps"] == 2 and result["train_loss"] > 0
    assert (result["adapter"] is None) == (method == "full")
    merged = Path(result["merged"])
    assert (merged / "model.safetensors").is_file()
    assert json.loads((merged / META_FILE).read_text())["source"] == f"{method}:tiny:0"
    tuned, _ = load(merged)
    base, _ = load(Path(tiny_model))
    assert not any("lora" in name for name, _ in tuned.named_parameters())  # merged, not an adapter
    changed = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert changed


def test_qlora_on_cpu_fails_before_any_work(tiny_model, train_file, tmp_path):
    with pytest.raises(RuntimeError, match="qlora needs a CUDA GPU"):
        require_device("qlora")
    with pytest.raises(RuntimeError, match="qlora needs a CUDA GPU"):
        train.fn(tiny_model, train_file, str(tmp_path / "out"), TrainSpec(method="qlora"))
    assert not (tmp_path / "out").exists()
