"""The OpenAI chat-completions wire format: request validation and response bodies.

Requests are parsed here (not by FastAPI's body binding) so that every mistake
answers 400 with OpenAI's error shape and one line naming the field:

    {"error": {"message": "messages: field required", "type": "invalid_request_error",
               "param": "messages", "code": null}}

Only what the server does is accepted: one choice (`n` = 1), no tools, no audio;
unknown fields are ignored (clients send many optional ones).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 5  # alternatives per token that `top_logprobs` may ask for


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the field (`param`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


class _Model(BaseModel):
    # strict: "5" for max_tokens or "yes" for stream is a 400, as OpenAI answers (an int
    # for a float field is still fine); unknown fields are ignored, known unsupported
    # ones refused (`_unsupported`).
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageUrl(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = TextPart | ImagePart


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    """The fields of `POST /v1/chat/completions` the server reads."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # An extension (vLLM has it too); 0 = off. Held as int32 by the decode step.
    top_k: int = Field(default=0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False  # an extension (vLLM's): generate exactly the token limit
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    n: int = 1
    user: str | None = None

    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`; None when neither."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def stop_strings(self) -> list[str]:
        """`stop` as a list (at most 4, as OpenAI allows; empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Body bytes -> a validated request, or `ApiError(400)` naming the problem."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_content_parts(data.get("messages"))
    try:
        req = ChatCompletionRequest.model_validate(data)
    except pydantic.ValidationError as e:
        raise _validation_error(e) from None
    limit = req.token_limit()
    if limit is not None and limit <= 0:
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise ApiError(400, f"{name} must be at least 1, got {limit}", param=name)
    if req.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {req.n}", param="n")
    if len(req.stop_strings()) > 4:
        raise ApiError(400, "stop takes at most 4 strings", param="stop")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    for name, why in _unsupported(data):
        raise ApiError(400, f"{name}: {why}", param=name)
    return req


def _check_content_parts(messages: Any) -> None:
    """Clear errors for content parts (pydantic's union errors name neither the part nor
    the problem): a known type, its text or its image_url.url."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        parts = message.get("content") if isinstance(message, dict) else None
        if not isinstance(parts, list):
            continue
        for j, part in enumerate(parts):
            where = f"messages.{i}.content.{j}"
            if not isinstance(part, dict):
                raise ApiError(400, f"{where}: a content part is an object with a type")
            kind = part.get("type")
            if kind not in ("text", "image_url"):
                raise ApiError(
                    400, f"{where}.type: {kind!r} is not supported (text and image_url parts are)"
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text: a string is required")
            url = part.get("image_url")
            if kind == "image_url" and not (
                isinstance(url, dict) and isinstance(url.get("url"), str)
            ):
                raise ApiError(400, f'{where}.image_url: expected {{"url": "data:..." or a path}}')


def _unsupported(data: dict[str, Any]) -> list[tuple[str, str]]:
    """OpenAI parameters this server does not implement, where the request asks for more
    than their no-op value: refused, so that no client relies on one silently ignored."""
    found = []

    def given(name: str, noop: tuple = (None,)) -> bool:
        return name in data and data[name] not in noop

    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        found.append(("response_format", "structured output (JSON) is not supported"))
    for name in ("tools", "functions"):
        if given(name, (None, [])):
            found.append((name, "tool calling is not supported"))
    for name in ("tool_choice", "function_call"):
        if given(name, (None, "none", "auto")):
            found.append((name, "tool calling is not supported"))
    if given("logit_bias", (None, {})):
        found.append(("logit_bias", "not supported"))
    for name in ("presence_penalty", "frequency_penalty"):
        if given(name, (None, 0, 0.0)):
            found.append((name, "not supported"))
    if given("modalities", (None, ["text"])):
        found.append(("modalities", "this server answers with text only"))
    for name, noop in (("best_of", (None, 1)), ("echo", (None, False)), ("prediction", (None,))):
        if given(name, noop):
            found.append((name, "not supported"))
    for i, message in enumerate(data.get("messages") or []):
        if isinstance(message, dict) and message.get("tool_calls"):
            found.append((f"messages.{i}.tool_calls", "tool calling is not supported"))
    return found


def _validation_error(e: pydantic.ValidationError) -> ApiError:
    """The first pydantic error as one line: `messages.0.content: ...`."""
    err = e.errors()[0]
    # Union members add their class name to the location; keep the field path only.
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper())]
    where = ".".join(loc) or "body"
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "field required"
    elif err["type"] == "too_short":
        msg = "must not be empty"
    return ApiError(400, f"{where}: {msg}", param=loc[0] if loc else None)


# ---------------------------------------------------------------------------- responses


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def logprob_entry(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict:
    """One `logprobs.content` item: the token, its log-probability, its alternatives."""
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top or []
        ],
    }


def completion_body(
    *,
    rid: str,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: list[dict] | None,
) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    *,
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    logprobs: list[dict] | None = None,
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` object (`delta=None` with usage: the final usage chunk)."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
    }
    if delta is not None:
        body["choices"] = [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason,
            }
        ]
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
