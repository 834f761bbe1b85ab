"""Prefect cache keys by content, for the expensive tasks (scoring, cost measurement).

Every iteration writes its splits and lm-eval tasks under a new folder and may merge the same weights into a
new one, so Prefect's INPUTS policy (which hashes the arguments, here paths) would never hit. These keys hash
what the result depends on instead: the model's files, the task's data files and settings, the code under
evals/ that renders and scores, and the machine and library versions that compute it (a cost measured on one
machine says nothing of another). Same inputs on a rerun → the persisted result, no recomputation.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import yaml

EVALS = Path(__file__).resolve().parent.parent / "evals"


@functools.lru_cache(maxsize=512)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: re-hash a file that changed
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's relative file names and their digests."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
        h.update(f"{f.relative_to(p)}:{digest(f)};".encode())
    return h.hexdigest()


def task_digest(tasks_dir: str | Path, task_name: str) -> str:
    """A generated lm-eval task as the model meets it: its settings without paths and its data files' bytes."""
    spec = yaml.safe_load((Path(tasks_dir) / f"{task_name}.yaml").read_text())
    files = spec.pop("dataset_kwargs", {}).get("data_files", {})
    spec.pop("include", None)  # a path into evals/, whose whole content is part of every key
    return hashlib.sha256(json.dumps([spec, {k: digest(v) for k, v in sorted(files.items())}],
                                     sort_keys=True).encode()).hexdigest()


LIBRARIES = ("torch", "transformers", "peft", "trl", "lm-eval")


def library_versions() -> dict[str, str]:
    """The versions of the libraries that train and score: a result computed under others is not reused."""
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


@functools.cache
def environment() -> str:
    """The machine (CPU model, cores, GPU) and the versions of the libraries that compute a cached result."""
    import torch  # every task keyed here runs a model anyway

    cpu = platform.processor()
    try:  # Linux names the CPU here; platform.processor() is often empty there
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return json.dumps({"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, **library_versions()}, sort_keys=True)


def by_content(context, parameters: dict) -> str:
    """cache_key_fn: the task's name, its plain arguments, the content behind its path arguments, and the
    environment (machine and library versions)."""
    plain = {k: v for k, v in parameters.items() if k not in {"model_dir", "tasks_dir"}}
    parts = [context.task.name, json.dumps(plain, sort_keys=True, default=str), digest(EVALS), environment()]
    if "model_dir" in parameters:
        parts.append(digest(parameters["model_dir"]))
    if "tasks_dir" in parameters:
        parts.append(task_digest(parameters["tasks_dir"], parameters["task_name"]))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
