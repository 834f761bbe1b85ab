"""Packaging: the smoke test catches a served model that answers differently from the one being promoted.
(A faithful service passing it is part of tests/test_systems.py and tests/test_deployments.py.)"""

from __future__ import annotations

from pathlib import Path

from tasks import packaging
from tasks.models import load
from tasks.processes import free_port


def test_smoke_compare_flags_a_service_serving_other_weights(tiny_model, home, tmp_path):
    model, tok = load(Path(tiny_model))
    model.model.norm.weight.data.neg_()  # negated logits: every greedy choice differs from the served model's
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    other = str(tmp_path / "other")
    bento = packaging.build_bento.fn(tiny_model, "smoke-test", "1", "You answer briefly.")
    prompts = ["Review: the kettle leaks", "Review: great shoes"]
    unfaithful = packaging.smoke_compare.fn(other, bento, prompts, "You answer briefly.", 8, str(home), free_port())
    assert len(unfaithful) == 2 and "served" in unfaithful[0]
    assert not (Path(home) / "bento-smoke.pid").exists()  # the temporary service was stopped
