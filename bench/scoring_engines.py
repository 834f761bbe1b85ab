"""How far a config's test scores move when lm-eval scores the weights through vLLM instead of transformers
(`evaluation.engine`), and what each costs: the base model zero-shot with the chat template on the config's test
split, once per engine, the same task files; per item, how many replies and ranked answers are the same.

Run:  .venv/bin/python bench/scoring_engines.py [--config configs/demo.yaml] [--model gguf:smollm2-135m-instruct]
      (needs the vLLM environment: `make install-vllm`)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from evals.runner import write_tasks
from flows.config import load_config
from tasks.datasets import prepare_data
from tasks.models import provision
from tasks.scoring import score

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--model", default="gguf:smollm2-135m-instruct")
    args = parser.parse_args()

    config, store = load_config(args.config), Path(os.environ.get("TUNELINE_HOME", ROOT / ".tuneline")) / "models"
    task, model_dir = config.task, str(provision(args.model, store))
    with tempfile.TemporaryDirectory() as tmp:
        splits = prepare_data.fn([task], config.data.validation, config.data.test, config.data.seed, tmp, "skip")
        tasks_dir = str(write_tasks(task.name, splits.files, Path(tmp) / "tasks", task.max_answer_tokens,
                                    ranked=task.ranked))
        found, seconds = {}, {}
        for engine in ("transformers", "vllm"):
            started = time.perf_counter()
            found[engine] = score.fn(model_dir, tasks_dir, f"{task.name}_test", system_prompt=task.system_prompt,
                                     shots=0, limit=task.max_test_examples, batch_size=config.evaluation.batch_size,
                                     kind=task.kind, generate=config.evaluation.generate_sample, engine=engine)
            seconds[engine] = time.perf_counter() - started
    hf, vl = ({s["doc_id"]: s for s in found[e].samples} for e in ("transformers", "vllm"))
    replies = [d for d in hf if hf[d]["response"] is not None]
    same_reply = sum(hf[d]["response"] == vl[d]["response"] for d in replies)
    print(f"{args.config} ({task.kind}), {args.model}, {found['transformers'].n} test items, "
          f"{os.cpu_count()} CPU cores\n")
    metrics = [m for m in ("accuracy", "exact_match", "field_f1", "rougeL") if m in found["transformers"].metrics]
    print(f"| engine | seconds (vLLM: with its start) | {' | '.join(metrics)} |\n|---|---|{'---|' * len(metrics)}")
    for engine, result in found.items():
        print(f"| {engine} | {seconds[engine]:.0f} | " + " | ".join(f"{result.metrics[m]:.3f}" for m in metrics) + " |")
    print(f"\nthe same generated reply on {same_reply} of {len(replies)} items", end="")
    if "prediction" in next(iter(hf.values())):
        same = sum(hf[d]["prediction"] == vl[d]["prediction"] for d in hf)
        print(f"; the same ranked answer on {same} of {len(hf)}", end="")
    print()


if __name__ == "__main__":
    main()
