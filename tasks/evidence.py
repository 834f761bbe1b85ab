"""Paired statistics for the gate: two systems compared item by item on the same test items.

Exact match (0/1 per item): the exact McNemar test on the discordant pairs, and its exact (Clopper-Pearson)
confidence bounds on the difference, conditional on the number of discordant pairs. Bound and p-value come
from the same binomial test, so "the bound clears the threshold" and "p < 1 - confidence" always agree.
Continuous metrics (field F1, ROUGE-L): a seeded paired bootstrap of the mean difference.

Written here because neither scipy nor statsmodels gives a one-sided bound on a *difference* of paired
proportions against a non-zero threshold; scipy supplies the binomial and beta distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 5000
POWER = 0.8  # the power at which the smallest detectable difference is stated


@dataclass(frozen=True)
class Comparison:
    """One rule's evidence: the mean per-item difference (a - b), its one-sided bounds at `confidence`, and
    the one-sided p-value against `threshold` in the rule's direction."""

    rule: str
    method: str
    n: int
    difference: float
    low: float
    high: float
    confidence: float
    threshold: float
    direction: str  # "above": the rule needs low > threshold; "below": high <= threshold
    p_value: float

    @property
    def passed(self) -> bool:
        return self.low > self.threshold if self.direction == "above" else self.high <= self.threshold

    @property
    def null(self) -> str:
        """The hypothesis the p-value tests: the difference on the wrong side of the rule's threshold."""
        return (f"difference <= {self.threshold:+.3f}" if self.direction == "above"
                else f"difference > {self.threshold:+.3f}")

    @property
    def p_text(self) -> str:
        """The p-value as a reader should take it: a tiny value is "< 0.0001", never "0" (certainty)."""
        return "< 0.0001" if self.p_value < 1e-4 else f"{self.p_value:.3g}"

    def describe(self) -> str:
        """One line a reviewer reads: n, the difference, its interval, the p-value and its hypothesis, and what
        was needed."""
        level = round(100 * (2 * self.confidence - 1))
        need = (f"lower bound > {self.threshold:+.3f}" if self.direction == "above"
                else f"upper bound <= {self.threshold:+.3f}")
        p = self.p_text if self.p_text.startswith("<") else f"= {self.p_text}"
        return (f"n={self.n}, difference {self.difference:+.3f}, {level} % interval [{self.low:+.3f}, "
                f"{self.high:+.3f}], p {p} for H0: {self.null} ({self.method}; needed {need})")

    def as_row(self, system: str = "") -> str:
        """A markdown table row: [system |] rule | n | difference | interval | p (H0) | needed | outcome."""
        need = f"> {self.threshold:+.3f}" if self.direction == "above" else f"<= {self.threshold:+.3f}"
        return (f"| {system + ' | ' if system else ''}{self.rule} | {self.n} | {self.difference:+.3f} | "
                f"[{self.low:+.3f}, {self.high:+.3f}] | {self.p_text} (H0: {self.null}) | "
                f"{'lower' if self.direction == 'above' else 'upper'} bound {need} | "
                f"{'pass' if self.passed else 'FAIL'} |")


def table(rows: list[tuple[str, Comparison]]) -> str:
    """(system, comparison) pairs as one markdown table: what the evaluate report and the promote artifact show."""
    if not rows:
        return "(no comparison possible)"
    return "\n".join(["| system | rule | n | difference | interval | p (hypothesis) | needed | outcome |",
                      "|---|---|---|---|---|---|---|---|", *(c.as_row(system) for system, c in rows)])


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs split wins/losses under a fair coin."""
    m = wins + losses
    if m == 0:
        return 1.0
    return min(1.0, 2 * stats.binom.cdf(min(wins, losses), m, 0.5))


def _paired(a: Mapping, b: Mapping) -> tuple[np.ndarray, np.ndarray]:
    common = sorted(set(a) & set(b), key=str)
    if not common:
        raise ValueError("no test items in common: the two systems were not scored on the same items")
    return np.array([float(a[k]) for k in common]), np.array([float(b[k]) for k in common])


def compare(rule: str, a: Mapping, b: Mapping, *, threshold: float, direction: str, confidence: float,
            seed: int = 0) -> Comparison:
    """a - b over the items both were scored on; exact for 0/1 scores, bootstrap otherwise."""
    x, y = _paired(a, b)
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    fn = _binary if binary else _bootstrap
    return fn(rule, x, y, threshold=threshold, direction=direction, confidence=confidence, seed=seed)


def _binary(rule, x, y, *, threshold, direction, confidence, seed) -> Comparison:
    n = len(x)
    wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    m, alpha = wins + losses, 1 - confidence
    # Given m discordant pairs, wins ~ Binomial(m, pi) and the mean difference is m (2 pi - 1) / n.
    pi_low = stats.beta.ppf(alpha, wins, losses + 1) if wins else 0.0
    pi_high = stats.beta.ppf(1 - alpha, wins + 1, losses) if losses else 1.0
    low, high = (m / n * (2 * pi_low - 1), m / n * (2 * pi_high - 1)) if m else (0.0, 0.0)
    # p-value of "difference on the wrong side of threshold": pi0 is the win share at which they are equal.
    if m == 0:
        p = 0.0 if (threshold < 0 if direction == "above" else threshold > 0) else 1.0
    else:
        pi0 = (threshold * n / m + 1) / 2
        if direction == "above":
            p = 1.0 if pi0 >= 1 else 0.0 if pi0 <= 0 else float(stats.binom.sf(wins - 1, m, pi0))
        else:
            p = 0.0 if pi0 >= 1 else 1.0 if pi0 <= 0 else float(stats.binom.cdf(wins, m, pi0))
    return Comparison(rule, "McNemar exact", n, (wins - losses) / n, float(low), float(high), confidence,
                      threshold, direction, p)


def _bootstrap(rule, x, y, *, threshold, direction, confidence, seed) -> Comparison:
    d = x - y
    means = d[np.random.default_rng(seed).integers(0, len(d), (RESAMPLES, len(d)))].mean(axis=1)
    low, high = np.quantile(means, [1 - confidence, confidence])
    wrong_side = (means <= threshold) if direction == "above" else (means > threshold)
    p = (1 + int(wrong_side.sum())) / (RESAMPLES + 1)
    return Comparison(rule, f"paired bootstrap, {RESAMPLES} resamples", len(d), float(d.mean()), float(low),
                      float(high), confidence, threshold, direction, p)


def wilson(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided Wilson score interval of a proportion `rate` over `n` items: one system's accuracy on its own
    (the gate's rules compare two systems paired, with the exact bounds above)."""
    if n < 1:
        return 0.0, 1.0
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------- power
def min_detectable(n: int, rate: float, confidence: float, power: float = POWER) -> float:
    """Smallest true gain in a 0/1 metric (exact match, accuracy) that `n` paired items detect at `confidence`
    with `power`, when both systems are near `rate` and err independently (discordance 2 p (1 - p)). Correlated
    errors detect less."""
    if n < 1:
        return math.inf
    discordance = max(2 * rate * (1 - rate), 1 / n)
    return (stats.norm.ppf(confidence) + stats.norm.ppf(power)) * math.sqrt(discordance / n)


def best_lower_bound(n: int, rate: float, confidence: float) -> float:
    """The lower bound a perfect result reaches: every item the bar gets wrong right, none broken."""
    wins = round(n * (1 - rate))
    if wins == 0:
        return 0.0
    return wins / n * (2 * (1 - confidence) ** (1 / wins) - 1)


def gate_power(gate, task, test_items: int, rate: float = 0.5) -> tuple[str, list[str]]:
    """What the scored test split of `task` (its first max_test_examples of `test_items`) can show under `gate`
    (`rate`: the bar's score; before the baselines are known, 0.5, the widest case)."""
    n = min(test_items, task.max_test_examples)
    return power_note(n, rate, gate.confidence, gate.min_improvement, gate.metric)


def power_note(n: int, rate: float, confidence: float, min_improvement: float, metric: str = "exact_match"
               ) -> tuple[str, list[str]]:
    """What a test split of `n` items can show, and warnings naming the numbers when the gate cannot be met."""
    mdd = min_detectable(n, rate, confidence)
    level = round(100 * confidence)
    note = (f"{n} test items detect a gain of {mdd:.3f} in {metric.replace('_', ' ')} ({level} % confidence, "
            f"{round(100 * POWER)} % power, bar at {rate:.2f})")
    warnings = []
    best = best_lower_bound(n, rate, confidence)
    if best <= min_improvement:
        warnings.append(f"the test split ({n} items) is too small to ever pass: even a perfect result has a "
                        f"lower bound of {best:+.3f}, not above gate.min_improvement {min_improvement:+.3f}")
    elif min_improvement < mdd:
        warnings.append(f"gate.min_improvement {min_improvement:+.3f} is below the smallest detectable gain "
                        f"{mdd:.3f} for {n} test items: a real gain under {mdd:.3f} will usually be rejected; "
                        f"about {items_for(max(min_improvement, 0.02), rate, confidence)} items detect "
                        f"{max(min_improvement, 0.02):.3f}")
    return note, warnings


def items_for(gain: float, rate: float, confidence: float, power: float = POWER) -> int:
    """Test items needed to detect `gain` (the inverse of `min_detectable`). At least the gain itself is
    discordant: a bar at 0 or 1 still needs items (the independent-errors discordance alone would say none)."""
    z = stats.norm.ppf(confidence) + stats.norm.ppf(power)
    return math.ceil(max(2 * rate * (1 - rate), gain) * (z / gain) ** 2)
