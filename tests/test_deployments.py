"""`tuneline up` as a user runs it: real Prefect and MLflow servers and the runner serving the deployments.

Runs are triggered through the Prefect REST API and execute on the runner; the first iteration passes the shipped
gate rules (none relaxed) on a task the tiny model truly learns; a correction sent to the served model, once
approved, reaches the next feedback round's training data, whose iteration is then rejected against the champion
with its interval; both UIs are then checked in headless Chromium. The tests in this file run in order on one
stack (module fixture), as a user's day would: its two lifecycle runs are the suite's end-to-end runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tasks.processes import free_port
from tests.conftest import reports_config
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.system
NAME, MODEL = "ops-demo", "ops-assistant"
STAGES = ("data", "select", "baseline", "finetune", "evaluate", "promote", "deploy")
CORRECTION = "label: yes"
DEPLOYMENTS = ("lifecycle", "feedback", "finetune-model", "evaluate-version", "deploy-version", "promote-version",
               "rollback")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, steady_tiny_model) -> Stack:
    """The reports task on the steady tiny model under the shipped demo config's gate rules (none relaxed)."""
    home = tmp_path_factory.mktemp("ops-home")
    demo = reports_config(home, NAME, steady_tiny_model)
    demo["registered_model"] = MODEL
    demo["deploy"]["port"] = free_port()
    demo["schedule"] = {"lifecycle": None, "feedback": "30 2 * * *", "timezone": "UTC"}
    with running_stack(home, demo) as stack:
        yield stack


def test_up_registers_every_deployment_with_its_form_and_schedule(stack):
    for flow_name in DEPLOYMENTS:
        deployment = stack.api("GET", f"/deployments/name/{flow_name}/{NAME}").json()
        assert deployment["status"] == "READY", flow_name
        schema = deployment["parameter_openapi_schema"]["properties"]
        default_key = "model" if flow_name in {"promote-version", "rollback"} else "config_path"
        assert deployment["parameters"][default_key] in {str(stack.config), MODEL}
        assert default_key in schema  # typed parameters: the form in the Prefect UI
    lifecycle = stack.api("GET", f"/deployments/name/lifecycle/{NAME}").json()
    assert lifecycle["parameter_openapi_schema"]["properties"]["serve"]["anyOf"][0]["type"] == "boolean"
    feedback = stack.api("GET", f"/deployments/name/feedback/{NAME}").json()
    assert [s["schedule"]["cron"] for s in feedback["schedules"]] == ["30 2 * * *"]
    assert not lifecycle["schedules"]


def test_lifecycle_triggered_through_the_api_completes_on_the_runner(stack):
    run = stack.trigger(f"lifecycle/{NAME}")
    assert run["state"]["type"] == "COMPLETED", stack.logs(run["id"])[-3000:]
    stack.runs["lifecycle"] = run["id"]

    # Under the shipped gate rules (none relaxed) a real pass goes through the paired statistics, the forgetting
    # bound over the whole general suite, the smoke test and `champion`.
    client = stack.mlflow_client()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.tags["tuneline.decision"] == "pass"
    reasons = champion.tags["tuneline.reasons"]
    assert reasons.startswith("beats the bar (0-shot, chat on the base weights) on exact_match: n=48, difference +")
    assert "McNemar exact" in reasons and "no current champion" in reasons and "smoke test passed" in reasons
    assert champion.tags["tuneline.rule.vs_bar"].startswith("pass: n=48")
    [forgetting] = [v for k, v in champion.tags.items() if k.startswith("tuneline.rule.forgetting_tuneline_general")]
    assert forgetting.startswith("pass: n=420"), forgetting
    assert {"tuneline.split.train", "tuneline.split.test"} <= set(champion.tags)
    assert champion.description.startswith(f"## {MODEL} v1: ") and "| reports | " in champion.description
    assert {"tuneline.metric.exact_match", "tuneline.metric.field_f1", "tuneline.metric.rougeL"} <= set(champion.tags)
    evaluate = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                  "tags.`tuneline.stage` = 'evaluate'")[0]
    assert {"base_exact_match", "finetuned_exact_match", "base_general_acc", "finetuned_general_acc"} \
        <= set(evaluate.data.metrics)

    reply = httpx.post(f"{stack.service}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "The lamp is great"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == f"{MODEL}/1" and body["usage"]["completion_tokens"] >= 1

    shown = stack.tuneline("status")  # what an operator sees: the stack, the runner and what the front serves
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = {line.split(":")[0]: line for line in shown.stdout.splitlines()}
    assert lines["prefect"].endswith(f"{stack.prefect} answering") and lines["runner"].startswith("runner: running")
    assert lines[f"front-{MODEL}"].endswith(f", {stack.service}: champion {MODEL}/1")
    assert lines[f"bento-{MODEL}-v1"].startswith(f"bento-{MODEL}-v1: running (pid ")


def test_each_stage_publishes_a_markdown_artifact_linking_its_mlflow_run(stack):
    client = stack.mlflow_client()
    experiment = client.get_experiment_by_name(NAME)
    [parent] = client.search_runs([experiment.experiment_id], "tags.`tuneline.kind` = 'lifecycle'")
    stage_runs = {r.data.tags["tuneline.stage"]: r.info.run_id for r in client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        if "tuneline.stage" in r.data.tags}
    assert set(STAGES) <= set(stage_runs)
    for stage in STAGES:
        [artifact] = stack.api("POST", "/artifacts/latest/filter",
                               json={"artifacts": {"key": {"any_": [f"{NAME}-{stage}"]}}}).json()
        assert artifact["type"] == "markdown"
        link = f"{stack.mlflow}/#/experiments/{experiment.experiment_id}/runs/{stage_runs[stage]}"
        assert link in artifact["data"], (stage, artifact["data"])


def test_prefect_restart_keeps_history_and_deployments(stack):
    """The Prefect server (stopped by its PID, and only it) goes away and `tuneline up` runs again: it starts
    Prefect, reuses the running MLflow, and history and deployments are kept; the next test's feedback round
    runs on the restarted stack."""
    from tasks.processes import recorded_pid, running, stop_started

    def finished() -> set[str]:  # scheduled future runs are re-created when the deployments are re-registered
        runs = stack.api("POST", "/flow_runs/filter", json={}).json()
        return {r["id"] for r in runs if r["state"]["type"] != "SCHEDULED"}

    before = finished()
    pid = recorded_pid("prefect", stack.home)
    assert "stopped" in stop_started("prefect", stack.home)  # the server only; its database stays on disk
    assert not running(pid)  # stopped by its PID: the process has exited (init reaps it a moment later)
    assert "left alone" in stop_started("prefect", stack.home)  # nothing recorded: nothing else is touched
    with pytest.raises(httpx.HTTPError):
        stack.api("GET", "/health")
    up = stack.tuneline("up", "--config", str(stack.config))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "prefect: started" in up.stdout and "mlflow: reusing" in up.stdout, up.stdout
    assert before <= finished() and stack.runs["lifecycle"] in before


def test_a_correction_sent_to_the_service_is_in_the_next_rounds_training_data(stack):
    question = "The kettle is great (a new report)"
    answer = httpx.post(f"{stack.service}/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "user", "content": question}], "max_tokens": 4}).json()
    sent = httpx.post(f"{stack.service}/feedback", timeout=30,
                      json={"response_id": answer["id"], "rating": 1, "correction": CORRECTION})
    assert sent.status_code == 200 and sent.json()["status"] == "pending", sent.text

    waiting = stack.trigger(f"feedback/{NAME}", {"serve": False})  # pending feedback trains nothing
    assert waiting["state"]["type"] == "COMPLETED"
    assert "1 pending review" in stack.logs(waiting["id"], expect="no approved feedback")
    approved = stack.tuneline("feedback", "approve", str(sent.json()["id"]), "--reason", "checked by hand")
    assert approved.returncode == 0 and "approved 1 item(s)" in approved.stdout, approved.stdout + approved.stderr

    run = stack.trigger(f"feedback/{NAME}", {"serve": False})
    assert run["state"]["type"] == "COMPLETED", stack.logs(run["id"])[-3000:]

    client = stack.mlflow_client()
    experiment = client.get_experiment_by_name(NAME).experiment_id
    [round_run] = client.search_runs([experiment], "tags.`tuneline.kind` = 'feedback-round'")
    # The round traced the served answers first: the correction's answer is a trace in MLflow carrying the
    # rating, the correction and the CLI's approval as assessments, where a reviewer could have approved it.
    [traced] = [t for t in client.search_traces(locations=[experiment])
                if t.info.tags.get("tuneline.response_id") == answer["id"]]
    assert {a.name for a in traced.info.assessments} >= {"rating", "expected_response", "tuneline.review"}
    assert round_run.data.params["new_examples"] == "1" and round_run.info.status == "FINISHED"
    [iteration] = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{round_run.info.run_id}'")
    [data_run] = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{iteration.info.run_id}' "
                                                  "and tags.`tuneline.stage` = 'data'")
    assert data_run.data.metrics["mixed_train_feedback"] == 1
    newest = sorted(stack.home.glob(f"runs/{NAME}/*/data/train.jsonl"))[-1]  # the round's iteration
    rows = [json.loads(line) for line in newest.read_text().splitlines()]
    fed = [r for r in rows if r["task"] == "feedback"]
    assert [(r["user"], r["assistant"]) for r in fed] == [(question, CORRECTION)]
    # The round's iteration is a second iteration: it scored the champion beside its model. Trained on the same
    # reports plus one correction, v2 answers the test items as v1 does, so the shipped rules (shown no worse:
    # a lower bound above -0) keep v1 the champion, and v2 is registered with the reason and its interval.
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["tuneline.decision"] == "fail"
    why = v2.tags["tuneline.reasons"]
    assert "not shown to be no worse than the champion v1 on exact_match: n=48, difference " in why
    assert "90 % interval [" in why and "for H0: difference" in why
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    again = stack.trigger(f"feedback/{NAME}")
    assert again["state"]["type"] == "COMPLETED"
    assert "no approved feedback" in stack.logs(again["id"], expect="no approved feedback")
    assert len(client.search_runs([experiment], "tags.`tuneline.kind` = 'feedback-round'")) == 1
    stack.runs["feedback"] = run["id"]


# ------------------------------------------------------------------------------------------- the UIs, in Chromium
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium through its chromedriver (no background networking: the network is closed)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager's usage statistics
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1500,950"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the pages are saved: $TUNELINE_SCREENSHOTS (the README's come from here), else a temp folder."""
    folder = Path(os.environ.get("TUNELINE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _page_shows(driver, url: str, texts: list[str], timeout_s: float = 60) -> str:
    """Open `url` and wait until the rendered page (a single-page app) shows every one of `texts`."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)

    def body() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    try:
        WebDriverWait(driver, timeout_s, poll_frequency=1).until(lambda _: all(t in body() for t in texts))
    except TimeoutException:
        missing = [t for t in texts if t not in body()]
        pytest.fail(f"{url} never showed {missing}; it shows: {body()[:1500]!r}")
    return body()


def test_prefect_ui_lists_the_deployments_and_the_completed_lifecycle_run(stack, browser, screenshots):
    _page_shows(browser, f"{stack.prefect}/deployments", [NAME, *DEPLOYMENTS, "At 02:30 AM every day"])
    browser.save_screenshot(str(screenshots / "prefect-deployments.png"))
    run = stack.api("GET", f"/flow_runs/{stack.runs['lifecycle']}").json()
    _page_shows(browser, f"{stack.prefect}/runs/flow-run/{run['id']}", [run["name"], "Completed", "lifecycle"])
    browser.save_screenshot(str(screenshots / "prefect-lifecycle-run.png"))


def test_mlflow_ui_shows_the_run_its_stage_runs_and_the_champion(stack, browser, screenshots):
    from selenium.webdriver.common.by import By

    client = stack.mlflow_client()
    experiment = client.get_experiment_by_name(NAME).experiment_id
    [first] = client.search_runs([experiment], "tags.`tuneline.kind` = 'lifecycle' and tags.mlflow.parentRunId "
                                               "IS NULL")
    name = first.info.run_name
    _page_shows(browser, f"{stack.mlflow}/#/experiments/{experiment}/runs", [name, "feedback round 1"])
    # Nested runs are folded under their parent: unfold the iteration and find every stage's run.
    browser.find_element(By.XPATH, f"//a[contains(., '{name}')]/preceding::button"
                                   "[contains(@data-component-id, 'runnamecellrenderer')][1]").click()
    body = _page_shows(browser, browser.current_url, [name])
    missing = [stage for stage in STAGES if f"\n{stage}\n" not in f"\n{body}\n"]
    assert not missing, f"stage runs not shown under {name}: {missing}"
    browser.save_screenshot(str(screenshots / "mlflow-runs.png"))
    _page_shows(browser, f"{stack.mlflow}/#/models/{MODEL}", [MODEL, "Version 1", "Version 2", "@ champion"])
    browser.save_screenshot(str(screenshots / "mlflow-registry.png"))
