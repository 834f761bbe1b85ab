"""The lifecycle YAML schema: the demo config is valid; every fault is one line naming the file and the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, load_config
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"
PREFS = {"name": "prefs", "kind": "preference", "data": str(ROOT / "data" / "review_preferences.jsonl"),
         "shape": "rankings", "prompt": "Review: {{ review }}", "answer": "{{ answer }}"}


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["task"]["data"] = str(ROOT / "data" / "reviews.jsonl")
    mutate(raw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_config_is_valid_and_resolves_data_against_its_folder():
    config = load_config(DEMO)
    assert config.task.data == str((ROOT / "data" / "reviews.jsonl").resolve())
    assert config.models.candidates == ["gguf:smollm2-135m-instruct", "gguf:gemma-3-270m"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["finetune"].update(learning_rat=1e-4), "finetune.learning_rat: Extra inputs are not permitted"),
        (lambda c: c.pop("registered_model"), "registered_model: Field required"),
        (lambda c: c["finetune"].update(max_steps="many"), "finetune.max_steps: Input should be a valid integer"),
        (lambda c: c["finetune"].update(max_steps=0), "finetune.max_steps: Input should be greater than 0"),
        (lambda c: c["models"].update(candidates=["huggingface/foo"]), "models.candidates: Value error"),
        (lambda c: c["models"].update(candidates=["tiny:0", "gguf:nope"]),
         "models.candidates.1: model source 'gguf:nope': unknown shipped model; choose one of"),
        (lambda c: c["models"].update(candidates=["path:no-such-folder"]),
         "models.candidates.0: model source 'path:"),
        (lambda c: c["models"].update(candidates=["hf:org/id@"]),
         "models.candidates.0: model source 'hf:org/id@': expected hf:<org/id> or hf:<org/id>@<revision>"),
        (lambda c: c["baseline"].update(shots=[-1]), "baseline.shots: Value error"),
        (lambda c: c["task"].update(data="missing.jsonl"), "task.data: file not found"),
        (lambda c: c["task"].update(prompt=[]), "task.prompt: Value error, prompt must be a non-empty template"),
        (lambda c: c["data"].update(on_bad_rows="ignore"), "data.on_bad_rows: Input should be 'error' or 'skip'"),
        (lambda c: c.update(extra_tasks=[dict(c["task"])]), "extra_tasks: task names must be unique"),
        (lambda c: c["finetune"].update(stages=[{"task": "nope"}]), "finetune.stages.0.task: unknown task 'nope'"),
        (lambda c: c["finetune"].update(method="prefix"), "finetune.method: Input should be 'lora', 'qlora'"),
        (lambda c: c["task"].update(kind="classify"), "task: Value error, kind classify needs exactly one entry in "
                                                      "labels (the class field), got ['rating', 'sentiment']"),
        (lambda c: c["task"].update(kind="choice"), "task: Value error, kind choice needs `choices`"),
        (lambda c: (c["task"].update(kind="classify", labels={"sentiment": ["positive", "negative"]},
                                     answer="{{ sentiment }} ({{ rating }} stars)"), c["gate"].update(metric=None)),
         "Value error, deploy.constrain: the answer template '{{ sentiment }} ({{ rating }} stars)' reads more of a "
         "record than its label (sentiment)"),
        (lambda c: c["task"].update(choices="options"), "task: Value error, choices is for kind choice"),
        (lambda c: c["gate"].update(metric="accuracy"), "Value error, gate.metric accuracy does not score a "
                                                        "generate task"),
        (lambda c: c["task"].update(kind="preference"), "Value error, task: kind preference is the data of `align`"),
        (lambda c: c.update(align={"data": c["task"]}), "align.data must be a task of kind preference, not generate"),
        (lambda c: c.update(align={"data": {**PREFS, "shape": "binary"}}), "method dpo trains on pairs; answers "
                                                                           "judged one at a time (shape binary)"),
        (lambda c: c.update(align={"data": PREFS, "method": "kto", "batch_size": 1}), "method kto needs batch_size 2"),
        (lambda c: c.update(align={"data": PREFS, "loss_type": "kto"}), "loss_type 'kto' is not a dpo loss of TRL"),
        (lambda c: c.update(align={"data": {**PREFS, "data": "nope.jsonl"}}), "align.data.data: file not found"),
    ],
)
def test_bad_field_is_named_with_the_file(tmp_path, mutate, expected):
    path = write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_a_classifier_answering_more_than_its_label_is_served_as_free_text_only_when_asked(tmp_path):
    path = write(tmp_path, lambda c: (c["task"].update(kind="classify", labels={"sentiment": ["positive", "negative"]},
                                                       answer="{{ sentiment }} ({{ rating }} stars)"),
                                      c["deploy"].update(constrain=False), c["gate"].update(metric=None)))
    assert load_config(path).deploy.constrain is False


def test_each_bundled_config_is_valid_and_the_gate_metric_follows_the_task_kind():
    metrics = {path.name: load_config(path).gate.metric for path in sorted((ROOT / "configs").glob("*.yaml"))}
    assert metrics == {"choice.yaml": "accuracy", "classify.yaml": "accuracy", "demo.yaml": "exact_match",
                       "multitask.yaml": "exact_match", "preference.yaml": "exact_match", "search.yaml": "exact_match"}


def test_every_field_at_fault_is_named_in_one_line(tmp_path):
    path = write(tmp_path, lambda c: (c.pop("name"), c.pop("registered_model"), c["finetune"].update(max_steps=0)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: name: Field required; registered_model: Field required; "
                              "finetune.max_steps: Input should be greater than 0")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntask: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: not valid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_check_reports_one_line_and_exit_code_2(tmp_path):
    path = write(tmp_path, lambda c: c["gate"].update(min_improvment=0.1))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {path}: gate.min_improvment: Extra inputs are not permitted"


def test_cli_check_states_the_power_of_the_test_split_and_warns_naming_the_numbers():
    done = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(ROOT / "configs" / "demo.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == ("data: reviews: 1598 examples (train 1279, validation 156, test 163); 2 rows rejected "
                        f"(first: {ROOT / 'data' / 'reviews.jsonl'}:1284: duplicate of "
                        f"{ROOT / 'data' / 'reviews.jsonl'}:140)")
    assert lines[2] == ("power: 48 test items detect a gain of 0.254 in exact match (95 % confidence, 80 % power, "
                        "bar at 0.50)")
    assert lines[3].startswith("warning: gate.min_improvement +0.050 is below the smallest detectable gain 0.254 "
                               "for 48 test items")
    assert lines[4] == "training: fine-tuning runs 30 steps of 4 examples: 0.09 epochs of the 1279 training examples"
    assert lines[5] == ("warning: finetune.max_steps 30 covers 9% of an epoch (320 steps at 4 examples a step); "
                        "set it to null to train for finetune.epochs (1)")


def test_cli_check_reads_the_data_as_the_run_would_under_on_bad_rows(tmp_path):
    data = tmp_path / "records.jsonl"
    data.write_text("".join((ROOT / "data" / "reviews.jsonl").read_text().splitlines(keepends=True)[:40])
                    + '{"review": "cut off\n')
    path = write(tmp_path, lambda c: (c["task"].update(data=str(data)), c["data"].update(on_bad_rows="error")))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 2  # the run would stop at this row: check says so before anything starts
    assert done.stderr.strip().startswith(f"error: {data}:41: malformed JSON")
    path = write(tmp_path, lambda c: (c["task"].update(data=str(data)), c["data"].update(on_bad_rows="skip")))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("data: reviews: 40 examples (train ")
    assert done.stdout.splitlines()[1].endswith(f"; 1 rows rejected (first: {data}:41: malformed JSON "
                                                "(Unterminated string starting at column 12))")


def test_cli_check_reads_the_preference_data_naming_its_rejects():
    done = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(ROOT / "configs" / "preference.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # 400 ranked reviews, 3 pairs each, less those on the fine-tuning task's held-out reviews (and duplicates)
    line = done.stdout.splitlines()[-1]
    assert line.startswith("align: dpo on 981 pairs and 0 judged answers from ")
    assert line.endswith("review_preferences.jsonl:4: its prompt is a validation prompt of the fine-tuning task: "
                         "the gate tests on it)")


def test_training_runs_by_epochs_by_default_and_warns_below_half_an_epoch():
    from flows.config import FinetuneConfig
    from tasks.training_config import training_plan

    assert FinetuneConfig().max_steps is None  # the default trains for `epochs`, whatever the data's size
    ft = load_config(DEMO).finetune  # the section is all the plan reads
    ft.max_steps, ft.epochs, ft.batch_size = None, 2, 8
    assert training_plan(ft, 100) == ("fine-tuning runs 26 steps of 8 examples: 2.00 epochs of the 100 training "
                                      "examples", [])
    ft.max_steps = 7  # 7 of 13 steps an epoch: over half, no warning; 6 would be under
    assert training_plan(ft, 100)[1] == []
    ft.max_steps = 6
    assert training_plan(ft, 100)[1] == ["finetune.max_steps 6 covers 46% of an epoch (13 steps at 8 examples "
                                         "a step); set it to null to train for finetune.epochs (2)"]
    assert training_plan(ft, 100, step_seconds=20.0)[0].endswith(
        ", about 2 min on this machine (20.0 s a step in the last run of this model here)")


def test_cli_pull_provisions_the_candidates_into_the_store_the_lifecycle_reads(tmp_path):
    from tasks.models import META_FILE, store_key

    path = write(tmp_path, lambda c: c["models"].update(candidates=["tiny:3"]))
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "pull", str(path)], capture_output=True, text=True,
                          env={**os.environ, "TUNELINE_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tiny:3: {home / 'models' / store_key('tiny:3')}"
    assert (home / "models" / store_key("tiny:3") / META_FILE).is_file()
