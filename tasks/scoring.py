"""Scoring a model folder with lm-eval: the one unit that selection, baselines and evaluation all call."""

from __future__ import annotations

from pathlib import Path

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
          batch_size: int, chat: bool = True, kind: str = "generate", generate: int | None = None
          ) -> runner.ScoreResult:
    """lm-eval score of the model in `model_dir` on a generated task (chat template and system prompt unless
    `chat` is off); a classify or choice `kind` also ranks the allowed replies (accuracy is then the score) and
    generates replies for the first `generate` items only (`evaluation.generate_sample`)."""
    model, tokenizer = load(Path(model_dir))
    return runner.evaluate(model, tokenizer, tasks_dir, task_name, system_prompt=system_prompt, shots=shots,
                           chat=chat, limit=limit, batch_size=batch_size, kind=kind, generate=generate)


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
