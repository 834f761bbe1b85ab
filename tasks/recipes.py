"""A system is weights plus a prompt recipe: what the lifecycle compares, registers, gates and serves.

The recipe says how a question reaches the weights: the system prompt, the chat template on or off, and the
shots before the question (none, the same fixed training examples for all, or the k nearest training examples
by MiniLM embedding). It travels with the weights as files in the registered version's folder; for retrieval
also the example pool (the training split) and its embeddings, so the service retrieves exactly as evaluation
did. The Bento adds the encoder itself (`tasks/packaging.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evals.variants import Variant
from serving.prompt_rule import render_question, retrieve
from tasks.datasets import read_examples
from tasks.retrieval import ENCODER, embed, shot

RECIPE_FILE = "tuneline_recipe.json"
POOL_FILE = "tuneline_pool.jsonl"
EMBEDDINGS_FILE = "tuneline_pool.npy"


@dataclass(frozen=True)
class Recipe:
    system_prompt: str = ""
    chat: bool = True
    shots: str = "none"  # none | fixed | retrieved
    k: int = 0
    fixed: tuple[dict, ...] = field(default_factory=tuple)  # the fixed shots: {"id", "user", "assistant"}
    encoder: str | None = None  # retrieval only

    @classmethod
    def of(cls, variant: Variant, system_prompt: str, fixed: dict[int, list[dict]] | None = None) -> Recipe:
        """From a baseline prompt variant (flows/config.py `BaselineConfig.variants`)."""
        if not variant.servable:
            raise ValueError(f"prompt {variant.name!r} cannot be served as a recipe")
        if variant.kind == "retrieved":
            return cls(system_prompt, variant.chat, "retrieved", variant.shots, encoder=ENCODER)
        if variant.shots:
            return cls(system_prompt, variant.chat, "fixed", variant.shots, tuple((fixed or {})[variant.shots]))
        return cls(system_prompt, variant.chat)

    def variant(self, owner: str = "") -> Variant:
        """The prompt variant this recipe serves; `owner` names whose shots its lm-eval tasks list."""
        return Variant("fixed" if self.shots == "none" else self.shots, self.k, self.chat, owner)

    @property
    def label(self) -> str:
        shots = "0-shot" if self.shots == "none" else f"{self.k} {self.shots} shots"
        return f"{shots}, {'chat' if self.chat else 'plain'}"

    def describe(self, weights: str) -> str:
        """What a registry version and the service call the system, e.g. "base + 3 retrieved shots, plain"."""
        if self.shots == "none" and self.chat:
            return weights
        return f"{weights} + {self.label}"


@dataclass(frozen=True)
class Baselines:
    """What the baseline stage hands on: every prompt scored (simplest first), each one's validation row (its
    metrics, `score` on the gate's metric and `stderr`), the best one (the bar), and the fixed shots drawn per k
    (a fixed-shot recipe carries them)."""
    variants: tuple[Variant, ...]
    rows: dict[str, dict]  # by variant name
    best: Variant
    fixed: dict[int, list[dict]]

    def score(self, variant: Variant) -> float:
        return self.rows[variant.name]["score"]

    def best_of(self, variants: list[Variant]) -> Variant | None:
        """The best scored of `variants`; the first (simpler) of equals."""
        return max(variants, key=self.score) if variants else None


def write_recipe(recipe: Recipe, out_dir: str | Path, pool_path: str | None = None) -> Path:
    """The recipe's files in `out_dir`; a retrieval recipe also gets its pool and the pool's embeddings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=2, ensure_ascii=False))
    if recipe.shots == "retrieved":
        if pool_path is None:
            raise ValueError("a retrieval recipe needs its example pool (the training split)")
        pool = [shot(e) for e in read_examples(pool_path)]
        (out / POOL_FILE).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in pool))
        np.save(out / EMBEDDINGS_FILE, embed([s["user"] for s in pool]))  # the ones evaluation ranked by
    return out


def read_recipe(folder: str | Path) -> Recipe:
    """The recipe in a system folder; a folder without one (a version registered before recipes) is the
    fine-tuned weights zero-shot with the chat template."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return Recipe()
    raw = json.loads(path.read_text())
    return Recipe(**{**raw, "fixed": tuple(raw.get("fixed", ()))})


def shots_for(recipe: Recipe, folder: str | Path, question: str) -> list[dict]:
    """The shots the recipe puts before `question`: none, its fixed ones, or the k nearest of its pool (in
    `folder`), farthest first, exactly as evaluation listed them (the prompt rule's `retrieve`)."""
    if recipe.shots == "fixed":
        return list(recipe.fixed)
    if recipe.shots != "retrieved":
        return []
    pool = [json.loads(line) for line in (Path(folder) / POOL_FILE).read_text(encoding="utf-8").splitlines()]
    vectors = np.load(Path(folder) / EMBEDDINGS_FILE)  # the embeddings the service ranks by, not recomputed
    return retrieve(pool, vectors, embed.fn([question])[0], recipe.k)


def prompt_text(tokenizer, recipe: Recipe, question: str, shots: list[dict]) -> str:
    """The prompt the recipe renders for `question` after `shots`: the prompt rule (serving/prompt_rule.py)."""
    return render_question(tokenizer, recipe.chat, recipe.system_prompt, shots, question)
