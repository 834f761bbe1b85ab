"""The prompt rule: how a question reaches a system's weights. The one implementation that evaluation (the lm-eval
sampler and the scored prompts), the tasks layer (recipes, retrieval, the smoke test's reference) and the service
call; the Bento carries this file beside the service.

Three parts:
- render: chat — the system prompt (or the conversation's own), each shot as a user and an assistant turn, the
  conversation, the generation prompt, through the tokenizer's chat template; plain — each shot as question,
  newline, answer, blank line, then the last user message alone. Exactly what lm-eval builds with
  `apply_chat_template`/`fewshot_as_multiturn` (chat) and its "\\n" target and "\\n\\n" few-shot delimiters
  (plain); tests/test_chat_template.py holds them byte-identical.
- retrieve: the k pool examples nearest a question (dot product of unit vectors, ties keep pool order), listed
  farthest first so the nearest sits next to the question.
- rank: each allowed answer scored as the continuation of the rendered prompt as lm-eval scores a multiple-choice
  reply (trailing whitespace of the prompt moves into the answer; plain text puts the answer on the next line),
  and the answers' probabilities as the softmax of their summed log-probabilities.

Imports nothing of the project and nothing heavier than numpy: it is the lowest layer (pyproject's contracts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PLAIN_TARGET = "\n"  # plain text: the answer on the line after the question
PLAIN_SHOT_GAP = "\n\n"  # plain text: a blank line after each shot


def render(tokenizer, chat: bool, system_prompt: str, shots: Sequence[dict], messages: Sequence[dict]) -> str:
    """The prompt text for a conversation (`messages`: role/content dicts, the last user turn the question) with
    `shots` ({"user", "assistant"}) before it. A conversation that opens with its own system message keeps it in
    place of `system_prompt`."""
    if not chat:
        question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return "".join(f"{s['user']}{PLAIN_TARGET}{s['assistant']}{PLAIN_SHOT_GAP}" for s in shots) + question
    own = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    system = own or ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    turns = [t for s in shots for t in ({"role": "user", "content": s["user"]},
                                         {"role": "assistant", "content": s["assistant"]})]
    rest = list(messages[len(own):])
    return tokenizer.apply_chat_template([*system, *turns, *rest], tokenize=False, add_generation_prompt=True)


def render_question(tokenizer, chat: bool, system_prompt: str, shots: Sequence[dict], question: str) -> str:
    """The prompt for one question with nothing before it but the recipe's system prompt and shots."""
    return render(tokenizer, chat, system_prompt, shots, [{"role": "user", "content": question}])


def nearest(pool_vectors: np.ndarray, query_vectors: np.ndarray, k: int) -> list[list[int]]:
    """For each query vector, the indices of the k most similar pool vectors (dot product of unit vectors),
    nearest first; ties keep pool order."""
    return [np.argsort(-(pool_vectors @ query), kind="stable")[:k].tolist() for query in query_vectors]


def retrieve(pool: Sequence[dict], pool_vectors: np.ndarray, query_vector: np.ndarray, k: int) -> list[dict]:
    """The k shots of `pool` nearest the query, farthest first: the nearest sits right before the question."""
    return [pool[i] for i in reversed(nearest(pool_vectors, query_vector[None, :], k)[0])]


def listed(shots: Sequence[dict], n: int) -> list[dict]:
    """The n shots a question carries that go before it: the last n (for retrieved shots, stored farthest first,
    the n nearest)."""
    return list(shots[len(shots) - n:]) if n else []


def ranking_inputs(tokenizer, text: str, answers: Sequence[str], chat: bool) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each answer's continuation ids, split as lm-eval splits a multiple-choice
    request: trailing whitespace of the prompt joins the answer, a plain-text answer follows a newline, and an
    answer's tokens are those of prompt + answer past the prompt's own."""
    context = text.rstrip()
    delimiter = text[len(context):] + ("" if chat else PLAIN_TARGET)
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ids, [tokenizer(context + delimiter + a, add_special_tokens=False)["input_ids"][len(ids):]
                 for a in answers]


def probabilities(logprobs: Sequence[float]) -> np.ndarray:
    """Each answer's probability: the softmax of the answers' summed log-probabilities."""
    values = np.asarray(logprobs, dtype=np.float64)
    exp = np.exp(values - values.max())
    return exp / exp.sum()
