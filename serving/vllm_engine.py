"""vLLM as the generator's engine: `vllm serve` on a private loopback port, driven with token ids.

vLLM runs as its own process from its own environment (`make install-vllm`: `.venv-vllm`), the way BentoML's vLLM
examples run `vllm serve` beside the service: its releases pin transformers below the version tuneline trains and
evaluates with, so the two cannot share one install. The service still renders and tokenises every prompt with
the prompt rule and the system's own tokenizer, and sends vLLM the token ids: the prompt a request reaches the
weights with is byte-identical on both engines. Replies come back as token ids and are decoded here, with the
same tokenizer, as the transformers engine decodes them; classify/choice ranking reads vLLM's prompt
log-probabilities of each allowed answer's tokens. A LoRA version is served as its adapter on the base weights
(`--enable-lora`; serving/adapter_weights.py), every request naming the adapter.

One engine can serve two versions on the same base: the champion's engine keeps room for a second adapter, and a
challenger's service started with `attach` loads its adapter into that engine (vLLM's runtime LoRA loading)
instead of starting one of its own, so the base weights are in memory once and one engine batches both versions'
requests. The engine belongs to the service that started it; an attached one unloads its adapter when it stops.

Stands alone like the service: standard library and httpx only.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from serving import adapter_weights

HOST = "127.0.0.1"
NAME = "tuneline"  # the served model name inside the private vLLM server
ADAPTER = "tuneline-adapter"  # the served adapter's name there
START_TIMEOUT_S = float(os.environ.get("TUNELINE_VLLM_START_TIMEOUT_S", 900))
# On a CPU vLLM reserves its KV cache up front (GiB); a small default leaves the rest of the host to the service.
KV_CACHE_GIB = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the vLLM server gets SIGTERM when the generator process that started it dies, however it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VllmEngine:
    """Generation, ranking and streaming through a vLLM server this object starts and owns."""

    def __init__(self, model_dir: str, python: str, max_model_len: int, log_dir: str | None = None,
                 port: int | None = None, attach: str | None = None) -> None:
        """Start vLLM for `model_dir` (on `port`, else a free one), or with `attach` (an engine's URL) load this
        folder's adapter into an engine another service started."""
        self.proc = None
        lora = adapter_weights.adapter(model_dir)
        if attach:
            if lora is None:
                raise RuntimeError("deploy: only a LoRA version can join another version's vLLM engine")
            self.url, self.log = attach.rstrip("/"), None
            self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600.0, connect=5.0))
            # a name of its own in the shared engine: the folder is this version's, unique in the model store
            self.model = f"{ADAPTER}-{hashlib.sha256(str(Path(lora).resolve()).encode()).hexdigest()[:12]}"
            reply = self.client.post("/v1/load_lora_adapter", json={"lora_name": self.model, "lora_path": str(lora)})
            if reply.status_code >= 400 and "already" not in reply.text:
                raise RuntimeError(f"vLLM at {self.url} did not load the adapter {lora}: {reply.text[:500]}")
            self.pool = ThreadPoolExecutor(max_workers=64)
            return
        if not Path(python).is_file():
            raise RuntimeError(f"deploy.engine vllm: no vLLM environment at {python} (run `make install-vllm`, or "
                               "set TUNELINE_VLLM_PYTHON to a Python that has vllm)")
        self.port = port or _free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", NAME,
               "--host", HOST, "--port", str(self.port), "--max-model-len", str(max_model_len),
               "--disable-uvicorn-access-log"]
        self.model = ADAPTER if lora else NAME  # requests name the adapter, not the base weights it is served on
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
        if lora:
            # two adapters in one batch (the champion's and a challenger's), the second loaded at run time; three
            # kept loaded, so a challenger swap (the new one loads before the old one unloads) evicts none and
            # reloads none from disk; the server listens on loopback only
            cmd += ["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "3", "--lora-modules", f"{ADAPTER}={lora}",
                    "--max-lora-rank", str(adapter_weights.vllm_rank(lora)),
                    "--lora-target-modules", *adapter_weights.targets(lora)]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if not _cuda():
            # fp32 as the service computes on a CPU; eager: vLLM's compile step takes minutes on a small CPU
            cmd += ["--dtype", "float32", "--enforce-eager"]
        log = Path(log_dir or ".") / f"vllm-{self.port}.log"
        self.log = log
        with open(log, "ab") as out:  # the child holds its own handle; ours closes here
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600.0, connect=5.0))
        self._wait_ready()
        self.pool = ThreadPoolExecutor(max_workers=64)  # vLLM batches what arrives together

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} while starting:\n{tail}")
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.close()
        raise RuntimeError(f"vLLM did not become ready within {START_TIMEOUT_S:.0f} s (log: {self.log})")

    def close(self) -> None:
        if self.proc is None:  # attached: the engine is another service's; only this adapter leaves it
            try:
                self.client.post("/v1/unload_lora_adapter", json={"lora_name": self.model}, timeout=10)
            except httpx.HTTPError:
                pass  # that engine stopped first
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @staticmethod
    def _sampling(request: dict, greedy_below: float) -> dict:
        sample = request["temperature"] >= greedy_below
        # top_k 0: off, as the transformers engine sets it (the model's generation config may name one)
        return {"temperature": request["temperature"] if sample else 0.0, "top_p": request["top_p"] if sample else 1.0,
                "top_k": 0, **({"seed": request["seed"]} if sample and request.get("seed") is not None else {})}

    def _body(self, request: dict, greedy_below: float, **extra) -> dict:
        # vLLM stops at the ids the model's generation config names as its end, as `generate` does
        return {"model": self.model, "prompt": request["ids"], "max_tokens": request["max_tokens"],
                "return_token_ids": True, **self._sampling(request, greedy_below), **extra}

    def generate(self, requests: list[dict], greedy_below: float) -> list[list[int]]:
        """Each request's generated token ids, the requests sent at once (vLLM batches them continuously)."""
        def one(request: dict) -> list[int]:
            reply = self.client.post("/v1/completions", json=self._body(request, greedy_below))
            reply.raise_for_status()
            return reply.json()["choices"][0]["token_ids"]

        return list(self.pool.map(one, requests))

    def rank(self, prompt: list[int], continuations: list[list[int]]) -> list[float]:
        """The summed log-probability of each continuation after the prompt: vLLM's prompt log-probabilities of
        prompt + continuation, read at the continuation's tokens."""
        reply = self.client.post("/v1/completions", json={
            "model": self.model, "prompt": [prompt + c for c in continuations], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0})
        reply.raise_for_status()
        scores = []
        for choice, c in zip(sorted(reply.json()["choices"], key=lambda x: x["index"]), continuations):
            found = choice["prompt_logprobs"]
            scores.append(sum(found[len(prompt) + j][str(token)]["logprob"] for j, token in enumerate(c)))
        return scores

    def stream(self, request: dict, greedy_below: float) -> t.Iterator[list[int]]:
        """The generated token ids as vLLM produces them; leaving the loop closes the connection, and vLLM aborts
        a request whose client went away."""
        body = self._body(request, greedy_below, stream=True)
        with self.client.stream("POST", "/v1/completions", json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RuntimeError(f"vLLM: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    if choice.get("token_ids"):
                        yield choice["token_ids"]


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
