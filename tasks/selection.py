"""Choosing a model: what each candidate costs to run, and the rule that picks one from scores and costs.

Cost is measured in a fresh Python process per candidate so the peak memory is that model's alone (a
process's high-water mark never goes down, and freed tensors are not always returned to the OS).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from prefect import task

from evals.runner import ScoreResult
from tasks.caching import by_content
from tasks.schema import BudgetConfig


@dataclass(frozen=True)
class Selection:
    """What selection hands on: the chosen model, why, and its zero-shot validation scoring (the baseline stage
    reuses it instead of scoring the same prompt twice)."""
    source: str
    model_dir: str
    reason: str
    score: float  # validation score on the gate's metric
    likelihood: float  # mean log-probability per token of the reference answers
    result: ScoreResult | None  # the zero-shot validation scoring (metrics and samples); None once its items changed


class NoCandidateFits(ValueError):
    """Every candidate breaks the budget; the message lists each one's violations."""


def choose(rows: list[dict], budget: BudgetConfig) -> tuple[dict, str]:
    """The best validation score among candidates within the budget; a tie goes to the model that finds the
    reference answers more likely (`likelihood`, mean log-probability per token), then to the smaller model,
    which is cheaper to train and serve. Returns the row and the reason in words."""
    fits = [r for r in rows if not budget.violations(r)]
    if not fits:
        detail = "; ".join(f"{r['source']}: {', '.join(budget.violations(r))}" for r in rows)
        raise NoCandidateFits(f"no candidate model fits models.budget: {detail}")
    best = max(fits, key=lambda r: (r["score"], r.get("likelihood", 0.0), -r["parameters"]))
    reason = f"best validation score ({best['score']:.3f})"
    if len(fits) < len(rows):
        reason += " within the budget (" + "; ".join(
            f"{r['source']} excluded: {', '.join(budget.violations(r))}" for r in rows if r not in fits) + ")"
    tied = [r for r in fits if r["score"] == best["score"]]
    if len(tied) > 1 and len({r.get("likelihood", 0.0) for r in tied}) > 1:
        reason += (f"; tied, so the one that finds the reference answers most likely "
                   f"({best['likelihood']:.3f} log-probability per token)")
    elif len(tied) > 1:
        reason += "; tied, so the smaller model"
    return best, reason


@task(name="measure-cost", cache_key_fn=by_content, persist_result=True)
def measure_cost(model_dir: str, messages: list[dict], new_tokens: int = 32) -> dict:
    """Parameters, greedy generation tokens/s and peak process memory of one model, in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "tasks.selection", model_dir, json.dumps(messages), str(new_tokens)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"cost measurement of {model_dir} failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_here(model_dir: str, messages: list[dict], new_tokens: int) -> dict:
    import resource
    import time
    from pathlib import Path

    import torch

    from tasks.models import load

    model, tokenizer = load(Path(model_dir))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    settings = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, min_new_tokens=new_tokens,
                    max_new_tokens=new_tokens)
    with torch.no_grad():
        model.generate(**inputs, **{**settings, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        model.generate(**inputs, **settings)
        seconds = time.perf_counter() - started
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_s": new_tokens / seconds,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    print(json.dumps(_measure_here(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))))
