"""One full lifecycle flow run on tiny models: real Prefect, real MLflow, real lm-eval, a real `bentoml serve`."""

from __future__ import annotations

import httpx
import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from infra.local import free_port
from tests.conftest import DEMO_DATA


@pytest.fixture()
def tiny_config(tmp_path, home) -> str:
    demo = yaml.safe_load((DEMO_DATA.parent.parent / "configs" / "demo.yaml").read_text())
    demo["name"] = "tiny-lifecycle"
    demo["registered_model"] = "tiny-assistant"
    demo["task"].update(data=str(DEMO_DATA), max_validation_examples=4, max_test_examples=6, max_answer_tokens=12)
    demo["models"]["candidates"] = ["tiny:0", "tiny:1"]
    demo["baseline"].update(shots=[0, 1], retrieval_shots=1, reasoning_tokens=8)
    demo["finetune"].update(max_steps=3, batch_size=4, max_seq_length=128)
    # Random tiny models score 0 everywhere; a negative margin lets this run exercise the promoting path.
    # The rejecting path is covered with real scores in test_registry.py.
    demo["gate"].update(min_improvement=-1.0, max_forgetting=1.0)
    demo["deploy"]["port"] = free_port()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(demo))
    return str(path)


def test_lifecycle_registers_promotes_and_serves(tiny_config, prefect_api, mlflow_sqlite, home):
    from flows.lifecycle import lifecycle
    from infra.local import stop_started

    try:
        summary = lifecycle(tiny_config, serve=True)

        client = MlflowClient()
        champion = client.get_model_version_by_alias("tiny-assistant", "champion")
        assert str(champion.version) == summary["promotion"]["version"] == "1"
        assert champion.tags["tuneline.decision"] == "pass"
        assert "no current champion" in champion.tags["tuneline.reasons"]
        assert "smoke test passed" in champion.tags["tuneline.reasons"]
        assert {"tuneline.metric.exact_match", "tuneline.metric.field_f1", "tuneline.metric.rougeL"} <= set(champion.tags)
        assert set(summary["test"]) >= {"base", "baseline", "finetuned"}
        assert all(row["general_acc"] is not None for name, row in summary["test"].items() if name != "baseline")

        parent = mlflow.get_run(summary["mlflow_run_id"])
        stages = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                    output_format="list")
        assert {r.data.tags.get("tuneline.stage") for r in stages} >= {
            "data", "select", "baseline", "finetune", "evaluate", "promote", "deploy"}

        service = summary["service"]
        assert service["served"] and service["model"] == "tiny-assistant/1"
        reply = httpx.post(f"{service['url']}/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "Review: great kettle"}], "max_tokens": 5})
        assert reply.status_code == 200
        body = reply.json()
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
        assert isinstance(body["choices"][0]["message"]["content"], str)

        # A second iteration evaluates the champion side by side and, not being worse, replaces it.
        second = lifecycle(tiny_config, serve=False)
        assert "champion" in second["test"] and second["promotion"]["version"] == "2"
        v2 = client.get_model_version_by_alias("tiny-assistant", "champion")
        assert str(v2.version) == "2" and v2.tags["tuneline.previous_champion"] == "1"
        assert "not worse than the champion" in v2.tags["tuneline.reasons"]
    finally:
        stop_started("bento", home)
