"""The service with vLLM as its engine (serving/vllm_engine.py), for real on vLLM's CPU build: the same prompts,
greedy answers and ranked probabilities as the transformers engine, streaming, seeds, a client that leaves
mid-stream, a LoRA version served as its adapter on the base, and no vLLM process left behind. `make test-vllm`
(which installs `.venv-vllm` first); skipped where that environment is missing."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from serving import prompt_rule
from tasks import packaging
from tasks.models import load
from tasks.processes import free_port, stop_started
from tests.conftest import ROOT, lora_run, varied_tiny

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not packaging.vllm_python().is_file(),
                                 reason=f"no vLLM environment at {packaging.vllm_python()} (make install-vllm)")]
SYSTEM = "You answer briefly."
PROMPTS = ["Review: the kettle leaks", "Review: these shoes are great, I wear them every day"]
ANSWERS = ["positive", "negative", "neutral"]
PAIR = "vllm-pair"  # the registered model name of the champion/challenger tests


def _vllm_processes(bento: str) -> list[int]:
    """PIDs of vLLM servers serving the Bento's model (from /proc: this test's own, by the model's store path)."""
    version = packaging.bento_model(bento).split(":")[1]
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"vllm.entrypoints.openai.api_server" in cmd \
                and any(version.encode() in part for part in cmd):
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def served(home, store, tmp_path_factory):
    model_dir = varied_tiny(tmp_path_factory.mktemp("tiny64") / "model", store)
    bento = packaging.build_bento.fn(model_dir, "vllm-test", "1", SYSTEM, {"max_prompt_tokens": 96, "max_tokens": 24},
                                     answers=ANSWERS)
    url = packaging.serve.fn(bento, free_port(), str(home), name="bento-vllm-test", engine="vllm")
    model, tokenizer = load(Path(model_dir))
    yield {"url": url, "model": model, "tokenizer": tokenizer, "dir": model_dir, "bento": bento}
    stop_started("bento-vllm-test", Path(home))


def chat(served, content: str, **body) -> dict:
    reply = httpx.post(f"{served['url']}/v1/chat/completions", timeout=300,
                       json={"messages": [{"role": "user", "content": content}], **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _reference(served, content: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """The prompt ids and greedy reply ids of the transformers engine, in-process, under the same prompt rule."""
    tok, model = served["tokenizer"], served["model"]
    text = prompt_rule.render_question(tok, True, SYSTEM, [], content)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return ids, out[0, len(ids):].tolist()


def test_greedy_answers_match_the_transformers_engine_token_for_token(served):
    replies = set()
    for content in PROMPTS:
        ids, reference = _reference(served, content, 24)
        assert len(set(reference)) > 8  # a reply of many different tokens: agreement means something
        reply = chat(served, content, max_tokens=24, response_format={"type": "text"})
        assert reply["usage"]["prompt_tokens"] == len(ids)  # the same prompt, rendered by the same rule
        expected = served["tokenizer"].decode(reference, skip_special_tokens=True)
        assert reply["choices"][0]["message"]["content"] == expected
        assert reply["usage"]["completion_tokens"] == len(reference)
        replies.add(expected)
    assert len(replies) == len(PROMPTS)


def _assert_ranked_as_in_process(served, content: str) -> None:
    """The service's label probabilities are the in-process model's, within 1e-4, and its reply their argmax."""
    tok, model = served["tokenizer"], served["model"]
    text = prompt_rule.render_question(tok, True, SYSTEM, [], content)
    ids, continuations = prompt_rule.ranking_inputs(tok, text, ANSWERS, chat=True)
    with torch.no_grad():
        expected = []
        for c in continuations:
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids + c])).logits.float(), dim=-1)[0]
            expected.append(float(sum(logprobs[len(ids) + j - 1, t] for j, t in enumerate(c))))
    reply = chat(served, content)  # a classifier's reply: its most likely label, every label's probability
    found = reply["choices"][0]["probabilities"]
    want = prompt_rule.probabilities(expected)
    assert np.allclose([found[a] for a in ANSWERS], want, atol=1e-4), (found, want)
    assert reply["choices"][0]["message"]["content"] == ANSWERS[int(np.argmax(expected))]


def test_ranked_probabilities_match_the_transformers_engine(served):
    _assert_ranked_as_in_process(served, PROMPTS[0])


def test_streaming_yields_the_plain_reply_and_seeds_repeat(served):
    plain = chat(served, PROMPTS[1], max_tokens=16, response_format={"type": "text"})
    pieces, finish = [], None
    with httpx.stream("POST", f"{served['url']}/v1/chat/completions", timeout=300,
                      json={"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 16, "stream": True,
                            "response_format": {"type": "text"}}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert finish == plain["choices"][0]["finish_reason"]
    sampled = [chat(served, PROMPTS[0], max_tokens=12, temperature=1.0, seed=7, response_format={"type": "text"})
               ["choices"][0]["message"]["content"] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_client_leaving_mid_stream_leaves_the_service_answering(served):
    with httpx.stream("POST", f"{served['url']}/v1/chat/completions", timeout=300,
                      json={"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 24, "stream": True,
                            "response_format": {"type": "text"}}) as reply:
        next(reply.iter_lines())  # the first event, then the client goes away
    reply = chat(served, PROMPTS[1], max_tokens=4, response_format={"type": "text"})
    assert reply["usage"]["completion_tokens"] <= 4


def test_a_lora_version_is_served_as_its_adapter_on_the_base_and_answers_as_its_merged_weights(served, home,
                                                                                                tmp_path):
    """vLLM serves the adapter on the base weights (--enable-lora), not a merged copy: greedy replies token for
    token and label probabilities within 1e-4 of the merged model's in-process answers (measured here: the
    largest log-probability difference 2e-5)."""
    base = tmp_path / "base"
    shutil.copytree(served["dir"], base)
    merged = lora_run(base, tmp_path / "run")
    bento = packaging.build_bento.fn(str(merged), "vllm-lora", "1", SYSTEM,
                                     {"max_prompt_tokens": 96, "max_tokens": 24}, answers=ANSWERS)
    url = packaging.serve.fn(bento, free_port(), str(home), name="bento-vllm-lora", engine="vllm")
    try:
        [pid] = _vllm_processes(bento)
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--enable-lora" in command and b"--max-lora-rank" in command
        model, tokenizer = load(merged)
        lora = {"url": url, "model": model, "tokenizer": tokenizer}
        for content in PROMPTS:
            _, reference = _reference(lora, content, 24)
            assert reference != _reference(served, content, 24)[1]  # the adapter changes the base's reply
            reply = chat(lora, content, max_tokens=24, response_format={"type": "text"})
            assert reply["choices"][0]["message"]["content"] == tokenizer.decode(reference, skip_special_tokens=True)
        _assert_ranked_as_in_process(lora, PROMPTS[1])
    finally:
        stop_started("bento-vllm-lora", Path(home))


@pytest.fixture(scope="module")
def lora_pair(served, tmp_path_factory):
    """Two LoRA versions of one base (the module's weights), v1 and v2, as Bentos: their tags and merged folders."""
    folder = tmp_path_factory.mktemp("pair")
    shutil.copytree(served["dir"], folder / "base")
    merged = {v: lora_run(folder / "base", folder / f"v{v}", seed=int(v)) for v in ("1", "2")}
    tags = {v: packaging.build_bento.fn(str(m), PAIR, v, SYSTEM, {"max_prompt_tokens": 96, "max_tokens": 24},
                                        answers=ANSWERS) for v, m in merged.items()}
    return tags, merged


def test_champion_and_challenger_share_one_vllm_engine_and_a_promoted_challenger_gets_its_own(
        served, lora_pair, home, prefect_api):
    """Two LoRA versions of one base through flows/deploy.py with deploy.engine vllm. The champion's route records
    its engine; the challenger's service loads its adapter into it (no second vLLM server), and requests to both at
    once are each answered as that version's merged weights answer them, token for token. A challenger that stops
    takes only its adapter out of the engine. Promoted, the challenger takes over on an engine of its own, with the
    front answering throughout, and the old champion's engine stops with its service (no vLLM process left)."""
    from flows.config import load_config
    from flows.deploy import _start, _take_over

    tags, merged = lora_pair
    config = load_config(ROOT / "configs" / "demo.yaml")
    config.registered_model, config.deploy.port, config.deploy.engine = PAIR, free_port(), "vllm"
    config.task.max_answer_tokens = 4
    ask = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 2, "user": "someone"}
    try:
        url, _ = _take_over(config, str(home), "1", tags["1"], PROMPTS[0])
        champion = packaging.routes(home, PAIR)["champion"]
        assert champion["engine_url"] and champion["bento"] == tags["1"]
        assert packaging.shared_engine(champion, served["bento"]) is None  # dense weights: an engine of its own
        side, _ = _start(config, str(home), "2", tags["2"], PROMPTS[0], beside=champion)
        assert side["shares"] == champion["engine_url"] and _vllm_processes(tags["2"]) == []
        assert len(_vllm_processes(tags["1"])) == 1

        def engine_models() -> set[str]:
            return {m["id"] for m in httpx.get(f"{champion['engine_url']}/v1/models").json()["data"]}

        assert len(engine_models()) == 3  # the base and two adapters
        urls = {"1": champion["url"], "2": side["url"]}
        versions = {v: dict(zip(("model", "tokenizer"), load(m), strict=True), url=urls[v]) for v, m in merged.items()}
        expected = {(v, c): _reference(versions[v], c, 24)[1] for v in versions for c in PROMPTS}
        assert any(expected["1", c] != expected["2", c] for c in PROMPTS)  # the two adapters answer differently
        with ThreadPoolExecutor(4) as pool:  # at once: one engine batches both adapters
            replies = dict(zip(expected, pool.map(lambda key: chat(versions[key[0]], key[1], max_tokens=24,
                                                                    response_format={"type": "text"}), expected),
                               strict=True))
        for (v, content), reference in expected.items():
            tokenizer = versions[v]["tokenizer"]
            assert replies[v, content]["choices"][0]["message"]["content"] == \
                tokenizer.decode(reference, skip_special_tokens=True), (v, content)

        stop_started(side["service"], Path(home))
        assert len(engine_models()) == 2  # its adapter unloaded; the champion's stays
        assert chat(versions["1"], PROMPTS[0], max_tokens=4)["usage"]["completion_tokens"] > 0

        side, _ = _start(config, str(home), "2", tags["2"], PROMPTS[0], beside=champion)  # joins again
        packaging.switch.fn(str(home), PAIR, config.deploy.port, champion, side, canary=1.0)
        assert httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=120).json()["model"] == f"{PAIR}/2"

        _take_over(config, str(home), "2", tags["2"], PROMPTS[0])  # promoted: an engine of its own
        now = packaging.routes(home, PAIR)["champion"]
        assert now["model"] == f"{PAIR}/2" and "shares" not in now and now["engine_url"] != champion["engine_url"]
        assert httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=120).json()["model"] == f"{PAIR}/2"
        assert len(_vllm_processes(tags["2"])) == 1
        deadline = time.monotonic() + 60
        while _vllm_processes(tags["1"]) and time.monotonic() < deadline:
            time.sleep(1)
        assert _vllm_processes(tags["1"]) == []  # the old champion's engine went with its service
    finally:
        packaging.stop_model(home, PAIR)


def test_auto_on_a_cpu_takes_the_engine_a_probe_measures_faster_and_remembers_it(served, tiny_model, tmp_path):
    """`deploy.engine: auto` on a CPU with the vLLM environment: both engines generate the same prompts; the faster
    one serves, and the figures are kept (a second deploy of the same weights does not measure again). Weights
    vLLM cannot serve (the tiny model's head size 16) leave transformers, with vLLM's reason recorded."""
    from tasks.engine_probe import PROBE_FILE, choose

    state = tmp_path / "state"
    engine, found = choose(served["dir"], state, str(packaging.vllm_python()))
    rates = found["tokens_per_second"]
    assert set(rates) == {"transformers", "vllm"} and min(rates.values()) > 0, found
    assert engine == max(rates, key=rates.get)
    started = time.monotonic()
    assert choose(served["dir"], state, str(packaging.vllm_python())) == (engine, found)
    assert time.monotonic() - started < 10  # read back, not measured again

    engine, found = choose(tiny_model, state, str(packaging.vllm_python()))
    assert engine == "transformers" and "vllm" not in found["tokens_per_second"]
    assert "head_dim=16" in found["vllm_error"], found["vllm_error"]
    assert len(json.loads((state / PROBE_FILE).read_text())) == 2


def test_evaluation_on_vllm_ranks_and_answers_as_the_transformers_engine(served, tmp_path):
    """`evaluation.engine: vllm`: lm-eval scores the weights through a vLLM server (its completions client, the
    prompts tokenised here) and reaches the same ranked labels, label probabilities within 1e-4 and the same
    greedy replies as the transformers engine on the same task."""
    from evals import runner
    from tasks.datasets import Example, write_examples
    from tasks.scoring import score

    reviews = ["the kettle leaks", "these shoes are great", "it arrived", "broke in a week", "love the colour",
               "fine, nothing special"]
    examples = [Example(f"r{i}", SYSTEM, f"Review: {text}", ANSWERS[i % 3], "rate", f"k{i}", tuple(ANSWERS))
                for i, text in enumerate(reviews)]
    files = {name: write_examples(tmp_path / f"{name}.jsonl", examples) for name in ("train", "validation", "test")}
    tasks_dir = str(runner.write_tasks("rate", files, tmp_path / "tasks", max_answer_tokens=12, ranked=True))
    options = dict(system_prompt=SYSTEM, shots=0, limit=None, batch_size=4, kind="classify", generate=None)
    on = {engine: {s["doc_id"]: s for s in score.fn(served["dir"], tasks_dir, "rate_test", engine=engine,
                                                      **options).samples}
          for engine in ("transformers", "vllm")}
    assert len(on["vllm"]) == len(on["transformers"]) == len(examples)
    for doc, reference in on["transformers"].items():
        found = on["vllm"][doc]
        assert found["prediction"] == reference["prediction"]
        assert np.allclose([found["probabilities"][a] for a in ANSWERS],
                           [reference["probabilities"][a] for a in ANSWERS], atol=1e-4), (found, reference)
        assert found["response"] == reference["response"] and len(reference["response"]) > 0
