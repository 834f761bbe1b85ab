"""lm-eval over an already-loaded model: generated task YAMLs with absolute data paths, chat-formatted prompts.

lm-eval resolves `data_files` against the current directory, not the YAML file, so the per-run YAMLs
are written with absolute paths; their shared parts come from evals/tasks/chat_answer.yaml via `include:`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import evaluate as hf_evaluate
import numpy as np
import torch
import yaml
from lm_eval import evaluator as lm_evaluator
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.loggers.utils import add_env_info
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from evals.variants import COT, ZERO_SHOT, Variant, likelihood_task, preference_task, ranked_twin
from serving.prompt_rule import probabilities

EVALS = Path(__file__).resolve().parent
SHARED_TASK = EVALS / "tasks" / "chat_answer.yaml"
COT_TASK = EVALS / "tasks" / "chain_of_thought.yaml"
RETRIEVED_TASK = EVALS / "tasks" / "listed_shots.yaml"
LIKELIHOOD_TASK = EVALS / "tasks" / "answer_likelihood.yaml"
GENERAL_TASK = EVALS / "tasks" / "general_mc.yaml"
RANKED = yaml.safe_load((EVALS / "tasks" / "ranked_answer.yaml").read_text())  # keys laid over a generated task
GENERAL_DATA = EVALS / "data" / "general.jsonl"
GENERAL = "tuneline_general"  # prefix of each general suite's task name
METRIC = "exact_match"
# Local `evaluate` modules (hub metrics cannot load offline): extra metrics over the replies lm-eval produced.
TEXT_METRICS = {"field_f1": EVALS / "metrics" / "json_fields.py", "rougeL": EVALS / "metrics" / "rouge_l.py"}

logging.getLogger("lm_eval").setLevel(logging.WARNING)


@functools.cache
def _environment() -> dict:
    found: dict = {}
    add_env_info(found)
    return found


def _evaluate(**kwargs) -> dict:
    """lm-eval's simple_evaluate, with the environment it records collected once per process.

    By hand, as lm-eval has no switch for it: simple_evaluate records the environment in every result through
    torch's collect_env, which runs `pip list` and other subprocesses (~1.2 s a call on 2 cores). An iteration
    scores a dozen times in one process and never reads it. Swapped in for the call only: importing this module
    changes nothing in lm-eval."""
    original = lm_evaluator.add_env_info
    lm_evaluator.add_env_info = lambda storage: storage.update(_environment())
    try:
        return simple_evaluate(**kwargs)
    finally:
        lm_evaluator.add_env_info = original


@dataclass(frozen=True)
class ScoreResult:
    """One model (with one prompt) scored on one task: the score and its standard error, every metric, and every
    sample (doc id, prompt, reply, target, per-item metric values; ranked tasks add the prediction and each
    allowed reply's probability). Ranked tasks also carry the majority answer's rate, and classify tasks the
    per-class figures and the confusion matrix."""
    score: float
    stderr: float
    n: int
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    majority: dict | None = None  # {"answer", "rate"}
    classes: dict | None = None  # label -> precision, recall, f1, support
    confusion: dict | None = None  # {"labels", "matrix"}


def suite_task(path: str | Path) -> str:
    """The lm-eval task name of a general (forgetting) suite: `tuneline_general_<file stem>`."""
    return f"{GENERAL}_{re.sub(r'[^a-z0-9]+', '_', Path(path).stem.lower()).strip('_')}"


def general_suites(own: list[str]) -> tuple[str, ...]:
    """The bundled general suite, then a config's own (evaluation.general): each scored and gated on forgetting
    apart."""
    return (str(GENERAL_DATA), *own)


def write_tasks(task: str, splits: dict[str, str], out_dir: str | Path, max_answer_tokens: int,
                reasoning_tokens: int = 192, general: tuple[str, ...] = (str(GENERAL_DATA),),
                ranked: bool = False) -> Path:
    """One lm-eval task per scored split (`<task>_validation`, `<task>_test`), its chain-of-thought variant
    (`…_cot`, with `reasoning_tokens` more to generate), with `ranked` its ranked-answer twin (`…_ranked`), and
    one task per general suite in `general`; returns the folder holding them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_files = {name: str(Path(path).resolve()) for name, path in splits.items()}
    for split in ("validation", "test"):
        _write_task(out, ZERO_SHOT.task(task, split), SHARED_TASK, data_files, split,
                    {"do_sample": False, "max_gen_toks": max_answer_tokens})
        _write_task(out, COT.task(task, split), COT_TASK, data_files, split,
                    {"do_sample": False, "until": ["\n\n\n"], "max_gen_toks": max_answer_tokens + reasoning_tokens})
        if ranked:
            _write_task(out, ZERO_SHOT.task(task, split, ranked=True), SHARED_TASK, data_files, split, None)
    _write_task(out, likelihood_task(task), LIKELIHOOD_TASK, data_files, "validation", {})
    for path in general:
        name = suite_task(path)
        spec = {"include": str(GENERAL_TASK), "task": name,
                "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def write_listed_tasks(task: str, files: dict[str, str], out_dir: str | Path, max_answer_tokens: int,
                       variant: Variant, ranked: bool = False) -> Path:
    """The variant's task (and with `ranked` its ranked twin) for each split in `files`, whose records carry
    their own `shots` (retrieved for each question, or the same fixed shots for all): lm-eval puts exactly those
    before the question."""
    out = Path(out_dir)
    data_files = {name: str(Path(path).resolve()) for name, path in files.items()}
    for split in files:
        _write_task(out, variant.task(task, split), RETRIEVED_TASK, data_files, split,
                    {"do_sample": False, "max_gen_toks": max_answer_tokens}, fewshot_split=split)
        if ranked:
            _write_task(out, variant.task(task, split, ranked=True), RETRIEVED_TASK, data_files, split, None,
                        fewshot_split=split)
    return out


def write_preference_task(task: str, pairs: str | Path, out_dir: str | Path) -> str:
    """The held-out preference pairs as a ranked task (`<task>_test_preference`): each pair's two answers ranked
    by likelihood after the same chat prompt; zero-shot, so no training split is read. Returns its name."""
    name = preference_task(task)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_task(Path(out_dir), name, SHARED_TASK, {"test": str(Path(pairs).resolve())}, "test", None,
                training_split=None, fewshot_split=None)
    return name


def _write_task(out: Path, name: str, shared: Path, data_files: dict, split: str, generation: dict | None,
                **extra) -> None:
    """One task YAML including `shared`; without `generation` settings, the ranked-answer keys laid over it."""
    spec = {"include": str(shared), "task": name, "dataset_kwargs": {"data_files": data_files},
            "test_split": split, **extra, **({"generation_kwargs": generation} if generation is not None else RANKED)}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def general_accuracy(model, tokenizer, tasks_dir: str | Path, suite: str, *, limit: int | None = None,
                     batch_size: int = 8, device: str = "cpu") -> dict:
    """Accuracy on one general multiple-choice suite (the forgetting check), with every item's 0/1 result."""
    acc, stderr, items = _choice_accuracy(model, tokenizer, tasks_dir, suite, limit, batch_size, device)
    return {"acc": acc, "stderr": stderr, "n": len(items), "items": items}


class SharedPromptLM(HFLM):
    """lm-eval's Hugging Face model, scoring the answers of a multiple-choice item after one pass over the prompt
    they share.

    Written by hand because lm-eval scores every (prompt, answer) pair as a whole sequence (its own comment asks
    for grouping by context) and reuses logits only for one-token answers: ranking five multi-token labels cost
    five passes over the same prompt. Here the prompt runs once and its key/value cache serves every answer; the
    log-probabilities are the same sums (the tests compare them with ones computed by hand)."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        shared = [(c, ids) for c, ids in groups.items()
                  if len(ids) > 1 and len(c) + max(len(requests[i][2]) for i in ids) <= self.max_length]
        kept = {c for c, _ in shared}
        alone = [i for c, ids in groups.items() if c not in kept for i in ids]  # lm-eval's own path
        found: list = [None] * len(requests)
        for i, result in zip(alone, super()._loglikelihood_tokens([requests[i] for i in alone], disable_tqdm,
                                                                  override_bs) if alone else [], strict=True):
            found[i] = result
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        for start in range(0, len(shared), size):
            chunk = shared[start:start + size]
            scored = self._answers([list(c) for c, _ in chunk], [[requests[i][2] for i in ids] for _, ids in chunk])
            for (_, ids), results in zip(chunk, scored, strict=True):
                for i, result in zip(ids, results, strict=True):
                    found[i] = result
        return found

    @torch.no_grad()
    def _answers(self, contexts: list[list[int]], answers: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """For a batch of items, each answer's summed log-probability after its item's context, and whether
        greedy decoding would produce it: the contexts in one pass (left-padded), then every answer of every item
        in one pass over a copy of its context's key/value cache."""
        width, pad = max(map(len, contexts)), self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        prompt = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            use_cache=True)
        owner = torch.tensor([g for g, group in enumerate(answers) for _ in group], device=self.device)
        cache = prompt.past_key_values
        cache.batch_select_indices(owner)  # one copy of its item's context for each answer
        flat = [a for group in answers for a in group]
        longest = max(map(len, flat))
        # Right padding (with each answer's last token): causal attention never lets a real token see it.
        batch = torch.tensor([a + a[-1:] * (longest - len(a)) for a in flat], device=self.device)
        lengths = torch.tensor([len(contexts[g]) for g in owner.tolist()], device=self.device)
        following = torch.log_softmax(self.model(
            input_ids=batch, past_key_values=cache,
            attention_mask=torch.cat([mask[owner], torch.ones_like(batch)], dim=1),
            position_ids=lengths[:, None] + torch.arange(longest, device=self.device)).logits.float(), dim=-1)
        first = torch.log_softmax(prompt.logits[:, -1].float(), dim=-1)  # left-padded: the last is each context's
        scored: list[list[tuple[float, bool]]] = [[] for _ in contexts]
        for k, (g, answer) in enumerate(zip(owner.tolist(), flat, strict=True)):
            steps = torch.cat([first[g][None], following[k, : len(answer) - 1]])  # before each answer token
            tokens = torch.tensor(answer, device=self.device)
            scored[g].append((float(steps.gather(1, tokens[:, None]).sum()),
                              bool((steps.argmax(dim=-1) == tokens).all())))
        return scored


def preference_accuracy(model, tokenizer, tasks_dir: str | Path, task: str, *, system_prompt: str,
                        limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """How often the model finds a pair's chosen answer more likely than its rejected one (summed log-probability,
    chat template and system prompt as training renders them), with every pair's 0/1 result by id."""
    acc, stderr, items = _choice_accuracy(model, tokenizer, tasks_dir, task, limit, batch_size, device,
                                          chat=True, system_prompt=system_prompt)
    return {"accuracy": acc, "stderr": stderr, "n": len(items), "items": items}


def _choice_accuracy(model, tokenizer, tasks_dir: str | Path, task: str, limit: int | None, batch_size: int,
                     device: str, chat: bool = False, system_prompt: str = "") -> tuple[float, float, dict]:
    """A zero-shot multiple-choice task's accuracy, its standard error and every item's 0/1 result by its id
    (the record's own `id`, else lm-eval's doc id); `chat`: the chat template and system prompt."""
    lm = SharedPromptLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = _evaluate(model=lm, tasks=[task], num_fewshot=0, limit=limit, bootstrap_iters=1000,
                        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                        log_samples=True, random_seed=0,
                        **({"apply_chat_template": True, "system_instruction": system_prompt or None} if chat else {}))
    scores = results["results"][task]
    items = {str(s["doc"].get("id", s["doc_id"])): float(s["acc"]) for s in results["samples"][task]}
    return float(scores["acc,none"]), _stderr(scores.get("acc_stderr,none")), items


def answer_likelihood(model, tokenizer, tasks_dir: str | Path, task: str, *, system_prompt: str,
                      limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """Mean log-probability per token of the reference answers (chat template, system prompt): how close a
    model is to the task even when it never produces an answer exactly."""
    lm = SharedPromptLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = _evaluate(model=lm, tasks=[task], num_fewshot=0, limit=limit, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                              apply_chat_template=True, system_instruction=system_prompt or None,
                              log_samples=True, random_seed=0)
    samples = results["samples"][task]
    logprob = sum(float(s["resps"][0][0][0]) for s in samples)
    tokens = sum(len(tokenizer(s["target"], add_special_tokens=False)["input_ids"]) for s in samples)
    return {"mean_logprob": logprob / max(tokens, 1), "n": len(samples)}


def _stderr(value) -> float:
    """lm-eval reports the string 'N/A' when a standard error cannot be estimated (fewer than two samples)."""
    return float(value) if isinstance(value, (int, float)) else 0.0


def offline() -> str | None:
    """The variable that keeps the hub out of reach, if one does: built-in lm-eval tasks then cannot load."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def builtin(model, tokenizer, tasks: list[str], *, limit: int | None, batch_size: int = 8,
            device: str = "cpu") -> dict[str, dict]:
    """lm-eval built-in tasks by name (their data comes from the hub): every numeric metric per task."""
    lm = SharedPromptLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = _evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False, bootstrap_iters=1000,
                              random_seed=0)
    return {task: {k.replace(",", "_"): float(v) for k, v in scores.items() if isinstance(v, (int, float))}
            for task, scores in results["results"].items()}


def text_metrics(samples: list[dict]) -> dict:
    """Per-field F1 and ROUGE-L of the replies against their targets, from the local evaluate modules; each
    sample also gets its own value of each (the gate pairs systems item by item)."""
    predictions = [str(s["response"]) for s in samples]
    references = [str(s["target"]) for s in samples]
    scores = {}
    for name, path in TEXT_METRICS.items():
        scores.update(_metric(path).compute(predictions=predictions, references=references, per_item=True))
        for sample, value in zip(samples, scores.pop(f"{name}_items")):
            sample[name] = value
    return scores


@functools.cache
def _metric(path: Path):
    return hf_evaluate.load(str(path))


def completions_lm(url: str, served_name: str, model_dir: str | Path, *, concurrent: int, max_length: int) -> LM:
    """lm-eval's own client of an OpenAI-compatible completions server (a vLLM server started from its own
    environment, which cannot share this one's transformers): prompts rendered and tokenised here with the
    model's own tokenizer and sent as token ids, log-likelihoods read from the echoed prompt's log-probabilities,
    replies generated greedily by the server."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=served_name, tokenizer=str(model_dir),
                               tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=concurrent,
                               max_length=max_length, timeout=600)


def evaluate(model, tokenizer, tasks_dir: str | Path, task: str, *, system_prompt: str, shots: int = 0,
             chat: bool = True, limit: int | None = None, batch_size: int = 8, device: str = "cpu",
             kind: str = "generate", generate: int | None = None) -> ScoreResult:
    """Score a loaded model (or an lm-eval LM: `completions_lm`) on one generated task: score, stderr, n, text
    metrics and every sample.

    `chat`: render with the model's chat template and the system prompt (shots as earlier turns), as training
    and serving do; otherwise plain text continuation with neither. `kind` classify or choice: the task's
    ranked twin is scored too, and accuracy (the most likely allowed reply) is the score; replies are then
    generated for the first `generate` items only (None: all), for the exact match reported beside it."""
    lm = model if isinstance(model, LM) else SharedPromptLM(pretrained=model, tokenizer=tokenizer,
                                                            batch_size=batch_size, device=device)
    ranked = ranked_twin(task) if kind != "generate" else None
    run = functools.partial(
        _evaluate, model=lm, num_fewshot=shots, task_manager=TaskManager(include_path=str(tasks_dir),
                                                                         include_defaults=False),
        apply_chat_template=chat, fewshot_as_multiturn=chat,
        system_instruction=(system_prompt or None) if chat else None, log_samples=True, bootstrap_iters=1000,
        random_seed=0, fewshot_random_seed=1234)
    if ranked and generate is not None and (limit is None or generate < limit):
        # Generating is most of a ranked task's cost (every reply token a forward pass, against one pass per
        # allowed answer): the ranking scores every item, the generation a sample of them.
        results, generated = run(tasks=[ranked], limit=limit), run(tasks=[task], limit=generate)
        for part in ("results", "samples"):
            results[part][task] = generated[part][task]
    else:
        results = run(tasks=[task] + ([ranked] if ranked else []), limit=limit)
    scores = results["results"][task]
    key = next(k for k in scores if k.startswith(f"{METRIC},"))  # "exact_match,<filter>"
    samples = [
        {
            "doc_id": s["doc_id"],
            "key": s["doc"].get("key", ""),
            "prompt": s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else str(s["arguments"][0]),
            "response": s["filtered_resps"][0],
            "target": s["target"],
            METRIC: float(s[METRIC]),
        }
        for s in results["samples"][task]
    ]
    metrics = {METRIC: float(scores[key]), **text_metrics(samples)}
    if not ranked:
        return ScoreResult(float(scores[key]), _stderr(scores.get(key.replace(",", "_stderr,", 1))), len(samples),
                           metrics, samples)
    found = ranking(results, ranked, samples, per_class=kind == "classify")
    # accuracy first (the score), exact match of the generated replies beside it (on those generated)
    return ScoreResult(found["score"], found["stderr"], len(found["samples"]), {**found["metrics"], **metrics},
                       found["samples"], found["majority"], found.get("classes"), found.get("confusion"))


def ranking(results: dict, task: str, samples: list[dict], per_class: bool) -> dict:
    """The ranked twin's results folded into the generated samples (same doc ids; an item with no generated reply
    gets `response` None): per item the most likely allowed reply, each reply's probability (softmax of the
    summed log-probabilities) and its 0/1 `accuracy`; overall accuracy (the score), length-normalised accuracy,
    the majority rate of the scored items' answers, every item (`samples`), and with `per_class` precision,
    recall and F1 per label and the confusion matrix."""
    scores, by_id = results["results"][task], {s["doc_id"]: s for s in samples}
    golds, preds, items = [], [], []
    for s in results["samples"][task]:
        choices = list(s["doc"]["choices"])
        logprobs = np.array([float(r[0]) for r in s["filtered_resps"]])
        probs = probabilities(logprobs)
        item = by_id.get(s["doc_id"]) or {"doc_id": s["doc_id"], "key": s["doc"].get("key", ""),
                                          "prompt": s["arguments"][0][0], "response": None,
                                          "target": s["doc"]["assistant"]}
        items.append(item)
        item.update(accuracy=float(s["acc"]), accuracy_norm=float(s["acc_norm"]), gold=s["doc"]["assistant"],
                    prediction=choices[int(logprobs.argmax())],
                    probabilities=dict(zip(choices, probs.round(6).tolist())))
        golds.append(item["gold"])
        preds.append(item["prediction"])
    counts = Counter(golds)
    majority, seen = counts.most_common(1)[0]
    out = {"score": float(scores["acc,none"]), "stderr": _stderr(scores.get("acc_stderr,none")),
           "majority": {"answer": majority, "rate": seen / len(golds)}, "samples": items}
    metrics = {"accuracy": out["score"], "accuracy_norm": float(scores["acc_norm,none"])}
    if per_class:
        labels = sorted(counts | Counter(preds))
        p, r, f, support = precision_recall_fscore_support(golds, preds, labels=labels, zero_division=0)
        out["classes"] = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": int(support[i])} for i, label in enumerate(labels)}
        out["confusion"] = {"labels": labels, "matrix": confusion_matrix(golds, preds, labels=labels).tolist()}
        metrics["macro_f1"] = float(np.mean(f))
    out["metrics"] = metrics
    return out
