"""`galaxy serve`: the OpenAI-compatible endpoint, driven by the official `openai` client over localhost.

Models run on an in-process cluster (threads, no worker processes). Cluster failures and a busy
cluster are simulated by wrapping the session's executor, so the real Session/Model code runs.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

import galaxy
from galaxy.cli.bench import kv_paths as bench_kv_paths
from galaxy.cli.serve import add_parser as add_serve_parser
from galaxy.cli.serve import engine_config
from galaxy.engine.engine import EngineConfig
from galaxy.engine.generation import Generation, TokenEvent
from galaxy.errors import PeerUnreachable
from galaxy.serving.openai import ApiError, parse_chat, parse_embeddings
from galaxy.serving.server import Server, _pieces

openai = pytest.importorskip("openai", reason="the tests drive the server with the official client: pip install openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --- fixtures and helpers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(smollm2_path):
    with galaxy.connect(local=2, transport="inproc") as cluster:
        yield cluster.load()


@pytest.fixture(scope="module")
def encoder(minilm_path):
    with galaxy.connect(local=2, transport="inproc") as cluster:
        yield cluster.load("minilm")


def _serve_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("galaxy-serve")]


@pytest.fixture(autouse=True)
def no_leaked_server_threads():
    yield
    assert _serve_threads() == [], "a server thread outlived its test"


@contextmanager
def serving(target, client_key: str = "x", **kw):
    """A started server and an OpenAI client on it; both closed (and checked closed) afterwards."""
    server = Server(target, **kw).start()
    try:
        with openai.OpenAI(base_url=f"http://{server.address}/v1", api_key=client_key, max_retries=0,
                           timeout=60) as client:
            yield server, client
    finally:
        server.stop()
        assert server._httpd.socket.fileno() == -1 and not server._httpd._conns


def request(address: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON) of one plain HTTP request."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(payload) if payload else None
    finally:
        conn.close()


class FlakyExecutor:
    """The session's executor, failing like an unreachable device while `broken` (or after `fail_after` forwards)."""

    def __init__(self, inner):
        self.inner, self.broken, self.fail_after = inner, False, None

    def _check(self):
        if self.fail_after is not None:
            self.fail_after -= 1
            self.broken = self.broken or self.fail_after < 0
        if self.broken:
            raise PeerUnreachable("device 1 'jetson' (10.0.0.7:50051): unreachable during forward (UNAVAILABLE)")

    def forward(self, req):
        self._check()
        return self.inner.forward(req)

    def step(self, step, pool):
        self._check()
        return self.inner.step(step, pool)

    def hello(self):
        if self.broken:
            raise PeerUnreachable("device 1 'jetson' (10.0.0.7:50051): unreachable during hello")
        return self.inner.hello()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class BlockingExecutor:
    """The session's executor, holding every forward until `release` is set (a long request)."""

    def __init__(self, inner):
        self.inner, self.release, self.entered = inner, threading.Event(), threading.Event()

    def forward(self, req):
        self.entered.set()
        assert self.release.wait(30), "the test never released the cluster"
        return self.inner.forward(req)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


# --- chat completions --------------------------------------------------------------------------------

def test_chat_streaming_text_equals_non_streaming_greedy_text(lm):
    with serving(lm) as (server, client):
        r = client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=24)
        text = r.choices[0].message.content
        assert "Paris" in text and r.choices[0].finish_reason == "stop"
        assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == server.name
        assert abs(r.created - time.time()) < 60
        assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 24
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        chunks = list(client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0,
                                                     max_tokens=24, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 3  # token by token
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_max_tokens_stop_strings_and_seeded_sampling(lm):
    with serving(lm) as (server, client):
        def chat(**kw):
            return client.chat.completions.create(model=server.name, messages=QUESTION, **kw).choices[0]

        short = chat(temperature=0, max_completion_tokens=2)
        assert short.finish_reason == "length" and short.message.content == "The capital"
        assert chat(temperature=0, max_tokens=2).message.content == "The capital"
        cut = chat(temperature=0, max_tokens=24, stop=["Paris", "London"])
        assert cut.message.content == "The capital of France is " and cut.finish_reason == "stop"
        # a stop string of several tokens: the stream must not show its start before it is complete
        stop = "France is Paris"
        whole = chat(temperature=0, max_tokens=24, stop=stop).message.content
        chunks = client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0,
                                                max_tokens=24, stop=stop, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole == "The capital of "
        a, b = (chat(temperature=1.0, top_p=0.9, seed=7, max_tokens=6).message.content for _ in range(2))
        assert a == b  # the same seed, the same sample


class _Stream:
    """What _pieces reads of a GenerationStream: its events, its Generation, cancel()."""

    def __init__(self, events):
        self.events, self.generation, self.cancelled = events, Generation([1]), False

    def events_while(self, alive):
        return self.events(self.generation)

    def cancel(self):
        self.cancelled = True


def test_pieces_hold_back_a_partial_stop_string():
    """The engine shows 'Par' before it sees the stop string 'Paris.'; the stream must not."""

    def events(gen):
        for piece in ["The", " capital", " is", " Par", "is"]:  # then '.' completes the stop string: no event
            yield TokenEvent(0, piece)
        gen.text, gen.finish = "The capital is ", "stop"

    assert "".join(_pieces(_Stream(events), ("Paris.",))) == "The capital is "

    def no_stop(gen):
        yield from (TokenEvent(0, p) for p in ["a P", "ar", "k"])
        gen.text = "a Park"

    stream = _Stream(no_stop)
    assert list(_pieces(stream, ("Paris.",))) == ["a ", "Park"] and stream.cancelled


def test_client_that_disconnects_mid_stream_frees_the_cluster(lm):
    with serving(lm) as (server, client):
        host, port = server.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": server.name, "messages": [{"role": "user", "content": "Tell me a long story."}],
             "max_tokens": 200, "temperature": 0, "stream": True}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        assert resp.fp.readline()  # the first chunk arrived
        conn.sock.shutdown(2)
        conn.close()
        wait_until(lambda: server.engine.load["running"] == 0, timeout=30)
        r = client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=3)
        assert r.choices[0].message.content == "The capital of"


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(lm):
    assert lm.weights_format == "int4"  # the default (auto) for the Q4_1 file: batched int4 gives the lone bits
    questions = [[{"role": "user", "content": q}] for q in
                 ("What is the capital of France?", "Name a colour.", "Count to five.", "What is 2 + 2?")]
    with serving(lm) as (server, client):
        def ask(messages, stream=False):
            r = client.chat.completions.create(model=server.name, messages=messages, temperature=0, max_tokens=12,
                                               stream=stream)
            return "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content

        alone = [ask(q) for q in questions]
        steps_alone = server.engine.steps
        together: list = [None] * len(questions)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i], stream=bool(i % 2))))
                   for i in range(len(questions))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert together == alone
        assert server.engine.steps - steps_alone < steps_alone  # they shared steps


def test_client_that_gives_up_on_a_non_streaming_request_frees_its_blocks_at_once(lm):
    """Before the engine, a non-streaming client that went away kept the cluster generating for nobody."""
    with serving(lm) as (server, client):
        host, port = server.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": server.name, "messages": [{"role": "user", "content": "Tell me a very long story."}],
             "max_tokens": 400, "temperature": 0}), headers={"Content-Type": "application/json"})
        wait_until(lambda: server.engine.load["running"] == 1, timeout=30)
        t0 = time.monotonic()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_until(lambda: server.engine.load["running"] == 0, timeout=30)
        assert time.monotonic() - t0 < 5  # 400 tokens would take far longer: it was cancelled, not finished
        assert server.engine.load["kv_blocks_used"] == 0


def test_metrics_are_prometheus_text_with_latencies_and_the_engine_state(lm):
    with serving(lm) as (server, client):
        client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=4)
        host, port = server.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    for name in ("galaxy_time_to_first_token_seconds_count 1.0", "galaxy_generations_total{finish=\"length\"} 1.0",
                 "galaxy_generation_tokens_total 4.0", "galaxy_requests_running 0.0", "galaxy_kv_blocks_used 0.0",
                 "galaxy_prefix_cache_hit_rate", "galaxy_device_kv_bytes{device="):
        assert name in text, name



class GatedExecutor:
    """The session's executor, its engine steps waiting while `open` is clear (a request held running)."""

    def __init__(self, inner):
        self.inner, self.open = inner, threading.Event()
        self.open.set()

    def step(self, step, pool):
        assert self.open.wait(30), "the test never reopened the cluster"
        return self.inner.step(step, pool)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_request_predicted_to_miss_the_ttft_objective_is_503_with_retry_after_and_others_run_on(lm, monkeypatch,
                                                                                                  fixed_step_cost):
    gated = GatedExecutor(lm.session._ex)
    monkeypatch.setattr(lm.session, "_ex", gated)
    monkeypatch.setattr(lm, "_engine_config", EngineConfig(slo_ttft=0.5))
    _restart_engine(lm)
    with serving(lm) as (server, client):
        # a = 0.3 s a step: a chat prompt alone is predicted at ~0.34 s (admitted: <= 0.9 x 0.5 s), behind a
        # running stream at ~0.64 s (refused)
        server.engine.admission.cost = fixed_step_cost(0.3, 0.001)
        stream = client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=12,
                                                stream=True)
        chunks = iter(stream)
        text = ""
        while not text:
            text += next(chunks).choices[0].delta.content or ""
        gated.open.clear()  # the stream stays running while the next request is judged
        status, headers, body = request(server.address, "POST", "/v1/chat/completions",
                                        {"model": server.name, "messages": QUESTION, "max_tokens": 4})
        gated.open.set()
        text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert status == 503 and int(headers["Retry-After"]) >= 1
        err = body["error"]
        assert err["code"] == "slo_unattainable" and err["slo_ttft_s"] == 0.5 and err["predicted_ttft_s"] > 0.45
        assert err["running"] == 1 and err["retry_after_s"] == int(headers["Retry-After"])
        assert "predicted time to first token" in err["message"]
        alone = client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=12)
        assert text == alone.choices[0].message.content  # the running stream was unharmed; drained, admitted
        host, port = server.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        assert "galaxy_requests_rejected_total 1.0" in metrics
    _restart_engine(lm)


# --- embeddings, models, health ----------------------------------------------------------------------

def test_embeddings_match_model_encode(encoder):
    texts = ["hello world", "the stock market fell"]
    with serving(encoder, served_model_name="minilm") as (server, client):
        r = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes it
        e = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert e.shape == (2, 384) and [d.index for d in r.data] == [0, 1] and r.model == "minilm"
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(e, encoder.encode(texts), atol=1e-6)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(encoder.tokenizer.encode(t)) for t in texts)

        floats = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
        np.testing.assert_allclose(floats.data[0].embedding, e[0], atol=1e-6)
        ids = encoder.tokenizer.encode("hello world")
        status, _, body = request(server.address, "POST", "/v1/embeddings",
                                  {"model": "minilm", "input": ids, "encoding_format": "base64"})
        v = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        assert status == 200 and body["usage"]["prompt_tokens"] == len(ids)
        np.testing.assert_allclose(v, e[0], atol=1e-6)


def test_a_session_serves_its_loaded_model(encoder):
    assert Server(encoder.session).model is encoder
    with galaxy.connect(local=1, transport="inproc") as empty, pytest.raises(ValueError, match="load"):
        Server(empty)


def test_models_list_and_health(encoder):
    with serving(encoder, served_model_name="minilm", max_queue=3) as (server, client):
        assert [m.id for m in client.models.list().data] == ["minilm"]
        assert client.models.retrieve("minilm").owned_by == "galaxy"
        status, _, body = request(server.address, "GET", "/health")
        assert status == 200 and body["status"] == "ok" and body["devices"] == 2
        assert body["running"] == 0 and body["waiting"] == 0 and body["max_queue"] == 3
        status, headers, body = request(server.address, "HEAD", "/health")  # for load balancers
        assert status == 200 and body is None and int(headers["Content-Length"]) > 0


# --- errors ------------------------------------------------------------------------------------------

def test_bad_requests_are_400_naming_the_field(lm):
    with serving(lm) as (server, client):
        def bad(param: str, **kw):
            body = {"model": server.name, "messages": QUESTION, "max_tokens": 4, **kw}
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(**body)
            assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
            assert e.value.body["type"] == "invalid_request_error"
            return e.value.body["message"]

        assert "n=1" in bad("n", n=2)
        bad("temperature", temperature=3)
        bad("top_p", top_p=1.5)
        bad("stop", stop=["a", ""])
        bad("messages", messages=[])
        bad("messages[0].role", messages=[{"role": "wizard", "content": "hi"}])
        assert "8192" in bad("max_tokens", max_tokens=9000)
        bad("max_completion_tokens", max_completion_tokens=0)
        bad("presence_penalty", presence_penalty=0.5)
        bad("model", extra_body={"model": 5})
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="gpt-4o", messages=QUESTION)
        with pytest.raises(openai.BadRequestError, match="causal LM") as e:
            client.embeddings.create(model=server.name, input="hi")
        assert e.value.body["param"] == "model"
        for raw, code in ((b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json")):
            status, _, body = request(server.address, "POST", "/v1/chat/completions", raw=raw)
            assert status == 400 and body["error"]["code"] == code
        status, _, body = request(server.address, "POST", "/v1/embeddings", {"input": []})
        assert status == 400 and body["error"]["param"] == "input"
        # a client's extra fields are ignored, as OpenAI's `user`
        assert client.chat.completions.create(model=server.name, messages=QUESTION, max_tokens=1, temperature=0,
                                              user="alice").choices[0].finish_reason == "length"


def test_chat_on_an_encoder_is_a_clear_400(encoder):
    with serving(encoder) as (server, client), pytest.raises(openai.BadRequestError, match="encoder"):
        client.chat.completions.create(model=server.name, messages=QUESTION)


def test_http_errors_unknown_path_method_and_oversize_body(encoder):
    with serving(encoder, max_body_bytes=2000) as (server, client):
        status, _, body = request(server.address, "GET", "/v1/completions/nope")
        assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
        status, headers, body = request(server.address, "GET", "/v1/chat/completions")
        assert status == 405 and headers["Allow"] == "POST" and "accepts POST" in body["error"]["message"]
        assert request(server.address, "DELETE", "/v1/models")[0] == 405
        status, _, body = request(server.address, "POST", "/v1/embeddings", {"input": "x" * 200_000})
        assert status == 413 and "at most 2000" in body["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.embeddings.create(model=server.name, input=["y" * 5000])
        assert e.value.status_code == 413
        assert len(client.embeddings.create(model=server.name, input="still serving").data) == 1


def _restart_engine(lm) -> None:
    """The engine keeps the executor it started with: a test that swaps the executor restarts it."""
    if lm._engine is not None:
        lm._engine.close()
        lm._engine = None


def test_cluster_failure_is_503_and_the_server_recovers(lm, monkeypatch):
    flaky = FlakyExecutor(lm.session._ex)
    monkeypatch.setattr(lm.session, "_ex", flaky)
    _restart_engine(lm)
    with serving(lm) as (server, client):
        def ask(**kw):
            return client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0,
                                                  max_tokens=8, **kw)

        before = ask().choices[0].message.content
        flaky.broken = True
        status, _, health = request(server.address, "GET", "/health")
        assert status == 503 and health["status"] == "unavailable" and "PeerUnreachable" in health["error"]
        for stream in (False, True):  # a failing prefill is a 503 even for a stream
            with pytest.raises(openai.InternalServerError) as e:
                ask(stream=stream)
            assert e.value.status_code == 503 and e.value.body["code"] == "cluster_unavailable"
            assert "10.0.0.7:50051" in e.value.body["message"]

        flaky.broken, flaky.fail_after = False, 3  # a device drops out mid-stream: an error event ends it
        with pytest.raises(openai.APIError, match="failed during the stream"):
            for _ in ask(stream=True):
                pass

        flaky.broken, flaky.fail_after = False, None
        assert request(server.address, "GET", "/health")[0] == 200
        assert ask().choices[0].message.content == before
        assert server.engine.load["running"] == 0
    _restart_engine(lm)


def test_full_queue_is_429_at_once_and_waiting_times_out(encoder, monkeypatch):
    blocking = BlockingExecutor(encoder.session._ex)
    monkeypatch.setattr(encoder.session, "_ex", blocking)
    with serving(encoder, max_queue=1, queue_timeout=20) as (server, client):
        results = {}

        def embed(key):
            results[key] = request(server.address, "POST", "/v1/embeddings", {"input": key})[0]

        running = threading.Thread(target=embed, args=("first",))
        running.start()
        assert blocking.entered.wait(10)
        queued = threading.Thread(target=embed, args=("second",))
        queued.start()
        wait_until(lambda: server.gate.waiting == 1)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            client.embeddings.create(model=server.name, input="third")
        assert time.monotonic() - t0 < 2 and e.value.response.headers["Retry-After"] == "1"
        assert e.value.body["code"] == "queue_full"
        blocking.release.set()
        running.join(30)
        queued.join(30)
        assert results == {"first": 200, "second": 200}

    blocking = BlockingExecutor(blocking.inner)
    monkeypatch.setattr(encoder.session, "_ex", blocking)
    with serving(encoder, max_queue=4, queue_timeout=0.3) as (server, client):
        running = threading.Thread(target=request, args=(server.address, "POST", "/v1/embeddings", {"input": "a"}))
        running.start()
        assert blocking.entered.wait(10) and server.gate.busy
        status, headers, body = request(server.address, "POST", "/v1/embeddings", {"input": "b"})
        assert status == 503 and body["error"]["code"] == "queue_timeout" and "Retry-After" in headers
        blocking.release.set()
        running.join(30)


def test_api_key_is_checked_on_every_request(encoder):
    with serving(encoder, api_key="sekret", client_key="sekret", served_model_name="minilm") as (server, client):
        assert [m.id for m in client.models.list().data] == ["minilm"]
        with openai.OpenAI(base_url=f"http://{server.address}/v1", api_key="wrong", max_retries=0) as other:
            with pytest.raises(openai.AuthenticationError) as e:
                other.embeddings.create(model="minilm", input="hi")
        assert e.value.body["code"] == "invalid_api_key"
        assert request(server.address, "GET", "/health")[0] == 401
        assert request(server.address, "GET", "/health", headers={"Authorization": "Bearer sekret"})[0] == 200


def test_binding_beyond_loopback_without_a_key_warns(encoder, caplog):
    with Server(encoder, host="0.0.0.0", port=0):
        pass
    assert "without an API key" in caplog.text
    caplog.clear()
    with Server(encoder, host="0.0.0.0", port=0, api_key="k"):
        pass
    assert "without an API key" not in caplog.text


def test_stopping_leaves_no_threads_or_sockets(encoder):
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    server = Server(encoder).start()
    host, port = server.address.rsplit(":", 1)
    idle = http.client.HTTPConnection(host, int(port), timeout=10)  # a keep-alive connection left open
    idle.request("GET", "/v1/models")
    assert idle.getresponse().read()
    wait_until(lambda: _serve_threads().count("galaxy-serve-conn") == 1)
    server.stop()
    assert _serve_threads() == []
    idle.close()
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


# --- request mapping (pure) --------------------------------------------------------------------------

def test_parse_chat_maps_openai_fields():
    r = parse_chat({"messages": [{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                                    {"type": "text", "text": "brief"}]},
                                 {"role": "user", "content": "hi"}], "stop": "\n", "seed": 3, "user": "u"})
    assert r.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert r.sampling.temperature == 1.0 and r.sampling.seed == 3 and r.stop == ("\n",) and r.max_tokens is None
    assert parse_chat({"messages": QUESTION}, default_temperature=0.0).sampling.temperature == 0.0
    r = parse_chat({"messages": QUESTION, "temperature": 0, "top_p": 0, "max_tokens": 5, "max_completion_tokens": 9})
    assert (r.sampling.temperature, r.sampling.top_k, r.sampling.top_p, r.max_tokens) == (0.0, 1, 1.0, 9)
    for body, param in (({"tools": [{"type": "function"}]}, "tools"), ({"logprobs": True}, "logprobs"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"temperature": True}, "temperature"), ({"n": 1.5}, "n")):
        with pytest.raises(ApiError) as e:
            parse_chat({"messages": QUESTION, **body})
        assert e.value.status == 400 and e.value.param == param
    assert parse_embeddings({"input": [[1, 2], "x"]}).inputs == ((1, 2), "x")


def test_serve_subcommand_options():
    ap = argparse.ArgumentParser(prog="galaxy")
    add_serve_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["serve", "--workers", "10.0.0.2:50051,10.0.0.3:50051", "--recover", "--max-queue", "2",
                          "--api-key", "k", "--max-body", "64KiB"])
    assert args.workers == ["10.0.0.2:50051", "10.0.0.3:50051"] and args.recover and args.max_queue == 2
    assert (args.host, args.port, args.api_key, args.max_body) == ("127.0.0.1", 8000, "k", 65536)
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--local", "2", "--workers", "h:1"])
    # early rejection: off unless --slo-ttft, then the engine's objective (bench serve's --slo-ttft is a multiple)
    assert engine_config(args).slo_ttft is None
    assert engine_config(ap.parse_args(["serve", "--slo-ttft", "2.5"])).slo_ttft == 2.5
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--slo-ttft", "0"])
    # the K/V path of a phase-separated placement: the plan's, else direct (None here); bench serve takes a list
    assert args.kv_path is None and ap.parse_args(["serve", "--kv-path", "coordinator"]).kv_path == "coordinator"
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--kv-path", "pigeon"])
    assert bench_kv_paths("direct, coordinator,direct") == ("direct", "coordinator")
    with pytest.raises(argparse.ArgumentTypeError, match="a comma list of direct, coordinator"):
        bench_kv_paths("direct,pigeon")


def test_galaxy_serve_process_answers_and_stops_on_sigterm(minilm_path):
    argv = ["serve", "--model", "minilm", "--transport", "inproc", "--local", "2", "--port", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "galaxy.cli", *argv], stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in proc.stderr:
            if "galaxy serve:" in line:
                address = line.split("http://")[1].split("/v1")[0]
                break
        assert address, "the server never said where it listens"
        status, _, body = request(address, "POST", "/v1/embeddings", {"model": "minilm", "input": "hi"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_bad_request_found_while_running_is_a_400_not_a_cluster_failure():
    from galaxy.errors import InvalidRequest
    from galaxy.serving.server import _cluster_errors

    with pytest.raises(ApiError) as e, _cluster_errors():
        raise InvalidRequest("max_new_tokens=9000: the prompt's 3 tokens + 9000 new ones exceed the model's 8192")
    assert e.value.status == 400 and "max_new_tokens=9000" in e.value.message
    with pytest.raises(ApiError) as e, _cluster_errors():
        raise PeerUnreachable("device 1: gone")
    assert e.value.status == 503
