"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (streaming over server-sent events or not),
GET /v1/models, GET /health, GET /metrics (Prometheus text format, vLLM's metric names).

A bad request gets a 400 with an OpenAI error body naming the field, before anything reaches the
engine (pydantic types and ranges, then prompt length against max_model_len, then the engine's own
validate_request). A client that disconnects has its requests aborted, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import ConfigError
from ..sampling import SamplingParams
from .async_engine import AsyncEngine
from .detokenize import ChoiceText
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, RequestError, error_body,
                       validation_error_body)

# The chat prompt of a tokenizer without a chat template: one "role: content" line per message, then
# "assistant:" (when add_generation_prompt), encoded with the tokenizer's special tokens (BOS).
FALLBACK_CHAT_FORMAT = "{role}: {content}\n"


def chat_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[int]:
    """Token ids of a chat: through the tokenizer's chat template when it has one (or ``chat_template``),
    else the FALLBACK_CHAT_FORMAT lines."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = "".join(FALLBACK_CHAT_FORMAT.format(**m) for m in messages)
    return list(tokenizer.encode(text + ("assistant:" if add_generation_prompt else "")))


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Failed(Exception):
    """The engine could not finish a request (a step failed or the loop died)."""


class OpenAIServer:
    """State shared by the routes: the LLM, its AsyncEngine, the metrics and the served model name."""

    def __init__(self, llm, model_name: str):
        self.llm, self.model_name = llm, model_name
        self.tokenizer = llm.tokenizer
        engine = llm.engine
        self.max_model_len = engine.config.max_model_len
        self.metrics = ServerMetrics(model_name, engine.config, engine.kv.num_blocks)
        self.engine = AsyncEngine(engine, self.metrics)

    # ----- request -> engine prompts and params -------------------------------------------------
    def tokenize(self, prompt, field: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"this model has no tokenizer: send {field} as a list of token ids", field)
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise _NotFound(f"The model `{name}` does not exist; this server serves `{self.model_name}`")

    def sampling_params(self, body, max_tokens: int) -> SamplingParams:
        """One engine request's params: n choices are SamplingParams(n) (the n sequences share the prompt's KV
        blocks; with a seed, choice i samples with seed + i, as vLLM does)."""
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, n=body.n,
                                  ignore_eos=body.ignore_eos, stop_token_ids=tuple(body.stop_token_ids or ()))
        except ConfigError as e:
            raise RequestError(str(e), str(e).split("=", 1)[0]) from None

    def output_limit(self, prompt: list[int], requested: int | None, field: str) -> int:
        """max_tokens of one prompt: as requested, or (None) what max_model_len leaves; raises when it does not fit."""
        n, limit = len(prompt), self.max_model_len
        if n >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, your {field} has "
                               f"{n} tokens, which leaves no room for output; shorten it.", field)
        if requested is None:
            return limit - n
        if n + requested > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{n + requested} tokens ({n} in the {field}, {requested} in the completion). "
                               "Please reduce the length of the prompt or max_tokens.", "max_tokens")
        return requested

    async def submit(self, body, prompts: list[list[int]], limits: list[int], field: str, arrival: float):
        """Add one engine request per prompt, with n sequences each; returns (ids, queue). Choice p * n + i is
        sequence i of prompt p."""
        ids = [f"{uuid.uuid4().hex}-{p}" for p in range(len(prompts))]
        params = [self.sampling_params(body, limits[p]) for p in range(len(prompts))]
        try:
            q = await self.engine.add(ids, prompts, params, arrival)
        except ValueError as e:
            msg = re.sub(r"^request '[^']*': ", "", str(e))  # the engine's request id means nothing to the client
            param = "n" if msg.startswith("n=") else "max_tokens" if "max_tokens" in msg else field
            raise RequestError(msg, param) from None
        return ids, q

    # ----- engine deltas -> choices -------------------------------------------------------------
    async def events(self, body, ids: list[str], q: asyncio.Queue, choices: list[ChoiceText], finish: list):
        """Yield [(index, new token ids)] as deltas arrive, until every choice finished.

        Deltas already queued are taken together and merged per choice (as vLLM merges outputs for a
        consumer that fell behind): when the event loop keeps up each token is its own chunk, and
        when it does not it writes fewer, larger chunks instead of falling further behind.
        finish[i] becomes the choice's finish_reason; a choice that hit a stop string finishes with "stop" and
        its further tokens are dropped; its engine request is aborted once all its n choices have finished.
        Raises _Failed when the engine failed a request.
        """
        n = len(choices) // len(ids)
        index = {rid: p for p, rid in enumerate(ids)}
        left = len(choices)
        while left:
            batch = [await q.get()]
            while not q.empty():
                batch.append(q.get_nowait())
            touched: dict[int, list[int]] = {}
            for d in batch:
                p = index[d.request_id]
                i = p * n + d.index
                if finish[i] is not None:
                    continue  # the abort that follows a stop string
                if d.finish_reason == "error":
                    raise _Failed(d.error)
                c = choices[i]
                c.add(d.token_ids)
                if d.output is not None:  # the request finished: every choice of it served the same prompt
                    for j in range(p * n, (p + 1) * n):
                        choices[j].cached_tokens = d.output.metrics.num_cached_tokens
                if c.stopped:
                    finish[i] = "stop"
                    if all(f is not None for f in finish[p * n:(p + 1) * n]):
                        self.engine.abort(d.request_id)  # a no-op when it has finished already
                elif d.finished:
                    c.flush()
                    finish[i] = d.finish_reason
                if finish[i] is not None:
                    left -= 1
                touched.setdefault(i, []).extend(d.token_ids)
            if touched:
                yield list(touched.items())

    @staticmethod
    def usage(prompts, choices) -> dict:
        """OpenAI's usage: prompt tokens (each prompt once, whatever n), output tokens of every choice."""
        p = sum(len(x) for x in prompts)
        c = sum(len(ch.ids) for ch in choices)
        n = len(choices) // len(prompts)
        cached = sum(getattr(ch, "cached_tokens", 0) for ch in choices[::n])  # choice 0 of each prompt
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}

    @staticmethod
    def unfinished(ids: list[str], finish: list) -> list[str]:
        """The engine requests with a choice not finished yet (to abort)."""
        n = len(finish) // len(ids)
        return [rid for p, rid in enumerate(ids) if any(f is None for f in finish[p * n:(p + 1) * n])]

    async def respond(self, request: Request, body, prompts, limits, field: str, chat: bool, arrival: float):
        ids, q = await self.submit(body, prompts, limits, field, arrival)
        choices = [ChoiceText(self.tokenizer, body.stop_strings, body.include_stop_str_in_output)
                   for _ in range(len(ids) * body.n)]
        finish: list = [None] * len(choices)
        rid = ("chatcmpl-" if chat else "cmpl-") + ids[0].split("-")[0]
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        with_ids = body.return_token_ids or self.tokenizer is None
        if body.stream:
            return StreamingResponse(self._stream(body, ids, q, choices, finish, head, chat, with_ids, prompts),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_abort_on_disconnect(request, self.engine, ids))
        try:
            async for _ in self.events(body, ids, q, choices, finish):
                pass
        except _Failed as e:
            return JSONResponse(error_body(str(e), None, "server_error", 500), status_code=500)
        finally:
            watcher.cancel()
            self.engine.abort(self.unfinished(ids, finish))
        out = []
        for i, c in enumerate(choices):
            text = c.take(final=True)
            item = {"index": i, "finish_reason": finish[i], "logprobs": None}
            item.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            if with_ids:
                item["token_ids"] = list(c.ids)
            out.append(item)
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
                             "usage": self.usage(prompts, choices)})

    async def _stream(self, body, ids, q, choices, finish, head, chat, with_ids, prompts):
        try:
            if chat:
                for i in range(len(choices)):
                    yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            try:
                async for batch in self.events(body, ids, q, choices, finish):
                    for i, new_ids in batch:
                        text = choices[i].take(final=finish[i] is not None)
                        item = {"index": i, "logprobs": None, "finish_reason": finish[i]}
                        item.update({"delta": {"content": text} if text or not finish[i] else {}} if chat
                                    else {"text": text})
                        if with_ids:
                            item["token_ids"] = new_ids
                        yield _sse({**head, "choices": [item]})
            except _Failed as e:
                yield _sse(error_body(str(e), None, "server_error", 500))
            else:
                if body.include_usage:
                    yield _sse({**head, "choices": [], "usage": self.usage(prompts, choices)})
            yield b"data: [DONE]\n\n"
        finally:
            # The client went away (or the response ended early): free what is still running.
            self.engine.abort(self.unfinished(ids, finish))


class _NotFound(Exception):
    pass


async def _abort_on_disconnect(request: Request, engine: AsyncEngine, ids: list[str], every: float = 0.25):
    while True:
        await asyncio.sleep(every)
        if await request.is_disconnected():
            engine.abort(ids)
            return


def build_app(llm, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``llm`` (an engine.LLM) as ``model_name``; the engine loop starts and
    stops with the app (its lifespan). ``app.state.server`` is the OpenAIServer."""
    server = OpenAIServer(llm, model_name or "model")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="paged-workbench OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)

    @app.exception_handler(RequestError)
    async def _bad(request, exc: RequestError):
        return JSONResponse(error_body(str(exc), exc.param), status_code=400)

    @app.exception_handler(_NotFound)
    async def _not_found(request, exc: _NotFound):
        return JSONResponse(error_body(str(exc), "model", "NotFoundError", 404), status_code=404)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse(error_body(f"the engine loop is not running: {server.engine.error!r}", None,
                                           "server_error", 503), status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "paged-workbench", "root": server.model_name,
                                            "max_model_len": server.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.check()
        server.check_model(body.model)
        prompts = [server.tokenize(p, "prompt") for p in body.prompts()]
        for p in prompts:
            if not p:
                raise RequestError("prompt is empty; give at least one token", "prompt")
        limits = [server.output_limit(p, body.max_tokens, "prompt") for p in prompts]
        return await server.respond(request, body, prompts, limits, "prompt", False, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        body.check()
        server.check_model(body.model)
        if server.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it cannot take chat messages; use "
                               "/v1/completions with token ids", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = chat_prompt_ids(server.tokenizer, msgs, body.add_generation_prompt, body.chat_template)
        except Exception as e:  # noqa: BLE001 - a template that fails on these messages is the request's fault
            raise RequestError(f"the chat template failed on these messages: {e}", "messages") from None
        limits = [server.output_limit(prompt, body.output_limit, "messages")]
        return await server.respond(request, body, [prompt], limits, "messages", True, arrival)

    return app
