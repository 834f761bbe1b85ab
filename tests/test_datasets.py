"""Records → chat examples → splits: sources, templates, dedup, leakage, mixing, and every kind of bad row."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.datasets import (
    DataError,
    Example,
    fingerprint,
    mix,
    normalise,
    prepare_data,
    read_examples,
    split,
    to_examples,
    write_examples,
)
from tasks.schema import TaskConfig
from tests.conftest import DEMO_DATA

PROMPT = "Review: {{ review }}"
ANSWER = '{"sentiment": "{{ sentiment }}"}'


def spec(source, **kw) -> TaskConfig:
    defaults = dict(name="t", data=str(source), system_prompt="sys", prompt=[PROMPT], answer=ANSWER,
                    labels={"sentiment": ["positive", "negative"]})
    return TaskConfig(**(defaults | kw))


def jsonl(tmp_path, *rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def test_demo_data_rejects_exactly_its_duplicates():
    outcome = to_examples(spec(DEMO_DATA, labels={}), on_bad_rows="skip")
    raw = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    assert len(outcome.examples) + len(outcome.rejects) == len(raw)
    assert len(outcome.examples) == len({normalise("Review: " + r["review"]) for r in raw})
    assert all(r["reason"].startswith("duplicate of ") for r in outcome.rejects)
    assert outcome.examples[0].system == "sys" and outcome.examples[0].user.startswith("Review: ")


def test_split_is_deterministic_by_seed_and_disjoint():
    examples = to_examples(spec(DEMO_DATA, labels={}), on_bad_rows="skip").examples
    a, b = split(examples, 0.1, 0.1, seed=7), split(examples, 0.1, 0.1, seed=7)
    assert a == b
    assert split(examples, 0.1, 0.1, seed=8)["test"] != a["test"]
    assert 0.07 < len(a["test"]) / len(examples) < 0.13  # hash buckets at the configured fraction
    users = {name: {e.user for e in part} for name, part in a.items()}
    assert not users["train"] & users["test"] and not users["train"] & users["validation"]
    assert sum(len(p) for p in a.values()) == len(examples)


def test_adding_records_never_moves_an_existing_example_between_splits(tmp_path):
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    before = prepare_data.fn([spec(jsonl(tmp_path, *rows[:400], name="a.jsonl"), labels={})], 0.1, 0.1,
                             13, str(tmp_path / "a"), on_bad_rows="skip")
    after = prepare_data.fn([spec(jsonl(tmp_path, *rows[:500], name="b.jsonl"), labels={})], 0.1, 0.1,
                            13, str(tmp_path / "b"), on_bad_rows="skip")
    where = {name: {e.key: name for e in read_examples(after.files[name])} for name in ("train", "validation", "test")}
    moved = [(e.key, name) for name in ("train", "validation", "test") for e in read_examples(before.files[name])
             if where[name].get(e.key) != name]
    assert moved == []
    assert sum(len(read_examples(after.files[n])) for n in ("train", "validation", "test")) > \
        sum(len(read_examples(before.files[n])) for n in ("train", "validation", "test"))
    # fingerprints identify the splits: unchanged data, same fingerprints; more data, new ones
    again = prepare_data.fn([spec(jsonl(tmp_path, *rows[:400], name="c.jsonl"), labels={})], 0.1, 0.1,
                            13, str(tmp_path / "c"), on_bad_rows="skip")
    assert again.fingerprints == before.fingerprints != after.fingerprints
    keys = json.loads(Path(after.keys).read_text())
    assert keys["fingerprints"] == after.fingerprints
    assert set(keys["train"]) == {e.key for e in read_examples(after.train)}


def test_lengths_are_checked_with_the_chosen_models_tokenizer_and_leave_every_split(tmp_path, tiny_model):
    from tasks.datasets import fit_lengths

    rows = [{"review": f"Item {i} works fine", "sentiment": "positive"} for i in range(60)]
    rows += [{"review": "very long " * (40 + i), "sentiment": "negative"} for i in range(30)]
    result = prepare_data.fn([spec(jsonl(tmp_path, *rows))], 0.2, 0.2, 3, str(tmp_path / "d"), "skip")
    fitted = fit_lengths.fn(result, tiny_model, {"t": 60})
    assert fitted.removed == 30 and all(n > 0 for n in fitted.lengths["t"])
    kept = [e for name in ("train", "validation", "test") for e in read_examples(result.files[name])]
    assert len(kept) == 60 and not any("very long" in e.user for e in kept)
    assert not any("very long" in e.user for e in read_examples(result.per_task["t"]["train"]))
    rejects = Path(result.rejects).read_text()
    assert rejects.count("over-long") == 30 and "max_tokens 60" in rejects
    # what a version is registered with describes the data used: the fingerprints and training keys of what stayed
    keys = json.loads(Path(result.keys).read_text())
    assert keys["fingerprints"] == {name: fingerprint(read_examples(result.files[name])) for name in
                                    ("validation", "test")} | {"train": fingerprint(read_examples(
                                        result.per_task["t"]["train"]))}
    assert set(keys["train"]) == {e.key for e in read_examples(result.per_task["t"]["train"])}
    assert fitted.changed == {n for n in ("train", "validation", "test") if keys["fingerprints"][n] !=
                              result.fingerprints[n]} and fitted.changed


def test_near_duplicates_cannot_leak_between_train_and_test(tmp_path):
    rows = [{"review": f"Item {i} works fine", "sentiment": "positive"} for i in range(40)]
    rows += [{"review": f"ITEM {i} works   fine!!", "sentiment": "positive"} for i in range(40)]  # same, normalised
    outcome = to_examples(spec(jsonl(tmp_path, *rows)), on_bad_rows="skip")
    assert len(outcome.examples) == 40 and len(outcome.rejects) == 40
    parts = split(outcome.examples, 0.2, 0.2, seed=1)
    train = {normalise(e.user) for e in parts["train"]}
    assert not train & {normalise(e.user) for e in parts["test"]}


def test_mix_follows_weights_and_keeps_the_total():
    a = [Example(str(i), "", f"a{i}", "x", "a") for i in range(300)]
    b = [Example(str(i), "", f"b{i}", "y", "b") for i in range(100)]
    mixed = mix({"a": a, "b": b}, {"a": 1.0, "b": 3.0}, seed=0)
    counts = Counter(e.task for e in mixed)
    assert counts == {"a": 100, "b": 300}  # b is up-sampled to its share
    assert mix({"a": a, "b": b}, {"a": 1.0, "b": 3.0}, seed=0) == mixed


def test_template_library_per_example_and_first(tmp_path):
    rows = [{"review": f"review number {i}", "sentiment": "negative"} for i in range(60)]
    path = jsonl(tmp_path, *rows)
    prompts = ("A: {{ review }}", "B: {{ review }}", "C: {{ review }}")
    varied = to_examples(spec(path, prompt=prompts)).examples
    assert {e.user[0] for e in varied} == {"A", "B", "C"}
    twice = jsonl(tmp_path, *rows, *rows, name="twice.jsonl")  # the same records under other phrasings
    assert len(to_examples(spec(twice, prompt=prompts), "skip").examples) == 60
    assert varied == to_examples(spec(path, prompt=prompts)).examples
    assert {e.user[0] for e in to_examples(spec(path, prompt=prompts, prompt_choice="first")).examples} == {"A"}


def test_csv_and_parquet_sources_with_field_mapping(tmp_path):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("text,label\nGreat buy,positive\nBroke fast,negative\n")
    mapped = spec(csv_path, fields={"review": "text", "sentiment": "label"})
    assert [e.user for e in to_examples(mapped).examples] == ["Review: Great buy", "Review: Broke fast"]
    pq_path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["Lovely", "Awful"], "label": ["positive", "negative"]}), pq_path)
    examples = to_examples(spec(pq_path, fields={"review": "text", "sentiment": "label"})).examples
    assert [e.assistant for e in examples] == ['{"sentiment": "positive"}', '{"sentiment": "negative"}']


GOOD = {"review": "fine", "sentiment": "positive"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD, b'{"review": oops}'], r"data.jsonl:2: malformed JSON"),
        ([GOOD, b"[1, 2]"], r"data.jsonl:2: expected a JSON object, got list"),
        ([GOOD, {"review": "no label"}], r"data.jsonl:2: missing field 'sentiment'"),
        ([GOOD, {"review": "   ", "sentiment": "positive"}], r"data.jsonl:2: empty value in 'review'"),
        ([GOOD, {"review": None, "sentiment": "positive"}], r"data.jsonl:2: empty value in 'review'"),
        ([GOOD, {"review": ["a", "b"], "sentiment": "positive"}], r"data.jsonl:2: template error: prints a whole list"),
        ([GOOD, b'{"review": "caf\xe9", "sentiment": "positive"}'], r"data.jsonl:2: not valid UTF-8"),
        ([GOOD, {"review": "meh", "sentiment": "mixed"}], r"data.jsonl:2: label 'mixed' in 'sentiment' is not one of"),
        ([GOOD, {"review": "FINE!", "sentiment": "positive"}], r"data.jsonl:2: duplicate of .*data.jsonl:1"),
    ],
)
def test_bad_row_errors_name_file_line_and_fault_and_skip_keeps_them(tmp_path, rows, message):
    path = jsonl(tmp_path, *rows)
    with pytest.raises(DataError, match=message):
        to_examples(spec(path), "error")
    outcome = to_examples(spec(path), "skip")
    assert [e.user for e in outcome.examples] == ["Review: fine"]
    assert len(outcome.rejects) == 1 and outcome.rejects[0]["where"].endswith("data.jsonl:2")


def test_template_variable_without_column_and_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"template variable 'stars' \(column 'stars'\) has no column"):
        to_examples(spec(jsonl(tmp_path, GOOD), answer="{{ stars }}"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no records"):
        to_examples(spec(empty))


def test_a_hub_dataset_not_cached_while_the_hub_is_off_is_named_with_the_switch():
    with pytest.raises(DataError) as err:  # HF_HUB_OFFLINE=1, the suite's setting: the hub is never reached
        to_examples(spec("hf:tuneline-tests/never-cached:train"))
    assert str(err.value) == ("hf:tuneline-tests/never-cached:train: not in the local Hugging Face cache, and the "
                              "hub is off (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0 to "
                              "download it")


def test_prepare_data_writes_splits_mixture_and_rejects(tmp_path):
    reviews = spec(DEMO_DATA, name="reviews", labels={})
    tickets = spec(DEMO_DATA.parent / "tickets.jsonl", name="tickets", prompt=["Ticket: {{ ticket }}"],
                   answer="{{ queue }}", labels={})
    result = prepare_data.fn([reviews, tickets], 0.1, 0.1, 13,
                             str(tmp_path), on_bad_rows="skip")
    assert {e.task for e in read_examples(result.test)} == {"reviews"}  # the primary task is scored
    assert result.mixed_train["reviews"] == result.mixed_train["tickets"]
    assert result.counts["reviews"]["rejected"] == 2
    rejected = sum(c["rejected"] for c in result.counts.values())
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == rejected


def test_corrections_join_the_training_split_only_and_never_a_held_out_question(tmp_path):
    reviews = spec(DEMO_DATA, name="reviews", labels={})
    plain = prepare_data.fn([reviews], 0.1, 0.1, 13, str(tmp_path / "a"), on_bad_rows="skip")
    held_out = read_examples(plain.test)[0]
    corrections = tmp_path / "round-001.jsonl"
    corrections.write_text(
        Example("feedback-1", "sys", "Review: a brand new question", '{"sentiment": "negative"}', "feedback").to_json()
        + "\n" + Example("feedback-2", "sys", held_out.user, "leaked answer", "feedback").to_json() + "\n")
    result = prepare_data.fn([reviews], 0.1, 0.1, 13, str(tmp_path / "b"), on_bad_rows="skip",
                             corrections=[str(corrections)])
    train = read_examples(result.train)
    assert [e.id for e in train if e.task == "feedback"] == ["feedback-1"]
    assert len(train) == len(read_examples(plain.train)) + 1
    assert [read_examples(result.files[s]) for s in ("validation", "test")] == \
        [read_examples(plain.files[s]) for s in ("validation", "test")]  # held-out splits unchanged between rounds
    assert result.mixed_train["feedback"] == 1
    rejects = [json.loads(line) for line in Path(result.rejects).read_text().splitlines()]
    assert any("feedback-2" in r["where"] and "validation/test question" in r["reason"] for r in rejects)


CHOICE_PROMPT = ("[{{ meta.topic }}] {{ question }}\n{% for c in choices %}{{ 'ABCD'[loop.index0] }}. {{ c }}\n"
                 "{% endfor %}")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Which flies?", "choices": ["bird", "fish", "stone"], "answer": 3, "meta": {"topic": "x"}},
         r"data.jsonl:2: template error: list object has no element 3 \(the templates read answer, choices"),
        ({"question": "Which is red?", "choices": ["sky", None, "blood"], "answer": 2, "meta": {"topic": "x"}},
         r"data.jsonl:2: empty value in 'choices\[1\]'"),
        ({"question": "Which is cold?", "choices": ["ice", "fire"], "answer": 0, "meta": {"topic": " "}},
         r"data.jsonl:2: empty value in 'meta.topic'"),
        ({"question": "Which is cold?", "choices": [], "answer": 0, "meta": {"topic": "x"}},
         r"data.jsonl:2: empty value in 'choices'"),
        ({"question": "Which is cold?", "choices": ["ice", "fire"], "meta": {"topic": "x"}},
         r"data.jsonl:2: missing field 'answer'"),
        ({"question": "Which is cold?", "choices": ["ice", "fire"], "answer": None, "meta": {"topic": "x"}},
         r"data.jsonl:2: empty value in 'answer'"),
    ],
)
def test_templates_index_and_loop_over_list_and_nested_fields_and_bad_rows_name_the_field(tmp_path, row, message):
    good = {"question": "Which is a fruit?", "choices": ["car", "apple", "rock"], "answer": 1,
            "meta": {"topic": "food"}}
    path = jsonl(tmp_path, good, row)
    task = spec(path, prompt=[CHOICE_PROMPT], answer="{{ 'ABCD'[answer] }}. {{ choices[answer] }}", labels={})
    outcome = to_examples(task, "skip")
    assert [(e.user, e.assistant) for e in outcome.examples] == [
        ("[food] Which is a fruit?\nA. car\nB. apple\nC. rock", "B. apple")]
    assert len(outcome.rejects) == 1
    with pytest.raises(DataError, match=message):
        to_examples(task, "error")


def test_a_template_that_renders_empty_text_is_a_bad_row(tmp_path):
    path = jsonl(tmp_path, {"review": "fine", "tags": ["a"]}, {"review": "meh", "tags": ["b", "c"]})
    task = spec(path, prompt=["{{ review }}"], answer="{% if tags | length > 1 %}{{ tags[1] }}{% endif %}", labels={})
    with pytest.raises(DataError, match=r"data.jsonl:1: the answer template renders empty text"):
        to_examples(task, "error")
    assert [(e.user, e.assistant) for e in to_examples(task, "skip").examples] == [("meh", "c")]


def test_a_classify_record_allows_each_label_written_as_the_answer_template_writes_it(tmp_path):
    path = jsonl(tmp_path, {"text": "charged twice", "queue": "billing"}, {"text": "parcel lost", "queue": "shipping"})
    examples = to_examples(spec(path, prompt=["Ticket: {{ text }}"], answer="queue: {{ queue }}",
                                labels={"queue": ("billing", "shipping")}, kind="classify")).examples
    assert [e.choices for e in examples] == [("queue: billing", "queue: shipping")] * 2
    assert [e.assistant for e in examples] == ["queue: billing", "queue: shipping"]
    assert read_examples(write_examples(tmp_path / "split.jsonl", examples)) == examples  # the split files keep them


QUIZ = {"q": "Which is a fruit?", "choices": ["carrot", "apple", "leek"], "answer": "B", "index": 1}


@pytest.mark.parametrize(("choice_answer", "answer", "choices", "gold"), [
    ("{{ letter }}", "{{ answer }}", ("A", "B", "C"), "B"),
    ("{{ choice }}", "{{ choices[index] }}", ("carrot", "apple", "leek"), "apple"),
    ("{{ index }}", "{{ index }}", ("0", "1", "2"), "1"),
    ("{{ letter }}. {{ choice }}", "B. {{ choices[index] }}", ("A. carrot", "B. apple", "C. leek"), "B. apple"),
])
def test_a_choice_record_lists_its_own_answers_by_letter_text_or_index(tmp_path, choice_answer, answer, choices, gold):
    prompt = "{{ q }}\n{% for c in choices %}{{ 'ABC'[loop.index0] }}. {{ c }}\n{% endfor %}"
    [example] = to_examples(spec(jsonl(tmp_path, QUIZ), prompt=[prompt], answer=answer, labels={}, kind="choice",
                                 choices="choices", choice_answer=choice_answer)).examples
    assert example.choices == choices and example.assistant == gold
    assert example.user == "Which is a fruit?\nA. carrot\nB. apple\nC. leek"


@pytest.mark.parametrize(("row", "message"), [
    (QUIZ | {"answer": "E"}, "the answer 'E' is not one of the allowed answers ['A', 'B', 'C']"),
    (QUIZ | {"choices": "carrot"}, "'choices' must be a list of at least 2 answers, got \"carrot\""),
    (QUIZ | {"choices": ["apple"]}, "'choices' must be a list of at least 2 answers"),
    (QUIZ | {"choices": ["apple", "apple"], "answer": "A"}, None),  # letters stay distinct
])
def test_choice_rows_without_a_usable_answer_list_are_bad_rows_naming_the_line(tmp_path, row, message):
    path = jsonl(tmp_path, QUIZ | {"q": "first"}, row)
    choice = spec(path, prompt=["{{ q }}"], answer="{{ answer }}", labels={}, kind="choice", choices="choices",
                  choice_answer="{{ letter }}")
    if message is None:
        assert len(to_examples(choice).examples) == 2
        by_text = spec(path, prompt=["{{ q }}"], answer="{{ choices[0] }}", labels={}, kind="choice",
                       choices="choices")
        with pytest.raises(DataError, match=rf"{path}:2: the allowed answers must be distinct"):
            to_examples(by_text)
        return
    with pytest.raises(DataError) as err:
        to_examples(choice)
    assert str(err.value) == f"{path}:2: {message}" or str(err.value).startswith(f"{path}:2: {message}")
    outcome = to_examples(choice, on_bad_rows="skip")
    assert len(outcome.examples) == 1 and outcome.rejects[0]["where"] == f"{path}:2"
