"""Packaging: the smoke test catches a served model that answers differently from the one being promoted; a LoRA
version's Bento holds its adapter on the base, not a dense copy. (A faithful service passing the smoke test is part
of tests/test_systems.py and tests/test_deployments.py; the same Bento on vLLM: tests/test_vllm_engine.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml

from serving import adapter_weights
from tasks import packaging
from tasks.caching import digest
from tasks.models import load
from tasks.processes import free_port
from tasks.recipes import Recipe
from tests.conftest import lora_run


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


def test_a_lora_version_is_packaged_as_its_adapter_on_the_base_and_served_as_its_merged_weights(tiny_model, home,
                                                                                                 tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    merged = lora_run(base, tmp_path / "run")
    bento = packaging.build_bento.fn(str(merged), "lora-test", "1", "You answer briefly.")
    stored = bentoml.models.get(packaging.bento_model(bento))
    folder = Path(stored.path)
    assert stored.info.metadata["weights"] == "a LoRA adapter on its base"
    assert (folder / "model.safetensors").samefile(base / "model.safetensors")  # the base's, linked: no copy
    assert digest(folder / adapter_weights.ADAPTER_DIR / "adapter_model.safetensors") == \
        digest(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    prompts = ["Review: the kettle leaks", "Review: great shoes"]
    replies = {str(d): [packaging.in_process_reply(*load(d), Recipe("You answer briefly."), str(d), p, 8)
                        for p in prompts] for d in (base, merged)}
    assert replies[str(base)] != replies[str(merged)]  # the adapter changes the answers
    # the service merges the adapter at load: it answers as the merged weights do
    assert packaging.smoke_compare.fn(str(merged), bento, prompts, "You answer briefly.", 8, str(home),
                                      free_port()) == []


def test_two_models_services_run_side_by_side_each_on_the_model_it_was_built_with(tiny_model, home):
    """Serving an older Bento (a rollback) once loaded whichever model was stored last; and every service ran
    under one process name, so deploying one config's model stopped another config's service."""
    from tasks.processes import stop_started

    older = packaging.build_bento.fn(tiny_model, "team-a", "1", "You answer briefly.")
    newer = packaging.build_bento.fn(tiny_model, "team-b", "2", "You answer briefly.")
    assert packaging.bento_model(older) != packaging.bento_model(newer)
    names = [packaging.service_name("team-a", "1"), packaging.service_name("team-b", "2")]
    try:
        urls = [packaging.serve.fn(bento, free_port(), str(home), name=name)
                for bento, name in zip((older, newer), names)]
        assert [packaging.chat.fn(url, "Review: fine", max_tokens=2)["model"] for url in urls] == ["team-a/1",
                                                                                                  "team-b/2"]
    finally:
        for name in names:
            stop_started(name, Path(home))


def test_the_bento_pins_the_versions_the_project_is_tested_with():
    """An image built from the Bento (`bentoml containerize`) must install what the tests ran."""
    import re

    import yaml

    from tests.conftest import ROOT

    pyproject = (ROOT / "pyproject.toml").read_text()
    tested = dict(re.findall(r'"(transformers|sentence-transformers|peft)==([\d.]+)"', pyproject))
    tested["torch"] = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)  # installed first
    packages = yaml.safe_load((ROOT / "serving" / "bentofile.yaml").read_text())["python"]["packages"]
    assert {p.split("==")[0]: p.split("==")[1] for p in packages if "==" in p} == tested
