"""Stage 8, deploy: a registered version (default: the champion) becomes a Bento, served on 127.0.0.1 and
smoke-tested. Runs at the end of each lifecycle iteration and alone through `tuneline deploy [VERSION]`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from bentoml.exceptions import BentoMLException
from mlflow.exceptions import MlflowException
from prefect import flow

from flows.config import LifecycleConfig, load_config
from tasks import packaging, registry, tracking
from tasks.datasets import to_examples
from tasks.packaging import Deployment
from tasks.paths import prune_run_folders
from tasks.processes import free_port, recorded_pid, stop_started
from tasks.tracking import publish, stage_run


def _probe(config: LifecycleConfig) -> str:
    """The first usable record of the task's data, rendered as training renders it: a realistic smoke prompt."""
    return to_examples(config.task, "skip", config.data.seed).examples[0].user


@flow(name="deploy")
def deploy_stage(config: LifecycleConfig, home: str, parent_run_id: str | None = None, version: str | None = None,
                 built: dict[str, str] | None = None, probe: str | None = None) -> Deployment:
    """Serve `version` of the registered model (default: the champion), and with deploy.canary or deploy.shadow
    the registry's challenger beside it; `built` maps versions to Bentos already built by the promote stage.
    Outside a lifecycle run, the deploy is its own MLflow run."""
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
            return Deployment(True, version, url=url, model=f"{name}/{version}", reason="served already",
                              **_challenger(config, home, version, built, probe))
        tag = _bento(config, version, built)
        mlflow.log_params({"bento": tag, "version": version})
        if not config.deploy.serve:
            publish("deploy", f"## Deploy: {name} v{version} built, not served\n\nBento `{tag}` (deploy.serve is off).")
            return Deployment(served=False, version=version, bento=tag, reason="deploy.serve is off")
        question = probe or _probe(config)
        url, reply = _take_over(config, home, version, tag, question)
        answer = reply["choices"][0]["message"]["content"]
        mlflow.log_text(f"Q: {question}\nA: {answer}\n", "smoke_test.txt")
        publish("deploy", f"## Deploy: {name} v{version} served\n\nBento `{tag}` at {url}/v1/chat/completions\n\n"
                          f"Smoke prompt: {question!r}\n\nAnswer: `{answer}`")
        print(f"deploy: {name} v{version} ({reply.get('system', '')}) served at {url}; answer to a test prompt: "
              f"{answer!r}")
        side = _challenger(config, home, version, built, question)
    if config.deploy.keep is not None:
        try:
            prune_served(config, home, config.deploy.keep)
        except (MlflowException, BentoMLException, OSError) as exc:  # housekeeping: the version is served already
            print(f"gc: skipped after the deploy ({type(exc).__name__}: {exc}); run `tuneline gc` later")
    return Deployment(True, version, tag, url, reply["model"], reply.get("system"), answer, **side)


def _bento(config: LifecycleConfig, version: str, built: dict[str, str] | None) -> str:
    """The Bento of `version`: the one the promote stage built, else built now from the registry."""
    if (built or {}).get(version):
        return built[version]
    name = config.registered_model
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = registry.download(name, version, tmp, dense=False)  # weights and recipe, side by side
        return packaging.build_bento(str(model_dir), name, version, config.task.system_prompt, config.deploy.limits,
                                     system=registry.system(name, version),
                                     answers=packaging.served_answers(config.task, config.deploy.constrain))


def _start(config: LifecycleConfig, home: str, version: str, tag: str, question: str,
           beside: dict | None = None) -> tuple[dict, dict]:
    """`version`'s service on a spare loopback port, ready and answering the smoke prompt: its route and the
    reply. The version already answering a route (the challenger becoming champion) is reused, not restarted,
    unless it runs on another version's engine. On vLLM a LoRA champion's engine is recorded in its route, and a
    challenger (`beside`: the champion's route) on the same base joins it as a second adapter. A version that
    fails is stopped, and the error names it and what keeps serving."""
    name, model = config.registered_model, f"{config.registered_model}/{version}"
    now = packaging.routes(home, name)
    routed = [r for r in now.values() if isinstance(r, dict) and r.get("model") == model]
    previous = now.get("champion")
    route = {"model": model, "bento": tag, "service": packaging.service_name(name, version)}
    try:
        if routed and recorded_pid(route["service"], Path(home)):
            route["url"] = routed[0]["url"]
            route.update({k: routed[0][k] for k in ("engine_url",) if k in routed[0]})
        else:
            engine = packaging.resolve_engine(config.deploy.engine, tag, home)
            attach = packaging.shared_engine(beside, tag) if engine == "vllm" else None
            port = free_port() if engine == "vllm" and not attach and packaging.lora_bento(tag) else None
            if attach:  # its own name: it stops with the engine's owner, and is never reused as a champion
                route.update(service=route["service"] + "-shared", shares=attach)
            if port:
                route["engine_url"] = f"http://127.0.0.1:{port}"
            route["url"] = packaging.serve(tag, free_port(), home, name=route["service"],
                                           redact=config.feedback.redact, engine=engine, vllm_port=port,
                                           vllm_attach=attach)
        reply = packaging.chat(route["url"], question, max_tokens=config.task.max_answer_tokens)
    except Exception as exc:  # whatever stopped it, it stops; the cause stays chained (`from exc`) with its traceback
        if not routed:
            stop_started(route["service"], Path(home))
        kept = f"{previous['model']} keeps serving" if previous else "nothing was served before"
        raise RuntimeError(f"deploy: {name} v{version} failed before taking over ({type(exc).__name__}: {exc}); "
                           f"{kept}") from exc
    return route, reply


def _take_over(config: LifecycleConfig, home: str, version: str, tag: str, question: str) -> tuple[str, dict]:
    """Start `version` beside the version served now; once it is ready and answers the smoke prompt, point the
    front on deploy.port at it and stop the old one. A version that fails is stopped and the deploy fails naming
    why, while the old one keeps serving."""
    name = config.registered_model
    packaging.require_key_beyond_loopback(config.deploy.host)  # before anything starts
    before = packaging.routes(home, name)
    route, reply = _start(config, home, version, tag, question)
    url = packaging.switch(home, name, config.deploy.port, route, host=config.deploy.host)
    for old in (before.get("champion"), before.get("challenger")):  # the canary is set again after
        if old and old.get("service") != route["service"]:
            stop_started(old["service"], Path(home))  # requests it is still answering finish first (SIGTERM)
    return url, reply


def _challenger(config: LifecycleConfig, home: str, champion: str, built: dict[str, str] | None,
                probe: str | None) -> dict:
    """With deploy.canary or deploy.shadow, the registry's challenger runs beside the champion: it answers the
    canary share of chat requests (sticky per request `user`), and as a shadow a copy of the rest, recorded and
    never returned. Without either, or when the challenger is the champion, the champion answers alone. A
    challenger that fails to start is stopped and named, and the champion keeps every request."""
    name, share, shadow = config.registered_model, config.deploy.canary, config.deploy.shadow
    found = registry.aliased(name, registry.CHALLENGER) if share > 0 or shadow else None
    wanted = found[0] if found and found[0] != champion else None
    now = packaging.routes(home, name)
    had = now.get("challenger")
    if wanted is None and not had:
        return {}
    if wanted and had and had["model"] == f"{name}/{wanted}" and (now.get("canary"), now.get("shadow")) == (
            share, shadow):
        return {"challenger": had["model"], "canary": share}  # as served already
    side = None
    if wanted:
        try:
            side, _ = _start(config, home, wanted, _bento(config, wanted, built), probe or _probe(config),
                             beside=now["champion"])
        except RuntimeError as exc:
            print(f"deploy: no challenger: {exc}")
            publish("challenger", f"## Challenger: none\n\nIt failed: {exc}")
    packaging.switch(home, name, config.deploy.port, now["champion"], side, share if side else 0.0,
                     host=config.deploy.host, shadow=shadow)
    if had and (not side or had["service"] != side["service"]):
        stop_started(had["service"], Path(home))
    if not side:
        return {}
    roles = [f"answers {share:.0%} of chat requests"] * (share > 0) + ["shadows the rest"] * shadow
    if "shares" in side:
        roles.append(f"on the champion's vLLM engine (a second adapter on its base, {side['shares']})")
    print(f"deploy: challenger {side['model']} {' and '.join(roles)} beside {name}/{champion}")
    publish("challenger", f"## Challenger: {side['model']} {' and '.join(roles)} beside {name}/{champion}\n\n"
                          "A canary is sticky per request `user`, and every reply's `model` names the version that "
                          "answered; a shadow's answers are recorded beside the champion's (`tuneline feedback "
                          "shadow`).")
    return {"challenger": side["model"], "canary": share}


def prune_served(config: LifecycleConfig, home: str, newest: int) -> list[str]:
    """Delete the served copies (BentoML models and Bentos) of the config's model but those of the newest
    `newest` versions, the champion, the challenger, the rollback target and the versions the front serves,
    and the config's run folders but the newest `newest`. The registry keeps every version: a pruned one is
    built again from it when it is deployed."""
    name = config.registered_model
    keep = registry.kept(name, newest)
    keep |= {r["model"].rpartition("/")[2] for r in packaging.routes(home, name).values() if isinstance(r, dict)}
    removed = packaging.prune(name, keep)
    folders = prune_run_folders(Path(home), config.name, newest)
    print(f"gc: {name}: kept v{', v'.join(sorted(keep, key=int)) or ' none'}; deleted {len(removed)} "
          f"Bentos and stored models and {len(folders)} of {config.name}'s run folders")
    return removed + [str(f) for f in folders]


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
