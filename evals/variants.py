"""A prompt variant: how a question is put to the weights when scored (shots, chain of thought, chat template),
and the one rule that names the lm-eval task scoring it on a split.

The baseline stage scores every variant on validation; evaluation scores the chosen ones on test; a served
system's recipe is made from one (tasks/recipes.py). Each names its lm-eval task here, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("fixed", "cot", "retrieved")


@dataclass(frozen=True)
class Variant:
    kind: str = "fixed"  # fixed (k training examples, the same for every question; 0: none) | cot | retrieved
    shots: int = 0
    chat: bool = True  # the chat template and system prompt, or plain text
    owner: str = ""  # whose shots: "" the run's own training split; "champion" a registered system's own

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"prompt kind {self.kind!r}: expected one of {KINDS}")
        if self.shots < 0 or (self.kind == "retrieved" and not self.shots) or (self.kind == "cot" and self.shots):
            raise ValueError(f"{self.kind} prompt with {self.shots} shots")

    @property
    def name(self) -> str:
        """What reports call it, e.g. "3 retrieved shots, plain"."""
        shots = {"fixed": f"{self.shots}-shot", "cot": "chain of thought",
                 "retrieved": f"{self.shots} retrieved shots"}[self.kind]
        return f"{shots}, {'chat' if self.chat else 'plain'}"

    @property
    def servable(self) -> bool:
        """A chain of thought is scored as a bar but never served: its reply is reasoning, not the answer."""
        return self.kind != "cot"

    def task(self, task: str, split: str, ranked: bool = False) -> str:
        """The lm-eval task scoring this variant on `split` (`ranked`: its allowed answers ranked by likelihood).
        The chat template is not part of the name: it is a model argument, the same task serves both."""
        if self.owner and self.shots:
            suffix = f"_{self.owner}"
        else:
            suffix = {"fixed": f"_fixed{self.shots}" if self.shots else "", "cot": "_cot",
                      "retrieved": "_retrieved"}[self.kind]
        name = f"{task}_{split}{suffix}"
        return ranked_twin(name) if ranked else name


def ranked_twin(task: str) -> str:
    """The task that ranks a generated task's allowed answers by likelihood (classify, choice), on its items."""
    return f"{task}_ranked"


def likelihood_task(task: str) -> str:
    """The task that measures the reference answers' likelihood on validation (selection's tie-breaker)."""
    return f"{task}_validation_likelihood"


def preference_task(task: str) -> str:
    """The task that ranks each held-out preference pair's two answers by likelihood (preference accuracy)."""
    return f"{task}_test_preference"


ZERO_SHOT = Variant()  # as fine-tuned weights are trained and served: the chat template, no shots
COT = Variant("cot")
