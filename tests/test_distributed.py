"""Distributed fine-tuning (tasks/distributed.py) on the CPU, for real: `accelerate launch` starts the ranks,
DDP talks over gloo, rank 0 alone logs and writes the weights; two "machines" are two network namespaces (the
kill and the two machines run in `make test-system`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

import tasks.training
from tasks.datasets import prepare_data
from tasks.distributed import accelerate_config, join
from tasks.models import META_FILE
from tasks.training import run_key, train
from tasks.training_config import DistributedConfig, FinetuneConfig
from tests.conftest import ROOT, SENTIMENT, killed_at_checkpoint

STEPS = 6
RUN = {"method": "full", "learning_rate": 1e-2, "max_steps": STEPS, "batch_size": 2, "max_seq_length": 64,
       "save_steps": None, "lr_scheduler": "linear", "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    return prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(tmp_path_factory.mktemp("data")), "skip").train


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.merged) / "model.safetensors")


def test_two_ddp_processes_match_one_process_accumulating_two(tiny_model, train_file, tmp_path, mlflow_sqlite,
                                                              monkeypatch):
    """Same global batch (2 ranks x 2 examples vs 1 process x 2 examples x 2 accumulation steps), same data order:
    the same loss at every step and the same weights. Both in fp32 (the launcher's precision choice reaches every
    rank), so what differs is the order of float sums alone: measured 5e-6 on weights that moved up to 0.035."""
    monkeypatch.setattr(tasks.training, "cpu_bf16", lambda: False)
    curves, results = {}, {}
    for name, spec in [("ddp", FinetuneConfig(**RUN, distributed=DistributedConfig(num_processes=2))),
                       ("single", FinetuneConfig(**RUN, gradient_accumulation_steps=2))]:
        with mlflow.start_run(run_name=name) as run:
            results[name] = train.fn(tiny_model, train_file, str(tmp_path / name), spec)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
        curves[name] = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]

    ddp, single = results["ddp"], results["single"]
    # rank 0 alone logged: one loss per step, not two
    assert [step for step, _ in curves["ddp"]] == list(range(1, STEPS + 1))
    assert [v for _, v in curves["ddp"]] == pytest.approx([v for _, v in curves["single"]], rel=1e-4)
    assert ddp.steps == single.steps == STEPS and not ddp.cached
    assert ddp.train_loss == pytest.approx(single.train_loss, rel=1e-4)
    assert ddp.tokens == single.tokens  # every rank's tokens counted
    a, b = _weights(ddp), _weights(single)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert json.loads((Path(ddp.merged) / META_FILE).read_text())["source"] == "full:tiny:0"  # the same artifact

    launched = Path(ddp.merged).parent / "launch"
    config = yaml.safe_load((launched / "accelerate-machine0.yaml").read_text())
    assert (config["num_processes"], config["num_machines"], config["mixed_precision"]) == (2, 1, "no")
    assert "rank 1 of 2" in (launched / "machine0.log").read_text()  # a second rank ran
    assert not (tmp_path / "ddp" / "checkpoints").exists()


@pytest.mark.system  # two launches of two ranks: ~50 s
def test_a_killed_distributed_run_resumes_from_its_last_checkpoint(tiny_model, train_file, tmp_path):
    """The lifecycle's process is killed mid-run: its ranks die with it (none keeps writing into the folder), and
    the next run's ranks resume from the last whole checkpoint."""
    out = tmp_path / "run"
    spec = dict(RUN, max_steps=400, save_steps=1, distributed={"num_processes": 2, "main_process_port": 29561})
    script = tmp_path / "train.py"
    script.write_text("from tasks.training import train\nfrom tasks.training_config import FinetuneConfig\n"
                      f"train.fn({tiny_model!r}, {train_file!r}, {str(out)!r}, FinetuneConfig(**{spec!r}))\n")
    saved = killed_at_checkpoint(script, out / "checkpoints")
    def ranks() -> str:
        return subprocess.run(["pgrep", "-f", str(out / "launch" / "job.json")], capture_output=True, text=True).stdout

    deadline = time.monotonic() + 20  # SIGTERM at the parent's death reaches the launcher, which stops its ranks
    while ranks().strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ranks().strip(), "ranks outlived the killed lifecycle"

    result = train.fn(tiny_model, train_file, str(out),
                      FinetuneConfig(**dict(spec, max_steps=saved + 2)))
    assert result.resumed_from == f"checkpoint-{saved}" and result.steps == saved + 2


def _namespaces(tag: str) -> tuple[str, str]:
    """Two network namespaces joined by a veth pair, its end named tl0 in both, at 10.77.0.1 and 10.77.0.2."""
    a, b = f"tl{tag}a", f"tl{tag}b"
    steps = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
             ["ip", "link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
             ["ip", "link", "set", f"v{tag}a", "netns", a], ["ip", "link", "set", f"v{tag}b", "netns", b],
             ["ip", "-n", a, "link", "set", f"v{tag}a", "name", "tl0"],
             ["ip", "-n", b, "link", "set", f"v{tag}b", "name", "tl0"],
             ["ip", "-n", a, "addr", "add", "10.77.0.1/24", "dev", "tl0"],
             ["ip", "-n", b, "addr", "add", "10.77.0.2/24", "dev", "tl0"]]
    steps += [["ip", "-n", ns, "link", "set", dev, "up"] for ns in (a, b) for dev in ("lo", "tl0")]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    return a, b


@pytest.mark.system  # root, namespaces, two launchers: ~40 s
def test_two_machines_train_together_over_a_network(tiny_model, train_file, tmp_path):
    """Machine 0 (namespace a) runs the fine-tuning, machine 1 (namespace b) joins it with `tuneline finetune-rank`;
    they meet at machine 0's address over the veth pair (machine 1 reaches nothing else) and write one model."""
    tag = str(os.getpid() % 10000)
    try:
        a, b = _namespaces(tag)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        subprocess.run(["ip", "netns", "del", f"tl{tag}a"], capture_output=True)
        pytest.skip(f"network namespaces cannot be made here (root and iproute2 needed): {exc}")
    out = tmp_path / "run"
    spec = dict(RUN, max_steps=4, distributed={"num_processes": 2, "num_machines": 2, "main_process_ip": "10.77.0.1",
                                                 "main_process_port": 29571, "network_interface": "tl0"})
    script = tmp_path / "machine0.py"
    script.write_text("from tasks.training import train\nfrom tasks.training_config import FinetuneConfig\n"
                      f"r = train.fn({tiny_model!r}, {train_file!r}, {str(out)!r}, FinetuneConfig(**{spec!r}))\n"
                      "print('steps', r.steps)\n")
    try:
        machine0 = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, str(script)], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        machine1 = subprocess.run(["ip", "netns", "exec", b, str(Path(sys.executable).parent / "tuneline"),
                                   "finetune-rank", str(out), "--machine-rank", "1", "--wait", "120"],
                                  capture_output=True, text=True, timeout=300)
        output, _ = machine0.communicate(timeout=300)
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert machine1.returncode == 0, machine1.stdout + machine1.stderr
    assert machine0.returncode == 0 and "steps 4" in output, output[-2000:]
    assert "machine 1's ranks finished" in machine1.stdout
    assert (out / "merged" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "launch" / "accelerate-machine1.yaml").read_text())["machine_rank"] == 1
    assert "rank 1 of 2" in (out / "launch" / "machine1.log").read_text()  # machine 1 ran the second rank


def test_distributed_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValidationError, match="multiple of num_machines"):
        DistributedConfig(num_processes=3, num_machines=2)
    with pytest.raises(ValidationError, match="machine_rank 2 must be below num_machines 2"):
        DistributedConfig(num_machines=2, machine_rank=2)
    with pytest.raises(ValidationError, match="not with search"):
        FinetuneConfig(distributed={}, search={"space": {"learning_rate": [1e-3, 1e-2]}})
    with pytest.raises(ValidationError, match="QLoRA's 4-bit base trains with ddp only"):
        FinetuneConfig(method="qlora", distributed={"strategy": "fsdp"})
    with pytest.raises(ValueError, match="needs GPUs; on a CPU use ddp"):
        accelerate_config(DistributedConfig(strategy="fsdp"), "cpu", False)
    assert accelerate_config(DistributedConfig(strategy="fsdp"), "cuda", True)["distributed_type"] == "FSDP"
    with pytest.raises(ValueError, match="machine 0 runs the lifecycle"):
        join(tmp_path, 0)
    with pytest.raises(TimeoutError, match="start the run on machine 0 first"):
        join(tmp_path, 1, wait_s=0)


def test_the_run_folder_is_named_by_what_trains_not_where_machines_meet(tiny_model, train_file):
    spec = FinetuneConfig(**RUN, distributed=DistributedConfig(num_processes=2))
    key = run_key(tiny_model, train_file, spec)
    moved = spec.model_copy(update={"distributed": spec.distributed.model_copy(
        update={"main_process_ip": "10.0.0.9", "main_process_port": 29999})})
    assert run_key(tiny_model, train_file, moved) == key  # a resumed run finds its checkpoints
    wider = spec.model_copy(update={"distributed": DistributedConfig(num_processes=4, num_machines=2)})
    assert run_key(tiny_model, train_file, wider) != key
    assert run_key(tiny_model, train_file, FinetuneConfig(**RUN)) != key
