"""Training, evaluation and serving render one example to the same prompt: the chat template and the system
prompt the model was trained with are the ones it is scored and served with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from trl import SFTConfig, SFTTrainer

from evals import runner
from evals.variants import Variant
from serving.service import Chat, ChatRequest
from tasks.datasets import Example, write_examples
from tasks.models import build_tiny, load
from tasks.recipes import Recipe, prompt_text, shots_for, write_recipe
from tasks.retrieval import attach_fixed, attach_shots, encoder_path, pick_fixed
from tasks.training import conversational

SYSTEM = "You extract structured data from product reviews."
REPLIES = ('{"sentiment": "negative"}', '{"sentiment": "positive"}')  # a ranked task's allowed replies
EXAMPLE = Example("x", SYSTEM, "Review: The kettle leaks.\nReturn JSON.", REPLIES[0], "reviews", "", REPLIES)


@pytest.fixture(scope="module")
def tiny_gemma(store) -> str:
    """A tiny random model with Gemma 3's real tokenizer (converted from its GGUF without the weights) and the
    chat template and end of turn tuneline gives Gemma: half of the demo's candidates render this way."""
    folder = store / "tiny-gemma"
    if not (folder / "config.json").is_file():
        build_tiny(folder, "gguf:gemma-3-270m", store=store)
    return str(folder)


RENDERED = {  # how each template opens the system turn and opens the assistant's
    "smollm2": (f"<|im_start|>system\n{SYSTEM}<|im_end|>", "<|im_start|>assistant\n"),
    "gemma": (f"<bos><start_of_turn>user\n{SYSTEM}\n\n", "<start_of_turn>model\n"),
}


@pytest.mark.parametrize("template", ["smollm2", "gemma"])
def test_train_eval_and_serve_render_identically(template, request, tmp_path):
    folder = request.getfixturevalue("tiny_model" if template == "smollm2" else "tiny_gemma")
    model, tok = load(Path(folder))

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
                                batch_size=1).samples[0]["prompt"]

    # Serving: the service's own rendering of a request that carries only the user message.
    served = served_prompt(tok, tmp_path / "zero", Recipe(SYSTEM), EXAMPLE.user)

    assert trained == evaluated == served
    opening, reply = RENDERED[template]
    assert served.startswith(opening) and served.endswith(reply)


@pytest.mark.parametrize("template", ["smollm2", "gemma"])
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_rows_render_as_fine_tuning_and_serving_do(template, method, request, tmp_path):
    """TRL's DPO and KTO rows, token for token, are the fine-tuning row of the same conversation: the prompt the
    service renders, then the answer and the template's end of turn (no BOS or EOS doubled or dropped)."""
    from tasks.alignment import preference_trainer
    from tasks.alignment_config import AlignConfig
    from tasks.preferences import Preference, write_preferences
    from tasks.schema import TaskConfig

    folder = request.getfixturevalue("tiny_model" if template == "smollm2" else "tiny_gemma")
    model, tok = load(Path(folder))
    pair = Preference("x", SYSTEM, EXAMPLE.user, REPLIES[0], REPLIES[1], key="k")
    data = TaskConfig(name="p", kind="preference", data="unused.jsonl", prompt="{{ x }}", answer="{{ answer }}")
    spec = AlignConfig(data=data, method=method, max_steps=1, batch_size=2, save_steps=None)
    row = preference_trainer(model, tok, spec, write_preferences(tmp_path / "p.jsonl", [pair]), tmp_path / "ck",
                             "cpu").train_dataset[0]
    answer_ids = row["chosen_ids"] if method == "dpo" else row["completion_ids"]

    args = SFTConfig(output_dir=str(tmp_path / "t"), use_cpu=True, bf16=False, report_to=[], max_length=256,
                     completion_only_loss=True)
    sft = SFTTrainer(model=model, args=args, train_dataset=conversational([EXAMPLE]),
                     processing_class=tok).train_dataset[0]
    assert row["prompt_ids"] + answer_ids == sft["input_ids"]
    assert tok.decode(row["prompt_ids"]) == served_prompt(tok, tmp_path / "zero", Recipe(SYSTEM), EXAMPLE.user)
    end = answer_ids[len(tok(REPLIES[0], add_special_tokens=False).input_ids):]  # the end of turn after it
    assert end and (tok.eos_token_id in end or tok.convert_tokens_to_ids("<end_of_turn>") in end)
    if method == "dpo":  # the rejected answer ends its turn the same way
        assert row["rejected_ids"][-len(end):] == end


def served_prompt(tok, folder: Path, recipe: Recipe, question: str, pool: str | None = None) -> str:
    """The prompt the Bento's `Chat` service builds for a request carrying only `question`, from the recipe's
    files as the Bento holds them (the encoder beside them for retrieval)."""
    write_recipe(recipe, folder, pool)
    if recipe.shots == "retrieved":
        (folder / "encoder").symlink_to(encoder_path())
    service = Chat.inner.__new__(Chat.inner)
    service.tokenizer, service.system_prompt, service.max_prompt_tokens, service.max_tokens = tok, SYSTEM, 4096, 8
    service.recipe = Chat.inner._load_recipe(folder)
    request = ChatRequest(messages=[{"role": "user", "content": question}])
    return tok.decode(Chat.inner._prepare(service, request)[1]["ids"])


POOL = [Example(f"p{i}", SYSTEM, f"Review: {text}", answer, "reviews", "", REPLIES) for i, (text, answer) in enumerate([
    ("The kettle leaks everywhere.", '{"sentiment": "negative"}'),
    ("Love these running shoes.", '{"sentiment": "positive"}'),
    ("The lamp flickers a lot.", '{"sentiment": "negative"}'),
    ("Great blender, smooth soups.", '{"sentiment": "positive"}'),
    ("My teapot leaks too.", '{"sentiment": "negative"}')])]


@pytest.mark.parametrize(("shots", "chat"), [("retrieved", True), ("fixed", False)])  # each kind, each mode
def test_recipes_with_shots_render_identically_in_evaluation_in_process_and_served(tiny_model, tmp_path, shots, chat):
    model, tok = load(Path(tiny_model))
    train = write_examples(tmp_path / "train.jsonl", POOL)
    test = write_examples(tmp_path / "test.jsonl", [EXAMPLE])
    splits = {"train": train, "validation": test, "test": test}
    tasks_dir = runner.write_tasks("reviews", splits, tmp_path / "tasks", max_answer_tokens=2)
    fixed = pick_fixed(train, 2, seed=13)
    files = attach_shots.fn(train, {"test": test}, 2, str(tasks_dir)) if shots == "retrieved" else \
        attach_fixed.fn(fixed, {"test": test}, str(tasks_dir), "fixed2")
    variant = Variant(shots, 2, chat)
    runner.write_listed_tasks("reviews", files, tasks_dir, 2, variant, ranked=True)
    [sample] = runner.evaluate(model, tok, tasks_dir, variant.task("reviews", "test"), system_prompt=SYSTEM, shots=2,
                               chat=chat, limit=1, batch_size=1, kind="classify").samples
    evaluated = sample["prompt"]
    assert sample["prediction"] in REPLIES  # the ranked twin takes the same listed shots

    recipe = Recipe.of(variant, SYSTEM, {2: fixed})
    assert recipe.variant() == variant  # a recipe serves the very prompt variant it was made from
    folder = tmp_path / "system"
    served = served_prompt(tok, folder, recipe, EXAMPLE.user, train)
    in_process = prompt_text(tok, recipe, EXAMPLE.user, shots_for(recipe, folder, EXAMPLE.user))

    assert evaluated == in_process == served
    if shots == "retrieved":  # the two nearest pool examples, the nearest right before the question
        assert served.index("teapot") < served.index("leaks everywhere") < served.index(EXAMPLE.user)
    assert ("<|im_start|>system" in served) == chat


# Gemma's run (its 262k-token vocabulary) is marked integration to keep make test short; the Gemma template
# itself is rendered in make test by test_train_eval_and_serve_render_identically.
@pytest.mark.parametrize("template", ["smollm2", pytest.param("gemma", marks=pytest.mark.integration)])
def test_ranked_answers_are_scored_as_the_reply_training_teaches(template, request, tmp_path):
    """Each allowed answer of a classify task is scored by lm-eval as the continuation of the same prompt that
    training and serving render, and prompt + answer is exactly how TRL renders that answer as the reply."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = request.getfixturevalue("tiny_model" if template == "smollm2" else "tiny_gemma")
    model, tok = load(Path(folder))
    example = Example("x", SYSTEM, EXAMPLE.user, "negative", "reviews", "k", ("positive", "negative", "neutral"))
    splits = {name: write_examples(tmp_path / f"{name}.jsonl", [example]) for name in ("train", "validation", "test")}
    tasks_dir = runner.write_tasks("reviews", splits, tmp_path / "tasks", max_answer_tokens=2, ranked=True)
    scored = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=["reviews_test_ranked"],
                             task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                             apply_chat_template=True, system_instruction=SYSTEM, log_samples=True)
    pairs = [tuple(a) for a in scored["samples"]["reviews_test_ranked"][0]["arguments"]]
    served = served_prompt(tok, tmp_path / "zero", Recipe(SYSTEM), example.user)

    assert [answer for _, answer in pairs] == list(example.choices)
    args = SFTConfig(output_dir=str(tmp_path / "t"), use_cpu=True, bf16=False, report_to=[], max_length=256)
    trained = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=conversational(
        [replace(example, assistant=choice) for choice in example.choices])).train_dataset
    for (context, answer), row in zip(pairs, trained):
        assert context == served
        assert tok.decode(row["input_ids"]).startswith(context + answer)
