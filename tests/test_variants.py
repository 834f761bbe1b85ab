"""Prompt variants name their lm-eval tasks in one place: what baseline writes, evaluation finds."""

from __future__ import annotations

import pytest

from evals import runner
from evals.variants import COT, ZERO_SHOT, Variant, likelihood_task
from flows.config import BaselineConfig
from tasks.recipes import Recipe


def test_each_variant_names_its_task_on_a_split():
    assert ZERO_SHOT.task("t", "test") == "t_test"
    assert ZERO_SHOT.task("t", "validation", ranked=True) == "t_validation_ranked"
    assert Variant("fixed", 3, chat=False).task("t", "test") == "t_test_fixed3"
    assert COT.task("t", "validation") == "t_validation_cot"
    assert Variant("retrieved", 2).task("t", "test", ranked=True) == "t_test_retrieved_ranked"
    # a registered system's own shots are listed in their own task; with none it is the plain zero-shot task
    assert Variant("retrieved", 2, owner="champion").task("t", "test") == "t_test_champion"
    assert Variant(owner="champion").task("t", "test") == "t_test"
    assert likelihood_task("t") == "t_validation_likelihood"


def test_the_baseline_plan_is_simplest_first_and_named_for_reports():
    plan = BaselineConfig(shots=[0, 3], retrieval_shots=2).variants()
    assert [v.name for v in plan] == ["0-shot, chat", "3-shot, chat", "chain of thought, chat",
                                      "2 retrieved shots, chat", "0-shot, plain", "3-shot, plain",
                                      "chain of thought, plain", "2 retrieved shots, plain"]
    ranked = BaselineConfig(shots=[0], retrieval_shots=0, without_chat_template=False).variants(ranked=True)
    assert ranked == [ZERO_SHOT]  # no chain of thought for ranked answers


def test_every_planned_task_is_one_the_runner_writes(tmp_path):
    """The names the stages score by are the files the runner wrote: one grammar, not two."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "system": "", "user": "q", "assistant": "a", "task": "t", "key": "a", '
                    '"shots": []}\n')
    runner.write_tasks("t", {"validation": str(data), "test": str(data)}, tmp_path, 4, ranked=True)
    for v in (Variant("fixed", 2), Variant("retrieved", 2)):
        runner.write_listed_tasks("t", {"validation": str(data), "test": str(data)}, tmp_path, 4, v, ranked=True)
    written = {p.stem for p in tmp_path.glob("*.yaml")}
    for v in BaselineConfig(shots=[0, 2], retrieval_shots=2).variants():
        for split in ("validation", "test"):
            assert v.task("t", split) in written
            if v.servable:
                assert v.task("t", split, ranked=True) in written
    assert likelihood_task("t") in written


@pytest.mark.parametrize("bad", [dict(kind="sampled"), dict(kind="retrieved", shots=0), dict(kind="cot", shots=2),
                                 dict(shots=-1)])
def test_a_malformed_variant_is_refused(bad):
    with pytest.raises(ValueError):
        Variant(**bad)


def test_a_recipe_serves_the_variant_it_was_made_from_and_cot_is_not_servable():
    fixed = {2: [{"id": "a", "user": "q", "assistant": "a"}] * 2}
    for v in (ZERO_SHOT, Variant("fixed", 2, chat=False), Variant("retrieved", 3)):
        assert Recipe.of(v, "sys", fixed).variant() == v
    with pytest.raises(ValueError, match="chain of thought"):
        Recipe.of(COT, "sys")
