"""The MLflow registry as the gate: every candidate becomes a version with its metrics and decision as tags;
only a pass (or a recorded manual promotion) moves `champion`; the previous champion is kept for rollback.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from tasks import stored_weights
from tasks.evidence import Comparison, compare, table
from tasks.recipes import Recipe
from tasks.schema import GateConfig

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "tuneline.score"
METRIC_TAG = "tuneline.metric."  # + a metric's name: the version's test score on it
EVALUATED_TAG = "tuneline.evaluated."  # + a metric's name: a score evaluate-version measured later
PREVIOUS_TAG = "tuneline.previous_champion"
DECISION_TAG, REASONS_TAG = "tuneline.decision", "tuneline.reasons"
SYSTEM_TAG = "tuneline.system"  # what the version is: "fine-tuned", "base + 3 retrieved shots, plain", …
RULE_TAG = "tuneline.rule."  # + the rule: n, difference, interval and p-value of each paired comparison
SPLIT_TAG = "tuneline.split."  # + train/validation/test: the split fingerprints the version was judged on
STORED_TAG = "tuneline.stored"  # what the version stores of its weights, and its size (+ "_bytes")
KEYS_ARTIFACT = "data/keys.json"  # in the version's run: its training split's example keys


@dataclass(frozen=True)
class AlignedEvidence:
    """What an aligned (preference-tuned) system must also show against the weights it was aligned from: on the
    held-out preference pairs (pair id -> 1 where the chosen answer was the more likely), that it prefers the
    chosen answers more often by more than `margin`; on the task's test items, that it lost at most `max_drop`."""

    tuned: dict[str, float] | None  # the weights aligned from (fine-tuned, or the base's) on the held-out pairs
    aligned: dict[str, float] | None
    tuned_task: dict[str, float] | None  # the weights aligned from on the test items, the gate's metric
    margin: float = 0.0
    max_drop: float = 0.05
    start: str = "fine-tuned"  # which weights were aligned: "fine-tuned", or "base" with fine-tuning off

    @property
    def rules(self) -> tuple[str, str]:
        """The names of its two rules: preferences and task drop, each against the weights aligned from."""
        return f"preferences vs {self.start}", f"task drop vs {self.start}"


@dataclass(frozen=True)
class Evidence:
    """What the gate judges, per test item (item id -> score on the gate metric), so every rule compares two
    systems on the same items: the candidate, the bar (best prompt baseline) and the champion on the test split,
    base and candidate on each general suite (0/1 per item), crashes and the smoke test."""

    metric: str
    candidate: dict[str, float] | None
    bar: dict[str, float] | None
    bar_name: str = "best baseline"
    champion: dict[str, float] | None = None  # the champion re-scored on this split's items it never trained on
    champion_version: str | None = None
    champion_note: str | None = None  # why the champion could not be compared: the champion rule fails with it
    general: dict[str, tuple[dict[str, float], dict[str, float]]] = field(default_factory=dict)  # (base, candidate)
    weights_changed: bool = True  # False: a prompt recipe on the base weights, which cannot forget
    crashed: dict[str, str] = field(default_factory=dict)
    smoke_failures: list[str] | None = None  # None: not run; [] passed
    aligned: AlignedEvidence | None = None  # a preference-tuned candidate's own rules


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return ("PASS: " if self.passed else "FAIL: ") + "; ".join(self.reasons)


@dataclass(frozen=True)
class Candidate:
    """A system the evaluate stage scored on the test split, with the evidence the gate judges it on."""
    name: str  # prompt | finetuned | finetuned+shots
    system: str  # what the registry and the service call it, e.g. "fine-tuned + 3 retrieved shots, chat"
    weights_dir: str
    recipe: Recipe
    evidence: Evidence
    score: float  # mean per-item score on the gate's metric
    metrics: dict[str, float] = field(default_factory=dict)
    preferred: bool = False  # when it passes, chosen over higher-scoring systems (an aligned system: the round's aim)


@dataclass(frozen=True)
class Evaluation:
    """What the evaluate stage hands on: the candidates for the gate (simplest first), every scored system's
    test metrics by name, crashes, and what fine-tuning alone fixed and broke against the bar."""
    candidates: list[Candidate]
    scores: dict[str, dict] = field(default_factory=dict)
    crashed: dict[str, str] = field(default_factory=dict)
    fixed: int = 0
    broke: int = 0
    builtin: dict = field(default_factory=dict)
    preferences: dict[str, dict] = field(default_factory=dict)  # held-out preference accuracy by weights


@dataclass(frozen=True)
class Verdict:
    """What the promote stage hands on: the version registered, the system it is, the gate's decision with its
    reasons, and the Bento built for it (None unless it passed the metric rules and was smoke-served)."""
    version: str
    system: str
    passed: bool
    reasons: list[str]
    bento: str | None = None


def comparisons(evidence: Evidence, rules: GateConfig) -> list[Comparison]:
    """Every paired comparison the evidence allows: vs the bar, vs the champion, forgetting per general suite."""
    found = []
    if evidence.candidate is not None and evidence.bar is not None:
        found.append(compare("vs bar", evidence.candidate, evidence.bar, threshold=rules.min_improvement,
                             direction="above", confidence=rules.confidence))
    if evidence.candidate is not None and evidence.champion is not None:
        found.append(compare(f"vs champion v{evidence.champion_version}", evidence.candidate, evidence.champion,
                             threshold=-rules.champion_margin, direction="above", confidence=rules.confidence))
    for suite, (base, tuned) in sorted(evidence.general.items()):
        found.append(compare(f"forgetting {suite}", base, tuned, threshold=rules.max_forgetting,
                             direction="below", confidence=rules.confidence))
    aligned = evidence.aligned
    if aligned and aligned.aligned is not None and aligned.tuned is not None:
        found.append(compare(aligned.rules[0], aligned.aligned, aligned.tuned, threshold=aligned.margin,
                             direction="above", confidence=rules.confidence))
    if aligned and aligned.tuned_task is not None and evidence.candidate is not None:
        found.append(compare(aligned.rules[1], aligned.tuned_task, evidence.candidate, threshold=aligned.max_drop,
                             direction="below", confidence=rules.confidence))
    return found


PREFERENCE_RULE, TASK_DROP_RULE = AlignedEvidence(None, None, None).rules  # aligned after fine-tuning


def gate(evidence: Evidence, rules: GateConfig) -> Decision:
    """Every rule is checked and reported, pass or fail, with n, the difference, its interval and the p-value,
    so a reviewer sees why. Missing evidence fails; a champion that cannot be compared fails its rule."""
    reasons, passed = [], True

    def fail(reason: str) -> None:
        nonlocal passed
        passed = False
        reasons.append(reason)

    for name, error in evidence.crashed.items():
        fail(f"evaluation of {name} crashed ({error})")
    found = comparisons(evidence, rules)
    missing = [n for n, v in (("fine-tuned", evidence.candidate), ("baseline", evidence.bar)) if v is None]
    if missing:
        fail("missing evaluation: " + ", ".join(missing))
    for c in (c for c in found if c.rule == "vs bar"):
        (reasons.append if c.passed else fail)(
            f"{'beats' if c.passed else 'not shown to beat'} the bar ({evidence.bar_name}) on {evidence.metric}: "
            f"{c.describe()}")
    for c in (c for c in found if c.rule.startswith("vs champion")):
        (reasons.append if c.passed else fail)(
            f"{'no worse than' if c.passed else 'not shown to be no worse than'} the champion "
            f"v{evidence.champion_version} on {evidence.metric}: {c.describe()}")
    if evidence.champion_note:
        fail(evidence.champion_note)
    elif evidence.champion_version is None:
        reasons.append("no current champion")
    for c in (c for c in found if c.rule.startswith("forgetting ")):
        (reasons.append if c.passed else fail)(
            f"{'forgetting within the limit' if c.passed else 'may forget more than allowed'} on general suite "
            f"{c.rule.removeprefix('forgetting ')} (drop in accuracy): {c.describe()}")
    if evidence.aligned:
        rules_found = {c.rule: c for c in found}
        for rule, good, bad, what in (
                (evidence.aligned.rules[0], "prefers the chosen answers more often than", "not shown to prefer the "
                 "chosen answers more often than", "held-out preference pairs"),
                (evidence.aligned.rules[1], "task score within align.max_task_drop of", "may lose more of the task "
                 "than align.max_task_drop allows against", f"{evidence.metric} (drop)")):
            c = rules_found.get(rule)
            if c is None:
                fail(f"missing evaluation: {rule}")
            else:
                (reasons.append if c.passed else fail)(f"{good if c.passed else bad} the {evidence.aligned.start} "
                                                        f"weights on {what}: {c.describe()}")
    if not evidence.weights_changed:
        reasons.append("the base weights, unchanged: nothing to forget")
    elif not evidence.general:
        fail("missing evaluation: general benchmark (forgetting)")
    if evidence.smoke_failures is None:
        if not rules.require_smoke:
            reasons.append("smoke test skipped by config")
        elif not passed:  # promote builds and serves only a version that passed every other rule
            reasons.append("smoke test not run: the rules above failed")
        else:
            fail("smoke test did not run")
    elif evidence.smoke_failures:
        fail(f"smoke test: the served model answered {len(evidence.smoke_failures)} prompt(s) differently "
             f"from in-process generation (first: {evidence.smoke_failures[0]})")
    else:
        reasons.append("smoke test passed")
    return Decision(passed, reasons, found)


def champion(name: str) -> tuple[str, float] | None:
    """(version, recorded score) of the current champion, or None when there is none yet: when the model or its
    alias does not exist. Any other failure (a server down, a timeout) is raised with MLflow's message, so a
    gate never mistakes an outage for "no champion" and skips the champion rule."""
    return aliased(name, CHAMPION)


def aliased(name: str, alias: str) -> tuple[str, float] | None:
    """(version, recorded score) under `alias` (champion, challenger), or None when the model or alias is missing."""
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # A missing model is RESOURCE_DOES_NOT_EXIST; a missing alias, INVALID_PARAMETER_VALUE "... not found".
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                exc.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in exc.message):
            return None
        raise
    return str(mv.version), float(mv.tags.get(SCORE_TAG, "nan"))


def kept(name: str, newest: int) -> set[str]:
    """The versions whose served copies are never pruned: the champion, the challenger, the version `rollback`
    would return to, and the `newest` most recent."""
    client = MlflowClient()
    keep = set()
    for alias in (CHAMPION, CHALLENGER):
        found = aliased(name, alias)
        if found:
            keep.add(found[0])
            if alias == CHAMPION:
                previous = client.get_model_version(name, found[0]).tags.get(PREVIOUS_TAG)
                keep |= {previous} if previous else set()
    numbers = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), reverse=True)
    return keep | {str(n) for n in numbers[:newest]}


def training_keys(name: str, version: str) -> set[str] | None:
    """The example keys of the training split a version learned from (recorded at registration), or None
    when the version carries none."""
    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    if KEYS_ARTIFACT not in {f.path for f in client.list_artifacts(run_id, str(Path(KEYS_ARTIFACT).parent))}:
        return None
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=KEYS_ARTIFACT)
    return set(json.loads(Path(path).read_text())["train"])


@task(name="register-model", retries=2, retry_delay_seconds=5)
def register(name: str, model_dir: str, run_id: str, metrics: dict[str, float], gate_metric: str,
             keys_file: str | None = None, recipe_dir: str | None = None, system: str = "fine-tuned",
             keep_dense: bool = True) -> str:
    """Log a system into `run_id` — what it stores of its weights (adapters and a base reference, or dense
    weights: `stored_weights`) and its prompt recipe's files, side by side in one folder — register it, and make
    it the `challenger`. `system` names it ("base + 3 retrieved shots"). `keep_dense` False: a full fine-tune
    the gate rejected keeps its scores and recipe, not its weights.

    `keys_file` (the data stage's keys.json): the split fingerprints become tags and the training keys an
    artifact, so a later round can tell which of its test items this version trained on."""
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as staged:
        stored = stored_weights.pack(model_dir, staged, keep_dense)
        client.log_artifacts(run_id, staged, artifact_path="model")
    if recipe_dir:
        client.log_artifacts(run_id, recipe_dir, artifact_path="model")
    if keys_file:
        client.log_artifact(run_id, keys_file, artifact_path=str(Path(KEYS_ARTIFACT).parent))
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = _score_tags(metrics, gate_metric)
    if keys_file:
        tags |= {SPLIT_TAG + split: value
                 for split, value in json.loads(Path(keys_file).read_text())["fingerprints"].items()}
    tags[SYSTEM_TAG] = system
    tags[STORED_TAG] = stored_weights.describe(stored)
    tags[STORED_TAG + "_bytes"] = str(stored["bytes"])
    # A retry after a failure past this point must not register the run a second time: reuse its version.
    earlier = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if earlier:
        version = str(min(int(v.version) for v in earlier))
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    else:
        version = str(client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags,
                                                  description=f"System: {system}.").version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def _score_tags(metrics: dict[str, float], gate_metric: str) -> dict[str, str]:
    tags = {METRIC_TAG + k: f"{v:.6f}" for k, v in metrics.items() if v is not None}
    tags[SCORE_TAG] = f"{metrics.get(gate_metric, float('nan')):.6f}"
    return tags


def record_scores(name: str, version: str, metrics: dict[str, float], test_fingerprint: str) -> None:
    """A version's test scores measured after its registration (evaluate-version), as its tags beside the
    gate's, with the fingerprint of the test items they were measured on."""
    client = MlflowClient()
    tags = {EVALUATED_TAG + k: f"{v:.6f}" for k, v in metrics.items() if v is not None}
    tags[EVALUATED_TAG + "test_split"] = test_fingerprint
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def mark_pending(name: str, version: str) -> None:
    """A version registered without a gate decision (finetune-model): evaluate it, then promote it by hand."""
    MlflowClient().set_model_version_tag(name, version, DECISION_TAG, "pending")


def _move_champion(client: MlflowClient, name: str, version: str) -> None:
    previous = champion(name)
    if previous and previous[0] != version:
        client.set_model_version_tag(name, version, PREVIOUS_TAG, previous[0])
    client.set_registered_model_alias(name, CHAMPION, version)


@task(name="record-decision", retries=2, retry_delay_seconds=5)
def record(name: str, version: str, decision: Decision) -> None:
    """Tags carry the decision, its reasons and each rule's statistics; only a pass moves `champion`."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, DECISION_TAG, "pass" if decision.passed else "fail")
    client.set_model_version_tag(name, version, REASONS_TAG, "; ".join(decision.reasons))
    for c in decision.comparisons:
        client.set_model_version_tag(name, version, RULE_TAG + c.rule.replace(" ", "_"),
                                     f"{'pass' if c.passed else 'fail'}: {c.describe()}")
    if decision.passed:
        _move_champion(client, name, version)


def card(name: str, version: str, system: str, recipe: str, decision: Decision, counts: dict[str, dict[str, int]],
         fingerprints: dict[str, str], replaced: str | None, serve: str, stored: str | None = None) -> str:
    """A version's model card in markdown, for its description in the MLflow UI: what it is, the data it was
    judged on, the gate's table, what it replaced and how to serve and call it (the tags stay for machines)."""
    rows = "\n".join(f"| {task} | {c.get('train', 0)} | {c.get('validation', 0)} | {c.get('test', 0)} | "
                     f"{c.get('rejected', 0)} |" for task, c in counts.items())
    prints = ", ".join(f"{split} `{value}`" for split, value in fingerprints.items())
    return "\n".join([
        f"## {name} v{version}: {system}",
        f"**Gate: {'PASS' if decision.passed else 'FAIL'}** ({'champion' if decision.passed else 'rejected'})"
        + (f"; it replaced v{replaced} as champion." if decision.passed and replaced else "."),
        "", f"**Recipe:** {recipe}", "", *([f"**Stored:** {stored}", ""] if stored else []),
        "### Data", "| task | train | validation | test | rejected |", "|---|---|---|---|---|", rows, "",
        f"Split fingerprints: {prints}.", "",
        "### Gate", table([(system, c) for c in decision.comparisons]), "",
        *(f"- {r}" for r in decision.reasons), "",
        "### Serve and call it", "```bash", serve,
        "curl -s http://127.0.0.1:3000/v1/chat/completions -H 'content-type: application/json' \\",
        "  -d '{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}]}'", "```",
    ])


def describe(name: str, version: str, markdown: str) -> None:
    """The version's description in the MLflow UI."""
    MlflowClient().update_model_version(name, version, description=markdown)


def _history(client: MlflowClient, name: str, entry: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    client.set_registered_model_tag(name, f"tuneline.history.{int(time.time() * 1000)}", f"{stamp} {entry}")


def promote_manually(name: str, version: str, reason: str) -> str:
    """Make `version` the champion by hand; the reason and the previous champion are recorded."""
    client = MlflowClient()
    client.get_model_version(name, version)  # fails with MLflow's message if the version does not exist
    before = champion(name)
    _move_champion(client, name, version)
    client.set_model_version_tag(name, version, DECISION_TAG, "manual")
    client.set_model_version_tag(name, version, REASONS_TAG, f"promoted by hand: {reason}")
    _history(client, name, f"promote v{version} (was v{before[0] if before else 'none'}): {reason}")
    return f"{name}: champion is now v{version} (was {('v' + before[0]) if before else 'none'})"


def rollback(name: str, reason: str) -> str:
    """Move `champion` back to the version it replaced; recorded on both versions and the model."""
    client = MlflowClient()
    current = champion(name)
    if current is None:
        raise ValueError(f"{name} has no champion to roll back")
    previous = client.get_model_version(name, current[0]).tags.get(PREVIOUS_TAG)
    if not previous:
        raise ValueError(f"{name} v{current[0]} replaced no earlier champion; nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current[0], "tuneline.rolled_back", reason)
    _history(client, name, f"rollback v{current[0]} -> v{previous}: {reason}")
    return f"{name}: champion rolled back from v{current[0]} to v{previous}"


def stored(name: str, version: str) -> str:
    """What a version stores of its weights and their size ("1 adapter on gguf:… (sha256 …), 1.2 MB")."""
    return MlflowClient().get_model_version(name, version).tags.get(STORED_TAG, "dense weights")


def system(name: str, version: str) -> str:
    """What a version is ("fine-tuned", "base + 3 retrieved shots, plain"); versions from before recipes were
    fine-tuned weights."""
    return MlflowClient().get_model_version(name, version).tags.get(SYSTEM_TAG, "fine-tuned")


def download(name: str, ref: str, dst: str | Path, dense: bool = True) -> Path:
    """The files of `models:/name/<version>` or `models:/name@<alias>` in a local folder, with its dense weights
    made again where the version stores adapters or a base reference (`tuneline export --merged`); as stored
    with `dense` off (a Bento serves one LoRA adapter on its base as it is)."""
    uri = f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    if not dense:
        return folder
    try:
        return stored_weights.unpack(folder)
    except stored_weights.WeightsError as exc:
        raise stored_weights.WeightsError(f"{name} {'v' * str(ref).isdigit()}{ref}: {exc}") from None
