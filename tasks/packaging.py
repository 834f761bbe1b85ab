"""The champion as a Bento: model into the BentoML store, `bentoml build`, `bentoml serve` on 127.0.0.1, smoke test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bentoml
import httpx
from prefect import task

from serving import adapter_weights
from tasks import stored_weights
from tasks.datasets import label_replies
from tasks.models import load
from tasks.paths import feedback_db as default_feedback_db
from tasks.paths import vllm_missing, vllm_python
from tasks.processes import HOST, listening, recorded_pid, spawn, stop_started, wait_until
from tasks.recipes import EMBEDDINGS_FILE, POOL_FILE, RECIPE_FILE, Recipe, prompt_text, read_recipe, shots_for
from tasks.retrieval import encoder_path
from tasks.schema import TaskConfig

ROOT = Path(__file__).resolve().parent.parent
SERVING_DIR = ROOT / "serving"
BENTO_MODEL = "tuneline-chat"


def _bentoml(*args: str, env: dict[str, str] | None = None) -> str:
    cmd = [str(Path(sys.executable).parent / "bentoml"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"`bentoml {' '.join(args)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


class IncompleteSystem(ValueError):
    """A version whose recipe needs a part it does not carry; the message names the version and the part."""


@dataclass(frozen=True)
class Deployment:
    """What the deploy stage hands on: whether a version is served, where, and its answer to a probe prompt."""
    served: bool
    version: str | None = None
    bento: str | None = None
    url: str | None = None
    model: str | None = None  # the served model id, e.g. "reviews-assistant/4"
    system: str | None = None  # e.g. "base + 3 retrieved shots, chat"
    answer: str | None = None
    reason: str | None = None  # why nothing is served
    challenger: str | None = None  # the model id answering the canary share beside it, e.g. "reviews-assistant/5"
    canary: float = 0.0


def served_answers(task: TaskConfig, constrain: bool) -> list[str] | None:
    """What a classifier's service replies with unless a request asks otherwise (deploy.constrain): its labels
    as the answer template writes them."""
    if task.kind != "classify" or not constrain:
        return None
    return list(label_replies(task.answer, task.labels))  # the config refuses a template that reads more


@task(name="build-bento")
def build_bento(model_dir: str, registered_model: str, version: str, system_prompt: str,
                limits: dict[str, int] | None = None, recipe_dir: str | None = None, system: str = "fine-tuned",
                answers: list[str] | None = None) -> str:
    """Put the system into BentoML's store — the weights, the prompt recipe (in `model_dir` itself for a
    downloaded version, else in `recipe_dir`) and for retrieval its pool, embeddings and encoder — with its
    registry identity, what kind of system it is (`system`, named in every reply), request limits and for a
    classifier the `answers` it ranks, then build the Bento. A system without a recipe serves the weights
    zero-shot with `system_prompt`."""
    folders = [Path(model_dir)] + ([Path(recipe_dir)] if recipe_dir else [])
    recipe = read_recipe(recipe_dir or model_dir)
    recipe_files = [f for f in (RECIPE_FILE, POOL_FILE, EMBEDDINGS_FILE) if any((d / f).is_file() for d in folders)]
    if recipe.shots == "retrieved":
        for part, what in ((POOL_FILE, "its retrieval pool"), (EMBEDDINGS_FILE, "the pool's embeddings")):
            if part not in recipe_files:
                raise IncompleteSystem(f"{registered_model} v{version}: {what} ({part}) is missing from the version")
        encoder = encoder_path(recipe.encoder)
        if encoder is None:
            raise IncompleteSystem(f"{registered_model} v{version}: the sentence encoder {recipe.encoder!r} its "
                                   "retrieval needs is not installed here")
    metadata = {"registered_model": registered_model, "version": str(version),
                "system_prompt": recipe.system_prompt if RECIPE_FILE in recipe_files else system_prompt,
                "system": system, **(limits or {}), **({"answers": list(answers)} if answers else {})}
    try:
        lora = stored_weights.served_lora(model_dir)
    except stored_weights.WeightsError as exc:
        raise stored_weights.WeightsError(f"{registered_model} v{version}: {exc}") from None
    metadata["weights"] = "a LoRA adapter on its base" if lora else "dense"
    if lora:
        metadata["base_sha256"] = lora[3]  # which base it needs: versions on the same one can share an engine
    with bentoml.models.create(
        BENTO_MODEL, labels={"registered_model": registered_model, "version": str(version)}, metadata=metadata,
    ) as bento_model:
        for folder in folders:
            for item in folder.iterdir():  # all but the weights, placed below in the form served
                if item.name not in (stored_weights.MANIFEST, "adapters") and ".safetensors" not in item.name:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, Path(bento_model.path) / item.name)
        if recipe.shots == "retrieved":
            shutil.copytree(encoder, Path(bento_model.path) / "encoder")
    # The weights go straight into the stored folder: BentoML copies what is built in its temporary folder into
    # the store, which would turn the base's hard links into copies (a 7B base is ~15 GB per deploy).
    stored = bentoml.models.get(bento_model.tag)
    try:
        stored_weights.place_served(model_dir, stored.path, lora)
    except BaseException as exc:
        bentoml.models.delete(stored.tag)  # no half-built model left in the store
        if isinstance(exc, stored_weights.WeightsError):
            raise stored_weights.WeightsError(f"{registered_model} v{version}: {exc}") from None
        raise
    # Built on the model just stored, by its exact tag: a deploy running at the same time stores another. The
    # build context is a folder holding only the serving package: BentoML walks every file under its context to
    # match the includes and cannot skip a folder, and a checkout's .venv alone holds some 150k files (6 of the
    # 8 s a build took).
    with tempfile.TemporaryDirectory(prefix="tuneline-bento-") as context:
        shutil.copytree(SERVING_DIR, Path(context) / "serving", ignore=shutil.ignore_patterns("__pycache__"))
        out = _bentoml("build", "--output", "tag", "-f", str(Path(context) / "serving" / "bentofile.yaml"), context,
                       env={"TUNELINE_BENTO_MODEL": str(bento_model.tag)})
    tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    return tag


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def require_key_beyond_loopback(host: str) -> None:
    """Production text is no one's to read: a service listening beyond loopback needs TUNELINE_API_KEY."""
    if host not in LOOPBACK and not os.environ.get("TUNELINE_API_KEY"):
        raise RuntimeError(f"deploy.host {host}: a service listening beyond loopback needs an API key; set "
                           "TUNELINE_API_KEY (clients then send `Authorization: Bearer <key>`)")


def serving(home: str, registered_model: str, port: int) -> str | None:
    """The "<model>/<version>" that this state folder's front of `registered_model` forwards to on `port`, or
    None (not started here, gone, or not answering)."""
    if recorded_pid(front_name(registered_model), Path(home)) is None:
        return None
    key = os.environ.get("TUNELINE_API_KEY")
    try:
        reply = httpx.get(f"http://{HOST}:{port}/v1/models", timeout=5,
                          headers={"Authorization": f"Bearer {key}"} if key else {})
        reply.raise_for_status()
        return reply.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def service_name(registered_model: str, version: str) -> str:
    """The process name of one version's Bento service: per model and version, so a new version starts beside
    the old one, and deploying one config never stops another's."""
    return f"bento-{registered_model}-v{version}"


def front_name(registered_model: str) -> str:
    """The process name of a registered model's front (serving/front.py), which owns deploy.port."""
    return f"front-{registered_model}"


def stop_model(home: str | Path, registered_model: str) -> list[str]:
    """Stop a registered model's front and every version's service this state folder started for it."""
    home = Path(home)
    versions = sorted(p.stem for p in home.glob(f"{service_name(registered_model, '*')}.pid"))
    names = [front_name(registered_model), *versions]
    return [stop_started(name, home) for name in names]


@task(name="prune-bentos")
def prune(registered_model: str, keep: set[str]) -> list[str]:
    """Delete `registered_model`'s stored models (each a full copy of a version's weights) and the Bentos built
    on them, except those of the versions in `keep`. Returns the tags deleted."""
    models = [m for m in bentoml.models.list(BENTO_MODEL) if m.info.labels.get("registered_model") == registered_model]
    gone = {str(m.tag) for m in models if m.info.labels.get("version") not in keep}
    removed = []
    for bento in bentoml.list():
        if {str(m.tag) for m in bento.info.all_models} & gone:
            bentoml.delete(bento.tag)
            removed.append(str(bento.tag))
    for tag in sorted(gone):
        bentoml.models.delete(tag)
        removed.append(tag)
    return removed


def routes_file(home: str | Path, registered_model: str) -> Path:
    return Path(home) / "fronts" / f"{registered_model}.json"


def routes(home: str | Path, registered_model: str) -> dict:
    """Where the model's front forwards: {"champion": {"url", "model", "service", "bento", "engine_url"?},
    "challenger": {… "shares"?: the champion's engine it runs on}, "canary", "shadow", "front": its own URL}."""
    path = routes_file(home, registered_model)
    return json.loads(path.read_text()) if path.is_file() else {}


@task(name="switch-front")
def switch(home: str, registered_model: str, port: int, champion: dict, challenger: dict | None = None,
           canary: float = 0.0, host: str = HOST, shadow: bool = False) -> str:
    """Point the model's front at `champion` (and `challenger` with its `canary` share, and as the `shadow`
    that answers a copy of each request), starting the front on `host`:`port` when it is not running; the
    switch is one atomic file rewrite, so no request finds no backend. Returns the front's URL."""
    require_key_beyond_loopback(host)
    path = routes_file(home, registered_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    url, name, home_path = f"http://{HOST}:{port}", front_name(registered_model), Path(home)
    staged.write_text(json.dumps({"champion": champion, "challenger": challenger, "canary": canary,
                                  "shadow": bool(shadow and challenger), "front": url}, indent=2))
    os.replace(staged, path)
    if recorded_pid(name, home_path) is not None and _front_up(url):
        return url
    stop_started(name, home_path)  # a recorded front that no longer answers
    if listening(port):
        raise RuntimeError(f"port {port} on {HOST} is taken by a process not started as '{name}' from {home_path}; "
                           f"stop it, or serve on another port (deploy.port)")
    cmd = [sys.executable, "-m", "serving.front", "--host", host, "--port", str(port), "--routes", str(path)]
    proc = spawn(name, cmd, {**os.environ, "PYTHONPATH": str(ROOT)}, home_path, cwd=ROOT)
    wait_until(name, lambda: _front_up(url), proc, home_path, 60)
    return url


def _front_up(url: str) -> bool:
    try:
        return httpx.get(url + "/front", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def resolve_engine(choice: str, bento_tag: str | None = None, home: str | None = None) -> str:
    """deploy.engine as served: `auto` is vLLM on a CUDA host that has the vLLM environment, transformers where
    there is none, and on a CPU with it whichever engine a short probe measures faster for the Bento's weights
    (tasks/engine_probe.py, once per weights and machine): measured through the service on 2 cores with a 135M
    model vLLM's CPU build gave 0.60x transformers' requests/s for one client and 1.07x at 32."""
    if choice != "auto":
        return choice
    if not vllm_python().is_file():
        return "transformers"
    import torch  # only a deploy that asks for auto pays for the import

    if torch.cuda.is_available():
        return "vllm"
    if bento_tag is None or home is None:
        return "transformers"
    from tasks.engine_probe import choose

    engine, found = choose(bentoml.models.get(bento_model(bento_tag)).path, home, str(vllm_python()))
    rates = ", ".join(f"{name} {rate:.1f}" for name, rate in found["tokens_per_second"].items())
    print(f"deploy.engine auto: {engine} for this model on this CPU (generated tokens/s: {rates}; measured "
          f"{found['measured']}{'; vLLM could not serve it: ' + found['vllm_error'] if 'vllm_error' in found else ''})")
    return engine


def shared_engine(champion: dict | None, bento_tag: str) -> str | None:
    """The URL of the champion's vLLM engine where the Bento `bento_tag` can join it as a second adapter: both
    LoRA versions on the same base weights (sha256), the challenger's rank within the engine's and its layers among
    the engine's (vLLM fixes both when it starts). None where it needs an engine of its own."""
    if not champion or not champion.get("engine_url"):
        return None
    mine, theirs = (bentoml.models.get(bento_model(tag)) for tag in (bento_tag, champion["bento"]))
    ours, engine = adapter_weights.adapter(mine.path), adapter_weights.adapter(theirs.path)
    if ours is None or engine is None or mine.info.metadata.get("base_sha256") != theirs.info.metadata.get(
            "base_sha256"):
        return None
    fits = adapter_weights.vllm_rank(ours) <= adapter_weights.vllm_rank(engine) and set(
        adapter_weights.targets(ours)) <= set(adapter_weights.targets(engine))
    return champion["engine_url"] if fits else None


def lora_bento(bento_tag: str) -> bool:
    """Whether the Bento serves a LoRA adapter on its base (the weights an engine can share with a challenger)."""
    return adapter_weights.adapter(bentoml.models.get(bento_model(bento_tag)).path) is not None


@task(name="serve-bento")
def serve(bento_tag: str, port: int, home: str, name: str = "bento", timeout_s: float = 180.0,
          feedback_db: str | None = None, host: str = HOST, redact: bool = True, engine: str = "transformers",
          vllm_port: int | None = None, vllm_attach: str | None = None) -> str:
    """`bentoml serve` the Bento on `host` (default 127.0.0.1), replacing the process this project started under
    `name`, generating with `engine` (transformers or vllm). Beyond loopback it refuses to start without
    TUNELINE_API_KEY: production text is no one's to read. With vllm, its engine listens on `vllm_port` (default:
    a free one), or with `vllm_attach` (an engine's URL, `shared_engine`) the version joins that engine.

    Answers and feedback go to `feedback_db`, else $TUNELINE_FEEDBACK_DB, else `home`/feedback.db, redacted
    unless `redact` is off."""
    require_key_beyond_loopback(host)
    if engine == "vllm" and (missing := vllm_missing("deploy.engine")):
        raise RuntimeError(missing)
    # vLLM's engine start is part of the service's (about a minute for a small model on a CPU)
    timeout_s = max(timeout_s, 900.0) if engine == "vllm" else timeout_s
    vllm = {"TUNELINE_VLLM_PORT": str(vllm_port or ""), "TUNELINE_VLLM_ATTACH": vllm_attach or ""}
    return _ready(*_launch(bento_tag, port, home, name, feedback_db, host, redact, engine, vllm), timeout_s)


def _launch(bento_tag: str, port: int, home: str, name: str, feedback_db: str | None, host: str = HOST,
            redact: bool = True, engine: str = "transformers", extra_env: dict[str, str] | None = None
            ) -> tuple[str, subprocess.Popen, Path, str]:
    home_path = Path(home)
    stop_started(name, home_path)
    # Checked before the launch: a new service that cannot bind exits only after a moment, and meanwhile the
    # process already on the port would answer the readiness check in its place.
    if listening(port):
        raise RuntimeError(f"port {port} on {HOST} is taken by a process not started as '{name}' from {home_path}; "
                           f"stop it, or serve on another port (deploy.port)")
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", bento_tag, "--host", host, "--port", str(port)]
    env = {**os.environ, "TUNELINE_FEEDBACK_DB": feedback_db or str(default_feedback_db(home_path.resolve())),
           "TUNELINE_REDACT": "on" if redact else "off", "TUNELINE_BENTO_MODEL": bento_model(bento_tag),
           "TUNELINE_ENGINE": engine, "TUNELINE_VLLM_PYTHON": str(vllm_python()),
           "TUNELINE_LOG_DIR": str((home_path / "logs").resolve()), **(extra_env or {})}
    return name, spawn(name, cmd, env, home_path, cwd=home_path), home_path, f"http://{HOST}:{port}"


def bento_model(bento_tag: str) -> str:
    """The exact tag of the model a Bento was built with (from its manifest)."""
    [tag] = {str(model.tag) for model in bentoml.get(bento_tag).info.all_models}  # both services share it
    return tag


def _ready(name: str, proc: subprocess.Popen, home_path: Path, url: str, timeout_s: float = 180.0) -> str:
    """Wait until the launched service answers /readyz; its URL."""
    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(name, ready, proc, home_path, timeout_s)
    return url


def in_process_reply(model, tokenizer, recipe: Recipe, recipe_dir: str | Path, content: str, max_tokens: int) -> str:
    """Greedy reply the way evaluation renders the recipe's prompt: the reference the service must match."""
    import torch  # heavy, and only the smoke test needs it here

    text = prompt_text(tokenizer, recipe, content, shots_for(recipe, recipe_dir, content))
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@task(name="smoke-compare")
def smoke_compare(model_dir: str, bento_tag: str, prompts: list[str], system_prompt: str, max_tokens: int,
                  home: str, port: int, recipe_dir: str | None = None) -> list[str]:
    """Serve the built Bento on a spare port and compare its replies with in-process greedy generation under
    the same recipe (`recipe_dir`, or none: zero-shot with `system_prompt`).

    Returns one line per prompt answered differently (empty: the service is faithful to the system).
    """
    launched = _launch(bento_tag, port, home, "bento-smoke", str(Path(home) / "smoke-answers.db"))
    try:
        # the references first, while the service starts: on a small machine both take tens of seconds
        model, tokenizer = load(Path(model_dir))
        recipe = read_recipe(recipe_dir) if recipe_dir else Recipe(system_prompt)
        expected = [in_process_reply(model, tokenizer, recipe, recipe_dir or model_dir, c, max_tokens) for c in prompts]
        url = _ready(*launched)
        failures = []
        for content, reference in zip(prompts, expected):
            served = chat.fn(url, content, max_tokens, free=True)["choices"][0]["message"]["content"]
            if served != reference:
                failures.append(f"{content[:60]!r}: served {served[:60]!r} != in-process {reference[:60]!r}")
        return failures
    finally:
        stop_started("bento-smoke", Path(home))


class RequestRefused(ValueError):
    """The service answered and refused the request (4xx): asking again gets the same answer."""


def _worth_retrying(task, task_run, state) -> bool:
    return not isinstance(state.result(raise_on_failure=False), RequestRefused)


@task(name="chat-request", retries=2, retry_delay_seconds=2, retry_condition_fn=_worth_retrying)
def chat(url: str, content: str, max_tokens: int = 48, stop: list[str] | None = None, free: bool = False,
         user: str | None = None) -> dict:
    """One chat request against the running service, as `user` when given (a canary is sticky per user); the
    JSON reply (`free`: generated text, also from a classifier)."""
    key = os.environ.get("TUNELINE_API_KEY")
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {key}"} if key else {},
                          json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                                **({"stop": stop} if stop else {}), **({"user": user} if user else {}),
                                **({"response_format": {"type": "text"}} if free else {})})
    if 400 <= response.status_code < 500:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise RequestRefused(f"the service at {url} refused the request ({response.status_code}): {message}")
    response.raise_for_status()
    return response.json()
