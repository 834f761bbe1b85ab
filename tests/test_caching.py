"""Prefect caching by content (tasks/caching.py): a rerun with the same weights and data, written under new
folders, reuses the persisted score; a change to either is scored again. Retrieval's embeddings are kept by
their texts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from prefect import flow

from evals.runner import write_tasks
from tasks.retrieval import embed
from tasks.scoring import score


def _splits(folder: Path, answers: list[str]) -> dict[str, str]:
    folder.mkdir(parents=True)
    files = {}
    for split in ("train", "validation", "test"):
        rows = [{"id": f"{split}-{i}", "system": "", "user": f"Review {i}: fine", "assistant": a, "task": "t"}
                for i, a in enumerate(answers)]
        files[split] = str(folder / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_score_is_reused_for_the_same_content_under_new_paths_and_redone_when_it_changes(tiny_model, prefect_api,
                                                                                          tmp_path):
    first = write_tasks("t", _splits(tmp_path / "run1", ["a", "b", "c"]), tmp_path / "run1" / "tasks", 4)
    same = write_tasks("t", _splits(tmp_path / "run2", ["a", "b", "c"]), tmp_path / "run2" / "tasks", 4)
    changed = write_tasks("t", _splits(tmp_path / "run3", ["a", "b", "x"]), tmp_path / "run3" / "tasks", 4)
    model_copy = shutil.copytree(tiny_model, tmp_path / "merged-again")

    @flow
    def three_runs():
        settings = dict(system_prompt="", shots=0, limit=3, batch_size=2)
        return [score(model, str(tasks), "t_validation", **settings, return_state=True)
                for model, tasks in ((tiny_model, first), (str(model_copy), same), (str(model_copy), changed))]

    computed, reused, redone = three_runs()
    assert (computed.name, reused.name, redone.name) == ("Completed", "Cached", "Completed")
    assert reused.result().samples == computed.result().samples
    assert [s["target"] for s in redone.result().samples][-1] == "x"


def test_embeddings_are_reused_for_the_same_texts_and_redone_when_they_change(prefect_api):
    pool = ["the kettle leaks", "light running shoes", "teapot leaking at the spout"]

    @flow
    def embedding(texts: list[str]):  # one flow run each: the rerun is a later iteration (or a later stage)
        return embed(texts, return_state=True)

    computed, reused, redone = (embedding(t) for t in (pool, list(pool), pool[:2] + ["shoes for jogging"]))
    assert (computed.name, reused.name, redone.name) == ("Completed", "Cached", "Completed")
    assert (reused.result() == computed.result()).all() and computed.result().shape == (3, 384)
    # the same texts in another batch: equal up to padding's float noise (why a recipe reuses these exact ones)
    assert np.allclose(redone.result()[:2], computed.result()[:2], atol=1e-5)



def test_cache_keys_change_with_the_machine_and_library_versions(tiny_model, monkeypatch):
    """A cost measured on one machine, or a score computed by other library versions, is not reused."""
    from tasks import caching

    context = SimpleNamespace(task=SimpleNamespace(name="measure-cost"))
    parameters = {"model_dir": tiny_model, "messages": [{"role": "user", "content": "hi"}], "new_tokens": 4}
    here = caching.by_content(context, parameters)
    assert caching.by_content(context, parameters) == here
    assert json.loads(caching.environment()).keys() == {"cpu", "cores", "gpu", *caching.LIBRARIES}
    monkeypatch.setattr(caching, "environment", lambda: json.dumps({"cpu": "another machine"}))
    assert caching.by_content(context, parameters) != here
