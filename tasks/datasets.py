"""Raw records → chat-format examples (system / user / assistant) → deterministic train/validation/test splits.

Every rejected row is reported with its file, line and fault; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from prefect import task

SPLITS = ("train", "validation", "test")
_JINJA = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the fault."""


@dataclass(frozen=True)
class Example:
    id: str
    system: str
    user: str
    assistant: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; a line that is not a JSON object is an error naming the line."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        rows.append((number, record))
    if not rows:
        raise DataError(f"{path}: no records (the file is empty)")
    return rows


def render(template: str, record: dict, where: str) -> str:
    try:
        text = _JINJA.from_string(template).render(**record).strip()
    except UndefinedError as exc:
        raise DataError(f"{where}: template variable has no field in the record ({exc.message})") from None
    except TemplateError as exc:
        raise DataError(f"{where}: template error ({exc})") from None
    if not text:
        raise DataError(f"{where}: template rendered an empty text")
    return text


def to_examples(path: Path, system: str, prompt: str, answer: str) -> list[Example]:
    """Render every record into a chat example; exact duplicates (same user turn) are kept once."""
    examples, seen = [], set()
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        user = render(prompt, record, where)
        if user in seen:
            continue
        seen.add(user)
        examples.append(Example(str(record.get("id", number)), system, user, render(answer, record, where)))
    return examples


def split(examples: list[Example], validation: float, test: float, seed: int) -> dict[str, list[Example]]:
    """Deterministic by seed: the same data and seed always give the same splits, with no overlap."""
    order = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e.user}".encode()).hexdigest())
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(order) * validation), round(len(order) * test)
    if min(n_val, n_test, len(order) - n_val - n_test) < 1:
        raise DataError(f"{len(order)} examples are too few for validation={validation}, test={test}")
    return {
        "validation": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }


@task(name="prepare-data")
def prepare_data(data: str, system: str, prompt: str, answer: str, validation: float, test: float,
                 seed: int, out_dir: str) -> dict[str, str]:
    """Write train/validation/test JSONL files of chat examples; return their paths by split."""
    splits = split(to_examples(Path(data), system, prompt, answer), validation, test, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SPLITS:
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(e.to_json() + "\n" for e in splits[name]), encoding="utf-8")
    return paths


def read_examples(path: str | Path) -> list[Example]:
    return [Example(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines()]
