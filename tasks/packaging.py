"""The champion as a Bento: model into the BentoML store, `bentoml build`, `bentoml serve` on 127.0.0.1, smoke test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
from prefect import task

from infra.local import spawn, stop_started, wait_until

SERVING_DIR = Path(__file__).resolve().parent.parent / "serving"
BENTO_MODEL = "tuneline-chat"
HOST = "127.0.0.1"


def _bentoml(*args: str) -> str:
    cmd = [str(Path(sys.executable).parent / "bentoml"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=SERVING_DIR, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"`bentoml {' '.join(args)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


@task(name="build-bento")
def build_bento(model_dir: str, registered_model: str, version: str, system_prompt: str) -> str:
    """Put the model into BentoML's store with its registry identity, then build the Bento offline."""
    with bentoml.models.create(
        BENTO_MODEL,
        labels={"registered_model": registered_model, "version": str(version)},
        metadata={"registered_model": registered_model, "version": str(version), "system_prompt": system_prompt},
    ) as bento_model:
        for item in Path(model_dir).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, Path(bento_model.path) / item.name)
    out = _bentoml("build", "--output", "tag", str(SERVING_DIR))
    tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    return tag


@task(name="serve-bento")
def serve(bento_tag: str, port: int, home: str, timeout_s: float = 180.0) -> str:
    """`bentoml serve` the Bento on 127.0.0.1 (replacing the one this project served before); wait for /readyz."""
    home_path = Path(home)
    stop_started("bento", home_path)
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", bento_tag, "--host", HOST, "--port", str(port)]
    proc = spawn("bento", cmd, os.environ.copy(), home_path, cwd=home_path)
    url = f"http://{HOST}:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until("bento", ready, proc, home_path, timeout_s)
    return url


@task(name="smoke-test", retries=2, retry_delay_seconds=2)
def chat(url: str, content: str, max_tokens: int = 48) -> dict:
    """One chat request against the running service; the JSON reply."""
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    response.raise_for_status()
    return response.json()
