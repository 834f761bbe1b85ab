"""The lifecycle end to end under the shipped gate rules (none relaxed): a task the tiny model truly learns in a few
dozen steps, so a real pass goes through the paired statistics, the forgetting bound over the whole general suite,
the smoke test and `champion`; then a real failure (the same model
again cannot be shown to be no worse than itself), recorded with its interval. (A champion that trained on
today's test items: tests/test_evaluate.py.) Real ephemeral Prefect, MLflow on SQLite, lm-eval, `bentoml serve`."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import reports_config

MODEL = "gate-on-model"


@pytest.fixture()
def config(tmp_path, steady_tiny_model):
    demo = reports_config(tmp_path, "gate-on", steady_tiny_model)
    demo["deploy"]["serve"] = False
    path = tmp_path / "gate-on.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def test_the_gate_passes_on_evidence_then_rejects_with_intervals(config, home, prefect_api, mlflow_sqlite):
    from flows.lifecycle import lifecycle

    client = MlflowClient()
    first = lifecycle(str(config))["promotion"]
    assert first["passed"], first["reasons"]
    assert first["reasons"][0].startswith("beats the bar (0-shot, chat on the base weights) on exact_match: n=48, "
                                       "difference +")
    assert "McNemar exact" in first["reasons"][0] and first["reasons"][-1] == "smoke test passed"
    v1 = client.get_model_version(MODEL, first["version"])
    assert v1.aliases and "champion" in v1.aliases
    assert v1.tags["tuneline.rule.vs_bar"].startswith("pass: n=48")
    [forgetting] = [v for k, v in v1.tags.items() if k.startswith("tuneline.rule.forgetting_tuneline_general")]
    assert forgetting.startswith("pass: n=420"), forgetting
    assert {"tuneline.split.train", "tuneline.split.test"} <= set(v1.tags)

    # The same data and settings again: the same weights, which cannot be shown to beat the champion (itself).
    second = lifecycle(str(config))["promotion"]
    assert not second["passed"]
    assert any(r.startswith(f"not shown to be no worse than the champion v{first['version']} on exact_match: "
                            "n=48, difference +0.000, 90 % interval [+0.000, +0.000]") for r in second["reasons"])
    assert client.get_model_version(MODEL, second["version"]).tags["tuneline.decision"] == "fail"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first["version"]
