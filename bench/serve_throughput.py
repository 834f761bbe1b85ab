"""Serving throughput: the Bento with adaptive batching vs the same Bento generating one request at a time
(TUNELINE_BATCHING=off), at 1, 8 and 32 concurrent clients, in one run (ratios within one run: these machines
are noisy). Also checks that batched greedy answers equal the one-at-a-time answers.

Run:  .venv/bin/python bench/serve_throughput.py [--model gguf:smollm2-135m-instruct|tiny:0] [--requests 16]
      .venv/bin/python bench/serve_throughput.py --engines [--clients 1 8 32 128]   # vLLM against transformers
      .venv/bin/python bench/serve_throughput.py --shadow [--clients 1 8]   # a shadow's cost to the champion

`--engines`: the same Bento served with each engine (deploy.engine transformers, with adaptive batching, and
vllm, from `make install-vllm`'s environment), requests/s and p50/p95 latency at each client count, engine start
time, and how many greedy answers agree (identical text; the first 8 tokens).

`--shadow`: requests through the front (serving/front.py) to a champion, alone and with a second service of the
same model shadowing it (deploy.shadow), in interleaved rounds; requests/s and p50 at each client count, median of
the rounds. Each round waits for the shadow's copies to be answered before the next, so none spills over.

Each client sends requests one after another (a demo review, max_tokens 48, greedy) until the level has sent
at least `--requests` (and every client at least one), so the concurrency holds for the whole measurement.
Requests/s = all requests / wall time of the level.

Retrieval: the same model served as a retrieval system (3 shots retrieved from a pool of `--pool` demo reviews
by the bundled MiniLM encoder), one client at a time; the retrieval step alone (embed the question, score the
pool, take the nearest, as the service does) is timed in-process over the same questions, and reported as its
share of the request time. `--retrieval-only` skips the batching levels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

# ruff: noqa: E402 (the imports below come after the offline switch, read when transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

from tasks import packaging
from tasks.models import provision
from tasks.paths import configure_env
from tasks.processes import free_port, stop_started

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Extract product, sentiment, rating and issue from the review. Answer with JSON only."


async def level(url: str, prompts: list[str], clients: int, rounds: int, max_tokens: int) -> dict:
    latencies, answers = [], {}

    async def client(http: httpx.AsyncClient, first: int) -> None:
        for r in range(rounds):
            prompt = prompts[(first * rounds + r) % len(prompts)]
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            answers[prompt] = response.json()["choices"][0]["message"]["content"]

    async with httpx.AsyncClient(timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        wall = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies), "p95": cuts[18], "answers": answers}


def measure(bento: str, batching: bool, prompts: list[str], args, home: Path, engine: str = "transformers",
            clients: tuple[int, ...] = (1, 8, 32)) -> dict:
    os.environ["TUNELINE_BATCHING"] = "on" if batching else "off"
    name = f"bench-{engine}-{'batched' if batching else 'sequential'}"
    started = time.perf_counter()
    url = packaging.serve.fn(bento, free_port(), str(home), name=name, feedback_db=str(home / "bench-answers.db"),
                             engine=engine)
    start_s = time.perf_counter() - started
    try:
        asyncio.run(level(url, prompts, 2, 1, args.max_tokens))  # warm-up (and the batcher's first estimates)
        found = {c: asyncio.run(level(url, prompts, c, -(-args.requests // c), args.max_tokens)) for c in clients}
        return {**found, "start_s": start_s}
    finally:
        stop_started(name, home)


def engines(bento: str, prompts: list[str], args, home: Path, tokenizer) -> None:
    """vLLM against the transformers engine on the same Bento: throughput, latency, agreement."""
    clients = tuple(args.clients)
    hf = measure(bento, True, prompts, args, home, "transformers", clients)
    vl = measure(bento, True, prompts, args, home, "vllm", clients)
    print(f"model {args.model}, max_tokens {args.max_tokens}, at least {args.requests} requests per level; engine "
          f"start: transformers {hf['start_s']:.0f} s, vllm {vl['start_s']:.0f} s\n")
    print("| clients | vllm req/s | p50 s | p95 s | transformers req/s | p50 s | p95 s | vllm / transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for c in clients:
        v, h = vl[c], hf[c]
        print(f"| {c} | {v['rps']:.2f} | {v['p50']:.2f} | {v['p95']:.2f} | {h['rps']:.2f} | {h['p50']:.2f} | "
              f"{h['p95']:.2f} | {v['rps'] / h['rps']:.2f}× |")
    last = clients[-1]
    pairs = [(vl[last]["answers"][p], hf[last]["answers"][p]) for p in vl[last]["answers"] if p in hf[last]["answers"]]
    head = sum(tokenizer(a)["input_ids"][:8] == tokenizer(b)["input_ids"][:8] for a, b in pairs)
    print(f"\ngreedy answers, vllm vs transformers: identical {sum(a == b for a, b in pairs)}/{len(pairs)}, "
          f"same first 8 tokens {head}/{len(pairs)}")


def shadow_cost(model_dir: str, prompts: list[str], args, home: Path, rounds: int = 2) -> None:
    """The front with and without a shadow, the same champion behind it."""
    name, clients = "bench-shadow", tuple(args.clients)
    limits = {"max_tokens": args.max_tokens}
    routes = []
    try:
        for version in ("1", "2"):
            bento = packaging.build_bento.fn(model_dir, name, version, SYSTEM, limits)
            url = packaging.serve.fn(bento, free_port(), str(home), name=packaging.service_name(name, version),
                                     feedback_db=str(home / "bench-answers.db"))
            routes.append({"url": url, "model": f"{name}/{version}"})
        port, found = free_port(), {}
        for shadow in (False, True) * rounds:  # interleaved: these machines drift within a run
            url = packaging.switch.fn(str(home), name, port, routes[0], routes[1], shadow=shadow)
            asyncio.run(level(url, prompts, 2, 1, args.max_tokens))  # warm-up
            for c in clients:
                found.setdefault((shadow, c), []).append(
                    asyncio.run(level(url, prompts, c, -(-args.requests // c), args.max_tokens)))
                while True:  # the shadow's copies still running would slow the next measurement
                    counts = httpx.get(f"{url}/front").json()["shadowed"]
                    if counts["sent"] == counts["answered"] + counts["failed"]:
                        break
                    time.sleep(0.5)
    finally:
        packaging.stop_model(home, name)
    print(f"model {args.model}, max_tokens {args.max_tokens}, at least {args.requests} requests per level, "
          f"median of {rounds} interleaved rounds\n")
    print("| clients | champion alone req/s | p50 s | with a shadow req/s | p50 s | with ÷ alone |")
    print("|---|---|---|---|---|---|")
    for c in clients:
        alone, shadowed = (
            {k: statistics.median(r[k] for r in found[(s, c)]) for k in ("rps", "p50")} for s in (False, True))
        print(f"| {c} | {alone['rps']:.2f} | {alone['p50']:.2f} | {shadowed['rps']:.2f} | {shadowed['p50']:.2f} | "
              f"{shadowed['rps'] / alone['rps']:.2f}× |")


def retrieval_share(model_dir: str, prompts: list[str], pool: list[str], args, home: Path) -> dict:
    import numpy as np

    from serving.prompt_rule import nearest
    from tasks.datasets import Example, write_examples
    from tasks.recipes import EMBEDDINGS_FILE, Recipe, write_recipe
    from tasks.retrieval import ENCODER, encoder

    pool_file = write_examples(home / "bench-pool.jsonl", [
        Example(f"p{i}", SYSTEM, text, '{"sentiment": "neutral"}', "reviews") for i, text in enumerate(pool)])
    recipe = write_recipe(Recipe(SYSTEM, True, "retrieved", 3, encoder=ENCODER), home / "bench-recipe", pool_file)
    bento = packaging.build_bento.fn(model_dir, "bench", "1", SYSTEM, {"max_tokens": args.max_tokens}, str(recipe),
                                     "base + 3 retrieved shots, chat")
    os.environ["TUNELINE_BATCHING"] = "on"
    url = packaging.serve.fn(bento, free_port(), str(home), name="bench-retrieval",
                             feedback_db=str(home / "bench-answers.db"))
    try:
        asyncio.run(level(url, prompts, 1, 1, args.max_tokens))  # warm-up
        served = asyncio.run(level(url, prompts, 1, args.requests, args.max_tokens))
    finally:
        stop_started("bench-retrieval", home)
    vectors, model = np.load(Path(recipe) / EMBEDDINGS_FILE), encoder()
    model.encode(prompts[:1], normalize_embeddings=True)  # warm-up
    started = time.perf_counter()
    for prompt in prompts[: args.requests]:
        nearest(vectors, model.encode([prompt], normalize_embeddings=True), 3)
    step = (time.perf_counter() - started) / args.requests
    return {"p50": served["p50"], "retrieval_s": step, "share": step / served["p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gguf:smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=16, help="at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--pool", type=int, default=1200, help="examples in the retrieval pool")
    parser.add_argument("--retrieval-only", action="store_true", help="skip the batching levels")
    parser.add_argument("--engines", action="store_true", help="vLLM against transformers, nothing else")
    parser.add_argument("--shadow", action="store_true", help="a shadow's cost to the champion, nothing else")
    parser.add_argument("--clients", type=int, nargs="+", default=None,
                        help="with --engines (default 1 8 32 128) or --shadow (default 1 8)")
    args = parser.parse_args()

    home = configure_env()
    model_dir = provision(args.model, home / "models")
    bento = packaging.build_bento.fn(str(model_dir), "bench", "0", SYSTEM, {"max_tokens": args.max_tokens})
    reviews = [json.loads(line)["review"] for line in (ROOT / "data" / "reviews.jsonl").read_text().splitlines()]
    prompts = [f"Review: {text}\nReturn the JSON." for text in reviews[:64]]
    pool = [f"Review: {text}\nReturn the JSON." for text in reviews[64:64 + args.pool]]
    if args.shadow:
        args.clients = args.clients or [1, 8]
        shadow_cost(str(model_dir), prompts, args, home)
        return
    if args.engines:
        args.clients = args.clients or [1, 8, 32, 128]
        from transformers import AutoTokenizer

        engines(bento, prompts, args, home, AutoTokenizer.from_pretrained(model_dir))
        return

    found = retrieval_share(str(model_dir), prompts, pool, args, home)
    print(f"model {args.model}, retrieval of 3 shots from {len(pool)} examples: {found['retrieval_s'] * 1000:.1f} ms "
          f"a request, {100 * found['share']:.1f} % of the p50 request time ({found['p50']:.2f} s, one client)\n")
    if args.retrieval_only:
        return
    batched = measure(bento, True, prompts, args, home)
    sequential = measure(bento, False, prompts, args, home)
    print(f"model {args.model}, max_tokens {args.max_tokens}, at least {args.requests} requests per level\n")
    print("| clients | batched req/s | p50 s | p95 s | sequential req/s | p50 s | p95 s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for c in (1, 8, 32):
        b, s = batched[c], sequential[c]
        print(f"| {c} | {b['rps']:.2f} | {b['p50']:.2f} | {b['p95']:.2f} | {s['rps']:.2f} | {s['p50']:.2f} | "
              f"{s['p95']:.2f} | {b['rps'] / s['rps']:.2f}× |")
    same = sum(batched[32]["answers"][p] == sequential[32]["answers"].get(p) for p in batched[32]["answers"])
    print(f"\ngreedy answers identical batched vs one at a time: {same}/{len(batched[32]['answers'])}")


if __name__ == "__main__":
    main()
