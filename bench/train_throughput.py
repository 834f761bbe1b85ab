"""Training throughput: tuneline's SFT vs a plain TRL SFTTrainer script, same model, data and hyperparameters,
with and without packing, in one run (ratios within one run: these machines are noisy).

Run:  .venv/bin/python bench/train_throughput.py [--model tiny:0|gguf:smollm2-135m-instruct] [--steps 8]

"Plain TRL" is what a user gets from SFTTrainer with only the hyperparameters set (and use_cpu on a CPU,
without which it refuses to start): its device defaults (bf16 and gradient checkpointing, even on a CPU)
are left as they are. tuneline chooses them from the device.
Tokens are the non-padding tokens trained on (TRL's own running count), divided by the training wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# ruff: noqa: E402 (the imports below come after the offline switch, read when transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from tasks.datasets import TaskSpec, prepare_data, read_examples
from tasks.models import load, provision
from tasks.training import TrainSpec, conversational, train

ROOT = Path(__file__).resolve().parent.parent


def plain_trl(model_dir: Path, train_path: str, out: Path, spec: TrainSpec) -> float:
    """The baseline script: SFTTrainer with the same hyperparameters and TRL's own defaults for the rest."""
    model, tokenizer = load(model_dir)
    args = SFTConfig(output_dir=str(out), learning_rate=spec.learning_rate, max_steps=spec.max_steps,
                     per_device_train_batch_size=spec.batch_size, max_length=spec.max_seq_length,
                     packing=spec.packing, report_to=[], save_strategy="no", logging_steps=1, seed=spec.seed,
                     use_cpu=not torch.cuda.is_available())  # without it, TRL's bf16 default refuses a CPU
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversational(read_examples(train_path)),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return max(float(log.get("num_tokens", 0)) for log in trainer.state.log_history) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:0")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = Path(os.environ.get("TUNELINE_HOME", ROOT / ".tuneline")) / "models"
        model_dir = provision(args.model, store)
        task = TaskSpec("reviews", str(ROOT / "data" / "reviews.jsonl"), "You extract structured data.",
                        ("Review: {{ review }}\nReturn JSON.",),
                        '{"product": "{{ product }}", "sentiment": "{{ sentiment }}", "rating": {{ rating }}}')
        train_path = prepare_data.fn([task], {"reviews": 1.0}, 0.1, 0.1, 13, str(work / "data"), "skip").train
        rows = {}
        for packing in (False, True):
            spec = TrainSpec(r=8, alpha=16, max_steps=args.steps, batch_size=args.batch_size, max_seq_length=256,
                             packing=packing, warmup_ratio=0.0)
            ours = train.fn(str(model_dir), train_path, str(work / f"ours-{packing}"), spec)["tokens_per_second"]
            theirs = plain_trl(model_dir, train_path, work / f"plain-{packing}", spec)
            rows[packing] = (ours, theirs)
        unpacked_plain = rows[False][1]
        print(f"model {args.model}, {args.steps} steps of batch {args.batch_size}")
        print(f"{'':>10} {'tuneline tok/s':>15} {'plain TRL tok/s':>16} {'ratio':>6}")
        for packing, (ours, theirs) in rows.items():
            label = "packed" if packing else "unpacked"
            print(f"{label:>10} {ours:>15.1f} {theirs:>16.1f} {ours / theirs:>6.2f}")
        print(f"tuneline packed vs plain TRL unpacked: {rows[True][0] / unpacked_plain:.2f}x")


if __name__ == "__main__":
    main()
