"""Raw records → chat-format examples (system / user / assistant) → deterministic train/validation/test splits.

Sources: JSONL, CSV and Parquet files, or `hf:<dataset id>[:split]` for online users. Every bad row is named
with its file, line (or row) and fault; with `on_bad_rows: skip` it is written to a rejects file with its
reason instead of stopping the run. Nothing is dropped silently: duplicates are rejects too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment
from prefect import task

from tasks.model_sources import hub_failure
from tasks.schema import TaskConfig

SPLITS = ("train", "validation", "test")
SCALARS = (str, int, float, bool)


def _printable(value):
    """Every `{{ … }}` output: a whole list or object printed as text would be Python's repr, never what a
    prompt means, so it is a fault of the row's template use (index it, or loop over it)."""
    if isinstance(value, (list, dict)):
        raise TemplateError(f"prints a whole {type(value).__name__} ({json.dumps(value)[:60]}); index it or loop "
                            "over it")
    return value


_JINJA = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, finalize=_printable)


class DataError(ValueError):
    """Bad input data; the message names the file, the line or row, and the fault."""


@dataclass(frozen=True)
class Example:
    id: str
    system: str
    user: str
    assistant: str
    task: str = ""
    key: str = ""  # hash of the normalised input fields ("" for text-only examples): see `identity`
    choices: tuple[str, ...] = ()  # classify / choice: every allowed reply, rendered as the answer is

    def to_json(self) -> str:
        """One JSONL line; `choices` only where a ranked task has them."""
        fields = asdict(self)
        if not self.choices:
            del fields["choices"]
        return json.dumps(fields, ensure_ascii=False)


@dataclass(frozen=True)
class Splits:
    """What the data stage hands on: the primary task's split files, the mixed training file (every task by
    weight, plus production corrections), each task's own splits, and the data card's numbers."""
    train: str
    validation: str
    test: str
    rejects: str  # rejects.jsonl: every bad row with its reason
    keys: str  # keys.json: the split fingerprints and the training keys, registered with a version
    fingerprints: dict[str, str]
    per_task: dict[str, dict[str, str]]  # task → split → file
    counts: dict[str, dict[str, int]]  # task → split (and "rejected") → examples
    mixed_train: dict[str, int]  # task (and "feedback") → examples in the mixed training file
    pool: str = ""  # where shots come from: the task records of the training file (no feedback unless opted in)

    @property
    def shot_pool(self) -> str:
        """The file retrieved and fixed shots are drawn from: production text never becomes another user's
        prompt unless the config opts in (feedback.into_pool)."""
        return self.pool or self.train

    @property
    def files(self) -> dict[str, str]:
        """The primary task's split files by name."""
        return {name: getattr(self, name) for name in SPLITS}


@dataclass(frozen=True)
class Lengths:
    """The lengths check's result: token counts per task (chat template applied), how many examples left, and
    the primary task's splits they left (whose fingerprints in keys.json were recomputed)."""
    lengths: dict[str, list[int]]
    removed: int
    changed: frozenset[str] = frozenset()


@dataclass
class Outcome:
    examples: list[Example]
    rejects: list[dict]


# ---------------------------------------------------------------------------------------------- reading
def _read_jsonl(path: Path) -> tuple[list[tuple[str, dict | None, str | None]], list[str]]:
    rows, columns = [], set()
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append((where, None, f"not valid UTF-8 (byte {raw[exc.start]:#x} at column {exc.start + 1})"))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # some of json's messages end in "at" ("Unterminated string starting at"): one "at" before the column
            rows.append((where, None, f"malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            rows.append((where, None, f"expected a JSON object, got {type(record).__name__}"))
            continue
        columns.update(record)
        rows.append((where, record, None))
    return rows, sorted(columns)


def _read_csv(path: Path) -> tuple[list[tuple[str, dict | None, str | None]], list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for record in reader:
        where = f"{path}:{reader.line_num}"
        if None in record:
            rows.append((where, None, f"{len(record[None])} more values than the header has columns"))
        else:
            rows.append((where, record, None))
    return rows, list(reader.fieldnames or [])


def _read_parquet(path: Path) -> tuple[list[tuple[str, dict | None, str | None]], list[str]]:
    import pyarrow.parquet as pq  # only Parquet sources need it

    table = pq.read_table(path)
    return [(f"{path} row {i + 1}", r, None) for i, r in enumerate(table.to_pylist())], table.column_names


def _read_hub(source: str) -> tuple[list[tuple[str, dict | None, str | None]], list[str]]:
    from datasets import load_dataset  # online users only

    dataset_id, _, split_name = source.removeprefix("hf:").partition(":")
    try:
        data = load_dataset(dataset_id, split=split_name or "train")
    except (OSError, ValueError) as exc:  # offline and not cached, no such dataset, no such split
        raise DataError(f"{source}: {hub_failure(exc)}") from exc
    return [(f"{source} row {i + 1}", r, None) for i, r in enumerate(data)], list(data.column_names)


READERS: dict[str, Callable] = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv,
                                ".parquet": _read_parquet}


def read_rows(source: str) -> tuple[list[tuple[str, dict | None, str | None]], list[str]]:
    """(where, record or None, fault or None) per row, plus the columns seen; an empty source is an error."""
    if source.startswith("hf:"):
        rows, columns = _read_hub(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported data format {path.suffix!r}; use one of {sorted(READERS)}")
        rows, columns = reader(path)
    if not rows:
        raise DataError(f"{source}: no records (the file is empty)")
    return rows, columns


# -------------------------------------------------------------------------------------------- rendering
def compile_template(text: str):
    """A template as every stage renders it: sandboxed, undefined variables an error, whole lists never printed."""
    return _JINJA.from_string(text)


def template_variables(*templates: str) -> set[str]:
    found = set()
    for template in templates:
        try:
            found |= meta.find_undeclared_variables(_JINJA.parse(template))
        except TemplateError as exc:
            raise DataError(f"template {template[:40]!r}…: {exc}") from None
    return found


def normalise(text: str) -> str:
    """The form duplicates are compared in: case, accents, punctuation and spacing do not make a new example."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _null_inside(value, where: str) -> str | None:
    """Where a null or empty text sits inside a list or object field (e.g. "choices[2]"), if anywhere."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return where
    if isinstance(value, list):
        return next((found for i, item in enumerate(value) if (found := _null_inside(item, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        return next((found for key, item in value.items() if (found := _null_inside(item, f"{where}.{key}"))), None)
    return None


def record_context(record: dict, task: TaskConfig, variables: set[str]) -> tuple[dict, str | None]:
    """The template context of a record, or the first fault in it. Fields may be text, numbers, lists and
    objects (templates index and loop over them); what must be text is what the templates render."""
    context = {}
    for var in sorted(variables):
        column = task.fields.get(var, var)
        if column not in record:
            return context, f"missing field {column!r}"
        value = record[column]
        if (where := _null_inside(value, column)) is not None:
            return context, f"empty value in {where!r}"
        if value == [] or value == {}:
            return context, f"empty value in {column!r}"
        allowed = task.labels.get(var)
        if allowed and (not isinstance(value, SCALARS) or str(value) not in allowed):
            return context, f"label {value!r} in {column!r} is not one of {list(allowed)}"
        context[var] = value
    return context, None


def _as_text(value) -> str:
    """A field's value as duplicate detection reads it: lists and objects by their JSON."""
    return str(value) if isinstance(value, SCALARS) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def candidates(task: TaskConfig, compiled: dict, context: dict, record: dict, answer: str
               ) -> tuple[tuple[str, ...], str | None]:
    """Every reply a classify or choice record allows, rendered exactly as its answer is (the same template,
    stripped), or the fault that makes the row unusable. classify: the answer template with the class field set
    to each label in turn; choice: `choice_answer` over each item of the record's list."""
    if task.kind == "classify":
        [(var, labels)] = task.labels.items()
        options = [compiled[task.answer].render(**{**context, var: label}).strip() for label in labels]
    elif task.kind == "choice":
        column = task.fields.get(task.choices, task.choices)
        items = record.get(column)
        if not isinstance(items, list) or len(items) < 2:
            return (), f"{column!r} must be a list of at least 2 answers, got {json.dumps(items)[:60]}"
        options = [compiled[task.choice_answer].render(**{**context, column: items, "choice": item,
                                                          "letter": chr(65 + i), "index": i}).strip()
                   for i, item in enumerate(items)]
    else:
        return (), None
    if any(not o for o in options) or len(set(options)) < len(options):
        return (), f"the allowed answers must be distinct and non-empty, got {options}"
    if answer not in options:
        return (), f"the answer {answer!r} is not one of the allowed answers {options}"
    return tuple(options), None


def label_replies(answer: str, labels: dict[str, list[str]]) -> tuple[str, ...] | None:
    """A classifier's replies for serving: the answer template rendered with each label alone (as `candidates`
    renders them); None when the template reads more of a record than its label, as the replies then differ
    from record to record."""
    [(var, values)] = labels.items()
    try:
        template = _JINJA.from_string(answer)
        return tuple(template.render(**{var: value}).strip() for value in values)
    except TemplateError:
        return None


def example_key(normalised_input: str) -> str:
    return hashlib.sha256(normalised_input.encode()).hexdigest()[:16]


def identity(example: Example, records_by_prompt: Mapping[str, str] | None = None) -> str:
    """The one answer to "is this the same example", for dedup, splits, the held-out filter, the champion-overlap
    check and feedback alike. A record is its input fields' key (one review phrased by two templates is one
    example). A text-only example (production feedback) is the record whose rendered prompt it repeats, found
    in `records_by_prompt` (normalised prompt → key, see `by_prompt`), else the key of its normalised prompt."""
    if example.key:
        return example.key
    prompt = normalise(example.user)
    return (records_by_prompt or {}).get(prompt) or example_key(prompt)


def by_prompt(examples: Iterable[Example]) -> dict[str, str]:
    """Each record's normalised rendered prompt → its identity: how text-only examples are matched to records."""
    return {normalise(e.user): identity(e) for e in examples}


def rejecter(on_bad_rows: str, rejects: list[dict], **extra) -> Callable[[str, str, dict | None], None]:
    """How a bad row is treated: raised naming where it is (on_bad_rows=error), or kept in `rejects` with its
    reason (skip)."""
    def reject(where: str, reason: str, record: dict | None) -> None:
        if on_bad_rows == "error":
            raise DataError(f"{where}: {reason}")
        rejects.append({"where": where, "reason": reason, "record": record, **extra})

    return reject


def readable_rows(rows: list[tuple[str, dict | None, str | None]], task: TaskConfig, variables: set[str],
                  reject: Callable[[str, str, dict | None], None]) -> Iterable[tuple[str, dict, dict]]:
    """(where, record, template context) of every row that could be read and has what the templates read; the
    others go to `reject`."""
    for where, record, fault in rows:
        if fault:
            reject(where, fault, None)
            continue
        context, fault = record_context(record, task, variables)
        if fault:
            reject(where, fault, record)
            continue
        yield where, record, context


def to_examples(task: TaskConfig, on_bad_rows: str = "error", seed: int = 13) -> Outcome:
    """Render every record of `task.data`; faults raise (on_bad_rows=error) or become rejects (skip). `seed`
    (the config's data.seed) draws each record's prompt template when the task has several."""
    variables = template_variables(*task.prompts, task.answer)
    input_vars = sorted(template_variables(*task.prompts))
    rows, columns = read_rows(task.data)
    unmapped = sorted(v for v in variables if task.fields.get(v, v) not in columns)
    if unmapped and columns:  # no row has the column: the config is wrong, not the rows
        names = ", ".join(f"{v!r} (column {task.fields.get(v, v)!r})" for v in unmapped)
        raise DataError(f"{task.data}: template variable {names} has no column; columns are {columns}")

    # Compiled once: compiling per row cost 4 s on the demo data.
    compiled = {text: _JINJA.from_string(text) for text in (*task.prompts, task.answer, task.choice_answer)}
    rng = random.Random(seed)
    examples, rejects, seen = [], [], {}
    reject = rejecter(on_bad_rows, rejects)
    for where, record, context in readable_rows(rows, task, variables, reject):
        prompt = task.prompts[0] if task.prompt_choice == "first" else rng.choice(task.prompts)
        try:
            user = compiled[prompt].render(**context).strip()
            assistant = compiled[task.answer].render(**context).strip()
            options, fault = candidates(task, compiled, context, record, assistant)
        except TemplateError as exc:  # e.g. choices[3] in a row with three choices
            reject(where, f"template error: {exc} (the templates read {', '.join(sorted(variables))})", record)
            continue
        if not user or not assistant:
            reject(where, f"the {'prompt' if not user else 'answer'} template renders empty text", record)
            continue
        if fault:
            reject(where, fault, record)
            continue
        # Duplicates are judged on the record's input fields, so one review phrased by two templates is
        # still one example (and cannot land in both train and test).
        key = normalise(" ".join(_as_text(context[v]) for v in input_vars))
        if key in seen:
            reject(where, f"duplicate of {seen[key]}", record)
            continue
        example = Example(str(record.get("id", where)), task.system_prompt, user, assistant, task.name,
                          example_key(key), options)
        seen[key] = where
        examples.append(example)
    if not examples:
        raise DataError(f"{task.data}: every row was rejected ({len(rejects)}); first: {rejects[0]['reason']}")
    return Outcome(examples, rejects)


def chat_messages(example: Example, with_answer: bool) -> list[dict]:
    """The one place an example becomes chat messages: training, evaluation and serving agree on it."""
    messages = [{"role": "system", "content": example.system}] if example.system else []
    messages.append({"role": "user", "content": example.user})
    if with_answer:
        messages.append({"role": "assistant", "content": example.assistant})
    return messages


# ---------------------------------------------------------------------------------------------- splits
def split(examples: list[Example], validation: float, test: float, seed: int | str) -> dict[str, list[Example]]:
    """Hash buckets: an example's split is a pure function of its key and `seed`, so adding or removing
    records never moves another example between splits (a champion's test items stay unseen by it)."""
    parts: dict[str, list[tuple[str, Example]]] = {name: [] for name in SPLITS}
    for e in examples:
        digest = hashlib.sha256(f"{seed}:{identity(e)}".encode()).hexdigest()
        bucket = int(digest[:15], 16) / 16**15
        name = "validation" if bucket < validation else "test" if bucket < validation + test else "train"
        parts[name].append((digest, e))
    if any(not part for part in parts.values()):
        sizes = ", ".join(f"{name} {len(part)}" for name, part in parts.items())
        raise DataError(f"{len(examples)} examples are too few for validation={validation}, test={test} ({sizes})")
    return {name: [e for _, e in sorted(part, key=lambda pair: pair[0])] for name, part in parts.items()}


def fingerprint(examples: list[Example]) -> str:
    """The identity of a split: a hash of its sorted example keys (recorded on runs and registry versions)."""
    return hashlib.sha256("\n".join(sorted(identity(e) for e in examples)).encode()).hexdigest()[:16]


def mix(train_sets: dict[str, list[Example]], weights: dict[str, float], seed: int) -> list[Example]:
    """A multi-task training set: as many examples as all tasks together, shared out by weight.

    A task whose share exceeds its data is repeated (up-sampled); a smaller share is a random subset.
    """
    total, weight_sum = sum(len(v) for v in train_sets.values()), sum(weights.values())
    rng = random.Random(seed)
    mixed = []
    for name in sorted(train_sets):
        pool, want = train_sets[name], round(total * weights[name] / weight_sum)
        picked = [pool[i % len(pool)] for i in range(want)] if want > len(pool) else rng.sample(pool, want)
        mixed.extend(picked)
    rng.shuffle(mixed)
    return mixed


def write_examples(path: Path, examples: list[Example]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(e.to_json() + "\n" for e in examples), encoding="utf-8")
    return str(path)


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a split file, or from a registered retrieval system's pool, whose rows are shots (no
    system prompt of their own)."""
    return [Example(**{"system": "", **raw, "choices": tuple(raw.get("choices", ()))})
            for raw in map(json.loads, Path(path).read_text(encoding="utf-8").splitlines())]


def token_counter(tokenizer_dir: str) -> Callable[[list[dict]], int]:
    """Tokens of a chat example as the model sees it: rendered with its chat template, then tokenised."""
    from transformers import AutoTokenizer  # the data stage runs without a model otherwise

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count(messages: list[dict]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count


@task(name="prepare-data")
def prepare_data(tasks: list[TaskConfig], validation: float, test: float, seed: int, out_dir: str,
                 on_bad_rows: str = "error", corrections: list[str] = (), corrections_in_pool: bool = False
                 ) -> Splits:
    """Write the splits of every task (per task, and the mixed train file); return paths, counts, fingerprints.

    The first task is the primary one: its validation and test splits are what selection, baselines and
    the gate score. Every task's train split goes into the mixture by its `weight`. `corrections` (chat-example
    JSONL from production feedback) join the training file only, minus any whose prompt is a validation or
    test question: the held-out splits stay comparable from round to round. The shot pool is the training file
    without them unless `corrections_in_pool`. Token lengths are checked later, with the chosen model's
    tokenizer (`fit_lengths`).
    """
    out = Path(out_dir)
    per_task, per_task_files, rejects, counts = {}, {}, [], {}
    for task_config in tasks:
        name = task_config.name
        outcome = to_examples(task_config, on_bad_rows, seed)
        parts = split(outcome.examples, validation, test, seed)
        per_task[name] = parts
        rejects += [{**r, "task": name} for r in outcome.rejects]
        counts[name] = {s: len(parts[s]) for s in SPLITS} | {"rejected": len(outcome.rejects)}
        per_task_files[name] = {s: write_examples(out / name / f"{s}.jsonl", parts[s]) for s in SPLITS}
    primary = per_task[tasks[0].name]
    train = mix({name: parts["train"] for name, parts in per_task.items()}, {t.name: t.weight for t in tasks}, seed)
    records = by_prompt(e for parts in per_task.values() for part in parts.values() for e in part)
    held_out = {identity(e) for parts in per_task.values() for name in ("validation", "test") for e in parts[name]}
    pool = list(train)
    fed_back, fed_keys = 0, set()
    for path in corrections:
        for e in read_examples(path):
            e = replace(e, key=identity(e, records))
            if e.key in held_out:
                rejects.append({"where": f"{path} id {e.id}", "reason": "its prompt is a validation/test question",
                                "task": e.task})
            else:
                train.append(e)
                pool += [e] if corrections_in_pool else []
                fed_keys.add(e.key)
                fed_back += 1
    if fed_back:
        random.Random(seed).shuffle(train)
    rejects_path = out / "rejects.jsonl"
    write_rejects(rejects_path, rejects)
    fingerprints = {name: fingerprint(primary[name]) for name in SPLITS}
    (out / "keys.json").write_text(json.dumps({"fingerprints": fingerprints, "train": sorted(
        {e.key for parts in per_task.values() for e in parts["train"] if e.key} | fed_keys)}))
    return Splits(
        train=write_examples(out / "train.jsonl", train),
        validation=write_examples(out / "validation.jsonl", primary["validation"]),
        test=write_examples(out / "test.jsonl", primary["test"]),
        rejects=str(rejects_path),
        keys=str(out / "keys.json"),
        fingerprints=fingerprints,
        per_task=per_task_files,
        counts=counts,
        mixed_train={name: sum(1 for e in train if e.task == name) for name in per_task}
        | ({"feedback": fed_back} if corrections else {}),
        pool=write_examples(out / "pool.jsonl", pool),
    )


def write_rejects(path: Path, rejects: list[dict], mode: str = "w") -> None:
    with path.open(mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)


@task(name="fit-lengths")
def fit_lengths(splits: Splits, tokenizer_dir: str, max_tokens: dict[str, int]) -> Lengths:
    """Every split file checked with the chosen model's tokenizer and chat template: an example longer than
    its task's `max_tokens` is removed (with its reason in rejects.jsonl), never truncated. Files are rewritten
    in place only when something was removed, and then keys.json too: the fingerprints and training keys a
    version is registered with describe the data it was trained and tested on. Returns the token lengths per
    task, the removed count and the primary task's splits that changed."""
    count = token_counter(tokenizer_dir)
    paths = [*splits.files.values(), *([splits.pool] if splits.pool else [])] + \
        [f for files in splits.per_task.values() for f in files.values()]
    lengths: dict[str, list[int]] = {}
    measured: dict[tuple, int] = {}
    removed, dropped = [], set()
    for path in paths:
        examples, kept = read_examples(path), []
        for e in examples:
            ident = (e.task, e.key or e.user, e.assistant)
            if ident not in measured:
                measured[ident] = count(chat_messages(e, with_answer=True))
                lengths.setdefault(e.task, []).append(measured[ident])
            limit = max_tokens.get(e.task) or max_tokens.get("*")
            if limit is not None and measured[ident] > limit:
                if ident not in dropped:  # one reject per example, though it sits in several files
                    dropped.add(ident)
                    removed.append({"where": f"{path} id {e.id}", "task": e.task,
                                    "reason": f"over-long: {measured[ident]} tokens > max_tokens {limit}"})
            else:
                kept.append(e)
        if len(kept) < len(examples):
            if not kept:
                raise DataError(f"{path}: every example is longer than max_tokens with {tokenizer_dir}'s tokenizer")
            write_examples(Path(path), kept)
    write_rejects(Path(splits.rejects), removed, mode="a")
    primary = {"train": next(iter(splits.per_task.values()))["train"], "validation": splits.validation,
               "test": splits.test}
    now = {name: fingerprint(read_examples(path)) for name, path in primary.items()}
    if dropped:
        keys = json.loads(Path(splits.keys).read_text())
        keys["fingerprints"] = now
        remaining = {e.key for path in paths for e in read_examples(path) if e.key}
        keys["train"] = sorted(set(keys["train"]) & remaining)
        Path(splits.keys).write_text(json.dumps(keys))
    return Lengths(lengths, len(dropped), frozenset(n for n in now if now[n] != splits.fingerprints.get(n)))
