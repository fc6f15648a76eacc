"""The OpenAI request surface, pure: JSON bodies -> validated records, errors in OpenAI's shape.

`parse_chat` and `parse_embeddings` refuse what Galaxy cannot honour with an `ApiError(400)` naming
the field, rather than answering something silently different; `Limits` bounds what the server
accepts and how long anything waits. No sockets, no cluster: the server (server.py) calls these.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.sampling import SamplingConfig

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: the stream's hold-back check costs its length squared per token
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Galaxy's finish -> OpenAI finish_reason: a request cut by its deadline was truncated, as by a length limit;
# a device's KV budget ends a reply as max_tokens would
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "deadline": "length", "kv_budget": "length"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, details: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.details = details or {}  # extra fields of the error object (an early rejection's prediction)

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else (
            "rate_limit_error" if self.status == 429 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code,
                          **self.details}}


@dataclass(frozen=True)
class Limits:
    """How much the server accepts and how long anything waits."""

    max_queue: int = 64  # generation requests waiting for a place in the batch; more get 429
    queue_timeout_s: float = 120.0  # longest wait for the embedding queue (one at a time) before a 503
    request_timeout_s: float = 600.0  # a generation's deadline: then it ends (504, or finish_reason "length")
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    default_max_tokens: int = 256  # completion budget of a request that sets no max_tokens
    default_temperature: float = 1.0  # of a request that sets none (OpenAI's default)
    io_timeout_s: float = 60.0  # socket reads/writes, and how long an idle keep-alive connection stays
    max_connections: int = 64  # open HTTP connections (one thread each); more are refused with 503

    def __post_init__(self):
        for name in ("max_queue",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("max_body_bytes", "default_max_tokens", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("queue_timeout_s", "io_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.default_temperature <= 2:
            raise ValueError(f"default_temperature={self.default_temperature} must be in [0, 2]")


# --- requests: OpenAI JSON -> validated records (pure) -------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # {"role": system|user|assistant, "content": str}, ready for the chat template
    max_tokens: int | None  # None: the server's default budget
    max_tokens_field: str  # which name the client used, for error messages
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    model: str | None


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[str | tuple[int, ...], ...]  # texts or token id lists
    base64: bool  # encoding_format: "base64" (little-endian float32) instead of "float"
    dimensions: int | None
    model: str | None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, int | float) or isinstance(x, bool) or not lo <= x <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo:g}, {hi:g}], got {x!r}", name, "invalid_value")
    return float(x)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    x = body.get(name)
    if x is None:
        return None
    if not _is_int(x) or x < lo or (hi is not None and x > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name} must be an integer {bound}, got {x!r}", name, "invalid_value")
    return x


def _flag(body: dict, name: str) -> bool:
    x = body.get(name, False)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise ApiError(400, f"{name} must be true or false, got {x!r}", name, "invalid_type")
    return x


def _model_field(body: dict) -> str | None:
    x = body.get("model")
    if x is not None and not isinstance(x, str):
        raise ApiError(400, f"model must be a string, got {x!r}", "model", "invalid_type")
    return x


def _unsupported(body: dict) -> None:
    """Fields we cannot honour: a clear 400 rather than a silently different answer."""
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by galaxy serve", name, "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported by galaxy serve (only 0)", name, "unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported by galaxy serve", "logprobs", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", "response_format",
                       "unsupported_parameter")


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if c is None and msg.get("role") == "assistant":
        return ""
    if isinstance(c, list):
        texts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                               "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_type")


def _messages(body: dict) -> tuple[dict, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported (use one of {sorted(ROLES)})",
                           f"messages[{i}].role", "invalid_value")
        out.append({"role": ROLES[role], "content": _content(m, i)})
    return tuple(out)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                       f"{MAX_STOP_STRINGS} of them", "stop", "invalid_value")
    return tuple(stops)


def parse_chat(body: dict, default_temperature: float = 1.0) -> ChatRequest:
    """Validate a /v1/chat/completions body; raises ApiError(400) naming the field."""
    _unsupported(body)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"n={n!r}: galaxy serve returns one choice per request (n=1)", "n", "unsupported_value")
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field, 1)  # the newer name wins when both are given
    temperature = _number(body, "temperature", 0.0, 2.0, default_temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    top_k = _integer(body, "top_k", -1) or 0  # an extension (as vLLM): 0 or -1 = off
    if top_k < 0:
        top_k = 0
    if top_p == 0.0:  # OpenAI allows 0: only the most likely token survives
        top_k, top_p = 1, 1.0
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict)):
        raise ApiError(400, "stream_options is an object, allowed only with stream: true", "stream_options",
                       "invalid_value")
    include_usage = _flag(opts or {}, "include_usage")
    return ChatRequest(_messages(body), max_tokens, field, SamplingConfig(temperature, top_k, top_p, seed),
                       _stops(body), stream, include_usage, _model_field(body))


def parse_embeddings(body: dict) -> EmbeddingRequest:
    """Validate a /v1/embeddings body: input is a string, a list of strings, token ids, or lists of ids."""
    x = body.get("input")
    bad = ApiError(400, "input must be a non-empty string, a list of them, a list of token ids, or a list of such "
                   "lists", "input", "invalid_value")
    if isinstance(x, str):
        inputs = [x]
    elif isinstance(x, list) and x and all(_is_int(t) for t in x):
        inputs = [tuple(x)]
    elif isinstance(x, list) and x:
        inputs = []
        for item in x:
            if isinstance(item, list) and item and all(_is_int(t) for t in item):
                inputs.append(tuple(item))
            elif isinstance(item, str):
                inputs.append(item)
            else:
                raise bad
    else:
        raise bad
    if any(s == "" for s in inputs):
        raise ApiError(400, "input must not contain empty strings", "input", "invalid_value")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} per request", "input",
                       "invalid_value")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format",
                       "invalid_value")
    return EmbeddingRequest(tuple(inputs), fmt == "base64", _integer(body, "dimensions", 1), _model_field(body))


