"""`galaxy serve`'s HTTP server: an OpenAI-compatible endpoint for a model split across devices.

    from galaxy.serving.server import Server

    with galaxy.connect(local=3) as cluster, Server(cluster.load(), port=8000) as server:
        ...  # OpenAI(base_url=f"http://{server.address}/v1", api_key="x")

This file owns the HTTP side: the responses and Server-Sent Events of many requests at once. Chat
completions go to the model's serving engine (galaxy.engine), which batches them on the devices;
a client that disconnects, streaming or not, has its request cancelled and its KV blocks freed at
once. Embeddings (one forward pass each) run one at a time behind a small bounded queue
(`RequestQueue`). Requests are parsed by openai.py; `/metrics` is metrics.py's; `/dashboard` (a live
page of the devices, the split, the last step and the engine over time) is dashboard_http.py's. It
speaks to the cluster only through the Python API (galaxy.runtime.api).

Standard library HTTP (http.server, a thread per connection): the devices, not HTTP, bound the
rate (an engine step takes tens of milliseconds; a request costs the server well under one).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import select
import socket
import socketserver
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np

from ..engine.engine import ClientGone, GenerationStream
from ..engine.generation import Generation, GenerationConfig, pending_stop
from ..engine.scheduler import QueueFull
from ..errors import GalaxyError, InvalidRequest, Overloaded
from ..version import __version__
from .dashboard_http import Dashboard
from .metrics import ServerMetrics
from .openai import FINISH, ApiError, ChatRequest, EmbeddingRequest, Limits, parse_chat, parse_embeddings

log = logging.getLogger(__name__)


# --- running requests on the cluster ----------------------------------------------------------------------

class RequestQueue:
    """One request at a time on the cluster; at most `max_queue` wait (first come, first served), each for
    at most `timeout` seconds."""

    def __init__(self, max_queue: int, timeout: float):
        self.max_queue, self.timeout = max_queue, timeout
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self.busy = False

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextmanager
    def hold(self):
        with self._cond:
            if self.busy or self._queue:
                if len(self._queue) >= self.max_queue:
                    raise ApiError(429, f"the server is busy: one request is running and {len(self._queue)} are "
                                   "waiting (the queue is full); retry later", code="queue_full",
                                   headers={"Retry-After": "1"})
                me = object()
                self._queue.append(me)
                try:
                    ok = self._cond.wait_for(lambda: not self.busy and self._queue[0] is me, self.timeout)
                finally:
                    self._queue.remove(me)
                    self._cond.notify_all()  # the next in line may go now
                if not ok:
                    raise ApiError(503, f"timed out after {self.timeout:g} s waiting for earlier requests; retry "
                                   "later", code="queue_timeout", headers={"Retry-After": "5"})
            self.busy = True
        try:
            yield
        finally:
            with self._cond:
                self.busy = False
                self._cond.notify_all()


@contextmanager
def _cluster_errors():
    """A GalaxyError while running a request means the cluster cannot serve it now: 503, and we keep serving."""
    try:
        yield
    except ClientGone:
        raise  # nobody to answer: not the cluster's failure
    except InvalidRequest as e:  # the request, not the cluster: the caller can fix it
        raise ApiError(400, str(e), code="invalid_value") from e
    except GalaxyError as e:
        log.warning("cluster failure: %s", e)
        raise ApiError(503, f"the Galaxy cluster could not serve the request ({type(e).__name__}): {e}",
                       code="cluster_unavailable", headers={"Retry-After": "5"}) from e


def _pieces(stream: GenerationStream, stops: tuple[str, ...], alive=None) -> Iterator[str]:
    """Text pieces of a generation such that their sum is exactly the final `gen.text`.

    The engine shows text token by token and only notices a stop string once it is complete, so
    a tail that could begin a stop string is held back until it is clear either way. With alive(),
    a client gone while no piece comes (queued, or a slow prefill) cancels the request (ClientGone)."""
    shown, sent, gen = "", 0, stream.generation
    try:
        for ev in stream.events_while(alive):
            shown += ev.text
            safe = len(shown) - pending_stop(shown, stops)
            if safe > sent:
                yield shown[sent:safe]
                sent = safe
        if len(gen.text) > sent:  # finished: gen.text is final (cut before a stop string)
            yield gen.text[sent:]
    finally:
        stream.cancel()  # a client that went away: its KV blocks are freed at once (no-op when finished)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _default_name(model) -> str:
    name = getattr(model.config, "name", "") or ""
    if name and name != "model":
        return name
    path = Path(str(getattr(model.source, "path", "") or "galaxy"))
    return path.parent.name if path.name == "model" else path.name


@dataclass
class _Chat:
    """A chat completion under way: its pieces come out as the cluster produces them."""

    id: str
    created: int
    gen: Generation
    pieces: Iterator[str]
    include_usage: bool

    def usage(self) -> dict:
        p, c = len(self.gen.prompt_tokens), len(self.gen.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish_reason(self) -> str:
        return FINISH.get(self.gen.finish, "stop")


class Server:
    """An OpenAI-compatible endpoint for one loaded model (a galaxy Model, or a Session that has one).

    `start()` serves from a background thread (`address` is then "host:port"), `stop()` closes every
    connection and thread it opened; `serve_forever()` serves in the calling thread (the CLI). The
    session stays the caller's: the server never closes it.

    dashboard=True also serves the live dashboard at /dashboard (dashboard_http.py), polling the
    devices every `poll_interval` seconds; `plan` (a planner Plan) gives it the planner's reason,
    `measure_links` has it measure each ring link once at start. api=False serves the dashboard
    (and /health, /metrics) without the OpenAI routes: `target` may then be a Session with no model."""

    def __init__(self, target, host: str = "127.0.0.1", port: int = 0, *, served_model_name: str | None = None,
                 api_key: str | None = None, max_queue: int = 64, queue_timeout: float = 120.0,
                 max_body_bytes: int = 1 << 20, default_max_tokens: int = 256, default_temperature: float = 1.0,
                 io_timeout: float = 60.0, max_connections: int = 64, request_timeout: float = 600.0,
                 api: bool = True, dashboard: bool = True, plan=None, poll_interval: float = 1.0,
                 measure_links: bool = True):
        model = target.model if hasattr(target, "load") and hasattr(target, "model") else target
        if model is None and api:
            raise ValueError("the session has no model: call session.load(...) before serving it")
        if not (api or dashboard):
            raise ValueError("Server(api=False, dashboard=False) would serve nothing")
        self.model, self.api = model, api
        self.session = getattr(model, "session", None) or target
        self.name = served_model_name or (_default_name(model) if model is not None else "")
        self.host, self.port, self.api_key = host, port, api_key or None
        self.limits = Limits(max_queue=max_queue, queue_timeout_s=queue_timeout, max_body_bytes=max_body_bytes,
                             default_max_tokens=default_max_tokens, default_temperature=default_temperature,
                             io_timeout_s=io_timeout, max_connections=max_connections,
                             request_timeout_s=request_timeout)
        self.gate = RequestQueue(max_queue, queue_timeout)  # embeddings: one forward pass at a time
        # started now: a KV pool that cannot fit fails here (a dashboard alone serves no requests: no engine)
        self.engine = model.engine if api and model.config.causal else None
        self.metrics = ServerMetrics(lambda: self.engine.load if self.engine is not None else None)
        self.dashboard = Dashboard(self.session, model, engine=self.engine, totals=self.metrics.totals,
                                   api_key=self.api_key, plan=plan, name=self.name, api=api,
                                   poll_s=poll_interval, timeout_s=min(poll_interval, 1.0),
                                   measure_links=measure_links) if dashboard else None
        self.created = int(time.time())
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._looping = threading.Event()  # serve_forever runs (or is about to) in some thread
        self._close_lock = threading.Lock()
        self._closed = False

    # lifecycle ----------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """'host:port' as bound (the real port when port=0)."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host, port = self._httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _bind(self) -> None:
        if self._closed:
            raise RuntimeError("this server was stopped; make a new one")
        if self._httpd is not None:
            return
        if self.api_key is None and not _is_loopback(self.host):
            log.warning("serving on %s without an API key: anyone who can reach this address can use the "
                        "cluster; set --api-key (or GALAXY_API_KEY)", self.host)
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        if self.dashboard is not None:
            self.dashboard.start()

    def start(self) -> Server:
        """Serve from a background thread; returns self."""
        self._bind()
        if not self._looping.is_set():
            self._looping.set()
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="galaxy-serve", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until KeyboardInterrupt or stop() from another thread."""
        self._bind()
        self._looping.set()
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        finally:
            self._close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (a running generation stops at its next token), join threads."""
        if self._httpd is None:
            return
        if self._looping.is_set():
            self._httpd.shutdown()  # returns once the accept loop has ended (at once if it already has)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close(timeout)

    def _close(self, timeout: float = 10.0) -> None:
        with self._close_lock:
            if self._closed or self._httpd is None:
                return
            self._closed = True
        self._httpd.server_close()
        self._httpd.close_connections(timeout)
        if self.dashboard is not None:
            self.dashboard.stop()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # endpoints ----------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise ApiError(404, f"the model {requested!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "galaxy"}

    def health(self) -> tuple[int, dict]:
        """200 when every device answers (a hello round trip), 503 with the reason otherwise."""
        load = self.engine.load if self.engine is not None else {"running": int(self.gate.busy),
                                                                    "waiting": self.gate.waiting}
        base = {"model": self.name, "running": load["running"], "waiting": load["waiting"],
                "max_queue": self.limits.max_queue}
        try:
            devices = self.session.devices()
        except GalaxyError as e:
            return 503, {"status": "unavailable", "error": f"{type(e).__name__}: {e}", **base}
        return 200, {"status": "ok", "devices": len(devices) or getattr(self.session, "world", 0), **base}

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        tok = self.model.tokenizer
        if not self.model.config.causal:
            raise ApiError(400, f"{self.name} is an encoder: it serves /v1/embeddings, not chat completions",
                           "model", "wrong_model_kind")
        if tok is None or not tok.chat_template:
            raise ApiError(400, f"{self.name} has no tokenizer with a chat template", "model", "no_chat_template")
        try:
            text = tok.apply_chat_template(list(req.messages), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - templates raise what they like (e.g. "roles must alternate")
            raise ApiError(400, f"the model's chat template rejected the messages: {e}", "messages",
                           "invalid_value") from None
        return tok.encode(text)

    def chat(self, req: ChatRequest) -> tuple[list[int], GenerationConfig]:
        """The prompt ids and generation config of a chat request, checked against the context size."""
        self.check_model(req.model)
        ids = self._chat_prompt(req)
        room = self.model.config.max_positions - len(ids)
        if room < 1:
            raise ApiError(400, f"the messages are {len(ids)} tokens; the model's context is "
                           f"{self.model.config.max_positions} tokens", "messages", "context_length_exceeded")
        budget = req.max_tokens
        if budget is None:
            budget = min(self.limits.default_max_tokens, room)
        elif budget > room:
            raise ApiError(400, f"{req.max_tokens_field}={budget} does not fit: the model's context is "
                           f"{self.model.config.max_positions} tokens and the messages take {len(ids)}",
                           req.max_tokens_field, "context_length_exceeded")
        return ids, GenerationConfig(budget, req.sampling, req.stop)

    def start_chat(self, ids: list[int], gc: GenerationConfig, include_usage: bool, alive=None) -> _Chat:
        """Queue the generation in the engine; the pieces come as it produces them. alive(): is the
        client still there (asked while no piece comes; a gone client's request is cancelled)."""
        if self.engine.load["waiting"] >= self.limits.max_queue:
            raise ApiError(429, f"the server is busy: {self.limits.max_queue} requests are waiting for a place in "
                           "the batch; retry later", code="queue_full", headers={"Retry-After": "1"})
        try:
            stream = self.engine.submit(ids, gc, timeout=self.limits.request_timeout_s)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except Overloaded as e:  # early rejection (`--slo-ttft`): it would miss the objective; say why and when
            raise ApiError(503, str(e), code="slo_unattainable", headers={"Retry-After": str(e.retry_after_s)},
                           details=e.details()) from None
        except InvalidRequest as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        return _Chat(_new_id("chatcmpl"), int(time.time()), stream.generation, _pieces(stream, gc.stop, alive),
                     include_usage)

    def completion(self, chat: _Chat, text: str) -> dict:
        return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": chat.finish_reason()}],
                "usage": chat.usage()}

    def chunk(self, chat: _Chat, delta: dict, finish: str | None = None) -> dict:
        return {"id": chat.id, "object": "chat.completion.chunk", "created": chat.created, "model": self.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def embeddings(self, req: EmbeddingRequest) -> dict:
        self.check_model(req.model)
        cfg, tok = self.model.config, self.model.tokenizer
        if cfg.causal:
            raise ApiError(400, f"{self.name} is a causal LM: it serves chat completions, not /v1/embeddings "
                           "(serve an encoder such as --model minilm)", "model", "wrong_model_kind")
        if req.dimensions is not None and req.dimensions != cfg.hidden:
            raise ApiError(400, f"dimensions={req.dimensions}: {self.name} embeds into {cfg.hidden} dimensions",
                           "dimensions", "unsupported_value")
        rows = []
        for i, item in enumerate(req.inputs):
            if isinstance(item, str):
                if tok is None:
                    raise ApiError(400, f"{self.name} has no tokenizer: send token ids", "input", "invalid_value")
                ids = tok.encode(item)
            else:
                ids = list(item)
                if not all(0 <= t < cfg.vocab_size for t in ids):
                    raise ApiError(400, f"input[{i}] has token ids outside [0, {cfg.vocab_size})", "input",
                                   "invalid_value")
            if len(ids) > cfg.max_positions:
                raise ApiError(400, f"input[{i}] is {len(ids)} tokens; {self.name} takes at most "
                               f"{cfg.max_positions}", "input", "context_length_exceeded")
            rows.append(ids)
        with self.gate.hold(), _cluster_errors():
            vectors = np.asarray(self.model.encode(rows), dtype="<f4").reshape(len(rows), -1)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if req.base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        n = sum(len(r) for r in rows)
        return {"object": "list", "data": data, "model": self.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, key = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- HTTP ----------------------------------------------------------------------------------------------

class _HTTPServer(HTTPServer):
    """One thread per connection, each tracked so stop() can close its socket and join it."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler, app: Server):
        self.app = app
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._lock = threading.Lock()
        try:
            self.address_family = socket.getaddrinfo(address[0] or None, address[1], type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as e:
            raise GalaxyError(f"cannot bind {address[0]!r}: {e}") from None
        super().__init__(address, handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn() can stall on reverse DNS
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request, client_address) -> None:
        with self._lock:
            if len(self._conns) >= self.app.limits.max_connections:
                _refuse(request)
                self.shutdown_request(request)
                return
            t = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                 name="galaxy-serve-conn", daemon=True)
            self._conns[t] = request
        t.start()

    def _serve_connection(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the server
            log.exception("unexpected error serving %s", client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._conns.pop(threading.current_thread(), None)

    def close_connections(self, timeout: float) -> None:
        with self._lock:
            conns = list(self._conns.items())
        for _, sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a read or write in the connection's thread
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t, _ in conns:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t, _ in conns if t.is_alive()]
        if alive:
            log.warning("%d connection thread(s) still running after %g s (a cluster step in progress)",
                        len(alive), timeout)


def _refuse(sock: socket.socket) -> None:
    body = json.dumps(ApiError(503, "too many open connections; retry later", code="too_many_connections").body())
    try:
        sock.settimeout(1.0)
        sock.sendall((f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                      f"{len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{body}").encode())
    except OSError:
        pass


ROUTES = {"/v1/chat/completions": {"POST"}, "/v1/embeddings": {"POST"}, "/v1/models": {"GET", "HEAD"},
          "/health": {"GET", "HEAD"}, "/metrics": {"GET", "HEAD"}}  # HEAD: the GET answer without its body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = f"galaxy-serve/{__version__}"
    server: _HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.app.limits.io_timeout_s
        super().setup()

    def handle_one_request(self) -> None:
        self._unread = 0  # body bytes of a refused request still on the socket
        self._streaming = False  # a 200 event stream has begun: errors can no longer change the status
        super().handle_one_request()
        if self._unread:
            self._discard(self._unread)

    def _discard(self, n: int, most: int = 64 << 20) -> None:
        """Drop a refused body (up to `most` bytes): closing on unread data would reset the connection
        before the client reads our answer."""
        self.connection.settimeout(2.0)
        try:
            left = min(n, most)
            while left > 0:
                got = self.rfile.read1(min(left, 1 << 16)) if hasattr(self.rfile, "read1") else b""
                if not got:
                    break
                left -= len(got)
        except OSError:
            pass

    def log_request(self, code="-", size="-") -> None:
        line = self.requestline
        if "?" in line:  # /dashboard?key=...: the key stays out of the logs
            method, _, rest = line.partition(" ")
            target, _, version = rest.partition(" ")
            line = f"{method} {target.split('?', 1)[0]}?... {version}"
        log.info('%s "%s" %s', self.client_address[0], line, code)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.client_address[0], format % args)

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own errors (malformed request line, header too long, ...) in OpenAI's shape."""
        self.close_connection = True
        self._send_json(code, ApiError(code, message or explain or "bad request").body())

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # plumbing -----------------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not supported)")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length is not a number") from None
        limit = self.server.app.limits.max_body_bytes
        if n > limit:
            self.close_connection = True
            self._unread = n  # read and dropped after the answer, so the client gets to read it
            raise ApiError(413, f"the request body is {n} bytes; this server accepts at most {limit}",
                           code="request_too_large")
        raw = self.rfile.read(n) if n > 0 else b""
        if len(raw) < n:
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(raw)} of {n} bytes")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _dispatch(self) -> None:
        app = self.server.app
        try:
            path, _, query = self.path.partition("?")
            path = path.rstrip("/") or "/"
            if app.dashboard is not None and (path == "/dashboard" or path.startswith("/dashboard/")):
                r = app.dashboard.handle(self.command, path, query, self.headers)  # its own key check
                self._send_bytes(r.status, r.body, r.content_type, r.headers)
                return
            if app.dashboard is not None and path == "/" and self.command in ("GET", "HEAD"):
                self._send_bytes(303, b"", "text/plain", {"Location": "/dashboard"})
                return
            if not app.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            model_path = path.startswith("/v1/models/")
            methods = {"GET", "HEAD"} if model_path else ROUTES.get(path)
            if not app.api and (model_path or path.startswith("/v1/")):
                raise ApiError(404, f"no endpoint {path}: this server serves only the dashboard (/dashboard), "
                               "/health and /metrics; `galaxy serve` serves the OpenAI API", code="unknown_url")
            if methods is None:
                raise ApiError(404, f"no endpoint {path}; see /v1/chat/completions, /v1/embeddings, /v1/models, "
                               "/health, /metrics" + (", /dashboard" if app.dashboard is not None else ""),
                               code="unknown_url")
            if self.command not in methods:
                raise ApiError(405, f"{path} accepts {', '.join(sorted(methods))}, not {self.command}",
                               code="method_not_allowed", headers={"Allow": ", ".join(sorted(methods))})
            if model_path:
                app.check_model(path[len("/v1/models/"):])
                self._send_json(200, app.model_card())
            elif path == "/v1/models":
                self._send_json(200, app.models())
            elif path == "/health":
                status, body = app.health()
                self._send_json(status, body)
            elif path == "/metrics":
                self._send_bytes(200, *app.metrics.render())
            elif path == "/v1/embeddings":
                self._send_json(200, app.embeddings(parse_embeddings(self._read_json())))
            else:
                self._chat(app, parse_chat(self._read_json(), app.limits.default_temperature))
        except ApiError as e:
            if e.status >= 500 or e.status == 429:
                log.info("%s %s: %d %s", self.command, self.path, e.status, e.message)
            self._send_json(e.status, e.body(), e.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - answer 500 and keep serving
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            if self._streaming:
                return  # the status line has gone out; closing the connection tells the client
            self._send_json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
                            .body())

    def _client_alive(self) -> bool:
        """Is the client still connected? Readable with nothing to read means it closed its end."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def _chat(self, app: Server, req: ChatRequest) -> None:
        ids, gc = app.chat(req)
        chat = app.start_chat(ids, gc, req.include_usage, alive=self._client_alive)
        try:
            with _cluster_errors():  # the prefill: a failing cluster still gets a proper 503
                first = next(chat.pieces, None)
            if req.stream:
                ok = self._stream_tokens(app, chat, first)
            else:
                with _cluster_errors():
                    text = (first or "") + "".join(chat.pieces)
        except ClientGone:
            self.close_connection = True  # nobody to answer
            return
        finally:
            chat.pieces.close()
            app.metrics.generation(chat.gen)
        if not req.stream:
            if chat.gen.finish == "deadline" and not chat.gen.tokens:
                raise ApiError(504, f"no token within the request timeout of {app.limits.request_timeout_s:g} s; "
                               "the devices are busy: retry later", code="timeout")
            self._send_json(200, app.completion(chat, text))
        elif ok:
            self._event(app.chunk(chat, {}, chat.finish_reason()))
            if chat.include_usage:
                self._event({**app.chunk(chat, {}), "choices": [], "usage": chat.usage()})
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")

    def _stream_tokens(self, app: Server, chat: _Chat, first: str | None) -> bool:
        """Server-Sent Events in OpenAI's chunk format, over chunked transfer encoding: the head and a
        chunk per piece of text. False if the cluster failed (the stream then ends with an error event)."""
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._event(app.chunk(chat, {"role": "assistant", "content": ""}))
        if first:
            self._event(app.chunk(chat, {"content": first}))
        try:
            for piece in chat.pieces:
                self._event(app.chunk(chat, {"content": piece}))
        except GalaxyError as e:  # the status line is out: report it as an error event, as OpenAI does
            log.warning("cluster failure mid-stream: %s", e)
            err = ApiError(503, f"the Galaxy cluster failed during the stream ({type(e).__name__}): {e}",
                           code="cluster_unavailable")
            self._event(err.body())
            self._write_chunk(b"")
            return False
        return True

    def _event(self, obj: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP chunk; b'' ends the body."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
