"""Training, evaluation and serving render one example to the same prompt: the chat template and the system
prompt the model was trained with are the ones it is scored and served with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from trl import SFTConfig, SFTTrainer

from evals import runner
from serving.service import Chat, ChatRequest
from tasks.datasets import Example, write_examples
from tasks.models import load
from tasks.training import conversational

SYSTEM = "You extract structured data from product reviews."
EXAMPLE = Example("x", SYSTEM, "Review: The kettle leaks.\nReturn JSON.", '{"sentiment": "negative"}', "reviews")


def test_train_eval_and_serve_render_identically(tiny_model, tmp_path):
    model, tok = load(Path(tiny_model))

    # Training: the part of TRL's tokenised row that carries no loss (labels -100), rendered by TRL itself.
    args = SFTConfig(output_dir=str(tmp_path / "t"), use_cpu=True, bf16=False, report_to=[], max_length=256,
                     completion_only_loss=True)
    row = SFTTrainer(model=model, args=args, train_dataset=conversational([EXAMPLE]),
                     processing_class=tok).train_dataset[0]
    trained = tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label == -100])
    assert tok.decode([t for t in row["labels"] if t != -100]).startswith(EXAMPLE.assistant)

    # Evaluation: the context lm-eval built for this example with the chat template and system prompt.
    splits = {name: write_examples(tmp_path / f"{name}.jsonl", [EXAMPLE]) for name in ("train", "validation", "test")}
    tasks_dir = runner.write_tasks("reviews", splits, tmp_path / "tasks", max_answer_tokens=2)
    evaluated = runner.evaluate(model, tok, tasks_dir, "reviews_test", system_prompt=SYSTEM, limit=1,
                                batch_size=1)["samples"][0]["prompt"]

    # Serving: the service's own rendering of a request that carries only the user message.
    service = SimpleNamespace(system_prompt=SYSTEM, tokenizer=tok, max_prompt_tokens=1024, max_tokens=8)
    request = ChatRequest(messages=[{"role": "user", "content": EXAMPLE.user}])
    served = tok.decode(Chat.inner._prepare(service, request)[1]["ids"])

    assert trained == evaluated == served
    assert served.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and served.endswith("<|im_start|>assistant\n")
