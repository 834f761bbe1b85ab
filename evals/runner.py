"""lm-eval over an already-loaded model: generated task YAMLs with absolute data paths, chat-formatted prompts.

lm-eval resolves `data_files` against the current directory, not the YAML (STACK.md), so the per-run YAMLs
are written with absolute paths; their shared parts come from evals/tasks/chat_answer.yaml via `include:`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

SHARED_TASK = Path(__file__).resolve().parent / "tasks" / "chat_answer.yaml"
METRIC = "exact_match"

logging.getLogger("lm_eval").setLevel(logging.WARNING)


def write_tasks(task: str, splits: dict[str, str], out_dir: str | Path, max_answer_tokens: int) -> Path:
    """One lm-eval task per scored split (`<task>_validation`, `<task>_test`); returns the folder holding them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_files = {name: str(Path(path).resolve()) for name, path in splits.items()}
    for split in ("validation", "test"):
        spec = {
            "include": str(SHARED_TASK),
            "task": f"{task}_{split}",
            "dataset_kwargs": {"data_files": data_files},
            "test_split": split,
            "generation_kwargs": {"do_sample": False, "max_gen_toks": max_answer_tokens},
        }
        (out / f"{task}_{split}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def evaluate(model, tokenizer, tasks_dir: str | Path, task: str, *, system_prompt: str, shots: int = 0,
             limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """Score a loaded model on one generated task; returns score, stderr, n and a few samples."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=shots,
        limit=limit,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        system_instruction=system_prompt or None,
        log_samples=True,
        bootstrap_iters=1000,
        random_seed=0,
        fewshot_random_seed=1234,
    )
    scores = results["results"][task]
    samples = results["samples"][task]
    return {
        "score": float(scores[f"{METRIC},none"]),
        "stderr": float(scores.get(f"{METRIC}_stderr,none") or 0.0),
        "n": len(samples),
        "samples": [
            {
                "prompt": s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else str(s["arguments"][0]),
                "response": s["filtered_resps"][0],
                "target": s["target"],
                METRIC: s[METRIC],
            }
            for s in samples
        ],
    }


def samples_jsonl(result: dict) -> str:
    return "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in result["samples"])
