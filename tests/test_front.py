"""The front (serving/front.py) and the deploy's take-over (flows/deploy.py): a new version starts beside the
old one and takes over deploy.port without a failed request; a version that cannot serve leaves the old one
serving; a challenger answers its canary share, sticky per user, or shadows the champion. Real `bentoml serve`
processes behind a real front process."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from flows.config import load_config
from flows.deploy import _take_over
from serving.front import share
from tasks import packaging
from tasks.feedback import review, shadow_report
from tasks.paths import feedback_db
from tasks.processes import free_port, recorded_pid
from tests.conftest import ROOT, varied_tiny

# A serving stack of four Bento services and a front: with the whole-stack runs, in `make test-system`.
pytestmark = pytest.mark.system

NAME = "front-test"
SYSTEM = "You answer briefly."


@pytest.fixture(scope="module")
def config():
    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model, config.deploy.port, config.deploy.engine = NAME, free_port(), "transformers"
    config.task.max_answer_tokens = 2
    return config


@pytest.fixture(scope="module")
def bentos(tiny_model, store, tmp_path_factory):
    # v3 starts but cannot answer: its prompt limit refuses the smoke prompt (as a misconfigured version would);
    # v4 is other weights, drawn wide so that its greedy answers vary (v1's, at the usual scale, repeat a token)
    built = {version: packaging.build_bento.fn(tiny_model, NAME, version, SYSTEM, limits)
             for version, limits in (("1", None), ("2", None), ("3", {"max_prompt_tokens": 1}))}
    varied = varied_tiny(Path(tmp_path_factory.mktemp("varied")) / "model", store)
    return {**built, "4": packaging.build_bento.fn(varied, NAME, "4", SYSTEM)}


def ask(url: str, user: str | None = None, content: str = "Review: fine", **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 1,
                            **({"user": user} if user else {}), **extra})


def test_a_new_version_takes_over_without_a_gap_and_a_failing_one_leaves_the_old_serving(config, bentos, home,
                                                                                          prefect_api):
    try:
        url, _ = _take_over(config, str(home), "1", bentos["1"], "Review: fine")
        assert ask(url).json()["model"] == f"{NAME}/1"

        answered, stop = [], threading.Event()

        def client():  # requests without pause for the whole deploy of v2
            while not stop.is_set():
                reply = ask(url)
                answered.append(reply.json()["model"] if reply.status_code == 200 else reply.status_code)

        load = threading.Thread(target=client)
        load.start()
        try:
            _take_over(config, str(home), "2", bentos["2"], "Review: fine")
            for _ in range(3):
                ask(url)  # a few more through the new version
        finally:
            stop.set()
            load.join()
        assert set(answered) <= {f"{NAME}/1", f"{NAME}/2"}, Counter(answered)  # not one failed request
        assert answered[0] == f"{NAME}/1" and answered[-1] == f"{NAME}/2"
        assert recorded_pid(packaging.service_name(NAME, "1"), home) is None  # the old version was stopped

        refused = rf"{NAME} v3 failed before taking over \(RequestRefused: .*\(400\): .*prompt.*{NAME}/2 keeps serving"
        with pytest.raises(RuntimeError, match=refused):  # a 400 is not retried: asking again gets the same
            _take_over(config, str(home), "3", bentos["3"], "Review: fine")
        assert ask(url).json()["model"] == f"{NAME}/2"
        assert recorded_pid(packaging.service_name(NAME, "3"), home) is None
    finally:
        packaging.stop_model(home, NAME)
    assert not any(Path(home).glob(f"*{NAME}*.pid"))


def test_a_challenger_answers_its_canary_share_sticky_per_user(config, bentos, home, prefect_api):
    try:
        services = {v: packaging.serve.fn(bentos[v], free_port(), str(home), name=packaging.service_name(NAME, v))
                    for v in ("1", "2")}
        url = packaging.switch.fn(str(home), NAME, config.deploy.port, {"url": services["1"], "model": f"{NAME}/1"},
                                  {"url": services["2"], "model": f"{NAME}/2"}, canary=0.25)
        users = [f"user-{i}" for i in range(400)]
        answered = {user: ask(url, user).json()["model"] for user in users}
        challenger = sum(model == f"{NAME}/2" for model in answered.values())
        assert 70 <= challenger <= 130, challenger  # 25 % of 400, within about 3 standard deviations
        assert all((share(u) < 0.25) == (m == f"{NAME}/2") for u, m in answered.items())  # by the user's share
        again = {user: ask(url, user).json()["model"] for user in users[:40]}
        assert again == {user: answered[user] for user in users[:40]}  # sticky
        anonymous = Counter(ask(url).json()["model"] for _ in range(40))
        assert set(anonymous) == {f"{NAME}/1", f"{NAME}/2"}  # without a user each request is drawn
    finally:
        packaging.stop_model(home, NAME)


def test_a_shadow_answers_every_request_beside_the_champion_recorded_and_never_returned(config, bentos, home,
                                                                                        prefect_api):
    db = feedback_db(Path(home).resolve())
    try:
        services = {v: packaging.serve.fn(bentos[v], free_port(), str(home), name=packaging.service_name(NAME, v))
                    for v in ("1", "4")}
        url = packaging.switch.fn(str(home), NAME, config.deploy.port, {"url": services["1"], "model": f"{NAME}/1"},
                                  {"url": services["4"], "model": f"{NAME}/4"}, shadow=True)
        questions = [f"Review: item {i} broke after {i + 2} days" for i in range(6)]
        replies = [ask(url, content=q, max_tokens=3).json() for q in questions]
        streamed = ask(url, content="Review: streamed", stream=True)  # not mirrored: a copy would hold the shadow
        assert streamed.status_code == 200 and {r["model"] for r in replies} == {f"{NAME}/1"}  # the champion's
        for _ in range(120):  # the shadow answers after the client got the champion's reply
            if httpx.get(f"{url}/front").json()["shadowed"]["answered"] == 6:
                break
            time.sleep(1)

        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT c.id, c.answer, s.answer, s.model, s.id FROM responses c JOIN responses s "
                                "ON s.pair = c.pair AND s.shadow = 1 WHERE c.model = ?", (f"{NAME}/1",)).fetchall()
        assert sorted(r[0] for r in rows) == sorted(r["id"] for r in replies)  # each request's shadow answer
        assert {r[3] for r in rows} == {f"{NAME}/4"}
        assert not {r[4] for r in rows} & {r["id"] for r in replies}  # no client got a shadow's answer
        differ = [r for r in rows if r[1].strip() != r[2].strip()]
        assert differ, rows  # other weights answer otherwise somewhere
        rid, _, shadow_answer, _, _ = differ[0]
        fid = httpx.post(f"{url}/feedback", json={"response_id": rid, "rating": 1, "correction": shadow_answer},
                         timeout=30).json()["id"]
        [pending] = shadow_report(db, NAME)
        assert (pending.pairs, pending.agreed, pending.judged) == (6, 6 - len(differ), 0)  # nothing reviewed yet
        review(db, "approved", ids=[fid], by="test")
        [report] = shadow_report(db, NAME)
        assert (report.champion, report.shadow, report.judged) == (f"{NAME}/1", f"{NAME}/4", 1)
        assert (report.champion_right, report.shadow_right, report.wins, report.losses) == (0, 1, 1, 0)
    finally:
        packaging.stop_model(home, NAME)
