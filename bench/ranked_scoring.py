"""What scoring one system on a ranked task (classify, choice) costs: every test item ranked and generated, against
every item ranked and a sample generated (`evaluation.generate_sample`), interleaved in rounds (medians reported;
these machines are noisy). The evaluate stage scores 4 to 6 systems this way, selection and the baselines one each
on the validation split.

Run:  .venv/bin/python bench/ranked_scoring.py [--config configs/classify.yaml] [--model gguf:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from evals import runner
from evals.runner import write_tasks
from flows.config import load_config
from tasks.datasets import prepare_data
from tasks.models import load, provision

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "classify.yaml"))
    parser.add_argument("--model", default="gguf:smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    config = load_config(args.config)
    task, sample = config.task, config.evaluation.generate_sample
    store = Path(os.environ.get("TUNELINE_HOME", ROOT / ".tuneline")) / "models"
    model, tokenizer = load(provision(args.model, store))
    with tempfile.TemporaryDirectory() as tmp:
        splits = prepare_data.fn([task], config.data.validation, config.data.test, config.data.seed, tmp, "skip")
        tasks_dir = write_tasks(task.name, splits.files, Path(tmp) / "tasks", task.max_answer_tokens, ranked=True)
        seconds: dict[str, list[float]] = {"every item generated": [], f"{sample} generated": []}
        results = {}
        for _ in range(args.rounds):
            for name, generate in (("every item generated", None), (f"{sample} generated", sample)):
                started = time.perf_counter()
                results[name] = runner.evaluate(model, tokenizer, tasks_dir, f"{task.name}_test",
                                                system_prompt=task.system_prompt, limit=task.max_test_examples,
                                                batch_size=config.evaluation.batch_size, kind=task.kind,
                                                generate=generate)
                seconds[name].append(time.perf_counter() - started)
    print(f"{args.config}: {task.kind}, {results['every item generated'].n} test items, {args.model}, "
          f"{os.cpu_count()} CPU cores, medians of {args.rounds} interleaved rounds\n")
    print("| replies generated | seconds per system | accuracy | exact match (generated) |\n|---|---|---|---|")
    for name, found in results.items():
        print(f"| {name} | {statistics.median(seconds[name]):.1f} | {found.score:.3f} | "
              f"{found.metrics['exact_match']:.3f} |")
    whole, part = (statistics.median(s) for s in seconds.values())
    print(f"\nsampled ÷ every item: {part / whole:.2f}× the time, the same accuracy: "
          f"{results['every item generated'].score == results[f'{sample} generated'].score}")


if __name__ == "__main__":
    main()
