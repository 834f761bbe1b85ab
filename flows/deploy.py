"""Stage 8, deploy: the champion from the MLflow registry becomes a Bento, served on 127.0.0.1 and smoke-tested."""

from __future__ import annotations

import tempfile

import mlflow
from prefect import flow

from flows.config import LifecycleConfig
from tasks import packaging, registry
from tasks.datasets import read_examples
from tasks.tracking import stage_run


@flow(name="deploy")
def deploy_stage(config: LifecycleConfig, test_path: str, home: str, parent_run_id: str,
                 built: dict[str, str] | None = None) -> dict:
    """Serve the current champion; `built` maps versions to Bentos the promote stage already built."""
    name = config.registered_model
    with stage_run("deploy", parent_run_id, registered_model=name):
        current = registry.champion(name)
        if current is None:
            print(f"deploy: {name} has no champion yet; nothing to serve")
            return {"served": False, "reason": "no champion"}
        version = current[0]
        tag = (built or {}).get(version)
        if tag is None:
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = registry.download(name, version, tmp)
                tag = packaging.build_bento(str(model_dir), name, version, config.task.system_prompt)
        mlflow.log_params({"bento": tag, "version": version})
        if not config.deploy.serve:
            return {"served": False, "bento": tag, "version": version}
        url = packaging.serve(tag, config.deploy.port, home)
        probe = read_examples(test_path)[0]
        reply = packaging.chat(url, probe.user, max_tokens=config.task.max_answer_tokens)
        answer = reply["choices"][0]["message"]["content"]
        mlflow.log_text(f"Q: {probe.user}\nA: {answer}\nexpected: {probe.assistant}\n", "smoke_test.txt")
        print(f"deploy: {name} v{version} served at {url}; answer to a test prompt: {answer!r}")
    return {"served": True, "url": url, "bento": tag, "version": version, "answer": answer,
            "model": reply["model"]}
