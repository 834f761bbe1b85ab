"""A served LoRA version as its base weights plus its adapter, not a dense merged copy of them.

The Bento's model folder then holds the base's weights (hard links into the model store where the filesystem
allows) and the adapter in `tuneline_adapter/`, with the dtype its merge ran in. vLLM serves the adapter on the
base as it is (`--enable-lora`); the transformers engine merges it at load, in that dtype, as the registry makes
a version's dense weights, so both engines serve the weights the gate evaluated.

Stands alone like the service: standard library here, torch and peft imported only to merge.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_DIR = "tuneline_adapter"
MERGE_FILE = "tuneline_merge.json"  # {"dtype": the dtype the version's merge ran in}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM 0.32's --max-lora-rank accepts


def adapter(model_dir: str | Path) -> Path | None:
    """The adapter a served folder applies to its base weights, or None (dense weights)."""
    found = Path(model_dir) / ADAPTER_DIR
    return found if (found / "adapter_config.json").is_file() else None


def vllm_rank(adapter_dir: str | Path) -> int:
    """--max-lora-rank for this adapter: its largest rank, rounded up to a value vLLM accepts."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    return next((r for r in VLLM_RANKS if r >= rank), rank)


def targets(adapter_dir: str | Path) -> list[str]:
    """The layer names the adapter changes (q_proj, down_proj…): vLLM wraps only those (--lora-target-modules).
    Left to itself it also wraps the output layer, whose LoRA path in vLLM 0.32 fails on prompt log-probabilities
    (the ranking of allowed answers) with more than one request in a batch."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return sorted({name.rsplit(".", 1)[-1] for name in config["target_modules"]})


def load_model(model_dir: str | Path):
    """The served weights as one dense transformers model: the base with the adapter merged, or the folder's own."""
    from transformers import AutoModelForCausalLM

    found = adapter(model_dir)
    if found is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    import torch
    from peft import PeftModel

    dtype = getattr(torch, json.loads((found / MERGE_FILE).read_text())["dtype"])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    return PeftModel.from_pretrained(base, found).merge_and_unload().eval()
