"""Supervised fine-tuning through TRL + peft: the loss is on the assistant's reply only, rendered with the
same chat template (and the same system prompt) that evaluation and serving use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import mlflow
import torch
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from prefect import task
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, EarlyStoppingCallback
from trl import SFTConfig, SFTTrainer

from tasks.caching import library_versions
from tasks.datasets import Example, chat_messages, read_examples
from tasks.distributed import launch
from tasks.models import META_FILE, load, load_tokenizer, model_info
from tasks.training_config import FinetuneConfig


def conversational(examples: list[Example]) -> Dataset:
    """TRL's prompt/completion form: it renders both with the chat template and trains on the completion."""
    rows = []
    for e in examples:
        *prompt, completion = chat_messages(e, with_answer=True)
        rows.append({"prompt": prompt, "completion": [completion]})
    return Dataset.from_list(rows)


def run_key(base_dir: str, train_path: str, spec: BaseModel) -> str:
    """Names a run by its inputs (`spec`: the finetune or align settings): the same base, data, settings and
    library versions resume (or reuse) the same folder; an upgraded TRL or transformers trains anew, as the score
    cache scores anew."""
    digest = hashlib.sha256()
    digest.update(Path(base_dir, META_FILE).read_bytes())
    digest.update(Path(base_dir).resolve().as_posix().encode())
    digest.update(Path(train_path).read_bytes())
    # Where a run executes (its work pool, where a distributed run's machines meet) does not change what it
    # trains: a moved machine 0 resumes.
    where = {"machine_rank", "main_process_ip", "main_process_port", "network_interface"}
    exclude = {"stages": True, "work_pool": True,
               "distributed": True if getattr(spec, "distributed", None) is None else where}
    digest.update(spec.model_dump_json(exclude=exclude).encode())
    digest.update(json.dumps(library_versions(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def measured_step_seconds(runs_dir: str | Path, base_dir: str, spec: FinetuneConfig) -> float | None:
    """Seconds per step of the latest run trained here from `base_dir` with the same method and examples per
    step (its result.json), or None: what the data card's estimate of the next run's time rests on."""
    found = []
    for path in Path(runs_dir).rglob(TrainResult.RESULT_FILE):
        result = json.loads(path.read_text())
        meta = Path(result.get("merged", "")) / META_FILE
        if result.get("examples_per_step") != spec.batch_size * spec.gradient_accumulation_steps \
                or result.get("method") != spec.method or not result.get("steps") or not meta.is_file():
            continue
        if json.loads(meta.read_text()).get("base") == str(Path(base_dir)):
            found.append((path.stat().st_mtime, result["train_seconds"] / result["steps"]))
    return max(found)[1] if found else None


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's resident high-water mark
    (writing 5 to /proc/self/clear_refs resets VmHWM), so the peak read afterwards is the training's alone,
    not the lifecycle's evaluation before it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the process's lifetime peak below is all there is
        pass


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA; on a CPU the process's peak resident memory since the last reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resolve_device(device: str) -> str:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.device is cuda, but no CUDA device is available here")
    return device


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX); without them bf16 is emulated, far slower."""
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def gemm_gflops(dtype: torch.dtype, device: str = "cpu", size: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of one size x size matrix product in `dtype` on `device`, the best of `repeats` after a warm-up."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


# bf16 autocast casts weights and activations on every step, so its matrix products must be clearly faster.
BF16_MARGIN = 1.5


def prefer_bf16(has_bf16_instructions: bool, fp32_gflops: float, bf16_gflops: float) -> bool:
    """bf16 on a CPU only where it has the instructions and they pay: an AMD EPYC with avx512_bf16 measured
    908 vs 212 GFLOP/s (bf16 vs fp32 GEMM), but an Intel Xeon with the same flag 167 vs 331."""
    return has_bf16_instructions and bf16_gflops >= BF16_MARGIN * fp32_gflops


def gemm_turns(turns: int = 8) -> tuple[float, float]:
    """The best fp32 and bf16 GFLOP/s of `turns` 1024² products each, timed in alternation: load from another
    process (a tracking server writing, a second test worker) then weighs on both dtypes, not on one. Timed
    one dtype after the other, best of 3, a 2-core EPYC whose bf16 runs 2.5x its fp32 read below the margin
    in two lifecycle runs out of two and trained them in fp32."""
    best = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for _ in range(turns):
        for dtype in best:
            best[dtype] = max(best[dtype], gemm_gflops(dtype, repeats=1))
    return best[torch.float32], best[torch.bfloat16]


@functools.cache
def cpu_bf16() -> bool:
    """This CPU's choice, timed once per process (~0.3 s, and only on a CPU with bf16 instructions)."""
    return native_bf16() and prefer_bf16(True, *gemm_turns())


def device_settings(device: str) -> dict:
    """SFTConfig defaults to bf16 and activation checkpointing even on a CPU: 17x slower on a CPU without
    native bf16. bf16 where it is faster; checkpointing on CUDA only (a CPU has the memory to spare)."""
    if device == "cuda":
        return {"bf16": torch.cuda.is_bf16_supported(), "activation_checkpointing": True, "use_cpu": False}
    return {"bf16": cpu_bf16(), "activation_checkpointing": False, "use_cpu": True}


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint a killed run left whole.

    Written by hand because transformers' get_last_checkpoint takes the highest-numbered folder even when
    the process died while writing it; the Trainer writes trainer_state.json last, so its presence marks a
    complete checkpoint.
    """
    complete = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def qlora_quantization(device: str = "cuda") -> BitsAndBytesConfig:
    """QLoRA's base weights: 4-bit NF4 with double quantisation, computing in bf16 on CUDA and on a CPU where
    bf16 was measured faster (`cpu_bf16`), else in fp32 (bitsandbytes' CPU 4-bit path)."""
    compute = torch.bfloat16 if device == "cuda" or cpu_bf16() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _load_for(method: str, base_dir: Path, device: str):
    if method != "qlora":
        # On a GPU, LoRA and DoRA train on a bf16 copy of the frozen base (peft keeps the adapter in fp32): half
        # the memory, and no fp32-to-bf16 cast of every weight on every pass under autocast. Full fine-tuning keeps
        # fp32 master weights; a CPU keeps fp32 weights (autocast where bf16 pays).
        frozen_bf16 = device == "cuda" and method != "full" and torch.cuda.is_bf16_supported()
        return load(base_dir, device=device, attention="sdpa" if device == "cuda" else None,
                    dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    from peft import prepare_model_for_kbit_training

    quantization = qlora_quantization(device)
    placement = {"": torch.cuda.current_device()} if device == "cuda" else "cpu"  # a distributed rank: its own GPU
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization,
                                                 dtype=quantization.bnb_4bit_compute_dtype, use_safetensors=True,
                                                 device_map=placement,
                                                 attn_implementation="sdpa")
    # activation checkpointing only where device_settings turns it on: a CPU has the memory to spare
    return (prepare_model_for_kbit_training(model, use_gradient_checkpointing=device == "cuda"),
            load_tokenizer(base_dir))


def _merged(trainer: SFTTrainer, spec: FinetuneConfig, base_dir: Path, adapter_dir: Path, base_dtype: str):
    """Dense weights to register: the adapter merged into the fp32 base, whatever precision the base trained in
    (`base_dtype`), so a version's weights do not depend on the device that trained it."""
    if spec.method == "full":
        return trainer.model
    if base_dtype != str(torch.float32):  # merging into 4-bit or bf16 weights would round them: reload densely
        base, _ = load(base_dir)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return trainer.model.merge_and_unload()


@dataclass(frozen=True)
class TrainResult:
    """One training run's summary, fine-tuning's or preference tuning's: written last into its folder as
    result.json (its presence marks the run complete), read back when the same inputs run again (`cached`)."""
    merged: str  # the dense weights (safetensors) to evaluate and register
    adapter: str | None  # the LoRA adapter, None for full fine-tuning
    method: str
    steps: int
    train_loss: float
    train_seconds: float
    tokens: float  # trained on in this process (a resumed run: since its checkpoint)
    tokens_per_second: float
    peak_memory_mb: float
    resumed_from: str | None = None  # the checkpoint a killed run resumed from
    examples_per_step: int = 0
    best_eval_loss: float | None = None
    eval_loss: float | None = None  # the validation loss of the trained weights (None unless asked)
    base_weights: str = ""
    rewards: dict[str, float] = field(default_factory=dict)  # preference tuning: TRL's last logged rewards
    cached: bool = False

    RESULT_FILE = "result.json"

    def save(self, folder: Path) -> TrainResult:
        (folder / self.RESULT_FILE).write_text(json.dumps({k: v for k, v in asdict(self).items() if k != "cached"},
                                                          indent=2))
        return self

    @classmethod
    def load(cls, folder: Path) -> TrainResult | None:
        """The finished run in `folder`, or None. Keys this version does not know (a summary written by another
        version of tuneline) are left out."""
        path = folder / cls.RESULT_FILE
        if not path.is_file():
            return None
        known = {f.name for f in fields(cls)} - {"cached"}
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known}, cached=True)


@dataclass(frozen=True)
class FineTuned:
    """What fine-tuning hands on: the merged weights (dense, safetensors) and the MLflow run that made them."""
    merged: str
    run_id: str
    steps: int
    train_loss: float
    train_seconds: float
    tokens_per_second: float


def run_arguments(spec, checkpoints: Path) -> dict:
    """The trainer arguments fine-tuning (FinetuneConfig) and preference tuning (AlignConfig) set alike: the
    schedule, the batch, the length, checkpoints, the seed, and curves into the active MLflow run (with none,
    no stray run is made)."""
    return {
        "output_dir": str(checkpoints),
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": spec.lr_scheduler,
        "warmup_steps": spec.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the total steps
        "max_steps": spec.max_steps or -1,
        "num_train_epochs": spec.epochs,
        "per_device_train_batch_size": spec.batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "max_length": spec.max_seq_length,
        "logging_steps": max(1, (spec.max_steps or 100) // 20),
        "save_strategy": "steps" if spec.save_steps else "no",
        "save_steps": spec.save_steps or 500,
        "save_total_limit": 2,
        "seed": spec.seed,
        "report_to": ["mlflow"] if mlflow.active_run() else [],
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,  # a distributed run: every trained weight is used each step
    }


def sft_trainer(model, tokenizer, spec: FinetuneConfig, train_path: str, val_path: str | None, checkpoints: Path,
                device: str, callbacks: list | None = None, eval_every: int | None = None,
                settings: dict | None = None) -> SFTTrainer:
    """TRL's SFTTrainer for `spec`: completion-only loss, the device's precision settings (`settings`, else
    this process's `device_settings`), packing, LoRA/DoRA through peft unless the method is full fine-tuning,
    early stopping on the validation loss when asked. `eval_every`: also compute the validation loss every so
    many steps (a search trial reports it)."""
    early = bool(spec.early_stopping_patience)
    evaluating = early or bool(eval_every)
    args = SFTConfig(
        **run_arguments(spec, checkpoints),
        weight_decay=spec.weight_decay,
        completion_only_loss=True,
        packing=spec.packing,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=spec.save_steps if early else eval_every,
        per_device_eval_batch_size=spec.batch_size,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        **(settings or device_settings(device)),
    )
    peft_config = None if spec.method == "full" else PeftLoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        use_dora=spec.method == "dora", task_type="CAUSAL_LM",
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=conversational(read_examples(train_path)),
        eval_dataset=conversational(read_examples(val_path)) if evaluating else None,
        processing_class=tokenizer, peft_config=peft_config,
        callbacks=([EarlyStoppingCallback(spec.early_stopping_patience)] if early else []) + list(callbacks or []),
    )


@task(name="train", log_prints=False)  # dill prints bytecode while datasets hashes a function
def train(base_dir: str, train_path: str, out_dir: str, spec: FinetuneConfig, val_path: str | None = None,
          callbacks: list | None = None, eval_every: int | None = None) -> TrainResult:
    """SFT of `base_dir` on the chat examples in `train_path`; writes the adapter (if any) and the merged model.
    With `eval_every` (a search trial) the validation loss is computed every so many steps, for `callbacks`,
    and once more at the end (`eval_loss`). With `spec.distributed` the ranks train in processes of their own
    (tasks/distributed.py), all with the precision chosen here."""
    if spec.early_stopping_patience and not (val_path and spec.save_steps):
        raise ValueError("early stopping needs a validation file and save_steps (the evaluation interval)")
    if eval_every and not val_path:
        raise ValueError("eval_every needs a validation file")
    out = Path(out_dir)
    if done := TrainResult.load(out):  # finished before with these inputs: nothing to redo
        return done
    if not spec.distributed:
        return fit(base_dir, train_path, out_dir, spec, val_path, callbacks, eval_every)
    if callbacks or eval_every:
        raise ValueError("a distributed run takes no callbacks (a search trial trains in one process)")
    device = resolve_device(spec.device)
    run = mlflow.active_run()
    job = {"base_dir": base_dir, "train_path": train_path, "out_dir": out_dir, "val_path": val_path,
           "spec": spec.model_dump(mode="json"), "device": device, "settings": device_settings(device),
           "mlflow_tracking_uri": mlflow.get_tracking_uri(), "mlflow_run_id": run.info.run_id if run else None}
    launch(job, out / "launch", spec.distributed, device, job["settings"]["bf16"])
    if not (result := TrainResult.load(out)):
        raise RuntimeError(f"distributed fine-tuning ended without a result in {out} (see {out / 'launch'})")
    return replace(result, cached=False)


def fit(base_dir: str, train_path: str, out_dir: str, spec: FinetuneConfig, val_path: str | None = None,
        callbacks: list | None = None, eval_every: int | None = None, settings: dict | None = None
        ) -> TrainResult | None:
    """Train in this process: a whole run, or one rank of a distributed one (`settings`: the precision its
    launcher chose for every rank). The main process writes the adapter, the merged weights and result.json
    (last: it marks the run complete); the other ranks return None."""
    out, base = Path(out_dir), Path(base_dir)
    checkpoints = out / "checkpoints"
    device = resolve_device(spec.device)
    model, tokenizer = _load_for(spec.method, base, device)
    trainer = sft_trainer(model, tokenizer, spec, train_path, val_path, checkpoints, device, callbacks, eval_every,
                          settings)
    lora = spec.method != "full"
    resume = last_complete_checkpoint(checkpoints)
    reset_peak_memory()
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None
    final_eval = None
    if eval_every:  # the last step's validation loss, unless the run evaluated at its last step already
        last = [log["eval_loss"] for log in trainer.state.log_history
                if "eval_loss" in log and log.get("step") == trainer.state.global_step]
        final_eval = last[-1] if last else trainer.evaluate()["eval_loss"]
    # TRL logs a running count of the tokens trained on (padding excluded). After a resume the history also
    # holds the checkpoint's earlier segment, whose seconds are not in `seconds`: count this segment's alone.
    logged = [(log.get("step", 0), float(log["num_tokens"])) for log in trainer.state.log_history
              if "num_tokens" in log]
    start = int(Path(resume).name.rsplit("-", 1)[1]) if resume else 0
    tokens = max((n for _, n in logged), default=0.0) - max((n for step, n in logged if step <= start), default=0.0)

    adapter_dir, merged_dir = out / "adapter", out / "merged"
    base_weights = "nf4 4-bit" if getattr(model, "is_loaded_in_4bit", False) else str(model.dtype)
    if lora:
        trainer.model.save_pretrained(adapter_dir)
    _merged(trainer, spec, base, adapter_dir, base_weights).save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    info = model_info(base)
    info.update(source=f"{spec.method}:{info['source']}", base=str(base))
    (merged_dir / META_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainResult(  # saved last: marks the run complete
        merged=str(merged_dir), adapter=str(adapter_dir) if lora else None, method=spec.method,
        steps=int(result.global_step), train_loss=float(result.training_loss), train_seconds=seconds, tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0, peak_memory_mb=peak_memory_mb(),
        resumed_from=Path(resume).name if resume else None,
        examples_per_step=spec.batch_size * spec.gradient_accumulation_steps,
        best_eval_loss=trainer.state.best_metric, eval_loss=final_eval,
        base_weights=base_weights).save(out)
