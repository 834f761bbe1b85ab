"""Scoring a model folder with lm-eval: the one unit that selection, baselines and evaluation all call."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from lm_eval.api.model import LM
from prefect import task

from evals import runner
from tasks.caching import by_content
from tasks.models import load

# What a report shows of a result, first the score (with its standard error): generated replies by their text
# metrics; ranked replies (classify, choice) by accuracy, with exact match of the generated reply beside it.
COLUMNS = {False: (("exact_match", "exact match"), ("field_f1", "field F1"), ("rougeL", "ROUGE-L")),
           True: (("accuracy", "accuracy"), ("accuracy_norm", "length-normalised accuracy"),
                  ("exact_match", "exact match (generated)"))}


def table(rows: dict[str, dict], ranked: bool, first: str = "system", extra: tuple[tuple[str, str], ...] = ()
          ) -> str:
    """Results as a markdown table: one row per name, the kind's columns, then `extra` (key, heading) columns
    the rows hold (None shows as –)."""
    (key, label), *rest = COLUMNS[ranked]
    head = [first, f"{label} ± se", *(name for _, name in rest), *(name for _, name in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{r.get(key, 0.0):.3f} ± {r.get('stderr', 0.0):.3f}",
                 *(f"{r.get(k, 0.0):.3f}" for k, _ in rest),
                 *("–" if r.get(e) is None else f"{r[e]:.3f}" for e, _ in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@task(name="score-model", cache_key_fn=by_content, persist_result=True)
def score(model_dir: str, tasks_dir: str, task_name: str, *, system_prompt: str, shots: int, limit: int,
          batch_size: int, chat: bool = True, kind: str = "generate", generate: int | None = None,
          engine: str = "transformers") -> runner.ScoreResult:
    """lm-eval score of the model in `model_dir` on a generated task (chat template and system prompt unless
    `chat` is off); a classify or choice `kind` also ranks the allowed replies (accuracy is then the score) and
    generates replies for the first `generate` items only (`evaluation.generate_sample`). `engine` vllm: the
    weights answer from a vLLM server started for them (`evaluation.engine`), as they would be served."""
    options = dict(system_prompt=system_prompt, shots=shots, chat=chat, limit=limit, batch_size=batch_size,
                   kind=kind, generate=generate)
    if engine == "vllm":
        with vllm_lm(model_dir, batch_size) as lm:
            return runner.evaluate(lm, None, tasks_dir, task_name, **options)
    model, tokenizer = load(Path(model_dir))
    return runner.evaluate(model, tokenizer, tasks_dir, task_name, **options)


@contextlib.contextmanager
def vllm_lm(model_dir: str, concurrent: int) -> Iterator[LM]:
    """lm-eval's completions client of a vLLM server on `model_dir`'s weights, stopped on leaving."""
    from serving.vllm_engine import NAME, VllmEngine
    from tasks.paths import state_dir, vllm_python

    config = json.loads(Path(model_dir, "config.json").read_text())
    # vLLM reserves KV cache for its longest sequence: the model's context, capped at what the tasks need
    length = min(int(config.get("max_position_embeddings", 2048)), 4096)
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    engine = VllmEngine(model_dir, str(vllm_python()), length, str(logs))
    try:
        yield runner.completions_lm(engine.url, NAME, model_dir, concurrent=concurrent, max_length=length)
    finally:
        engine.close()


@task(name="score-likelihood", cache_key_fn=by_content, persist_result=True)
def score_likelihood(model_dir: str, tasks_dir: str, task_name: str, *, system_prompt: str, limit: int,
                     batch_size: int) -> dict:
    """Mean per-token log-probability of the reference answers: selection's tie-breaker."""
    model, tokenizer = load(Path(model_dir))
    return runner.answer_likelihood(model, tokenizer, tasks_dir, task_name, system_prompt=system_prompt,
                                    limit=limit, batch_size=batch_size)


@task(name="score-preferences", cache_key_fn=by_content, persist_result=True)
def score_preferences(model_dir: str, tasks_dir: str, task_name: str, *, system_prompt: str, limit: int | None,
                      batch_size: int) -> dict:
    """Preference accuracy on held-out pairs: how often the chosen answer is the more likely, per pair."""
    model, tokenizer = load(Path(model_dir))
    return runner.preference_accuracy(model, tokenizer, tasks_dir, task_name, system_prompt=system_prompt,
                                      limit=limit, batch_size=batch_size)


@task(name="score-general", cache_key_fn=by_content, persist_result=True)
def score_general(model_dir: str, tasks_dir: str, task_name: str, *, limit: int | None, batch_size: int) -> dict:
    """Accuracy on one general multiple-choice suite (the forgetting check), with every item's result."""
    model, tokenizer = load(Path(model_dir))
    return runner.general_accuracy(model, tokenizer, tasks_dir, task_name, limit=limit, batch_size=batch_size)


@task(name="score-builtin")
def score_builtin(model_dir: str, tasks: list[str], *, limit: int | None, batch_size: int) -> dict:
    """lm-eval built-in tasks (online users): their metrics by task."""
    model, tokenizer = load(Path(model_dir))
    return runner.builtin(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
