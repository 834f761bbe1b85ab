"""The `tuneline` command: start and stop the local stack, run a lifecycle config."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from enum import Enum
from pathlib import Path

import typer

from flows.config import ConfigError, load_config
from infra import local
from tasks.paths import vllm_missing

app = typer.Typer(help="tuneline: an LLM fine-tuning lifecycle, scope to deployment.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode="markdown")  # docstrings reflowed
feedback_app = typer.Typer(help="Production feedback captured by the service.", no_args_is_help=True,
                           rich_markup_mode="markdown")
app.add_typer(feedback_app, name="feedback")


def _fail(message: str, exc: BaseException | None = None) -> None:
    """One line for the reader; where `exc` is an unexpected error, its traceback goes to the state folder's
    log (named in the line), so a bug is never reduced to a message."""
    if exc is not None:
        log = local.configure_env() / "logs" / "cli.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            # A URL's password (`up --database postgresql://user:password@…`) never reaches the log.
            command = re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", " ".join(sys.argv[1:]))
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} tuneline {command}\n")
            out.write("".join(traceback.format_exception(exc)))
        message = f"{message} (traceback in {log})"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _connect(prefect: bool) -> None:
    """Point this process at the servers named in the environment, or at the local stack, and check they answer."""
    local.configure_env()
    for key, value in local.client_env().items():
        os.environ.setdefault(key, value)
    # Prefect read its settings when the config schema's tasks imported it, before the lines above named the
    # servers: read them again, or flows start on a temporary server while their tasks report to this one.
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    mlflow_server, prefect_server = local.mlflow_server(), local.prefect_server()
    checks = [("MLflow", "MLFLOW_TRACKING_URI", mlflow_server, mlflow_server.url)] + (
        [("Prefect", "PREFECT_API_URL", prefect_server, f"{prefect_server.url}/api")] if prefect else [])
    for name, variable, server, stack_url in checks:
        url = os.environ[variable].rstrip("/")
        if url == stack_url:
            if not server.healthy():
                _fail(f"no {name} server at {server.url}; start the stack with `tuneline up`")
        # A server the environment names (a team's shared one) is only asked whether it answers at all: one behind
        # a proxy may want credentials for /health, which is not the same as being down.
        elif url.startswith(("http://", "https://")) and local.http_status(url + "/health") is None:
            _fail(f"no {name} server answers at {url} ({variable}); check the address, or unset {variable} to "
                  "use the local stack")


@app.command()
def up(config: list[Path] = typer.Option([Path("configs/demo.yaml")],
                                      help="config whose deployments the runner serves (repeatable)"),
       runner: bool = typer.Option(True, "--runner/--no-runner", help="also register and serve the deployments"),
       database: str = typer.Option("", envvar="TUNELINE_DATABASE_URL", show_default=False,
                                    help="a shared PostgreSQL server for both servers' state: postgresql://user:"
                                         "password@host:port/NAME (default: SQLite under the state folder)"),
       artifacts_destination: str = typer.Option("", envvar="TUNELINE_ARTIFACTS_DESTINATION", show_default=False,
                                                 help="where MLflow stores artifacts: a folder or s3://bucket/path "
                                                      "(clients reach them through the server)"),
       allowed_hosts: str = typer.Option("", envvar="TUNELINE_MLFLOW_ALLOWED_HOSTS", show_default=False,
                                         help="MLflow's allowed Host headers, for a server behind a proxy"),
       pool: str = typer.Option("", help="register the deployments on this process work pool (created if missing) "
                                         "and start a worker for it, instead of the runner")
       ) -> None:
    """Start (or reuse) the Prefect and MLflow servers on 127.0.0.1, state under $TUNELINE_HOME (.tuneline) or
    on a shared PostgreSQL server, and a runner that registers each config's deployments (with its schedules)
    and executes their runs."""
    for path in config if runner else []:
        _config(path)
    # The servers read their stores from the environment (local.Stores): the options only fill it in.
    for key, value in {"TUNELINE_DATABASE_URL": database, "TUNELINE_ARTIFACTS_DESTINATION": artifacts_destination,
                       "TUNELINE_MLFLOW_ALLOWED_HOSTS": allowed_hosts}.items():
        if value:
            os.environ[key] = value
    try:
        for line in local.up(configs=[str(p) for p in config] if runner else [], pool=pool or None):
            typer.echo(line)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"Prefect UI: {local.prefect_server().url}   MLflow UI: {local.mlflow_server().url}")


@app.command()
def worker(pool: str = typer.Argument(..., help="the work pool, e.g. the config's finetune.work_pool")) -> None:
    """Start a process worker for POOL on this machine, beside the stack (`down` stops it): where the GPU stages
    run when this machine has the GPUs. Elsewhere: `prefect worker start --pool POOL`."""
    _connect(prefect=True)
    try:
        typer.echo(local.start_worker(pool, local.configure_env()))
    except (RuntimeError, TimeoutError) as exc:  # the pool refused, or the worker never came online (log named)
        _fail(str(exc))


@app.command()
def down() -> None:
    """Stop the servers and the Bento service that tuneline started (by PID); leave anything else alone."""
    for line in local.down():
        typer.echo(line)


@app.command()
def status() -> None:
    """What tuneline started from this state folder and whether it runs: the servers, the runner and workers, each
    model's front (with its champion and challenger) and services. Exit code 1 when one of them has exited."""
    lines, all_running = local.status(local.configure_env())
    for line in lines:
        typer.echo(line)
    if not all_running:
        raise typer.Exit(1)


@app.command()
def check(config: Path) -> None:
    """Validate a lifecycle config without running it, and say what its test split can show to the gate."""
    cfg = _config(config)
    typer.echo(f"{config}: ok ({cfg.task.name}, {len(cfg.models.candidates)} candidate models)")
    if not cfg.feedback.require_review:
        typer.echo("warning: feedback.require_review is false: feedback rounds train on unreviewed production "
                   "feedback (anyone with access to the service writes the next model's training data)")
    if cfg.deploy.engine == "vllm" and (missing := vllm_missing("deploy.engine")):
        typer.echo(f"warning: {missing} (the deploy would fail)")
    if cfg.task.data.startswith("hf:"):
        typer.echo("power: not estimated for a hub dataset (it is read when the lifecycle runs)")
        return
    from tasks.datasets import DataError, split, to_examples
    from tasks.evidence import gate_power  # the statistics only when the config is valid
    from tasks.training_config import training_plan

    parts = []
    for task in (cfg.task, *cfg.extra_tasks):  # read as the data stage reads it: a bad row stops here or is named
        try:
            outcome = to_examples(task, cfg.data.on_bad_rows, cfg.data.seed)
        except DataError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        parts.append(split(outcome.examples, cfg.data.validation, cfg.data.test, cfg.data.seed))
        first = f" (first: {outcome.rejects[0]['where']}: {outcome.rejects[0]['reason']})" if outcome.rejects else ""
        typer.echo(f"data: {task.name}: {len(outcome.examples)} examples ("
                   + ", ".join(f"{name} {len(rows)}" for name, rows in parts[-1].items())
                   + f"); {len(outcome.rejects)} rows rejected{first}")
    note, warnings = gate_power(cfg.gate, cfg.task, len(parts[0]["test"]))
    typer.echo(f"power: {note}")
    for warning in warnings:
        typer.echo(f"warning: {warning}")
    plan, warnings = training_plan(cfg.finetune, sum(len(p["train"]) for p in parts))
    typer.echo(f"training: {plan}")
    for warning in warnings:
        typer.echo(f"warning: {warning}")
    if cfg.align and not cfg.align.data.data.startswith("hf:"):
        _check_preferences(cfg, parts[0])


def _check_preferences(cfg, primary: dict) -> None:
    """The preference data read as the align stage reads it (all but the token lengths, which need the chosen
    model): its rows, pairs and rejects, the first fault named."""
    from tasks.datasets import DataError
    from tasks.preferences import held_out_prompts, read_preferences

    held = held_out_prompts({name: primary[name] for name in ("validation", "test")})
    try:
        rows, rejects = read_preferences(cfg.align.data, cfg.data.on_bad_rows, held, cfg.data.seed)
    except DataError as exc:
        typer.echo(f"error: align.data: {exc}", err=True)
        raise typer.Exit(2) from None
    paired = sum(r.paired for r in rows)
    typer.echo(f"align: {cfg.align.method} on {paired} pairs and {len(rows) - paired} judged answers from "
               f"{cfg.align.data.data}; {len(rejects)} rows rejected"
               + (f" (first: {rejects[0]['where']}: {rejects[0]['reason']})" if rejects else ""))


@app.command()
def pull(config: Path) -> None:
    """Provision the config's candidate models into the model store ahead of a run (the GGUF conversion, or
    the hub download), so the lifecycle's select stage finds them ready. Nothing else is started."""
    cfg = _config(config)
    from tasks.models import provision  # transformers only when there is work to do

    store = local.configure_env() / "models"
    for source in cfg.models.candidates:
        typer.echo(f"{source}: {provision(source, store)}")


@app.command()
def run(config: Path, serve: bool = typer.Option(None, "--serve/--no-serve", help="override deploy.serve")) -> None:
    """Run one lifecycle iteration against the local stack (start it first with `tuneline up`)."""
    _config(config)
    _connect(prefect=True)
    from flows.lifecycle import lifecycle  # after the environment points Prefect and MLflow at the stack

    summary = lifecycle(str(config.resolve()), serve=serve)
    typer.echo(json.dumps(summary, indent=2, default=str))
    typer.echo(f"Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}   "
               f"MLflow UI: {os.environ['MLFLOW_TRACKING_URI']}")
    if summary["service"].get("served"):
        url = summary["service"]["url"]
        typer.echo(f"Service: {url}/v1/chat/completions   try:\n  curl -s {url}/v1/chat/completions "
                   "-H 'content-type: application/json' "
                   "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Review: Love it. Return JSON.\"}]}'")


def _config(path: Path):
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def deploy(version: str = typer.Argument(None, help="registered version; default: the champion"),
           config: Path = typer.Option(Path("configs/demo.yaml"), help="lifecycle config: model name, port, limits")
           ) -> None:
    """Build VERSION of the registered model into a Bento, serve it on 127.0.0.1 and smoke-test it."""
    if version and version.endswith((".yaml", ".yml")):  # `tuneline deploy configs/x.yaml`, as `run` takes it
        _fail(f"VERSION {version!r} is a config file: pass it as --config {version}")
    cfg = _config(config)
    _connect(prefect=True)
    from flows.deploy import deploy_version  # after the environment points at the stack

    try:
        result = deploy_version(str(config.resolve()), version)
    except Exception as exc:  # MLflow's message names the missing model or version
        _fail(f"deploy of {cfg.registered_model} {version or 'champion'}: {exc}", exc)
    typer.echo(f"serving {result.model} ({result.bento}) at {result.url}/v1/chat/completions")


@app.command()
def align(version: str = typer.Argument(None, help="registered version; default: the champion"),
          config: Path = typer.Option(Path("configs/preference.yaml"), help="lifecycle config with an `align` section"),
          preferences: Path = typer.Option(None, help="preference file in align.data's shape; default: align.data")
          ) -> None:
    """Preference-tune VERSION alone (DPO or KTO, as the config's `align` says); the result is registered as a
    pending version beside its preference accuracy against VERSION. The champion does not move."""
    cfg = _config(config)
    if cfg.align is None:
        _fail(f"{config}: no `align` section: nothing says how to tune on preferences")
    _connect(prefect=True)
    from flows.align import align_model  # after the environment points at the stack

    try:
        result = align_model(str(config.resolve()), version, str(preferences.resolve()) if preferences else None)
    except Exception as exc:  # MLflow's message names a missing version; a DataError the row at fault
        _fail(f"align of {cfg.registered_model} {version or 'champion'}: {exc}", exc)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def export(version: str = typer.Argument(..., help="registered version, or an alias: champion, challenger"),
           merged: Path = typer.Option(..., help="folder to write the dense model to (safetensors, tokenizer, "
                                                 "recipe)"),
           config: Path = typer.Option(Path("configs/demo.yaml"), help="whose model")) -> None:
    """Write VERSION as a dense model any transformers code loads: a version that stores an adapter and a base
    reference is merged onto that base here, exactly as training merged it."""
    cfg = _config(config)
    if merged.exists() and any(merged.iterdir()):
        _fail(f"--merged {merged}: the folder is not empty; name a new one")
    _connect(prefect=False)
    from tasks import registry, stored_weights

    try:
        folder = registry.download(cfg.registered_model, version, merged)
    except stored_weights.WeightsError as exc:  # names the base that is missing, or why no weights were kept
        _fail(f"export of {cfg.registered_model} {version}: {exc}")
    except Exception as exc:  # MLflow's message names the missing model or version
        _fail(f"export of {cfg.registered_model} {version}: {exc}", exc)
    manifest = folder / stored_weights.MANIFEST
    kept = f" (stored as {stored_weights.describe(json.loads(manifest.read_text()))})" if manifest.is_file() else ""
    typer.echo(f"{cfg.registered_model} {version}{kept}: dense model in {folder}")


@app.command("finetune-rank")
def finetune_rank(run_folder: Path = typer.Argument(..., help="the fine-tuning run's folder, on a shared filesystem"),
                  machine_rank: int = typer.Option(..., help="this machine's rank, 1 to num_machines - 1"),
                  wait: float = typer.Option(600, help="seconds to wait for machine 0 to start the run"),
                  network_interface: str = typer.Option(None, help="this machine's NIC, where not machine 0's name")
                  ) -> None:
    """Join a distributed fine-tuning run (`finetune.distributed` with num_machines > 1) from another machine:
    its ranks train beside machine 0's, which runs the lifecycle and writes the weights."""
    from tasks.distributed import join

    try:
        join(run_folder, machine_rank, wait, network_interface)
    except (TimeoutError, RuntimeError, ValueError) as exc:  # no job yet, a failed rank (its log named), a bad rank
        _fail(f"finetune-rank {machine_rank} in {run_folder}: {exc}")
    typer.echo(f"finetune-rank: machine {machine_rank}'s ranks finished")


@app.command()
def gc(config: Path = typer.Option(Path("configs/demo.yaml"), help="whose model"),
       keep: int = typer.Option(None, help="newest versions whose served copies stay; default: deploy.keep, else 3")
       ) -> None:
    """Delete the served copies (Bentos, BentoML models) of the model's old versions; never the champion, the
    challenger, the rollback target or what is served. The registry keeps every version."""
    cfg = _config(config)
    _connect(prefect=False)
    from flows.deploy import prune_served
    from tasks.paths import state_dir

    newest = keep if keep is not None else (cfg.deploy.keep if cfg.deploy.keep is not None else 3)
    try:
        removed = prune_served(cfg, str(state_dir()), newest)
    except Exception as exc:  # MLflow's message names the missing model
        _fail(f"gc of {cfg.registered_model}: {exc}", exc)
    for tag in removed:
        typer.echo(f"deleted {tag}")


def _feedback_db() -> Path:
    from tasks.paths import feedback_db

    local.configure_env()
    return feedback_db()


@feedback_app.command("export")
def feedback_export(out: Path, config: Path = typer.Option(Path("configs/demo.yaml"), help="whose model"),
                    approve_at: int = typer.Option(None, help="also keep uncorrected replies rated at least this"),
                    pairs: bool = typer.Option(False, "--pairs", help="preference data instead: corrections as pairs "
                                               "(OUT), ratings as judged answers (OUT's stem + .binary.jsonl)"),
                    reject_at: int = typer.Option(None, help="--pairs: replies rated at most this are undesirable")
                    ) -> None:
    """Write the config's model's approved feedback as a JSONL dataset: chat examples (id, system, user,
    assistant, task), or with --pairs preference rows an `align.data` task reads."""
    from tasks.feedback import export, export_pairs

    cfg = _config(config)
    try:
        if pairs:
            found, binary = export_pairs(_feedback_db(), out, cfg.registered_model,
                                         cfg.feedback.approve_at if approve_at is None else approve_at,
                                         cfg.feedback.reject_at if reject_at is None else reject_at)
            typer.echo(f"{out}: {len(found.pairs)} pairs (approved corrections); {binary}: {len(found.binary)} "
                       f"judged answers (approved ratings) of {cfg.registered_model} ({found.pending} pending "
                       "review, not exported)")
            return
        found = export(_feedback_db(), out, cfg.registered_model, cfg.task.system_prompt, approve_at)
    except FileNotFoundError as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {len(found.examples)} approved examples of {cfg.registered_model} "
               f"({found.pending} pending review, not exported)")


class Review(str, Enum):
    """A feedback item's review status, as `feedback list` filters it (a typo is a usage error, not no items)."""
    pending = "pending"
    approved = "approved"
    rejected = "rejected"
    all = "all"


@feedback_app.command("list")
def feedback_list(status: Review = typer.Option(Review.pending, help="which items, by review status"),
                  model: str = typer.Option(None, help="only this registered model's")) -> None:
    """Feedback waiting for review (or with another status), one line each."""
    from tasks.feedback import items

    try:
        found = items(_feedback_db(), None if status is Review.all else status.value, model=model)
    except FileNotFoundError as exc:
        _fail(str(exc))
    for i in found:
        change = f" -> {i.correction[:40]!r}" if i.correction else ""
        typer.echo(f"{i.id:>5} {i.status:<8} {i.model:<24} rating {i.rating} key {i.key_id or '-':<12} "
                   f"{i.question[:50]!r}{change}")
    typer.echo(f"{len(found)} item(s)")


@feedback_app.command("show")
def feedback_show(ids: list[int]) -> None:
    """Every field of the given feedback items, as JSON."""
    from dataclasses import asdict

    from tasks.feedback import items

    try:
        found = items(_feedback_db(), ids=ids)
    except FileNotFoundError as exc:
        _fail(str(exc))
    missing = sorted(set(ids) - {i.id for i in found})
    if missing:
        _fail(f"no feedback with id {', '.join(map(str, missing))}")
    typer.echo(json.dumps([asdict(i) for i in found], indent=2, ensure_ascii=False))


def _review(decision: str, ids: list[int] | None, all_from: str | None, reason: str | None) -> None:
    from tasks.feedback import review, reviewer

    if not ids and not all_from:
        _fail("name the feedback ids, or --all-from KEY_ID")
    try:
        changed = review(_feedback_db(), decision, ids, all_from, reason)
    except (FileNotFoundError, KeyError) as exc:
        _fail(str(exc).strip("'\""))
    typer.echo(f"{decision} {len(changed)} item(s) as {reviewer()}: {', '.join(map(str, changed)) or '-'}")


@feedback_app.command("approve")
def feedback_approve(ids: list[int] = typer.Argument(None), all_from: str = typer.Option(None, help="API key id"),
                     reason: str = typer.Option(None)) -> None:
    """Approve feedback: the next round may train on it. Records who ($TUNELINE_REVIEWER or the login) and when."""
    _review("approved", ids, all_from, reason)


@feedback_app.command("reject")
def feedback_reject(ids: list[int] = typer.Argument(None), all_from: str = typer.Option(None, help="API key id"),
                    reason: str = typer.Option(None)) -> None:
    """Reject feedback: it never trains anything."""
    _review("rejected", ids, all_from, reason)


@feedback_app.command("sync")
def feedback_sync(config: Path = typer.Option(Path("configs/demo.yaml"), help="whose model and experiment")) -> None:
    """Write the model's served answers as MLflow traces with their ratings and corrections as assessments, and
    read back the reviews made in the MLflow UI (a `tuneline.review` assessment: approved or rejected)."""
    from tasks.feedback import trace

    cfg = _config(config)
    _connect(prefect=False)
    try:
        done = trace(_feedback_db(), cfg.registered_model, cfg.name)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if done.error:
        _fail(f"{done.error}; {done.waiting} answers wait in the store and are traced on the next sync")
    typer.echo(f"{cfg.name}: {done.answers} answers traced, {done.assessments} assessments written, "
               f"{len(done.reviewed)} reviews read from MLflow ({', '.join(map(str, done.reviewed)) or '-'})")


@feedback_app.command("shadow")
def feedback_shadow(config: Path = typer.Option(Path("configs/demo.yaml"), help="whose model")) -> None:
    """What a shadow deploy recorded: the challenger's answers beside the champion's on the same requests, and
    on the requests a reviewer settled, which was right (paired, exact McNemar test)."""
    from tasks.feedback import shadow_report

    cfg = _config(config)
    try:
        reports = shadow_report(_feedback_db(), cfg.registered_model, cfg.feedback.approve_at)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if not reports:
        typer.echo(f"{cfg.registered_model}: no shadow answers recorded (deploy.shadow: true records them)")
    for r in reports:
        typer.echo(f"{r.shadow} shadowing {r.champion}: {r.pairs} requests, the same answer on {r.agreed}; "
                   f"{r.judged} settled by review: champion right {r.champion_right}, shadow right "
                   f"{r.shadow_right} (shadow better on {r.wins}, worse on {r.losses}; exact McNemar p = "
                   f"{r.p_value:.3g}, against no difference)")


@feedback_app.command("purge")
def feedback_purge(config: Path = typer.Option(Path("configs/demo.yaml"), help="its feedback.retain_days"),
                   days: float = typer.Option(None, help="override feedback.retain_days")) -> None:
    """Delete stored prompts and answers older than the retention period that no approved feedback keeps."""
    from tasks.feedback import purge

    retain = days if days is not None else _config(config).feedback.retain_days
    try:
        gone = purge(_feedback_db(), retain)
    except FileNotFoundError as exc:
        _fail(str(exc))
    typer.echo(f"deleted {gone['responses']} answers and {gone['feedback']} feedback items older than {retain:g} days")


@app.command()
def promote(version: str, model: str = typer.Option(..., help="registered model name"),
            reason: str = typer.Option(..., help="why, recorded on the version")) -> None:
    """Make VERSION the champion by hand (the previous champion is kept for rollback)."""
    _connect(prefect=False)
    from tasks import registry  # after the tracking URI is set

    try:
        typer.echo(registry.promote_manually(model, version, reason))
    except Exception as exc:  # MLflow's message names the missing model or version
        _fail(str(exc), exc)


@app.command()
def rollback(model: str = typer.Option(..., help="registered model name"),
             reason: str = typer.Option(..., help="why, recorded on the version")) -> None:
    """Move `champion` back to the version the current champion replaced."""
    _connect(prefect=False)
    from tasks import registry  # after the tracking URI is set

    try:
        typer.echo(registry.rollback(model, reason))
    except Exception as exc:  # MLflow's message names the model; the traceback goes to the log
        _fail(str(exc), exc)


if __name__ == "__main__":
    app()
