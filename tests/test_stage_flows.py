"""The stages that run alone (the deployments besides `lifecycle`): fine-tune a pending version, evaluate it,
promote it by hand, roll back, serve the champion; on a real ephemeral Prefect and a real MLflow on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from serving.front import share
from tasks import packaging
from tasks.datasets import fingerprint, read_examples
from tasks.processes import free_port, recorded_pid
from tests.conftest import DEMO_DATA, ROOT


@pytest.fixture()
def config(tmp_path) -> str:
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo.update(name="alone", registered_model="alone-model")
    demo["task"].update(data=str(DEMO_DATA), max_validation_examples=4, max_test_examples=4, max_answer_tokens=6)
    demo["models"]["candidates"] = ["tiny:0", "tiny:1"]
    demo["finetune"].update(max_steps=4, batch_size=4, max_seq_length=128)
    demo["evaluation"]["general_limit"] = 10
    demo["deploy"]["port"] = free_port()
    path = tmp_path / "alone.yaml"
    path.write_text(yaml.safe_dump(demo))
    return str(path)


@pytest.mark.system  # five stages alone, three Bentos built, three services started: about 2 min on 2 cores
def test_finetune_evaluate_promote_and_rollback_run_alone(config, home, prefect_api, mlflow_sqlite):
    from flows.deploy import deploy_version
    from flows.evaluate import evaluate_version
    from flows.finetune import finetune_model
    from flows.promote import promote_version, rollback_champion

    client = MlflowClient()
    first = finetune_model(config, model="tiny:1", max_steps=2)
    assert first["version"] == "1" and first["model"] == "tiny:1"
    pending = client.get_model_version("alone-model", "1")
    assert pending.tags["tuneline.decision"] == "pending" and "champion" not in pending.aliases
    assert first["steps"] == 2  # the form's max_steps overrides the config's 4

    scores = evaluate_version(config, version="1")
    tags = client.get_model_version("alone-model", "1").tags
    assert float(tags["tuneline.evaluated.exact_match"]) == pytest.approx(scores["exact_match"], abs=1e-6)
    assert float(tags["tuneline.evaluated.general_acc"]) == pytest.approx(scores["general_acc"], abs=1e-6)
    # through the lifecycle's data path: the lengths check ran with the version's tokenizer before scoring, and
    # the scores name the test items they were measured on
    [parent] = client.search_runs([client.get_experiment_by_name("alone").experiment_id],
                                  "tags.`tuneline.kind` = 'evaluate-version'")
    stages = {r.data.tags.get("tuneline.stage") for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert {"data", "lengths", "evaluate"} <= stages
    scored = sorted(Path(home).glob("runs/alone/*/data/test.jsonl"))[-1]  # evaluate-version's, after the check
    assert tags["tuneline.evaluated.test_split"] == fingerprint(read_examples(scored))

    with pytest.raises(ValueError, match="no champion"):
        evaluate_version(config)  # no version named and none promoted yet

    assert "champion is now v1" in promote_version("alone-model", "1", "reviewed by hand")
    finetune_model(config)  # the config's first candidate, its own max_steps: v2, still pending
    assert "champion is now v2 (was v1)" in promote_version("alone-model", "2", "better on spot checks")
    assert "rolled back from v2 to v1" in rollback_champion("alone-model", "complaints")
    assert str(client.get_model_version_by_alias("alone-model", "champion").version) == "1"

    try:
        served = deploy_version(config)  # the champion, on the config's port
        assert served.served and served.model == "alone-model/1"
        pids = [recorded_pid(n, home) for n in (packaging.front_name("alone-model"),
                                                packaging.service_name("alone-model", "1"))]
        again = deploy_version(config)  # the champion did not change: left running, not rebuilt or restarted
        assert (again.model, again.reason, again.bento) == ("alone-model/1", "served already", None)
        assert [recorded_pid(n, home) for n in (packaging.front_name("alone-model"),
                                                packaging.service_name("alone-model", "1"))] == pids

        # deploy.canary: the challenger (v2, registered after v1, rolled back from) answers half beside v1
        with_canary = yaml.safe_load(Path(config).read_text())
        with_canary["deploy"]["canary"] = 0.5
        Path(config).write_text(yaml.safe_dump(with_canary))
        side = deploy_version(config)
        assert (side.model, side.challenger, side.canary) == ("alone-model/1", "alone-model/2", 0.5)
        assert recorded_pid(packaging.service_name("alone-model", "1"), home) == pids[1]  # the champion untouched
        answered = {u: packaging.chat.fn(f"{served.url}", "Review: fine", user=u)["model"] for u in "abcdefghijkl"}
        assert set(answered.values()) == {"alone-model/1", "alone-model/2"}, answered
        assert all((share(u) < 0.5) == (m == "alone-model/2") for u, m in answered.items())
        challenger_pid = recorded_pid(packaging.service_name("alone-model", "2"), home)

        promote_version("alone-model", "2", "won its canary")  # the challenger takes over: its service is reused
        promoted = deploy_version(config)
        assert (promoted.model, promoted.challenger) == ("alone-model/2", None)
        assert recorded_pid(packaging.service_name("alone-model", "2"), home) == challenger_pid
        assert recorded_pid(packaging.service_name("alone-model", "1"), home) is None
        assert packaging.routes(home, "alone-model")["challenger"] is None
    finally:
        packaging.stop_model(home, "alone-model")


def test_align_model_registers_a_pending_aligned_version_from_a_preference_file(config, home, prefect_api,
                                                                               mlflow_sqlite, tmp_path):
    """The align-model deployment alone: a registered version preference-tuned on a file given with the run,
    compared with it on held-out pairs, registered as pending; the champion does not move."""
    import json

    import mlflow

    from flows.align import align_model
    from flows.finetune import finetune_model

    reviews = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:80]]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"id": r["id"], "review": r["review"], "chosen": r["sentiment"],
                                         "rejected": "neutral" if r["sentiment"] != "neutral" else "positive"}) + "\n"
                             for r in reviews))
    raw = yaml.safe_load(Path(config).read_text())
    raw["align"] = {"data": {"name": "prefs", "kind": "preference", "data": str(ROOT / "data" / "reviews.jsonl"),
                             "prompt": raw["task"]["prompt"], "answer": "{{ answer }}",
                             "system_prompt": raw["task"]["system_prompt"]},
                    "max_steps": 2, "batch_size": 2, "max_seq_length": 192, "max_test_pairs": 8, "save_steps": None}
    Path(config).write_text(yaml.safe_dump(raw))
    finetune_model(config, model="tiny:1", max_steps=2)
    found = align_model(config, version="1", preferences=str(prefs))
    assert found["version"] == "2" and found["from"] == "1"
    assert set(found["preference_accuracy"]) == {"v1", "aligned"}
    version = MlflowClient().get_model_version("alone-model", "2")
    assert version.tags["tuneline.decision"] == "pending" and "champion" not in version.aliases
    assert version.tags["tuneline.system"] == "v1 + DPO"
    [run] = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`tuneline.stage` = 'align'",
                               output_format="list")
    # the stage's parameters and the trainer's (logged into the same run by its MLflow callback) all landed
    assert run.data.params["align_loss"] == "sigmoid" and run.data.params["loss_type"] == "['sigmoid']"
    with pytest.raises(ValueError, match="no champion"):
        align_model(config)  # nothing named and nothing promoted


def test_a_stage_sent_to_a_work_pool_without_a_worker_fails_at_once_naming_the_fix(config, prefect_api, tmp_path):
    """The lifecycle would otherwise wait for ever on a run no worker takes."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.config import load_config
    from flows.finetune import finetune_on_pool

    cfg = load_config(config)
    cfg.finetune.work_pool = "gpu-nobody"
    with pytest.raises(RuntimeError, match="finetune.work_pool gpu-nobody: no such work pool; `tuneline up` creates"):
        finetune_on_pool(cfg, "base", None, str(tmp_path), "run")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu-nobody", type="process"))
    with pytest.raises(RuntimeError, match="no worker is online; start one where the GPUs are .*tuneline worker "
                                           "gpu-nobody"):
        finetune_on_pool(cfg, "base", None, str(tmp_path), "run")
