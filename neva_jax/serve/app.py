"""The FastAPI app: OpenAI routes, health, metrics and the chat page.

    POST /v1/chat/completions   OpenAI chat completions (JSON, or SSE with "stream": true)
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok" | "draining" | "error", ...}; never needs a key
    GET  /metrics               Prometheus text
    GET  /                      the chat page (static files under /static/)

Every refusal is a 4xx with OpenAI's error body naming the problem; the server
keeps serving. With an API key, the API routes and /metrics need
`Authorization: Bearer KEY`; /health and the page's static files do not (a
browser cannot send the header when it opens a page; the page asks for the key
and sends it with every call).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from neva_jax.serve import protocol
from neva_jax.serve.chat import ChatFormat, TextStream
from neva_jax.serve.engine import DrainingError, Engine, Finished, GenParams, Handle, QueueFullError
from neva_jax.serve.metrics import ServerMetrics
from neva_jax.serve.protocol import ApiError

MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclasses.dataclass
class ServerState:
    """What the routes share."""

    engine: Engine
    chat: ChatFormat
    metrics: ServerMetrics
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app for one engine; the caller starts and stops the engine."""
    app = FastAPI(title="neva-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    static = resources.files("neva_jax.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer <key>",
                kind="authentication_error",
            )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        state.metrics.refused(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, ApiError(e.status_code, str(e.detail), kind="not_found"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, ApiError(400, str(e.errors()[0].get("msg", e))))

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text())

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = state.engine.stats()
        status = "error" if stats["error"] else "draining" if stats["draining"] else "ok"
        return JSONResponse(
            {"status": status, "model": state.model_name, **stats},
            status_code=200 if status == "ok" else 503,
        )

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "neva-jax",
            "max_model_len": state.engine.runner.max_len,
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict[str, Any]:  # the OpenAI client's models.retrieve
        if model_id != state.model_name:
            raise protocol.ApiError(
                404, f"model {model_id!r}: this server has {state.model_name!r}", kind="not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        req = protocol.parse_request(await _read_body(request, state.max_body_bytes))
        prompt = await state.chat.prepare(req.messages)
        params = _params(req, len(prompt.ids), state.engine.runner.max_len)
        try:
            handle = state.engine.submit(prompt.ids, prompt.pixels, params)
        except QueueFullError as e:
            raise ApiError(
                429,
                f"the server is busy: {e}; retry later",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None
        except DrainingError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        except RuntimeError as e:
            raise ApiError(500, str(e), kind="server_error") from None
        state.metrics.prompt_tokens.inc(len(prompt.ids))
        answer = _Answer(state, handle, req, len(prompt.ids))
        if req.stream:
            return StreamingResponse(
                answer.sse(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await answer.json(request)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _params(req: protocol.ChatCompletionRequest, prompt_tokens: int, context: int) -> GenParams:
    """Generation settings; refuses prompts that leave no room (the limit in the message)."""
    limit = req.token_limit()
    if limit is None:
        limit = context - prompt_tokens  # as much as the context leaves
        if limit < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens, which fills the context of {context} "
                "tokens (--max-seq-len); shorten the conversation",
                param="messages",
            )
    elif prompt_tokens + limit > context:
        raise ApiError(
            400,
            f"the prompt is {prompt_tokens} tokens and max_tokens is {limit}: "
            f"{prompt_tokens + limit} exceeds the context of {context} tokens (--max-seq-len); "
            "shorten the conversation or lower max_tokens",
            param="messages",
        )
    return GenParams(
        max_tokens=limit,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        top_logprobs=req.top_logprobs or 0,
        ignore_eos=req.ignore_eos,
    )


class _Answer:
    """One request's tokens turned into OpenAI text, as a JSON body or an SSE stream."""

    def __init__(
        self, state: ServerState, handle: Handle, req: protocol.ChatCompletionRequest, n: int
    ):
        self.state, self.handle, self.req, self.prompt_tokens = state, handle, req, n
        self.text = TextStream(state.chat.gen, req.stop_strings())
        self.hf = state.chat.gen.tokenizer.hf
        self.rid = protocol.new_id()
        self.tokens = 0
        self.finish: Finished | None = None

    async def pieces(self) -> AsyncIterator[tuple[str, list[dict] | None]]:
        """(text delta, logprob entries) as tokens arrive; sets `finish` at the end."""
        try:
            async for event in self.handle.events():
                if isinstance(event, Finished):
                    self.finish = event
                    break
                self.tokens += 1
                delta = self.text.add(event.id)
                entries = self._logprobs(event) if self.req.logprobs else None
                if self.text.stopped:  # a stop string: the slot is freed at once
                    self.handle.cancel("stop")
                    self.finish = Finished("stop")
                if delta or entries:
                    yield delta, entries
                if self.finish is not None:
                    break
            rest = self.text.finish()
            if rest:
                yield rest, None
        finally:
            self.handle.cancel()  # the client left, or we are done: free the slot

    def _logprobs(self, event: Any) -> list[dict]:
        top = [(self.hf.decode([i]), lp) for i, lp in event.top[: self.req.top_logprobs or 0]]
        return [protocol.logprob_entry(self.hf.decode([event.id]), event.logprob, top)]

    def _reason(self) -> str:
        assert self.finish is not None
        if self.finish.reason == "error":
            raise ApiError(500, f"generation failed: {self.finish.message}", kind="server_error")
        return self.finish.reason if self.finish.reason in ("stop", "length") else "stop"

    async def json(self, request: Request) -> JSONResponse:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.handle))
        try:
            logprobs: list[dict] | None = [] if self.req.logprobs else None
            async for _, entries in self.pieces():
                if logprobs is not None and entries:
                    logprobs += entries
        finally:
            watcher.cancel()
        body = protocol.completion_body(
            rid=self.rid,
            model=self.state.model_name,
            text=self.text.text,
            finish_reason=self._reason(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.tokens,
            logprobs=logprobs,
        )
        return JSONResponse(body)

    async def sse(self) -> AsyncIterator[bytes]:
        created = int(time.time())
        common = dict(rid=self.rid, model=self.state.model_name, created=created)
        yield protocol.sse(
            protocol.chunk_body(**common, delta={"role": "assistant", "content": ""})
        )
        async for delta, entries in self.pieces():
            yield protocol.sse(
                protocol.chunk_body(**common, delta={"content": delta}, logprobs=entries)
            )
        try:
            reason = self._reason()
        except ApiError as e:
            yield protocol.sse(e.body())
            yield protocol.sse("[DONE]")
            return
        yield protocol.sse(protocol.chunk_body(**common, delta={}, finish_reason=reason))
        options = self.req.stream_options
        if options is not None and options.include_usage:
            usage = protocol.usage(self.prompt_tokens, self.tokens)
            yield protocol.sse(protocol.chunk_body(**common, usage_=usage))
        yield protocol.sse("[DONE]")


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """Cancels `handle` when the client of a non-streaming request hangs up."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


class BackgroundServer:
    """`create_app(state)` under uvicorn on a loopback port, in a thread of this process.

    For tests and benchmarks that want real HTTP and a look at the engine;
    `close()` stops the server and the engine.
    """

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0):
        import threading

        import uvicorn

        self.state = state
        config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="neva-serve-http", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port}")
            self.thread.join(0.01)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.state.engine.stop()
