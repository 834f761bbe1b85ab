"""What scoring one system on a ranked task (classify, choice) costs, as before and as now, interleaved in rounds
(medians reported; these machines are noisy). Before: lm-eval's HFLM ranking every answer as a whole sequence, and
every test item generated. Now: each item's prompt run once for all its answers (evals/runner.SharedPromptLM), and
replies generated for a sample (`evaluation.generate_sample`). The evaluate stage scores 4 to 6 systems this way,
selection and the baselines one each on the validation split. Then the forgetting check (the general
multiple-choice suite, scored for the base and every trained system in every config) before and now.

Run:  .venv/bin/python bench/ranked_scoring.py [--config configs/classify.yaml] [--model gguf:smollm2-135m-instruct]
      (a generate config, e.g. configs/demo.yaml, measures the forgetting check alone)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from lm_eval.models.huggingface import HFLM

from evals import runner
from evals.runner import SharedPromptLM, write_tasks
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
    store = Path(os.environ.get("TUNELINE_HOME", ROOT / ".tuneline")) / "models"
    model, tokenizer = load(provision(args.model, store))
    print(f"{args.config}, {args.model}, {os.cpu_count()} CPU cores, medians of {args.rounds} interleaved rounds\n")
    if config.task.ranked:
        ranked_rows(model, tokenizer, config, args.rounds)
    general_rows(model, tokenizer, config, args.rounds)


def ranked_rows(model, tokenizer, config, rounds: int) -> None:
    """One system on the config's ranked test split: before, with the prompt shared, and now."""
    task, sample = config.task, config.evaluation.generate_sample
    with tempfile.TemporaryDirectory() as tmp:
        splits = prepare_data.fn([task], config.data.validation, config.data.test, config.data.seed, tmp, "skip")
        tasks_dir = write_tasks(task.name, splits.files, Path(tmp) / "tasks", task.max_answer_tokens, ranked=True)
        arms = {"before: HFLM, every item generated": (HFLM, None),
                "prompt shared, every item generated": (SharedPromptLM, None),
                f"now: prompt shared, {sample} generated": (SharedPromptLM, sample)}
        seconds: dict[str, list[float]] = {name: [] for name in arms}
        results = {}
        for _ in range(rounds):
            for name, (engine, generate) in arms.items():
                runner.SharedPromptLM = engine  # the class runner.evaluate builds (restored below)
                started = time.perf_counter()
                results[name] = runner.evaluate(model, tokenizer, tasks_dir, f"{task.name}_test",
                                                system_prompt=task.system_prompt, limit=task.max_test_examples,
                                                batch_size=config.evaluation.batch_size, kind=task.kind,
                                                generate=generate)
                seconds[name].append(time.perf_counter() - started)
        runner.SharedPromptLM = SharedPromptLM
    before, now = list(arms)[0], list(arms)[-1]
    print(f"{task.kind}, {results[before].n} test items\n")
    print("| scoring | seconds per system | accuracy | exact match (generated) |\n|---|---|---|---|")
    for name, found in results.items():
        print(f"| {name} | {statistics.median(seconds[name]):.1f} | {found.score:.3f} | "
              f"{found.metrics['exact_match']:.3f} |")
    agree = max(abs(a["probabilities"][k] - b["probabilities"][k]) for a, b in
                zip(results[before].samples, results[now].samples, strict=True) for k in a["probabilities"])
    same = [s["prediction"] for s in results[before].samples] == [s["prediction"] for s in results[now].samples]
    ratio = statistics.median(seconds[now]) / statistics.median(seconds[before])
    print(f"\nnow ÷ before: {ratio:.2f}× the time; the same ranked answers: {same}, largest probability "
          f"difference {agree:.1e}")


def general_rows(model, tokenizer, config, rounds: int) -> None:
    """The forgetting check's cost per system (every config's evaluate stage scores it for the base and the
    trained weights): the bundled general suite at the config's `evaluation.general_limit`, before and now."""
    suite = runner.suite_task(str(runner.GENERAL_DATA))
    seconds: dict[str, list[float]] = {"before: HFLM": [], "now: prompt shared": []}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks_dir = write_tasks("probe", {}, Path(tmp), 4)
        for _ in range(rounds):
            for name, engine in (("before: HFLM", HFLM), ("now: prompt shared", SharedPromptLM)):
                runner.SharedPromptLM = engine
                started = time.perf_counter()
                found[name] = runner.general_accuracy(model, tokenizer, tasks_dir, suite,
                                                      limit=config.evaluation.general_limit,
                                                      batch_size=config.evaluation.batch_size)
                seconds[name].append(time.perf_counter() - started)
        runner.SharedPromptLM = SharedPromptLM
    print(f"\nforgetting check, {found['now: prompt shared']['n']} general items: "
          + ", ".join(f"{name} {statistics.median(t):.1f} s (accuracy {found[name]['acc']:.3f})"
                      for name, t in seconds.items())
          + f"; the same items right: {found['before: HFLM']['items'] == found['now: prompt shared']['items']}")


if __name__ == "__main__":
    main()
