"""The gate and the registry: a pass moves `champion`; every kind of failure is recorded with its reason and
moves nothing; manual promotion and rollback are recorded."""

from __future__ import annotations

from dataclasses import replace

import mlflow
import pytest
from mlflow import MlflowClient

from tasks import registry
from tasks.datasets import Splits
from tasks.recipes import Recipe
from tasks.registry import Candidate, Evaluation, Evidence
from tasks.schema import GateConfig

NAME = "gate-test"
RULES = GateConfig(min_improvement=0.1, max_forgetting=0.05)
N = 100


def right(k: int, n: int = N) -> dict[str, float]:
    """Per-item exact match: the first `k` of `n` test items right."""
    return {str(i): float(i < k) for i in range(n)}


GENERAL = {"tuneline_general_general": (right(50, 400), right(50, 400))}  # base, candidate: nothing forgotten
GOOD = Evidence(metric="exact_match", candidate=right(60), bar=right(30), bar_name="3-shot, chat", general=GENERAL,
                smoke_failures=[])


def test_gate_passes_on_paired_evidence_and_reports_every_rule_with_its_interval():
    decision = registry.gate(GOOD, RULES)
    assert decision.passed, decision.reasons
    bar, champion, forgetting, smoke = decision.reasons
    assert bar.startswith("beats the bar (3-shot, chat) on exact_match: n=100, difference +0.300, 90 % interval [")
    assert "McNemar exact" in bar and "needed lower bound > +0.100" in bar
    assert champion == "no current champion"
    assert forgetting.startswith("forgetting within the limit on general suite tuneline_general_general")
    assert smoke == "smoke test passed"
    rule = decision.comparisons[0]
    # 30 wins, no loss: the difference cannot exceed the 30 discordant items; p = (2/3) ** 30 against +0.10
    assert (rule.n, rule.difference, rule.high) == (100, 0.3, 0.3) and 0.1 < rule.low < 0.3
    assert rule.p_value == pytest.approx((2 / 3) ** 30)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        # +0.12 over the bar in the point estimate, but 12 wins out of 100 items cannot show > +0.10
        ({"candidate": right(42)}, "not shown to beat the bar (3-shot, chat) on exact_match: n=100, difference +0.120"),
        ({"champion": right(70), "champion_version": "3"}, "not shown to be no worse than the champion v3"),
        ({"champion_note": "champion v3 not comparable: 30 of 100 test items were in its training data",
          "champion_version": "3"}, "champion v3 not comparable: 30 of 100"),
        ({"general": {"g": (right(80, 400), right(50, 400))}}, "may forget more than allowed on general suite g"),
        ({"crashed": {"finetuned": "RuntimeError: boom"}}, "evaluation of finetuned crashed (RuntimeError: boom)"),
        ({"candidate": None}, "missing evaluation: fine-tuned"),
        ({"general": {}}, "missing evaluation: general benchmark (forgetting)"),
        ({"smoke_failures": ["'hi': served 'a' != in-process 'b'"]}, "smoke test: the served model answered 1"),
        ({"smoke_failures": None}, "smoke test did not run"),
    ],
)
def test_gate_rejects_with_reason(changes, reason):
    decision = registry.gate(replace(GOOD, **changes), RULES)
    assert not decision.passed
    assert any(r.startswith(reason) for r in decision.reasons), decision.reasons


ALIGNED = replace(GOOD, aligned=registry.AlignedEvidence(tuned=right(60), aligned=right(80), tuned_task=right(60)))


@pytest.mark.parametrize(("changes", "reason"), [
    ({}, None),
    ({"aligned": right(60)}, "not shown to prefer the chosen answers more often than the fine-tuned weights on "
                             "held-out preference pairs: n=100, difference +0.000"),
    ({"tuned_task": right(75)}, "may lose more of the task than align.max_task_drop allows"),
    ({"aligned": None}, "missing evaluation: preferences vs fine-tuned"),
])
def test_an_aligned_system_must_beat_the_fine_tuned_weights_on_held_out_preferences(changes, reason):
    evidence = replace(ALIGNED, aligned=replace(ALIGNED.aligned, **changes))
    decision = registry.gate(evidence, RULES)
    if reason is None:
        assert decision.passed, decision.reasons
        assert any(r.startswith("prefers the chosen answers more often than the fine-tuned weights") and
                   "difference +0.200" in r for r in decision.reasons)
        assert any(r.startswith("task score within align.max_task_drop") for r in decision.reasons)
    else:
        assert not decision.passed
        assert any(r.startswith(reason) for r in decision.reasons), decision.reasons


@pytest.mark.parametrize("aligned_wins", [True, False])
def test_promote_takes_the_aligned_system_only_when_it_passes(aligned_wins, tiny_model, home, prefect_api,
                                                              mlflow_sqlite, tmp_path):
    """The fine-tuned weights score higher on the task; the aligned ones pass every rule only where they beat
    the fine-tuned weights on held-out preferences, and are then the version registered and promoted."""
    from flows.config import load_config
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model = f"aligned-{aligned_wins}"
    config.gate = RULES.model_copy(update={"smoke_prompts": 0, "metric": "exact_match"})  # the task kind's metric
    aligned = registry.AlignedEvidence(right(60), right(80 if aligned_wins else 60), right(62))
    candidates = [Candidate("finetuned", "fine-tuned", tiny_model, Recipe(), replace(GOOD, candidate=right(62)),
                            score=0.62),
                  Candidate("aligned", "fine-tuned + DPO", tiny_model, Recipe(), replace(GOOD, aligned=aligned),
                            score=0.60, preferred=True)]
    verdict = promote_alone(config, candidates, tmp_path, home)
    assert verdict.passed
    assert verdict.system == ("fine-tuned + DPO" if aligned_wins else "fine-tuned")
    assert registry.champion(config.registered_model)[0] == verdict.version


def test_a_continuous_gate_metric_is_judged_by_a_paired_bootstrap():
    soft = {str(i): 0.5 + 0.004 * i for i in range(N)}
    lifted = {k: v + 0.2 for k, v in soft.items()}
    decision = registry.gate(replace(GOOD, metric="field_f1", candidate=lifted, bar=soft), RULES)
    assert decision.passed and "paired bootstrap" in decision.reasons[0]


@pytest.fixture()
def registry_env(mlflow_sqlite, tmp_path):
    mlflow.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("gate")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def _candidate(model_dir: str, evidence: Evidence, champion_items: dict | None = None) -> str:
    with mlflow.start_run() as run:
        score = sum(evidence.candidate.values()) / N
        version = registry.register.fn(NAME, model_dir, run.info.run_id, {"exact_match": score}, "exact_match")
    current = registry.champion(NAME)
    if current:
        evidence = replace(evidence, champion=champion_items, champion_version=current[0])
    registry.record.fn(NAME, version, registry.gate(evidence, RULES))
    return version


def test_register_retried_for_the_same_run_reuses_its_version(registry_env):
    with mlflow.start_run() as run:
        first = registry.register.fn(NAME, registry_env, run.info.run_id, {"exact_match": 0.4}, "exact_match")
        again = registry.register.fn(NAME, registry_env, run.info.run_id, {"exact_match": 0.5}, "exact_match")
    versions = MlflowClient().search_model_versions(f"name = '{NAME}'")
    assert again == first and [str(v.version) for v in versions] == [first]
    assert versions[0].tags[registry.SCORE_TAG] == "0.500000"  # the retry's figures, on the one version


def test_a_version_description_is_its_model_card(registry_env):
    v1 = _candidate(registry_env, GOOD)
    decision = registry.gate(GOOD, RULES)
    markdown = registry.card(NAME, v1, "fine-tuned", "0-shot, chat, system prompt 'sys'", decision,
                             {"reviews": {"train": 800, "validation": 100, "test": 100, "rejected": 3}},
                             {"train": "aaa111", "test": "bbb222"}, "7", "tuneline deploy 2 --config x.yaml",
                             "1 adapter on tiny:0 (sha256 0123456789ab), 1.2 MB")
    registry.describe(NAME, v1, markdown)
    shown = MlflowClient().get_model_version(NAME, v1).description
    assert shown.startswith(f"## {NAME} v{v1}: fine-tuned\n**Gate: PASS** (champion); it replaced v7 as champion.")
    assert "**Stored:** 1 adapter on tiny:0 (sha256 0123456789ab), 1.2 MB" in shown
    assert "| reviews | 800 | 100 | 100 | 3 |" in shown and "test `bbb222`" in shown
    [vs_bar] = [line for line in shown.splitlines() if line.startswith("| fine-tuned | vs bar |")]
    assert vs_bar.startswith("| fine-tuned | vs bar | 100 | +0.300 | [") and vs_bar.endswith("| pass |")
    assert "(H0: difference <= +0.100) | lower bound > +0.100 |" in vs_bar
    assert "tuneline deploy 2 --config x.yaml" in shown and "smoke test passed" in shown


def test_champion_moves_only_on_pass_and_rollback_restores(registry_env, tmp_path):
    client = MlflowClient()
    v1 = _candidate(registry_env, GOOD)
    assert registry.champion(NAME) == (v1, 0.6)
    tags = client.get_model_version(NAME, v1).tags
    assert tags["tuneline.rule.vs_bar"].startswith("pass: n=100, difference +0.300, 90 % interval [")

    rejected = {  # the champion (60 right) re-scored on the same items each time
        "not shown to be no worse than the champion": (replace(GOOD, candidate=right(55)), right(60)),
        "not shown to beat the bar": (replace(GOOD, candidate=right(80), bar=right(75)), right(60)),
        "may forget more than allowed": (replace(GOOD, candidate=right(90),
                                                 general={"g": (right(300, 400), right(100, 400))}), right(60)),
        "evaluation of finetuned crashed": (replace(GOOD, candidate=right(90),
                                                    crashed={"finetuned": "OSError: no weights"}), right(60)),
        "smoke test": (replace(GOOD, candidate=right(90), smoke_failures=["differs"]), right(60)),
    }
    for reason, (evidence, champion_items) in rejected.items():
        version = _candidate(registry_env, evidence, champion_items)
        tags = client.get_model_version(NAME, version).tags
        assert tags["tuneline.decision"] == "fail" and reason in tags["tuneline.reasons"], tags["tuneline.reasons"]
        assert registry.champion(NAME) == (v1, 0.6)
        assert str(client.get_model_version_by_alias(NAME, "challenger").version) == version

    better = _candidate(registry_env, replace(GOOD, candidate=right(80)), right(60))
    assert registry.champion(NAME) == (better, 0.8)
    assert client.get_model_version(NAME, better).tags["tuneline.rule.vs_champion_v1"].startswith("pass: ")
    assert client.get_model_version(NAME, better).tags["tuneline.previous_champion"] == v1
    assert (registry.download(NAME, "champion", tmp_path / "dl") / "config.json").read_text() == "{}"

    assert "rolled back from v" in registry.rollback(NAME, "bad answers in production")
    assert registry.champion(NAME)[0] == v1
    assert client.get_model_version(NAME, better).tags["tuneline.rolled_back"] == "bad answers in production"
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(NAME, "again")

    registry.promote_manually(NAME, better, "fixed upstream")
    assert registry.champion(NAME)[0] == better
    tags = client.get_model_version(NAME, better).tags
    assert tags["tuneline.decision"] == "manual" and tags["tuneline.reasons"] == "promoted by hand: fixed upstream"
    history = [v for k, v in client.get_registered_model(NAME).tags.items() if k.startswith("tuneline.history.")]
    assert len(history) == 2 and any("rollback" in h for h in history)


def test_cli_rollback_without_champion_is_a_one_line_error_with_its_traceback_logged(mlflow_sqlite, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TUNELINE_HOME": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "rollback", "--model", "nobody", "--reason", "x"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    log = tmp_path / "state" / "logs" / "cli.log"
    assert done.stderr.strip().splitlines()[-1] == f"error: nobody has no champion to roll back (traceback in {log})"
    text = log.read_text()
    assert "tuneline rollback --model nobody" in text and "Traceback" in text
    assert "ValueError: nobody has no champion to roll back" in text


def test_gate_reports_the_smoke_test_as_not_run_when_other_rules_failed():
    failing = replace(GOOD, candidate=right(35), smoke_failures=None)
    decision = registry.gate(failing, RULES)
    assert not decision.passed
    assert decision.reasons[-1] == "smoke test not run: the rules above failed"


def promote_alone(config, candidates: list[Candidate], tmp_path, home) -> registry.Verdict:
    """The promote stage on scored candidates alone, with the split keys a version is registered with."""
    from flows.promote import promote_stage

    keys = tmp_path / "data" / "keys.json"
    keys.parent.mkdir()
    keys.write_text('{"fingerprints": {"train": "a", "validation": "b", "test": "c"}, "train": []}')
    mlflow.create_experiment("promote", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("promote")
    with mlflow.start_run() as parent, mlflow.start_run(nested=True) as finetune:
        pass
    unused = str(tmp_path / "no-split-needed.jsonl")
    data = Splits(unused, unused, unused, rejects="", keys=str(keys), fingerprints={}, per_task={}, counts={},
                  mixed_train={})
    return promote_stage(config.registered_model, config.gate, config.task, config.deploy, finetune.info.run_id,
                         Evaluation(candidates), data, str(home), parent.info.run_id)


def test_promote_builds_no_bento_for_a_version_the_metrics_reject(tiny_model, home, prefect_api, mlflow_sqlite,
                                                                   tmp_path):
    """Building and serving a Bento takes a minute: only a version that passed every other rule gets one."""
    import bentoml

    from flows.config import load_config
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model = "never-built"
    evidence = replace(GOOD, candidate=right(40), bar=right(50), smoke_failures=None)
    candidate = Candidate("finetuned", "fine-tuned", tiny_model, Recipe(), evidence, score=0.4)
    verdict = promote_alone(config, [candidate], tmp_path, home)
    assert not verdict.passed and verdict.bento is None
    assert "smoke test not run: the rules above failed" in verdict.reasons
    built = [m for m in bentoml.models.list() if m.info.labels.get("registered_model") == "never-built"]
    assert built == []
    tags = MlflowClient().get_model_version("never-built", verdict.version).tags
    assert tags["tuneline.decision"] == "fail" and "not shown to beat the bar" in tags["tuneline.reasons"]


def test_gc_keeps_the_champion_challenger_rollback_target_served_and_newest_copies(registry_env, tiny_model, home):
    import bentoml

    from flows.config import load_config
    from flows.deploy import prune_served
    from tasks import packaging
    from tests.conftest import ROOT

    v1 = _candidate(registry_env, GOOD)  # champion, then the rollback target
    worse = (replace(GOOD, candidate=right(55)), right(60))
    v2, v3 = _candidate(registry_env, *worse), _candidate(registry_env, *worse)
    v4 = _candidate(registry_env, replace(GOOD, candidate=right(80)), right(60))  # the champion
    v5, v6 = _candidate(registry_env, *worse), _candidate(registry_env, *worse)  # v6: the challenger
    bentos = {v: packaging.build_bento.fn(tiny_model, NAME, v, "sys") for v in (v1, v2, v3, v5, v6)}
    other = packaging.build_bento.fn(tiny_model, "another-model", v2, "sys")
    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model = NAME
    routes = packaging.routes_file(home, NAME)
    routes.parent.mkdir(parents=True, exist_ok=True)
    routes.write_text(f'{{"champion": {{"url": "http://127.0.0.1:1", "model": "{NAME}/{v2}"}}}}')  # served now

    gone = {v3, v5}
    expected = {bentos[v] for v in gone} | {packaging.bento_model(bentos[v]) for v in gone}
    config.name = "gc-runs"  # its own run folders: the newest (the run deploying now) and `feedback` stay
    runs = home / "runs" / config.name
    for folder in ("20261201-090000", "20261202-090000", "20261203-090000", "feedback"):
        (runs / folder / "model").mkdir(parents=True)
    expected |= {str(runs / "20261202-090000"), str(runs / "20261201-090000")}

    removed = prune_served(config, str(home), newest=0)

    assert registry.kept(NAME, 0) == {v1, v4, v6}
    assert set(removed) == expected
    for version, tag in bentos.items():
        stored = [b for b in bentoml.list() if str(b.tag) == tag]
        assert bool(stored) == (version not in gone), version
    assert sorted(p.name for p in runs.iterdir()) == ["20261203-090000", "feedback"]
    assert bentoml.get(other)  # another model's copies are never touched
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 6  # the registry keeps every version
