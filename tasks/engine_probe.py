"""`deploy.engine: auto` on a CPU: the engine that generates faster for the served model on this machine, measured
once and remembered, as the bf16 rule measures rather than assumes. On a 2-core Xeon with a 135M model vLLM's CPU
build was the slower engine at low concurrency and the faster one only at 32 clients, so neither is a safe default.

The probe: the same prompts (the model's chat template, token ids shared by both engines), greedy, 32 new tokens
each, all at once, after one warm-up request; generated tokens per second, each engine's start excluded (a
service pays it once). The answer is kept in the state folder, keyed by the weights' content and the machine.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer

from serving import adapter_weights
from serving.vllm_engine import VllmEngine
from tasks.caching import digest, environment

PROBE_FILE = "engine-probe.json"
PROMPTS = 8  # requests at once: the service's batches and vLLM's continuous batching both see a load
NEW_TOKENS = 32
GREEDY = 1e-5  # temperatures below this decode greedily (the service's own threshold)


def _prompts(tokenizer) -> list[list[int]]:
    texts = [f"Describe product {i} of our catalogue in two sentences." for i in range(PROMPTS)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


@torch.no_grad()
def transformers_rate(model_dir: str, prompts: list[list[int]]) -> float:
    """Generated tokens per second of one batched greedy `generate` (left-padded), after a warm-up."""
    model, tokenizer = adapter_weights.load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=pad)
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=pad)
    seconds = time.perf_counter() - started
    new = out[:, width:]
    stops = {pad, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    return sum(int(sum(1 for t in row.tolist() if t not in stops)) for row in new) / seconds


def vllm_rate(model_dir: str, python: str, prompts: list[list[int]], log_dir: Path) -> float:
    """Generated tokens per second of the same requests sent at once to a vLLM server, after a warm-up."""
    log_dir.mkdir(parents=True, exist_ok=True)
    engine = VllmEngine(model_dir, python, max(map(len, prompts)) + NEW_TOKENS + 8, str(log_dir))
    try:
        requests = [{"ids": p, "max_tokens": NEW_TOKENS, "temperature": 0.0, "top_p": 1.0} for p in prompts]
        engine.generate(requests[:1], GREEDY)
        started = time.perf_counter()
        replies = engine.generate(requests, GREEDY)
        return sum(map(len, replies)) / (time.perf_counter() - started)
    except httpx.HTTPStatusError as exc:  # the reason is in the server's log, not its reply
        errors = [line for line in engine.log.read_text(errors="replace").splitlines()
                  if " ERROR " in line and "Error:" in line]  # the first logged error is the cause
        raise RuntimeError(f"vLLM answered {exc.response.status_code}: "
                           f"{errors[0].split('Error:', 1)[1].strip() if errors else 'see ' + str(engine.log)}") \
            from exc
    finally:
        engine.close()


def choose(model_dir: str, home: str | Path, python: str) -> tuple[str, dict]:
    """The faster engine for these weights here, and the figures it rests on: measured the first time, then read
    from the state folder."""
    path = Path(home) / PROBE_FILE
    key = hashlib.sha256(f"{digest(model_dir)}:{environment()}".encode()).hexdigest()[:16]
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        prompts = _prompts(AutoTokenizer.from_pretrained(model_dir))
        rates = {"transformers": transformers_rate(model_dir, prompts)}
        found = {"model": str(model_dir), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            rates["vllm"] = vllm_rate(model_dir, python, prompts, Path(home) / "logs")
        except (RuntimeError, OSError, httpx.HTTPError) as exc:  # e.g. its CPU attention refuses the head size
            found["vllm_error"] = f"{type(exc).__name__}: {exc}"[:500]
        known[key] = {"engine": max(rates, key=rates.get), "tokens_per_second": rates, **found}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=2))
    found = known[key]
    return found["engine"], found
