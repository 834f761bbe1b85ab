"""The champion behind an OpenAI-style chat endpoint. Stands alone: imports nothing from flows/ or tasks/.

The model, its registry name and version and the system prompt it was trained with come from the BentoML
model `tuneline-chat`, baked into the Bento at build time.
"""

from __future__ import annotations

import time
import uuid

import bentoml
from bentoml.models import BentoModel


@bentoml.service(name="tuneline-chat", traffic={"timeout": 300}, workers=1)
class TunelineChat:
    model_ref = BentoModel("tuneline-chat:latest")

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.model_ref.path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        meta = self.model_ref.info.metadata
        self.model_id = f"{meta['registered_model']}/{meta['version']}"
        self.system_prompt = meta.get("system_prompt", "")
        self.torch = torch

    def _prompt_ids(self, messages: list[dict]):
        # Same rendering as training and evaluation: the tokenizer's chat template, the trained system prompt.
        if self.system_prompt and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)

    @bentoml.api(route="/v1/chat/completions")
    def chat_completions(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0,
                         model: str = "") -> dict:
        inputs = self._prompt_ids(messages)
        with self.torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new = out[0][inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finished = len(new) < max_tokens or int(new[-1]) == self.tokenizer.eos_token_id
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop" if finished else "length"}],
            "usage": {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": int(len(new)),
                      "total_tokens": int(inputs["input_ids"].shape[1] + len(new))},
        }
