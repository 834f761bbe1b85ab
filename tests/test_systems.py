"""Systems (weights + prompt recipe) through promote, the registry and the service: the gate promotes whichever
kind wins, a recipe system is registered, rebuilt from the registry and served answering exactly as lm-eval did,
rollback and manual promotion cross kinds, and a version missing a part of its recipe fails the build naming it.

The gate's evidence here is constructed (per-item scores chosen so that one candidate wins); the rest is real:
MLflow on SQLite, the Bento built and served by `bentoml serve`, lm-eval, the MiniLM encoder."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from evals import runner
from evals.variants import Variant
from tasks import packaging, registry
from tasks.datasets import Example, Splits, write_examples
from tasks.models import load, provision
from tasks.processes import free_port
from tasks.recipes import POOL_FILE, Recipe, write_recipe
from tasks.registry import Candidate, Evaluation, Evidence
from tasks.retrieval import attach_fixed, attach_shots, pick_fixed
from tests.conftest import ROOT

NAME = "systems-test"
SYSTEM = "You label reviews."
TRAIN = [Example(f"t{i}", SYSTEM, f"Review: {text}", label, "reviews", f"k{i}") for i, (text, label) in enumerate([
    ("The kettle leaks everywhere.", "negative"), ("Love these running shoes.", "positive"),
    ("The lamp flickers a lot.", "negative"), ("Great blender, smooth soups.", "positive"),
    ("My teapot leaks too.", "negative"), ("Best backpack I have owned.", "positive")])]
TEST = [Example(f"q{i}", SYSTEM, f"Review: {text}", label, "reviews", f"q{i}") for i, (text, label) in enumerate([
    ("The mug leaks at the handle.", "negative"), ("These shoes are wonderful.", "positive"),
    ("The desk lamp is too dim.", "negative")])]
RETRIEVED = Variant("retrieved", 2, chat=True)
FIXED = Variant("fixed", 2, chat=False)


def right(k: int, n: int = 100) -> dict[str, float]:
    return {str(i): float(i < k) for i in range(n)}


@pytest.fixture()
def setting(tmp_path, mlflow_sqlite):
    from flows.config import load_config

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model, config.task.system_prompt, config.task.max_answer_tokens = NAME, SYSTEM, 6
    config.gate.smoke_prompts, config.deploy.port = 2, free_port()
    data = tmp_path / "run" / "data"
    files = {"train": write_examples(data / "train.jsonl", TRAIN), "test": write_examples(data / "test.jsonl", TEST)}
    (data / "keys.json").write_text(json.dumps({"fingerprints": {"train": "a", "validation": "b", "test": "c"},
                                                "train": [e.key for e in TRAIN]}))
    mlflow.create_experiment("systems", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("systems")
    return config, Splits(files["train"], files["test"], files["test"], rejects="", keys=str(data / "keys.json"),
                          fingerprints={}, per_task={}, counts={}, mixed_train={})


def sections(config) -> tuple:
    """What the promote stage reads of a lifecycle config."""
    return config.registered_model, config.gate, config.task, config.deploy


def candidate(name: str, weights: str, folder: str, recipe: Recipe, evidence: Evidence) -> Candidate:
    return Candidate(name, recipe.describe(weights), folder, recipe, evidence,
                     score=sum(evidence.candidate.values()) / len(evidence.candidate))


def test_the_winning_kind_is_promoted_served_and_rolled_back_across_kinds(setting, tiny_model, store, home,
                                                                          prefect_api, tmp_path):
    from flows.deploy import deploy_stage
    from flows.promote import promote_stage

    config, data = setting
    tuned = str(provision("tiny:1", store))  # stands in for fine-tuned weights
    general = {"g": (right(50, 200), right(50, 200))}
    prompt, fixed = Recipe.of(RETRIEVED, SYSTEM), pick_fixed(data.train, 2, seed=13)
    tuned_fixed = Recipe.of(FIXED, SYSTEM, {2: fixed})
    with mlflow.start_run() as parent:
        # Round 1: retrieved shots on the base weights clearly beat the base zero-shot; fine-tuning does not beat
        # the bar. The prompt system wins, is built with its pool and encoder, and is smoke-served.
        first = promote_stage(*sections(config), "no-finetune-run", Evaluation([
            candidate("prompt", "base", tiny_model, prompt,
                      Evidence("exact_match", right(60), right(20), "0-shot, chat", weights_changed=False)),
            candidate("finetuned", "fine-tuned", tuned, Recipe(SYSTEM),
                      Evidence("exact_match", right(35), right(60), "2 retrieved shots, chat", general=general)),
        ]), data, str(home), parent.info.run_id)
        assert first.passed, first.reasons
        assert first.system == "base + 2 retrieved shots, chat" and "smoke test passed" in first.reasons
        assert "the base weights, unchanged: nothing to forget" in first.reasons

        # Round 2: the fine-tuned weights (with 2 fixed shots, plain text) now win, also against the champion (the
        # prompt system) on the same items.
        config.gate.smoke_prompts = 0  # round 1 served and smoke-tested a Bento already; this one need not
        second = promote_stage(*sections(config), "finetune-run", Evaluation([
            candidate("prompt", "base", tiny_model, prompt,
                      Evidence("exact_match", right(60), right(20), "0-shot, chat", champion=right(60),
                               champion_version=first.version, weights_changed=False)),
            candidate("finetuned", "fine-tuned", tuned, tuned_fixed,
                      Evidence("exact_match", right(90), right(60), "2 retrieved shots, chat", champion=right(60),
                               champion_version=first.version, general=general)),
        ]), data, str(home), parent.info.run_id)
    assert second.passed and second.system == "fine-tuned + 2 fixed shots, plain", second.reasons
    client = MlflowClient()
    assert client.get_model_version(NAME, first.version).tags["tuneline.system"] == "base + 2 retrieved shots, chat"
    card = client.get_model_version(NAME, second.version).description  # the model card
    assert card.startswith(f"## {NAME} v{second.version}: fine-tuned + 2 fixed shots, plain\n**Gate: PASS** "
                           f"(champion); it replaced v{first.version} as champion.")
    assert "**Recipe:** 2 fixed shots, plain" in card
    assert registry.champion(NAME)[0] == second.version

    # Rollback to the prompt system, then back by hand to the fine-tuned one: each time the deploy stage rebuilds
    # the system from the registry alone and serves it answering as lm-eval did in-process.
    tasks_dir = runner.write_tasks("reviews", {"train": data.train, "validation": data.test,
                                               "test": data.test}, tmp_path / "tasks", 6)
    runner.write_listed_tasks("reviews", attach_shots.fn(data.train, {"test": data.test}, 2, str(tasks_dir)),
                              tasks_dir, 6, RETRIEVED)
    runner.write_listed_tasks("reviews", attach_fixed.fn(fixed, {"test": data.test}, str(tasks_dir), "fixed2"),
                              tasks_dir, 6, Variant("fixed", 2))
    registry.rollback(NAME, "prefer the prompt system")
    try:
        served = deploy_stage(config, str(home), version=None, probe=TEST[0].user)
        assert served.served and served.model == f"{NAME}/{first.version}"
        assert served.system == "base + 2 retrieved shots, chat"
        models = httpx.get(f"{served.url}/v1/models", timeout=30).json()["data"][0]
        assert models["system"] == "base + 2 retrieved shots, chat"
        assert_served_as_evaluated(served.url, tiny_model, tasks_dir, "reviews_test_retrieved", chat=True)

        registry.promote_manually(NAME, second.version, "back to the fine-tuned system")
        served = deploy_stage(config, str(home), version=None, probe=TEST[0].user)
        assert served.model == f"{NAME}/{second.version}"
        assert served.system == "fine-tuned + 2 fixed shots, plain"
        assert_served_as_evaluated(served.url, tuned, tasks_dir, "reviews_test_fixed2", chat=False)
    finally:
        packaging.stop_model(home, NAME)


def assert_served_as_evaluated(url: str, weights: str, tasks_dir: Path, task: str, chat: bool) -> None:
    """The served answers are what lm-eval produced for the same recipe in-process (greedy; lm-eval stops a reply
    at a blank line, which a client asks for with `stop`)."""
    model, tok = load(Path(weights))
    evaluated = runner.evaluate(model, tok, tasks_dir, task, system_prompt=SYSTEM, shots=2, chat=chat, limit=3,
                                batch_size=1).samples
    assert len(evaluated) == len(TEST)
    for sample in evaluated:
        reply = packaging.chat.fn(url, TEST[sample["doc_id"]].user, 6, stop=["\n\n"])
        assert reply["choices"][0]["message"]["content"] == sample["response"], task


def test_a_version_missing_part_of_its_recipe_fails_the_build_naming_it(tiny_model, tmp_path, home, prefect_api):
    train = write_examples(tmp_path / "train.jsonl", TRAIN)
    system = tmp_path / "system"
    write_recipe(Recipe.of(RETRIEVED, SYSTEM), system, train)
    (system / POOL_FILE).unlink()
    with pytest.raises(packaging.IncompleteSystem, match=r"systems-test v7: its retrieval pool "
                                                         r"\(tuneline_pool.jsonl\) is missing from the version"):
        packaging.build_bento.fn(tiny_model, NAME, "7", SYSTEM, recipe_dir=str(system))
    other = tmp_path / "other"
    write_recipe(Recipe(SYSTEM, True, "retrieved", 2, encoder=str(tmp_path / "no-encoder")), other, train)
    with pytest.raises(packaging.IncompleteSystem, match=r"systems-test v8: the sentence encoder .*no-encoder.* "
                                                         "is not installed here"):
        packaging.build_bento.fn(tiny_model, NAME, "8", SYSTEM, recipe_dir=str(other))
