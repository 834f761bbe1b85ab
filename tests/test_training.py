"""Fine-tuning methods through TRL + peft on the tiny model: each CPU method trains and yields a dense model."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch

from tasks.datasets import prepare_data, read_examples
from tasks.models import META_FILE, load
from tasks.training import (
    cpu_bf16,
    device_settings,
    gemm_turns,
    measured_step_seconds,
    native_bf16,
    prefer_bf16,
    qlora_quantization,
    sft_trainer,
    train,
)
from tasks.training_config import FinetuneConfig, LoraConfig
from tests.conftest import ROOT, SENTIMENT, killed_at_checkpoint

SMALL = LoraConfig(r=4, alpha=8)  # enough rank for the tiny model


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data")
    return prepare_data.fn([SENTIMENT], 0.1, 0.1, 13, str(out), "skip").train


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_method_trains_and_writes_a_changed_dense_model(method, tiny_model, train_file, tmp_path):
    spec = FinetuneConfig(method=method, lora=SMALL, learning_rate=1e-2, max_steps=2, batch_size=2,
                     max_seq_length=64, lr_scheduler="linear", warmup_ratio=0.5, weight_decay=0.01)
    result = train.fn(tiny_model, train_file, str(tmp_path), spec)
    assert result.steps == 2 and result.train_loss > 0
    assert result.tokens_per_second > 0 and result.peak_memory_mb > 0
    assert (result.adapter is None) == (method == "full")
    merged = Path(result.merged)
    assert (merged / "model.safetensors").is_file()
    assert json.loads((merged / META_FILE).read_text())["source"] == f"{method}:tiny:0"
    # the next run's time estimate rests on this run's step time, for the same method and examples per step only
    assert measured_step_seconds(tmp_path, tiny_model, spec) == pytest.approx(result.train_seconds / 2)
    assert measured_step_seconds(tmp_path, tiny_model, spec.model_copy(update={"batch_size": 4})) is None
    tuned, _ = load(merged)
    base, _ = load(Path(tiny_model))
    assert not any("lora" in name for name, _ in tuned.named_parameters())  # merged, not an adapter
    changed = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert changed


def test_packing_puts_several_examples_in_a_sequence_without_padding_and_trains(tiny_model, train_file, tmp_path):
    def first_batches(packing: bool) -> list[dict]:
        model, tokenizer = load(Path(tiny_model))
        spec = FinetuneConfig(lora=SMALL, max_steps=2, batch_size=2, max_seq_length=128, packing=packing)
        loader = iter(sft_trainer(model, tokenizer, spec, train_file, None, tmp_path / str(packing), "cpu")
                      .get_train_dataloader())
        return [next(loader) for _ in range(3)]

    def padding(batch: dict) -> int:
        return int((batch["attention_mask"] == 0).sum()) if "attention_mask" in batch else 0

    plain, packed = first_batches(False), first_batches(True)
    assert all(b["input_ids"].shape[0] == 2 for b in plain)  # one example per row
    assert sum(padding(b) for b in plain) > 0
    # packed: each batch is one padding-free row of 2 sequences of up to 128 tokens; an example starts wherever
    # the position ids restart at 0
    examples = [int((b["position_ids"] == 0).sum()) for b in packed]
    assert all(n > 2 for n in examples), examples  # more than one example per packed sequence
    assert sum(padding(b) for b in packed) == 0
    assert sum(b["input_ids"].numel() for b in packed) > sum(b["input_ids"].numel() for b in plain)

    result = train.fn(tiny_model, train_file, str(tmp_path / "run"), FinetuneConfig(lora=SMALL, max_steps=2,
                                                                               batch_size=2, max_seq_length=128,
                                                                               packing=True))
    assert result.steps == 2 and result.tokens_per_second > 0


def test_peak_memory_is_the_trainings_own_not_the_processs_earlier_peak(tiny_model, train_file, tmp_path):
    ballast = b"x" * (1 << 30)  # 1 GiB written, then freed: an earlier stage's peak in the same process
    del ballast
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spec = FinetuneConfig(lora=SMALL, max_steps=1, batch_size=2, max_seq_length=64, save_steps=None)
    result = train.fn(tiny_model, train_file, str(tmp_path), spec)
    assert 0 < result.peak_memory_mb < lifetime - 512, (result.peak_memory_mb, lifetime)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_registered_model_reloads_with_identical_outputs(method, tiny_model, train_file, tmp_path, mlflow_sqlite):
    """A PEFT model logged over a local base folder reloads with reinitialised base weights (MLflow 3.17); the
    merged folder must round-trip exactly. QLoRA trains for real here, on the CPU: bitsandbytes' NF4 base with
    fp32 compute, the adapter merged into the dense base."""
    import mlflow
    from mlflow import MlflowClient

    from tasks import registry

    result = train.fn(tiny_model, train_file, str(tmp_path / "run"),
                      FinetuneConfig(method=method, lora=SMALL, learning_rate=1e-2, max_steps=2, batch_size=2,
                                     max_seq_length=64))
    assert result.base_weights == ("nf4 4-bit" if method == "qlora" else "torch.float32")
    assert result.steps == 2 and result.train_loss > 0
    mlflow.create_experiment("rt", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("rt")
    with mlflow.start_run() as run:
        version = registry.register.fn("round-trip", result.merged, run.info.run_id, {"exact_match": 0.0},
                                       "exact_match")
    # The registry holds the adapter and a reference to the base, not a dense copy; the download merges them
    # again exactly as training did.
    stored = MlflowClient().get_model_version("round-trip", version).tags[registry.STORED_TAG]
    assert stored.startswith("1 adapter on tiny:0 (sha256 "), stored
    logged = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model")]
    assert "model/model.safetensors" not in logged and "model/adapters" in logged
    trained, tok = load(Path(result.merged))
    reloaded, _ = load(registry.download("round-trip", version, tmp_path / "dl"))
    ids = tok(["The kettle leaks.", "Great shoes, would buy again"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(trained(**ids).logits, reloaded(**ids).logits)
    base, _ = load(Path(tiny_model))
    assert not any("lora" in name for name, _ in trained.named_parameters())  # dense, the adapter merged in
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))


def test_a_cpu_trains_in_bf16_only_where_it_has_the_instructions_and_they_are_faster():
    flags = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f {}\n"
    assert native_bf16(flags.format("avx512_bf16")) and native_bf16(flags.format("amx_bf16 amx_tile"))
    assert not native_bf16(flags.format("avx512_vnni"))
    assert prefer_bf16(True, fp32_gflops=212, bf16_gflops=908)  # measured on an AMD EPYC with avx512_bf16
    assert not prefer_bf16(True, fp32_gflops=331, bf16_gflops=167)  # an Intel Xeon with the same flag
    assert not prefer_bf16(False, fp32_gflops=1, bf16_gflops=900)  # a reading without the instructions
    here = device_settings("cpu")
    # timed only where the instructions exist: without them bf16 products are emulated, 50 s of them here
    expected = native_bf16() and prefer_bf16(True, *gemm_turns())
    assert here["bf16"] == expected and not here["activation_checkpointing"] and here["use_cpu"]


def test_qlora_loads_its_base_in_4bit_nf4_computing_in_bf16_on_cuda_and_fp32_on_a_cpu():
    """The CUDA settings are checked here too (a lost `load_in_4bit` once made "qlora" train an unquantised
    bf16 model)."""
    for device, compute in (("cuda", torch.bfloat16), ("cpu", torch.bfloat16 if cpu_bf16() else torch.float32)):
        quant = qlora_quantization(device)
        assert quant.load_in_4bit and not quant.load_in_8bit
        assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("nf4", True)
        assert quant.bnb_4bit_compute_dtype == compute


def test_qlora_holds_its_base_weights_as_nf4_in_an_eighth_of_fp32s_memory(tiny_model):
    """The weights themselves, not the config asked for: every linear layer of the decoder is bitsandbytes'
    4-bit NF4, packed two weights a byte."""
    import bitsandbytes as bnb

    from tasks.training import _load_for

    quantized, _ = _load_for("qlora", Path(tiny_model), "cpu")
    dense, _ = _load_for("lora", Path(tiny_model), "cpu")
    packed = [m for m in quantized.model.layers.modules() if isinstance(m, bnb.nn.Linear4bit)]
    full = [m for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert packed and len(packed) == len(full)
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in packed)
    assert 8 * sum(m.weight.numel() * m.weight.element_size() for m in packed) == \
        sum(m.weight.numel() * m.weight.element_size() for m in full)


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model, train_file, tmp_path):
    """A real training process is killed mid-way; the next run resumes, losing no checkpointed step."""
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "from tasks.training import train\n"
        "from tasks.training_config import FinetuneConfig\n"
        f"train.fn({tiny_model!r}, {train_file!r}, {str(out)!r}, FinetuneConfig(lora={{'r': 4, 'alpha': 8}}, "
        "max_steps=400, batch_size=2, max_seq_length=64, save_steps=1))\n"
    )
    saved = killed_at_checkpoint(script, out / "checkpoints")
    assert 3 <= saved < 400

    spec = FinetuneConfig(lora=SMALL, max_steps=saved + 2, batch_size=2, max_seq_length=64, save_steps=1)
    result = train.fn(tiny_model, train_file, str(out), spec)
    assert result.resumed_from == f"checkpoint-{saved}"
    assert result.steps == saved + 2
    assert 0 < result.tokens <= 2 * 2 * 64  # this segment's 2 steps only: tokens/s is not inflated
    assert not (out / "checkpoints").exists()

    again = train.fn(tiny_model, train_file, str(out), spec)  # finished with these inputs: reused, not redone
    assert again.cached and again.merged == result.merged


def test_early_stopping_ends_a_diverging_run_and_keeps_the_best(tiny_model, train_file, tmp_path):
    val = str(Path(train_file).with_name("validation.jsonl"))
    spec = FinetuneConfig(lora=SMALL, learning_rate=5.0, max_steps=30, batch_size=2, max_seq_length=64,
                     save_steps=1, early_stopping_patience=1, lr_scheduler="constant", warmup_ratio=0.0)
    result = train.fn(tiny_model, train_file, str(tmp_path), spec, val)
    assert result.steps < 30 and result.best_eval_loss is not None
    with pytest.raises(ValueError, match="early stopping needs a validation file"):
        train.fn(tiny_model, train_file, str(tmp_path / "x"),
                 FinetuneConfig(early_stopping_patience=1, save_steps=None), val)


def test_sequential_stages_chain_weights(tiny_model, prefect_api, mlflow_sqlite, tmp_path):
    """Two stages: tickets, then reviews from the tickets stage's weights."""
    import mlflow

    from flows.config import FinetuneStage, load_config
    from flows.finetune import finetune_stage
    from tasks.models import model_info

    config = load_config(ROOT / "configs" / "multitask.yaml")
    config.finetune.max_steps, config.finetune.batch_size, config.finetune.max_seq_length = 2, 2, 96
    config.finetune.stages = [FinetuneStage(task="tickets"), FinetuneStage(task="reviews", max_steps=3)]
    splits = prepare_data.fn([config.task, *config.extra_tasks], 0.1, 0.1, 13, str(tmp_path / "d"), "skip")
    mlflow.create_experiment("seq", artifact_location=(tmp_path / "a").as_uri())
    mlflow.set_experiment("seq")
    with mlflow.start_run() as parent:
        result = finetune_stage(config, tiny_model, splits, str(tmp_path / "runs"), parent.info.run_id)
    assert result.steps == 3
    assert model_info(Path(result.merged))["source"] == "lora:lora:tiny:0"
    metrics = mlflow.get_run(result.run_id).data.metrics
    assert {"stage0_train_loss", "stage1_train_loss"} <= set(metrics)
    # Registered, the reviews stage's weights are two adapters on the base, merged again in order exactly.
    from tasks import registry

    with mlflow.start_run() as run:
        version = registry.register.fn("seq", result.merged, run.info.run_id, {}, "exact_match")
    assert registry.stored("seq", version).startswith("2 adapters on tiny:0 (sha256 ")
    trained, tok = load(Path(result.merged))
    reloaded, _ = load(registry.download("seq", version, tmp_path / "dl"))
    ids = tok(["The kettle leaks."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(trained(**ids).logits, reloaded(**ids).logits)

    # Without stages: one multi-task run on the weighted mixture of both tasks' training data.
    config.finetune.stages = []
    with mlflow.start_run() as parent:
        mixed = finetune_stage(config, tiny_model, splits, str(tmp_path / "runs"), parent.info.run_id)
    assert mixed.steps == 2 and model_info(Path(mixed.merged))["source"] == "lora:tiny:0"
    assert {e.task for e in read_examples(splits.train)} == {"reviews", "tickets"}


def test_run_key_changes_with_the_data_the_settings_and_the_library_versions(tiny_model, train_file, monkeypatch):
    """The training folder a run resumes into is named by everything that shapes its weights."""
    from tasks import caching, training

    spec = FinetuneConfig(method="lora", lora=SMALL, max_steps=2)
    here = training.run_key(tiny_model, train_file, spec)
    assert training.run_key(tiny_model, train_file, spec) == here
    assert training.run_key(tiny_model, train_file, spec.model_copy(update={"max_steps": 3})) != here
    newer = {**caching.library_versions(), "trl": "99.0"}
    monkeypatch.setattr(training, "library_versions", lambda: newer)
    assert training.run_key(tiny_model, train_file, spec) != here
