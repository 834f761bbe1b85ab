"""What a registry version stores of its weights. A LoRA or QLoRA version is its adapter (an aligned one: the
fine-tuning adapter and the preference adapter, in order) plus a reference to the base snapshot they apply to,
its source and the sha256 of its safetensors; a prompt system on the base weights is the reference alone; only
a full fine-tune stores dense weights, and only when it passed the gate's metric rules. The dense model is made
again on demand (`unpack`) as training merged it: the same base, cast to the dtype each merge ran in, each
adapter merged in turn. A 7B LoRA version is then megabytes, not 15 GB.

Written here because MLflow logs folders and peft merges one adapter, but neither records which base weights an
adapter was trained on nor rebuilds a chain of merges (a preference adapter on a fine-tuned one on the base)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from serving import adapter_weights
from tasks.caching import digest
from tasks.models import META_FILE, model_info
from tasks.paths import state_dir

MANIFEST = "weights.json"
ADAPTER_CONFIG = "adapter_config.json"


class WeightsError(ValueError):
    """A version's weights cannot be made here: its base is missing or not the one it was trained on, or the
    gate rejected it and its dense weights were not kept."""


def _weights_digest(folder: Path) -> str:
    """sha256 over a folder's safetensors (names and contents): its weights, whatever else was re-saved beside."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f"{f.name}:{digest(f)};".encode())
    return h.hexdigest()


def _dtype(model_dir: Path) -> str:
    """The dtype a merged folder's weights were saved in: the dtype its merge ran in."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def chain(model_dir: str | Path) -> dict | None:
    """What `model_dir`'s weights are made of: {"base": {source, path, sha256}, "adapters": [(dir, dtype)…]} with
    the adapters in the order they were merged, or None where some step was a full fine-tune (dense only)."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():  # a version made again from the registry (align-model starts from one)
        stored = json.loads((model_dir / MANIFEST).read_text())
        if stored["kind"] not in ("base", "adapter"):
            return None
        return {"base": stored["base"],
                "adapters": [(str(model_dir / a["dir"]), a["dtype"]) for a in stored["adapters"]]}
    if not (model_dir / META_FILE).is_file():  # weights from elsewhere: nothing says what they were made from
        return None
    meta = model_info(model_dir)
    if "base" not in meta:  # a snapshot in the model store
        return {"base": {"source": meta["source"], "path": str(model_dir.resolve()),
                         "sha256": _weights_digest(model_dir)}, "adapters": []}
    adapter = model_dir.parent / "adapter"  # a training run folder: adapter/ beside merged/
    if not (adapter / ADAPTER_CONFIG).is_file():
        return None
    if not (Path(meta["base"]) / META_FILE).is_file():  # the weights it was trained from are gone: dense only
        return None
    below = chain(meta["base"])
    return None if below is None else {**below, "adapters": below["adapters"] + [(str(adapter), _dtype(model_dir))]}


def _place(src: Path, dst: Path) -> None:
    """A file where it is needed: a hard link where the filesystem allows (weights are never written in place),
    else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def pack(model_dir: str | Path, dst: str | Path, keep_dense: bool = True) -> dict:
    """Stage in `dst` what a version stores of `model_dir`: its tokenizer, config and metadata always; then its
    adapters and base reference, or its dense weights (`keep_dense`), or neither (a rejected full fine-tune).
    Returns the manifest, written to dst/weights.json, with the bytes staged."""
    model_dir, dst = Path(model_dir), Path(dst)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (MANIFEST, "model.safetensors.index.json"):
            _place(f, dst / f.name)
    found = chain(model_dir)
    if found is not None:
        manifest = {"kind": "adapter" if found["adapters"] else "base", "base": found["base"], "adapters": []}
        for i, (adapter, dtype) in enumerate(found["adapters"]):
            for f in Path(adapter).iterdir():
                if f.is_file():
                    _place(f, dst / "adapters" / str(i) / f.name)
            manifest["adapters"].append({"dir": f"adapters/{i}", "dtype": dtype})
    elif keep_dense:
        for f in model_dir.glob("*.safetensors*"):
            _place(f, dst / f.name)
        manifest = {"kind": "dense"}
    else:
        manifest = {"kind": "none", "why": "the gate rejected it and its dense weights were not kept"}
    manifest["bytes"] = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def describe(manifest: dict) -> str:
    """One line for the model card and the logs: what the version stores and its size."""
    size = f"{manifest['bytes'] / 2**20:.1f} MB"
    if manifest["kind"] == "dense":
        return f"dense weights, {size}"
    if manifest["kind"] == "none":
        return f"no weights ({manifest['why']}), {size}"
    base = f"{manifest['base']['source']} (sha256 {manifest['base']['sha256'][:12]})"
    n = len(manifest["adapters"])
    return f"{n} adapter{'s' * (n > 1)} on {base}, {size}" if n else f"a reference to {base}, {size}"


def _base(stored: dict) -> Path:
    """The base snapshot a version was made from: where it was recorded, else the same store folder in this
    state folder's model store; its weights must be the very ones recorded."""
    recorded = Path(stored["path"])
    for folder in (recorded, state_dir() / "models" / recorded.name):
        if (folder / META_FILE).is_file():
            if _weights_digest(folder) != stored["sha256"]:
                raise WeightsError(f"the base {stored['source']} at {folder} is not the snapshot the version was "
                                   f"made from (sha256 {_weights_digest(folder)[:12]}, recorded "
                                   f"{stored['sha256'][:12]}); make its dense weights where that snapshot is")
            return folder
    raise WeightsError(f"the version's base {stored['source']} is not in this model store ({recorded}): pull it "
                       f"first (`tuneline pull` with a config whose model is {stored['source']})")


def served_lora(model_dir: str | Path) -> tuple[Path, Path, str, str] | None:
    """(base folder, adapter folder, merge dtype, the base's sha256) where `model_dir` (a training run's merged
    folder, or a version downloaded without its dense weights) is one plain LoRA adapter on a base in the model
    store: what an engine can serve as the adapter on the base. None where it must be served dense: full
    fine-tunes, chains of adapters (an aligned model), DoRA (vLLM does not serve it), adapters on the embeddings
    or output layer or that train whole modules, targets given as a pattern, and resized vocabularies."""
    found = chain(model_dir)
    if found is None or len(found["adapters"]) != 1:
        return None
    adapter, dtype = found["adapters"][0]
    config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("modules_to_save") \
            or config.get("trainable_token_indices") or not isinstance(config.get("target_modules"), list) \
            or any(name.endswith(("lm_head", "embed_tokens")) for name in config["target_modules"]):
        return None
    base = _base(found["base"])
    vocab = [json.loads((d / "config.json").read_text()).get("vocab_size") for d in (base, Path(model_dir))]
    return (base, Path(adapter), dtype, found["base"]["sha256"]) if vocab[0] == vocab[1] else None


def place_served(model_dir: str | Path, target: str | Path, lora: tuple[Path, Path, str, str] | None) -> None:
    """Put in `target` the weights a service loads for `model_dir`: one plain LoRA adapter on its base
    (`served_lora`) as just that (the base's weights linked from the model store, the adapter in its own folder
    with the dtype its merge ran in: serving/adapter_weights.py), anything else dense (made first where a
    downloaded version stores adapters)."""
    for f in Path(lora[0] if lora else unpack(model_dir)).glob("*.safetensors*"):
        _place(f, Path(target) / f.name)
    if lora:
        folder = Path(target) / adapter_weights.ADAPTER_DIR
        for f in lora[1].iterdir():
            if f.is_file():
                _place(f, folder / f.name)
        (folder / adapter_weights.MERGE_FILE).write_text(json.dumps({"dtype": lora[2]}))


def unpack(folder: str | Path) -> Path:
    """Make a downloaded version's dense weights in its folder (a no-op for dense versions and for versions
    registered before manifests); returns the folder, ready to load, evaluate or build a Bento from."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return folder
    stored = json.loads((folder / MANIFEST).read_text())
    if stored["kind"] == "none":
        raise WeightsError(f"it stores no weights: {stored['why']}")
    if stored["kind"] == "dense" or (folder / "model.safetensors").is_file():
        return folder
    base = _base(stored["base"])
    if stored["kind"] == "base":
        for f in base.glob("*.safetensors*"):
            _place(f, folder / f.name)
        return folder
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, stored["adapters"][0]["dtype"]))
    for adapter in stored["adapters"]:
        model = PeftModel.from_pretrained(model.to(getattr(torch, adapter["dtype"])), folder / adapter["dir"])
        model = model.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    return folder
