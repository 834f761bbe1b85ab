"""The gate's statistics on known answers: McNemar's exact test, exact bounds, bootstrap coverage, power."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import evidence


def _items(pairs: list[tuple[int, int]]) -> tuple[dict, dict]:
    return {i: a for i, (a, _) in enumerate(pairs)}, {i: b for i, (_, b) in enumerate(pairs)}


def test_mcnemar_exact_p_value_of_a_constructed_table():
    # 10 wins, 2 losses: two-sided p = 2 * P(Bin(12, 1/2) <= 2) = 2 * (1 + 12 + 66) / 4096
    assert evidence.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert evidence.mcnemar_exact(3, 3) == 1.0
    assert evidence.mcnemar_exact(0, 0) == 1.0


def test_exact_comparison_counts_discordant_pairs_and_its_bound_agrees_with_its_p_value():
    # 40 items: 10 wins, 2 losses, 28 ties
    a, b = _items([(1, 0)] * 10 + [(0, 1)] * 2 + [(1, 1)] * 14 + [(0, 0)] * 14)
    c = evidence.compare("vs bar", a, b, threshold=0.0, direction="above", confidence=0.95)
    assert c.method == "McNemar exact" and c.n == 40
    assert c.difference == pytest.approx(8 / 40)
    assert c.p_value == pytest.approx(79 / 4096)  # one-sided exact McNemar: P(Bin(12, 1/2) >= 10)
    assert c.passed and c.low > 0 and c.low < c.difference < c.high
    # the same evidence against a threshold above its bound fails, and its p-value says so
    strict = evidence.compare("vs bar", a, b, threshold=c.low + 0.01, direction="above", confidence=0.95)
    assert not strict.passed and strict.p_value > 0.05
    # few items: 3 wins and no loss is not evidence at 95 %
    weak = evidence.compare("vs bar", *_items([(1, 0)] * 3 + [(1, 1)] * 5), threshold=0.0, direction="above",
                            confidence=0.95)
    assert not weak.passed and weak.p_value == pytest.approx(1 / 8)


def test_upper_bound_rule_for_forgetting():
    base, tuned = _items([(1, 0)] * 6 + [(0, 1)] * 5 + [(1, 1)] * 189)
    drop = evidence.compare("forgetting", base, tuned, threshold=0.05, direction="below", confidence=0.95)
    assert drop.difference == pytest.approx(1 / 200) and drop.high < 0.05 and drop.passed
    big = evidence.compare("forgetting", *_items([(1, 0)] * 30 + [(1, 1)] * 70), threshold=0.05,
                           direction="below", confidence=0.95)
    assert not big.passed and big.low > 0.05


def test_p_values_name_their_hypothesis_and_never_read_zero():
    # no discordant pair: the forgetting rule passes with p = 0 exactly, which a reader would take for certainty
    same = evidence.compare("forgetting", *_items([(1, 1)] * 30 + [(0, 0)] * 10), threshold=0.05,
                            direction="below", confidence=0.95)
    assert same.passed and same.p_value == 0.0
    line, row = same.describe(), same.as_row("sft")
    assert "p < 0.0001 for H0: difference > +0.050" in line and "p=0" not in line and "p = 0 " not in line
    assert "| < 0.0001 (H0: difference > +0.050) |" in row
    gain = evidence.compare("vs bar", *_items([(1, 0)] * 10 + [(0, 1)] * 2 + [(1, 1)] * 28), threshold=0.0,
                            direction="above", confidence=0.95)
    assert f"p = {79 / 4096:.3g} for H0: difference <= +0.000" in gain.describe()


def test_bootstrap_bound_covers_the_true_difference_at_about_the_nominal_rate():
    covered, trials = 0, 300
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        base = rng.uniform(0, 1, 80)
        tuned = np.clip(base + 0.1 + rng.normal(0, 0.2, 80), 0, 1.5)  # continuous: the bootstrap path
        true = float(np.mean(np.clip(base + 0.1 + rng.normal(0, 0.2, (4000, 80)), 0, 1.5) - base))
        c = evidence.compare("vs bar", dict(enumerate(tuned)), dict(enumerate(base)), threshold=0.0,
                             direction="above", confidence=0.95, seed=seed)
        assert c.method.startswith("paired bootstrap")
        covered += c.low <= true
    assert 0.90 <= covered / trials <= 0.99


def test_bootstrap_is_seeded():
    a, b = dict(enumerate([0.2, 0.5, 0.9, 0.4])), dict(enumerate([0.1, 0.5, 0.7, 0.6]))
    one = evidence.compare("r", a, b, threshold=0, direction="above", confidence=0.9, seed=3)
    assert one == evidence.compare("r", a, b, threshold=0, direction="above", confidence=0.9, seed=3)


def test_unpaired_items_are_refused():
    with pytest.raises(ValueError, match="not scored on the same items"):
        evidence.compare("r", {0: 1}, {1: 0}, threshold=0, direction="above", confidence=0.95)


def test_power_names_the_detectable_gain_and_warns_when_the_gate_cannot_be_met():
    assert evidence.min_detectable(48, 0.5, 0.95) == pytest.approx(0.2537, abs=1e-3)
    assert evidence.min_detectable(400, 0.5, 0.95) < evidence.min_detectable(48, 0.5, 0.95) / 2.5
    assert evidence.items_for(evidence.min_detectable(200, 0.3, 0.95), 0.3, 0.95) == pytest.approx(200, abs=1)
    # a bar at 0 (nothing right before fine-tuning): every win is discordant, and items are still needed
    assert evidence.items_for(0.05, 0.0, 0.95) == math.ceil((1.6449 + 0.8416) ** 2 / 0.05)
    note, warnings = evidence.power_note(48, 0.5, 0.95, min_improvement=0.05)
    assert "48 test items detect a gain of 0.254" in note
    assert warnings and "below the smallest detectable gain 0.254" in warnings[0]
    _, never = evidence.power_note(4, 0.5, 0.95, min_improvement=0.0)
    assert never and "too small to ever pass" in never[0]
    assert evidence.power_note(5000, 0.5, 0.95, min_improvement=0.05)[1] == []
