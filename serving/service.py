"""The champion behind an OpenAI-compatible API. Stands alone: imports nothing from flows/ or tasks/.

Two BentoML services in one Bento:
- `Chat` (the entry point) speaks OpenAI's schema, checks limits and the API key, renders the prompt with
  the training chat template, records every answer and the feedback on it in SQLite;
- `Generator` holds the weights; its batchable `generate` lets BentoML's adaptive batcher group the
  concurrent requests `Chat` forwards into one `model.generate` call.
The system comes from the BentoML model `tuneline-chat`, baked into the Bento at build time: the weights,
its registry name and version, what kind of system it is, its prompt recipe (tuneline_recipe.json: system
prompt, chat template on or off, fixed shots or k shots retrieved from its pool by the bundled sentence
encoder), the limits, and for a classifier its labels. The recipe is applied to every request exactly as
evaluation applied it. A classifier replies with its most likely label and every label's probability, ranked as
evaluation ranked them; any request can ask for that over its own answers (a json_schema response format with an
enum), or for free text (`{"type": "text"}`).

Environment: TUNELINE_API_KEY (if set, `Authorization: Bearer <key>` is required on /v1 and /feedback; if not,
only loopback clients are answered), TUNELINE_REDACT=off (store text unredacted), TUNELINE_FEEDBACK_DB
(default $TUNELINE_HOME/feedback.db), TUNELINE_BATCHING=off (one generation at a time: the benchmark's sequential
reference).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import typing as t
import uuid
from http import HTTPStatus
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from bentoml.models import BentoModel
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serving import adapter_weights, prompt_rule
from serving.feedback_store import PAIR_HEADER, SHADOW_HEADER, Store

# The model this Bento was built with, by its exact tag: the launcher sets it from the Bento's manifest (and the
# build from the model it just stored). BentoML pins only hub models to the Bento's version at serve time, so
# "latest" would be whichever system was stored last, e.g. a newer one's weights behind a rolled-back Bento.
# Unset (a container holding one model): the only one there.
MODEL = BentoModel(os.environ.get("TUNELINE_BENTO_MODEL") or "tuneline-chat:latest")
BATCHING = os.environ.get("TUNELINE_BATCHING", "on") != "off"
ENGINE = os.environ.get("TUNELINE_ENGINE", "transformers")  # or vllm (serving/vllm_engine.py)
MAX_BODY_BYTES = 1_000_000
MAX_ANSWERS, MAX_ANSWER_CHARS = 32, 200  # a request's own allowed answers (response_format's enum)
# The generator's answers that mean "busy or restarting", as BentoML's client raises them (error_code).
TRANSIENT = {HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.GATEWAY_TIMEOUT}
logger = logging.getLogger("tuneline.service")
TIMEOUT_S = 300
# Below this, sampling picks the greedy token all but always, and logits / temperature overflows float32 near
# 1e-38 (torch.multinomial then fails on inf/nan): such temperatures are decoded greedily.
GREEDY_BELOW = 1e-3
RECIPE_FILE, POOL_FILE, EMBEDDINGS_FILE = "tuneline_recipe.json", "tuneline_pool.jsonl", "tuneline_pool.npy"


# ---------------------------------------------------------------- generation


# runner_connection: BentoML's default (a new pool every 100 calls, closing the old one under calls still in
# flight) broke a few requests in every burst of 200; one pool a day for two processes on one host.
@bentoml.service(name="tuneline-generator", traffic={"timeout": TIMEOUT_S}, workers=1,
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 86400.0})
class Generator:
    """Token ids in, text out. Requests come from `Chat` only; they are already validated there."""

    model_ref = MODEL

    def __init__(self) -> None:
        self.load(self.model_ref.path)

    def load(self, path: str) -> None:
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.engine = self.model = None
        if ENGINE == "vllm":
            from serving.vllm_engine import VllmEngine

            meta = self.model_ref.info.metadata
            longest = int(meta.get("max_prompt_tokens", 1024)) + int(meta.get("max_tokens", 256))
            limit = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings", longest)
            port = os.environ.get("TUNELINE_VLLM_PORT")
            self.engine = VllmEngine(path, os.environ.get("TUNELINE_VLLM_PYTHON", "vllm-python-not-set"),
                                     min(longest, limit), os.environ.get("TUNELINE_LOG_DIR"),
                                     port=int(port) if port else None, attach=os.environ.get("TUNELINE_VLLM_ATTACH"))
            generation = GenerationConfig.from_pretrained(path)
        else:
            self.model = adapter_weights.load_model(path)
            generation = self.model.generation_config
        eos = generation.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.tokenizer.eos_token_id
        self.lock = threading.Lock()  # a stream and a batch at once would only fight over the same cores

    @bentoml.on_shutdown
    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def _sampling(self, request: dict) -> dict:
        """generate()'s sampling settings; a request's `seed` reseeds torch first (call under the lock)."""
        sample = request["temperature"] >= GREEDY_BELOW
        if sample and request.get("seed") is not None:
            self.torch.manual_seed(request["seed"])
        return {"do_sample": sample, "temperature": request["temperature"] if sample else None,
                "top_p": request["top_p"] if sample else None, "top_k": None, "pad_token_id": self.pad}

    def _finish(self, tokens: list[int], max_tokens: int) -> tuple[list[int], str]:
        for i, token in enumerate(tokens[:max_tokens]):
            if token in self.eos:
                return tokens[:i], "stop"
        return tokens[:max_tokens], "length" if len(tokens) >= max_tokens else "stop"

    def _generate_group(self, group: list[dict]) -> list[dict]:
        """One left-padded `generate` for requests that share sampling settings (vLLM: the requests at once)."""
        if self.engine is not None:
            rows = self.engine.generate(group, GREEDY_BELOW)
        else:
            width = max(len(r["ids"]) for r in group)
            ids = [[self.pad] * (width - len(r["ids"])) + r["ids"] for r in group]
            mask = [[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in group]
            with self.lock, self.torch.no_grad():
                out = self.model.generate(
                    input_ids=self.torch.tensor(ids), attention_mask=self.torch.tensor(mask),
                    max_new_tokens=max(r["max_tokens"] for r in group), **self._sampling(group[0]))
            rows = out[:, width:].tolist()
        results = []
        for row, request in zip(rows, group):
            tokens, finish = self._finish(row, request["max_tokens"])
            results.append({"text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                            "completion_tokens": len(tokens), "finish_reason": finish})
        return results

    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=TIMEOUT_S * 1000)
    def generate(self, requests: list[dict]) -> list[dict]:
        # The batcher drops requests it expects to miss max_latency_ms (a 503); generation on CPU takes
        # seconds, so the bound is the request timeout itself.
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            # a seeded request is generated alone: its answer must not depend on what it was batched with
            alone = i if request.get("seed") is not None else None
            groups.setdefault((request["temperature"], request["top_p"], alone), []).append(i)
        results: list[dict] = [{}] * len(requests)
        for members in groups.values():
            for i, result in zip(members, self._generate_group([requests[i] for i in members])):
                results[i] = result
        return results

    @bentoml.api
    def rank(self, request: dict) -> list[float]:
        """The summed log-probability of each continuation (token ids) after the prompt's ids: one forward
        pass over every prompt + continuation, right-padded."""
        prompt, continuations = request["ids"], request["continuations"]
        if self.engine is not None:
            return self.engine.rank(prompt, continuations)
        rows = [prompt + c for c in continuations]
        width = max(len(r) for r in rows)
        ids = self.torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        mask = self.torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with self.lock, self.torch.no_grad():
            logprobs = self.torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        # the token at position p is predicted by the logits at p - 1
        return [float(sum(logprobs[i, len(prompt) + j - 1, token] for j, token in enumerate(c)))
                for i, c in enumerate(continuations)]

    @bentoml.api
    def stream(self, request: dict) -> t.Generator[str, None, None]:
        """Newline-delimited JSON: {"text": …} pieces as they are decoded, then {"finish_reason",
        "completion_tokens"}."""
        if self.engine is not None:
            yield from self._stream_vllm(request)
            return
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        produced: dict = {}
        gone = threading.Event()  # the reader stopped reading (a client that went away): stop generating

        torch = self.torch

        class ReaderGone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), gone.is_set(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                with self.lock, self.torch.no_grad():
                    out = self.model.generate(
                        input_ids=self.torch.tensor([request["ids"]]), streamer=streamer,
                        max_new_tokens=request["max_tokens"], stopping_criteria=StoppingCriteriaList([ReaderGone()]),
                        **self._sampling(request))
                produced["tokens"] = out[0, len(request["ids"]):].tolist()
            except Exception as exc:  # handed to the reader, which raises it; the stream must still end
                produced["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield json.dumps({"text": piece}) + "\n"
        finally:  # also when the reader closes this generator early: the lock is free again within a token
            gone.set()
            worker.join()
        if "error" in produced:
            raise produced["error"]
        tokens, finish = self._finish(produced["tokens"], request["max_tokens"])
        yield json.dumps({"finish_reason": finish, "completion_tokens": len(tokens)}) + "\n"

    def _stream_vllm(self, request: dict) -> t.Generator[str, None, None]:
        """vLLM's token ids as text pieces, decoded as the whole reply so far (a piece never splits a character:
        text ending in an incomplete one waits for the next token); the same pieces' text as a plain request."""
        tokens, sent = [], ""
        for ids in self.engine.stream(request, GREEDY_BELOW):
            tokens += ids
            kept, _ = self._finish(tokens, request["max_tokens"])
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                yield json.dumps({"text": text[len(sent):]}) + "\n"
                sent = text
        tokens, finish = self._finish(tokens, request["max_tokens"])
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(sent):
            yield json.dumps({"text": text[len(sent):]}) + "\n"
        yield json.dumps({"finish_reason": finish, "completion_tokens": len(tokens)}) + "\n"


# ---------------------------------------------------------------- the OpenAI-compatible front


class TextPart(BaseModel):
    type: t.Literal["text"]
    text: str


class Message(BaseModel):
    role: t.Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """OpenAI's chat-completions request; fields this service does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0,
                               description="0 (the default here) is greedy; so is anything under 0.001")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, description="with sampling: the same seed and request give the same answer")
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    response_format: dict | None = Field(None, description='{"type": "json_schema", "json_schema": {"schema": '
                                         '{"enum": [...]}}}: reply with the most likely of those answers; '
                                         '{"type": "text"}: free text, also from a classifier')

    @property
    def enum(self) -> list[str] | None:
        """The allowed answers a json_schema response format lists, if it does."""
        if not self.response_format or self.response_format.get("type") != "json_schema":
            return None
        enum = (self.response_format.get("json_schema") or {}).get("schema", {}).get("enum")
        if not isinstance(enum, list) or len(enum) < 2 or not all(isinstance(a, str) and a for a in enum):
            raise HTTPException(400, "response_format.json_schema.schema.enum: a list of at least 2 non-empty "
                                     "strings is required")
        # Every answer is scored in one pass over the prompt: the cost grows with their number and length (100
        # answers once held the service for two minutes), so both are bounded.
        if len(enum) > MAX_ANSWERS or max(map(len, enum)) > MAX_ANSWER_CHARS:
            raise HTTPException(400, f"response_format.json_schema.schema.enum: at most {MAX_ANSWERS} answers of "
                                     f"at most {MAX_ANSWER_CHARS} characters each (got {len(enum)}, the longest "
                                     f"{max(map(len, enum))})")
        return enum

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=100)
    rating: int = Field(ge=1, le=5, description="1 (wrong) … 5 (right)")
    correction: str | None = Field(None, max_length=20_000, description="the answer it should have given")
    comment: str | None = Field(None, max_length=2_000)


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _failure(exc: Exception, what: str) -> HTTPException:
    """A failure behind the API as the client should read it. Load, a timeout or a dropped connection between the
    two services is 503 (retry later); anything else is a fault of ours: 500, its traceback in the service log,
    so that a bug never looks like load. Call it inside the `except` that caught `exc`."""
    code = getattr(exc, "error_code", None)
    if isinstance(exc, (aiohttp.ClientConnectionError, TimeoutError)) or code in TRANSIENT:
        return HTTPException(503, f"{what} failed ({type(exc).__name__}: {str(exc)[:200]}); retry later")
    logger.exception("%s failed", what)
    return HTTPException(500, f"{what} failed: internal error ({type(exc).__name__}); the service log has its "
                              "traceback")


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def key_id(key: str) -> str:
    """A key's public name: the first 12 hex digits of its SHA-256 (feedback records it, reviewers filter by it)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def require_key(request: Request, authorization: str | None = Header(None)) -> str:
    """The caller's key id ("" when no key is configured). With TUNELINE_API_KEY set every call must bring it,
    compared in constant time; without one only loopback clients are served (the launcher refuses to listen
    beyond loopback without a key, and this holds if the service is started some other way)."""
    expected = os.environ.get("TUNELINE_API_KEY")
    if not expected:
        client = request.client.host if request.client else ""
        if client not in LOOPBACK:
            raise HTTPException(401, "this service has no API key set, so it answers loopback clients only")
        return ""
    sent = (authorization or "").removeprefix("Bearer ")
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key: send `Authorization: Bearer <TUNELINE_API_KEY>`")
    return key_id(sent)


app = FastAPI(title="tuneline chat", description="The promoted model, OpenAI-compatible.")


@app.middleware("http")
async def limit_body(request: Request, call_next):
    """Refuse a body over the limit before it is parsed or tokenised. A declared length is checked at once; a
    chunked body (no length) is counted as it arrives and refused at the chunk that crosses the limit."""
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
        return _error(413, f"request body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit")
    if not size and request.method in {"POST", "PUT", "PATCH"}:
        chunks, seen = [], 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > MAX_BODY_BYTES:
                return _error(413, f"chunked request body passed the {MAX_BODY_BYTES}-byte limit")
            chunks.append(chunk)
        # Starlette's middleware hands a body it holds to the endpoint (the stream is consumed by now).
        request._body = b"".join(chunks)
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":  # loc is ("body", character offset)
        return _error(400, f"body: not valid JSON ({first['ctx'].get('error', 'decode error')} at character "
                           f"{first['loc'][-1]})", "body")
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return _error(400, f"{where}: {first['msg']}", where)


@app.exception_handler(HTTPException)
async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    kinds = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}
    kind = kinds.get(exc.status_code, "invalid_request_error")
    return _error(exc.status_code, str(exc.detail), kind=kind)


@bentoml.service(name="tuneline-chat", traffic={"timeout": TIMEOUT_S}, workers=1)
@bentoml.asgi_app(app)
class Chat:
    model_ref = MODEL
    generator = bentoml.depends(Generator)

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref.path)
        meta = self.model_ref.info.metadata
        self.model_id = f"{meta['registered_model']}/{meta['version']}"
        self.system = meta.get("system", "fine-tuned")
        self.created = int(time.time())
        self.system_prompt = meta.get("system_prompt", "")
        self.recipe = self._load_recipe(Path(self.model_ref.path))
        self.max_prompt_tokens = int(meta.get("max_prompt_tokens", 1024))
        self.max_tokens = int(meta.get("max_tokens", 256))
        self.answers = meta.get("answers")  # a classifier's labels: its replies are ranked, not generated
        home = Path(os.environ.get("TUNELINE_HOME", "."))
        self.store = Store(Path(os.environ.get("TUNELINE_FEEDBACK_DB", home / "feedback.db")),
                           redaction=os.environ.get("TUNELINE_REDACT", "on") != "off")

    @staticmethod
    def _load_recipe(folder: Path) -> dict:
        """The prompt recipe, and for retrieval the pool, its embeddings and the encoder (loaded once)."""
        path = folder / RECIPE_FILE
        recipe = json.loads(path.read_text()) if path.is_file() else {"chat": True, "shots": "none", "k": 0}
        if recipe["shots"] == "retrieved":
            from sentence_transformers import SentenceTransformer

            recipe["pool"] = [json.loads(line) for line in (folder / POOL_FILE).read_text().splitlines()]
            recipe["vectors"] = np.load(folder / EMBEDDINGS_FILE)
            recipe["encoder"] = SentenceTransformer(str(folder / "encoder"), device="cpu")
        return recipe

    def _shots(self, question: str) -> list[dict]:
        """The recipe's shots for this question: fixed, or retrieved by the prompt rule from the pool."""
        recipe = self.recipe
        if recipe["shots"] == "fixed":
            return recipe["fixed"]
        if recipe["shots"] != "retrieved":
            return []
        query = recipe["encoder"].encode([question], normalize_embeddings=True)[0]
        return prompt_rule.retrieve(recipe["pool"], recipe["vectors"], query, recipe["k"])

    def _render(self, messages: list[dict]) -> tuple[str, list[dict]]:
        """The request rendered by the prompt rule under the recipe (the trained system prompt unless the
        request brings its own). Returns the text and the conversation as recorded for feedback (with the
        system prompt used)."""
        question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        text = prompt_rule.render(self.tokenizer, self.recipe["chat"], self.system_prompt, self._shots(question),
                                  messages)
        if not self.recipe["chat"] or messages[0]["role"] == "system" or not self.system_prompt:
            return text, messages
        return text, [{"role": "system", "content": self.system_prompt}, *messages]

    def _prepare(self, body: ChatRequest) -> tuple[list[dict], dict]:
        """The chat rendered as evaluation rendered the recipe (trained system prompt added if absent), limits
        checked."""
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        if not any(m["role"] == "user" for m in messages):
            raise HTTPException(400, "messages: at least one message with role 'user' is required")
        text, messages = self._render(messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise HTTPException(400, f"messages: the prompt is {len(ids)} tokens; this service accepts at most "
                                     f"{self.max_prompt_tokens}")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.max_tokens
        if max_tokens > self.max_tokens:
            raise HTTPException(400, f"max_tokens: {max_tokens} is over this service's limit of {self.max_tokens}")
        return messages, {"ids": ids, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                          "seed": body.seed, "text": text}

    def _completion(self, rid: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
                "system": self.system,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.get("/v1/models")
    def models(self, _: str = Depends(require_key)) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "tuneline", "system": self.system}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, http: Request, _: str = Depends(require_key)):
        started = time.time()
        # rendering, retrieval and tokenising a prompt of up to the body limit take about a second: off the event
        # loop, so one large prompt never stalls the requests beside it
        messages, request = await asyncio.to_thread(self._prepare, body)
        supplied = body.messages[0].role == "system"  # stored, never trained on
        # set by the front alone (it drops these headers from clients): a shadow deploy's pairing of answers
        origin = (supplied, started, http.headers.get(PAIR_HEADER), http.headers.get(SHADOW_HEADER) == "1")
        text = request.pop("text")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        free = (body.response_format or {}).get("type") == "text"
        answers = body.enum or (None if free else self.answers)
        if answers:
            if body.stream:
                raise HTTPException(400, "stream: a ranked answer is one reply; send stream false, or "
                                         'response_format {"type": "text"} for streamed free text')
            return await self._ranked(rid, messages, text, answers, body.enum is not None, origin)
        if body.stream:
            return StreamingResponse(self._stream(rid, messages, request, body.stops, origin),
                                     media_type="text/event-stream")
        try:
            [result] = await self._generate(request)
        except Exception as exc:  # sorted by _failure: load is 503, a fault of ours 500 with its traceback logged
            raise _failure(exc, "generation") from exc
        text, stopped = _cut_at_stop(result["text"], body.stops)
        tokens = (len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if stopped
                  else result["completion_tokens"])
        await self._save(rid, messages, text, origin)
        return self._completion(rid, text, "stop" if stopped else result["finish_reason"], len(request["ids"]), tokens)

    async def _save(self, rid: str, messages: list[dict], answer: str, origin: tuple) -> None:
        """Store the answer (off the event loop); `origin` is (system prompt supplied by the client, start, the
        front's pair id, whether this is a shadow's answer)."""
        supplied, started, pair, shadow = origin
        await asyncio.to_thread(self.store.save_response, rid, self.model_id, messages, answer, supplied, self.system,
                                started, pair, shadow)

    async def _ranked(self, rid: str, messages: list[dict], text: str, answers: list[str], as_json: bool,
                      origin: tuple) -> dict:
        """The most likely of `answers` as the reply, with every answer's probability: ranked by the prompt rule,
        as evaluation ranks them."""
        ids, continuations = prompt_rule.ranking_inputs(self.tokenizer, text, answers, self.recipe["chat"])
        try:
            logprobs = np.array(await self.generator.to_async.rank({"ids": ids, "continuations": continuations}))
        except Exception as exc:  # as for generation
            raise _failure(exc, "ranking") from exc
        probs = prompt_rule.probabilities(logprobs)
        best = answers[int(logprobs.argmax())]
        reply = json.dumps(best) if as_json else best
        await self._save(rid, messages, reply, origin)
        out = self._completion(rid, reply, "stop", len(ids), len(continuations[int(logprobs.argmax())]))
        out["choices"][0]["probabilities"] = {a: round(float(p), 6) for a, p in zip(answers, probs)}
        return out

    async def _generate(self, request: dict, attempts: int = 4) -> list[dict]:
        """The generator call, sent again when the connection between the two services drops under it.

        BentoML's client replaces its connection pool every `runner_connection` max_requests / max_age and
        closes the old one with calls still on it: those fail with a connection error, and calls queued for a
        pooled connection are cancelled (a CancelledError this request did not ask for). The Generator's
        config makes that rare; when it happens, greedy generation is idempotent and the call is repeated."""
        for attempt in range(attempts - 1):
            try:
                return await self.generator.to_async.generate([request])
            except aiohttp.ClientConnectionError:
                pass
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # this request itself was cancelled: client gone, timeout, shutdown
            await asyncio.sleep(0.2 * 2**attempt)
        return await self.generator.to_async.generate([request])

    async def _stream(self, rid: str, messages: list[dict], request: dict, stops: list[str],
                      origin: tuple):
        """Server-sent events in OpenAI's chunk format; text that could begin a stop string is held back."""

        def event(delta: dict, finish: str | None = None) -> str:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_id,
                     "system": self.system, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        text, sent, buffer, finish, stopped = "", 0, "", "length", False
        hold = max((len(s) for s in stops), default=1) - 1
        pieces = self.generator.to_async.stream(request=request)
        while True:
            try:
                raw = await anext(pieces)
            except StopAsyncIteration:
                break
            except Exception as exc:  # the status line is sent already: report the failure as the last event
                failure = _failure(exc, "generation")
                error = {"message": failure.detail, "type": "server_error", "code": failure.status_code}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            buffer += raw
            *lines, buffer = buffer.split("\n")
            for line in filter(None, lines):
                item = json.loads(line)
                if "finish_reason" in item:
                    finish = item["finish_reason"]
                elif not stopped:
                    text, stopped = _cut_at_stop(text + item["text"], stops)
            if stopped:
                finish = "stop"
                break
            if len(text) - hold > sent:
                yield event({"content": text[sent:len(text) - hold]})
                sent = len(text) - hold
        if len(text) > sent:
            yield event({"content": text[sent:]})
        await self._save(rid, messages, text, origin)
        yield event({}, finish)
        yield "data: [DONE]\n\n"

    @app.post("/feedback")
    def feedback(self, body: FeedbackRequest, key: str = Depends(require_key)) -> dict:
        """Stored pending: it trains nothing until a reviewer approves it (`tuneline feedback approve`)."""
        feedback_id = self.store.save_feedback(body.response_id, body.rating, body.correction, body.comment, key)
        if feedback_id is None:
            raise HTTPException(404, f"response_id: no response {body.response_id!r} was served here")
        return {"id": feedback_id, "response_id": body.response_id, "stored": True, "status": "pending"}
