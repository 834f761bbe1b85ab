"""Training throughput: tuneline's SFT against the fastest plain TRL SFTTrainer configuration for this device,
same model, data and hyperparameters, in one run (ratios within one run: these machines are noisy).

Run:  .venv/bin/python bench/train_throughput.py [--model tiny:0|gguf:smollm2-135m-instruct] [--steps 8]
      .venv/bin/python bench/train_throughput.py --dpo [--rounds 3]   # preference tuning: the align stage's DPO
      .venv/bin/python bench/train_throughput.py --gpu [--model hf:Qwen/Qwen2.5-0.5B] [--steps 16]   # the GPU half

"Plain TRL" is SFTTrainer with the hyperparameters set and each combination of the two device settings that
decide its speed tried: bf16 autocast on or off (on a CPU only where it has bf16 instructions), gradient
checkpointing on or off (TRL's defaults are both on, even on a CPU). The baseline is the fastest; each is
reported. The configurations run interleaved, `--rounds` times (default 3): the medians are compared, and the
per-round ratio to the fastest shows the spread. tuneline chooses its settings from the device
(tasks/training.py `device_settings`). Tokens are the non-padding tokens trained on (TRL's own running count),
divided by the training wall time.

With --dpo the same comparison is made for preference tuning: tuneline's DPO step (tasks/alignment.py, a LoRA
adapter on the weights, the reference those weights with the adapter disabled) against plain TRL DPOTrainer with
the same model, pairs (data/review_preferences.jsonl) and hyperparameters, its device configurations tried. The
peak memory is the process's resident high-water mark on a CPU (reset before each run), CUDA's allocator peak
on a GPU.

The same run measures the dense matrix-multiply peak of each dtype (a 2048² GEMM, best of 5) and reports
training's share of the peak of the dtype it used, counting 4 FLOPs per parameter per token for LoRA (forward
and the backward pass's activation gradients; the frozen base has no weight gradient) and 6 for full training.

With --gpu, on a CUDA device: a 1B model (default: Llama 3.2 1B's shape with random weights, since a device
without the hub has no such model; any source with --model), LoRA and QLoRA at batch 64, tuneline against plain
TRL with each setting a GPU script would try (the frozen base in bf16 or fp32 under bf16 autocast, QLoRA's NF4
base computing in bf16; activation checkpointing on or off), tokens/s, peak CUDA memory and the share of the
bf16 GEMM peak (8192², best of 10); then tuneline's DDP over all the machine's GPUs against one GPU at the same
global batch, where it has two or more. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# ruff: noqa: E402 (the imports below come after the offline switch, read when transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from tasks.alignment import align, preference_dataset
from tasks.alignment_config import AlignConfig
from tasks.datasets import prepare_data, read_examples, token_counter
from tasks.models import META_FILE, build_tiny, load, model_info, provision
from tasks.preferences import prepare_preferences
from tasks.schema import TaskConfig
from tasks.training import (
    conversational,
    device_settings,
    gemm_gflops,
    native_bf16,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    train,
)
from tasks.training_config import DistributedConfig, FinetuneConfig

ROOT = Path(__file__).resolve().parent.parent


def plain_trl(model_dir: Path, train_path: str, out: Path, spec: FinetuneConfig, bf16: bool, checkpointing: bool,
              base: str = "fp32") -> tuple[float, float]:
    """The baseline script: SFTTrainer with the same hyperparameters, the given device settings, and TRL's own
    defaults for the rest. `base`: the frozen weights' precision, fp32, bf16 or nf4 (QLoRA: TRL prepares the
    4-bit model itself). Returns tokens/s and peak memory (MB)."""
    if base == "nf4":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, device_map={"": 0} if torch.cuda.is_available() else "cpu",
            attn_implementation="sdpa",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    else:
        model, tokenizer = load(model_dir, attention="sdpa" if torch.cuda.is_available() else None,
                                dtype=torch.bfloat16 if base == "bf16" else torch.float32)
    args = SFTConfig(output_dir=str(out), learning_rate=spec.learning_rate, max_steps=spec.max_steps,
                     per_device_train_batch_size=spec.batch_size, max_length=spec.max_seq_length,
                     packing=spec.packing, report_to=[], save_strategy="no", logging_steps=1, seed=spec.seed,
                     bf16=bf16, activation_checkpointing=checkpointing,
                     use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversational(read_examples(train_path)),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    return _timed(trainer)


def plain_dpo(model_dir: Path, train_path: str, out: Path, spec: AlignConfig, bf16: bool, checkpointing: bool
              ) -> tuple[float, float]:
    """The DPO baseline script: DPOTrainer on the same pairs and hyperparameters with a LoRA adapter and no
    ref_model (TRL then uses the adapter-disabled model, as tuneline does), the given device settings, TRL's
    defaults for the rest. Returns tokens/s and peak memory (MB)."""
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load(model_dir)
    args = DPOConfig(output_dir=str(out), learning_rate=spec.learning_rate, max_steps=spec.max_steps, beta=spec.beta,
                     per_device_train_batch_size=spec.batch_size, max_length=spec.max_seq_length, report_to=[],
                     save_strategy="no", logging_steps=1, seed=spec.seed, bf16=bf16,
                     activation_checkpointing=checkpointing, use_cpu=not torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_dataset(train_path, "dpo"),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    return _timed(trainer)


def _timed(trainer) -> tuple[float, float]:
    """Train; tokens/s over the training wall time (TRL's own count of non-padding tokens) and peak memory."""
    reset_peak_memory()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return max(float(log.get("num_tokens", 0)) for log in trainer.state.log_history) / seconds, peak_memory_mb()


def interleaved(ours, plain, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """tuneline and every plain configuration (bf16 autocast × checkpointing) interleaved (`rounds`). bf16
    autocast is tried only where the device has bf16 instructions: emulated, it is an order of magnitude slower."""
    precisions = (True, False) if torch.cuda.is_available() or native_bf16() else (False,)
    return in_rounds([("tuneline", ours)] + [
        (f"{'on' if bf16 else 'off'} | {'on' if ckpt else 'off'}",
         lambda r, bf16=bf16, ckpt=ckpt: plain(r, bf16, ckpt))
        for bf16 in precisions for ckpt in (True, False)], rounds)


def in_rounds(configs: list, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Each (name, run) configuration once per round, `rounds` times: on a noisy machine a slow spell then weighs
    on every configuration of a round, not on one. Each round runs them in its own (seeded) order, so none always
    follows the same neighbour (a bf16 run straight after an fp32 one meets cold kernels and caches)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in configs}
    for r in range(rounds):
        for name, run in random.Random(r).sample(configs, len(configs)):
            runs[name].append(run(r))
            print(f"  round {r + 1}, {name}: {runs[name][-1][0]:.1f} tok/s", flush=True)
    return runs


def report(what: str, runs: dict[str, list[tuple[float, float]]], columns: tuple[str, ...] = (
        "bf16", "gradient checkpointing"), chosen: str | None = None) -> float:
    """Medians per configuration, tuneline's ratio to each, and the ratio to the fastest per round (its spread).
    `columns` name the parts of a configuration's name; `chosen`: tuneline's own, by default its device settings.
    Returns tuneline's median tokens/s."""
    median = {name: (statistics.median(t for t, _ in found), statistics.median(m for _, m in found))
              for name, found in runs.items()}
    if chosen is None:
        settings = device_settings(resolve_device("auto"))
        chosen = " | ".join("on" if settings[key] else "off" for key in ("bf16", "activation_checkpointing"))
    ours = median.pop("tuneline")
    fastest = max(median, key=lambda name: median[name][0])
    print(f"\n{what}, medians of {len(runs['tuneline'])} interleaved rounds\n")
    print(f"| trainer | {' | '.join(columns)} | tokens/s | peak memory MB | tuneline ÷ this |")
    print("|---|" + "---|" * (len(columns) + 3))
    print(f"| tuneline | {chosen} | {ours[0]:.1f} | {ours[1]:.0f} | 1.00 |")
    for name, (rate, memory) in median.items():
        print(f"| plain TRL{' (fastest)' if name == fastest else ''} | {name} | {rate:.1f} | {memory:.0f} | "
              f"{ours[0] / rate:.2f}× |")
    spread = [t / p for (t, _), (p, _) in zip(runs["tuneline"], runs[fastest], strict=True)]
    print(f"\ntuneline vs the fastest plain TRL configuration: median {ours[0] / median[fastest][0]:.2f}× (per round "
          f"{', '.join(f'{x:.2f}' for x in spread)}); peak memory {ours[1]:.0f} vs {median[fastest][1]:.0f} MB")
    return ours[0]


REVIEWS = TaskConfig(name="reviews", data=str(ROOT / "data" / "reviews.jsonl"),
                     system_prompt="You extract structured data.", prompt="Review: {{ review }}\nReturn JSON.",
                     answer='{"product": "{{ product }}", "sentiment": "{{ sentiment }}", "rating": {{ rating }}}')


def sft_spec(steps: int, batch: int, method: str = "lora") -> FinetuneConfig:
    # No checkpoints, as the plain script saves none (tuneline's default writes one every 10 steps, so that a
    # killed run resumes: a cost of its own, not of the training step compared here).
    return FinetuneConfig(method=method, lora={"r": 8, "alpha": 16}, max_steps=steps, batch_size=batch,
                          max_seq_length=256, warmup_ratio=0.0, save_steps=None)


def tuneline_run(model_dir: Path, train_path: str, work: Path, spec: FinetuneConfig):
    """tuneline's fine-tuning task (after a short discarded warm-up: the first training in a process pays one-off
    start-up costs, kernel selection and thread pools, that would otherwise weigh on whichever ran first)."""
    train.fn(str(model_dir), train_path, str(work / f"warm-up-{spec.method}"), spec.model_copy(update={"max_steps": 2}))

    def ours(r: int) -> tuple[float, float]:
        found = train.fn(str(model_dir), train_path, str(work / f"ours-{spec.method}-{r}"), spec)
        shutil.rmtree(work / f"ours-{spec.method}-{r}")  # a 1B model's merged weights: 4 GB a run
        return found.tokens_per_second, found.peak_memory_mb

    return ours


def sft_rows(model_dir: Path, work: Path, steps: int, batch: int, rounds: int) -> float:
    train_path = prepare_data.fn([REVIEWS], 0.1, 0.1, 13, str(work / "data"), "skip").train
    spec = sft_spec(steps, batch)
    return report(f"SFT, {steps} steps of batch {batch}, LoRA r8, unpacked", interleaved(
        tuneline_run(model_dir, train_path, work, spec),
        lambda r, bf16, ckpt: plain_trl(model_dir, train_path, work / f"plain-{r}-{bf16}-{ckpt}", spec, bf16,
                                        ckpt), rounds))


# Llama 3.2 1B's shape with SmolLM2's 49k vocabulary (1.1B parameters): the GPU half's model. The device that runs
# it reaches no hub, so its weights are random; a training step's speed does not depend on their values.
GPU_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 2048}


def gpu_model(store: Path) -> Path:
    folder = store / "random-llama-1b"
    if not (folder / META_FILE).is_file():
        build_tiny(folder, store=store, shape=GPU_SHAPE)
        parameters = sum(p.numel() for p in load(folder)[0].parameters())
        (folder / META_FILE).write_text(json.dumps({"source": "random:llama-3.2-1b-shape",
                                                    "parameters": parameters, "instruct": True}))
    return folder


def gpu_rows(model_dir: Path, work: Path, steps: int, batch: int, rounds: int) -> dict[str, float]:
    """LoRA and QLoRA on a GPU: tuneline against plain TRL with the settings a GPU script would try (bf16
    autocast; the frozen base in fp32 or bf16; activation checkpointing on or off; QLoRA's NF4 base computing
    in bf16). Returns tuneline's median tokens/s per method."""
    train_path = prepare_data.fn([REVIEWS], 0.1, 0.1, 13, str(work / "data"), "skip").train
    found = {}
    for method, bases in (("lora", ("bf16", "fp32")), ("qlora", ("nf4",))):
        spec = sft_spec(steps, batch, method)
        configs = [("tuneline", tuneline_run(model_dir, train_path, work, spec))] + [
            (f"{base} | on | {'on' if ckpt else 'off'}",
             lambda r, base=base, ckpt=ckpt: plain_trl(model_dir, train_path, work / f"plain-{r}-{base}-{ckpt}",
                                                       spec, True, ckpt, base))
            for base in bases for ckpt in (True, False)]
        tuneline_base = {"lora": "bf16", "qlora": "nf4"}[method]
        found[method] = report(f"{method.upper()} SFT on the GPU, {steps} steps of batch {batch}, r8, unpacked",
                               in_rounds(configs, rounds), ("base weights", "bf16 autocast", "gradient checkpointing"),
                               f"{tuneline_base} | on | on")
    return found


def ddp_rows(model_dir: Path, work: Path, steps: int, batch: int) -> None:
    """tuneline's DDP (finetune.distributed) over every GPU of the machine against one GPU, same global batch."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"\nDDP: this machine has {gpus} GPU; DDP over GPUs needs 2 or more (not measured)")
        return
    train_path = prepare_data.fn([REVIEWS], 0.1, 0.1, 13, str(work / "data"), "skip").train
    one = train.fn(str(model_dir), train_path, str(work / "ddp-1"), sft_spec(steps, batch))
    spec = sft_spec(steps, batch // gpus).model_copy(update={"distributed": DistributedConfig(num_processes=gpus)})
    many = train.fn(str(model_dir), train_path, str(work / f"ddp-{gpus}"), spec)
    print(f"\nDDP over {gpus} GPUs, global batch {batch}: {many.tokens_per_second:.0f} tok/s against "
          f"{one.tokens_per_second:.0f} on one GPU ({many.tokens_per_second / one.tokens_per_second:.2f}×)")


def dpo_rows(model_dir: Path, work: Path, steps: int, batch: int, rounds: int) -> float:
    data = TaskConfig(name="prefs", kind="preference", shape="rankings",
                      data=str(ROOT / "data" / "review_preferences.jsonl"), prompt="Review: {{ review }}",
                      answer="{{ answer }}")
    pairs = prepare_preferences(data, work / "prefs", validation=0.1, test=0.1, seed=13, on_bad_rows="skip",
                                held_out={}, count=token_counter(str(model_dir)), max_tokens=256, max_test_pairs=8)
    spec = AlignConfig(data=data, lora={"r": 8, "alpha": 16}, max_steps=steps, batch_size=batch, max_seq_length=256,
                       warmup_ratio=0.0, save_steps=None)
    align.fn(str(model_dir), pairs.train, str(work / "dpo-warm-up"), spec.model_copy(update={"max_steps": 2}))

    def ours(r: int) -> tuple[float, float]:
        found = align.fn(str(model_dir), pairs.train, str(work / f"dpo-ours-{r}"), spec)
        return found.tokens_per_second, found.peak_memory_mb

    return report(f"DPO, {steps} steps of {batch} pairs, LoRA r8", interleaved(
        ours, lambda r, bf16, ckpt: plain_dpo(model_dir, pairs.train, work / f"dpo-plain-{r}-{bf16}-{ckpt}", spec,
                                              bf16, ckpt), rounds))


def gpu_main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("no GPU here: the GPU half measures nothing (docs/benchmarks.md, \"On a GPU\", says what it measures)")
        return
    peak = gemm_gflops(torch.bfloat16, "cuda", size=8192, repeats=10)
    store = Path(os.environ.get("TUNELINE_HOME", ROOT / ".tuneline")) / "models"
    model_dir = provision(args.model, store) if args.model else gpu_model(store)
    parameters = model_info(model_dir)["parameters"]
    print(f"model {args.model or 'Llama 3.2 1B shape, random weights'} ({parameters / 1e6:.0f}M parameters); "
          f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; bf16 GEMM peak (8192²) "
          f"{peak / 1e3:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        found = gpu_rows(model_dir, Path(tmp), args.steps, args.batch_size, args.rounds)
        for method, rate in found.items():
            print(f"{method}: tuneline reaches {flops_per_token(method, parameters) * rate / 1e9 / peak:.1%} of the "
                  f"bf16 GEMM peak ({flops_per_token(method, parameters) // parameters} FLOPs per parameter per token)")
        ddp_rows(model_dir, Path(tmp), args.steps, args.batch_size)


def flops_per_token(method: str, parameters: int) -> int:
    """A step's model FLOPs per token: forward 2 per parameter, backward 2 for the gradient of the activations and,
    for weights that train, 2 more for their own gradient. LoRA's frozen base needs no weight gradient (its small
    adapter is left out); recomputation under activation checkpointing is not counted (it is not the model's)."""
    return (6 if method == "full" else 4) * parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model source (default: tiny:0; with --gpu a random "
                                                      "1B model of Llama 3.2's shape)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (with --gpu: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--dpo", action="store_true", help="preference tuning (DPO) instead of SFT")
    parser.add_argument("--gpu", action="store_true", help="the GPU half: a 1B model, LoRA and QLoRA, DDP")
    args = parser.parse_args()
    if args.gpu:
        args.batch_size = args.batch_size or 64
        return gpu_main(args)
    args.batch_size = args.batch_size or 4

    device = resolve_device("auto")
    # Without bf16 instructions a CPU emulates bf16 at under 1 GFLOP/s: a 2048² product would take minutes, and
    # nothing trains in bf16 there (tasks/training.py `prefer_bf16`).
    bf16 = device == "cuda" or native_bf16()
    peaks = {name: gemm_gflops(dtype, device, size=2048, repeats=5)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if name == "fp32" or bf16}
    store = Path(os.environ.get("TUNELINE_HOME", ROOT / ".tuneline")) / "models"
    model_dir = provision(args.model or "tiny:0", store)
    parameters = model_info(model_dir)["parameters"]
    print(f"model {args.model or 'tiny:0'} ({parameters / 1e6:.0f}M parameters); {os.cpu_count()} CPU cores"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
          + f"; GEMM peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 "
          + (f"{peaks['bf16']:.1f} GFLOP/s\n" if bf16 else "not measured (no bf16 instructions)\n"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = dpo_rows if args.dpo else sft_rows
        ours = rows(model_dir, Path(tmp), args.steps, args.batch_size, args.rounds)
    dtype = "bf16" if device_settings(device)["bf16"] else "fp32"
    if not args.dpo:
        print(f"training reaches {flops_per_token('lora', parameters) * ours / 1e9 / peaks[dtype]:.1%} of the "
              f"{dtype} GEMM peak (4 FLOPs per parameter per token: LoRA's frozen base has no weight gradient)")


if __name__ == "__main__":
    main()
