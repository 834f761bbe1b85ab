"""Stage 8, deploy: a registered version (default: the champion) becomes a Bento, served on 127.0.0.1 and
smoke-tested. Runs at the end of each lifecycle iteration and alone through `tuneline deploy [VERSION]`."""

from __future__ import annotations

import tempfile

import mlflow
from prefect import flow

from flows.config import LifecycleConfig, load_config
from flows.data import served_answers
from tasks import packaging, registry, tracking
from tasks.datasets import to_examples
from tasks.packaging import Deployment
from tasks.tracking import publish, stage_run


def _probe(config: LifecycleConfig) -> str:
    """The first usable record of the task's data, rendered as training renders it: a realistic smoke prompt."""
    return to_examples(config.task, "skip", config.data.seed).examples[0].user


@flow(name="deploy")
def deploy_stage(config: LifecycleConfig, home: str, parent_run_id: str | None = None, version: str | None = None,
                 built: dict[str, str] | None = None, probe: str | None = None) -> Deployment:
    """Serve `version` of the registered model (default: the champion); `built` maps versions to Bentos already
    built by the promote stage. Outside a lifecycle run, the deploy is its own MLflow run."""
    name = config.registered_model
    run = stage_run("deploy", parent_run_id, registered_model=name) if parent_run_id else \
        mlflow.start_run(run_name="deploy", tags={"tuneline.stage": "deploy"})
    with run:
        if version is None:
            current = registry.champion(name)
            if current is None:
                print(f"deploy: {name} has no champion yet; nothing to serve")
                publish("deploy", f"## Deploy: nothing served\n\n{name} has no champion yet.")
                return Deployment(served=False, reason="no champion")
            version = current[0]
        if config.deploy.serve and packaging.serving(home, name, config.deploy.port) == f"{name}/{version}":
            url = f"http://127.0.0.1:{config.deploy.port}"  # the champion did not change: no rebuild, no restart
            print(f"deploy: {name} v{version} is served already at {url}; left running")
            publish("deploy", f"## Deploy: {name} v{version} left running\n\nIt is served already at {url}.")
            return Deployment(True, version, url=url, model=f"{name}/{version}", reason="served already")
        tag = (built or {}).get(version)
        if tag is None:
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = registry.download(name, version, tmp)  # weights and recipe, side by side
                tag = packaging.build_bento(str(model_dir), name, version, config.task.system_prompt,
                                            config.deploy.limits, system=registry.system(name, version),
                                            answers=served_answers(config))
        mlflow.log_params({"bento": tag, "version": version})
        if not config.deploy.serve:
            publish("deploy", f"## Deploy: {name} v{version} built, not served\n\nBento `{tag}` (deploy.serve is off).")
            return Deployment(served=False, version=version, bento=tag, reason="deploy.serve is off")
        url = packaging.serve(tag, config.deploy.port, home, name=packaging.service_name(name),
                              host=config.deploy.host, redact=config.feedback.redact)
        question = probe or _probe(config)
        reply = packaging.chat(url, question, max_tokens=config.task.max_answer_tokens)
        answer = reply["choices"][0]["message"]["content"]
        mlflow.log_text(f"Q: {question}\nA: {answer}\n", "smoke_test.txt")
        publish("deploy", f"## Deploy: {name} v{version} served\n\nBento `{tag}` at {url}/v1/chat/completions\n\n"
                          f"Smoke prompt: {question!r}\n\nAnswer: `{answer}`")
        print(f"deploy: {name} v{version} ({reply.get('system', '')}) served at {url}; answer to a test prompt: "
              f"{answer!r}")
    return Deployment(True, version, tag, url, reply["model"], reply.get("system"), answer)


@flow(name="deploy-version", log_prints=True)
def deploy_version(config_path: str, version: str | None = None) -> Deployment:
    """Serve `version` of the config's registered model (default: the champion) on deploy.port, 127.0.0.1."""
    config = load_config(config_path)
    config.deploy.serve = True
    home = tracking.open_experiment(config.name)
    result = deploy_stage(config, str(home), version=version)
    if not result.served:
        raise RuntimeError(f"{config.registered_model}: {result.reason}")
    return result
