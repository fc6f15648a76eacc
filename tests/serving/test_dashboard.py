"""The dashboard without a browser: its views (dashboard.py), its device monitor (monitor.py) and its
routes and authentication (dashboard_http.py), on an in-process tiny model. The browser and a real
cluster are test_dashboard_browser.py's."""

from __future__ import annotations

import http.client
import json
import logging
import threading

import pytest

import galaxy
from galaxy.errors import PeerUnreachable
from galaxy.model.config import preset
from galaxy.parallel.executor import DeviceInfo
from galaxy.parallel.sharding import Strategy, even_partition, weighted_partition
from galaxy.serving.dashboard import DeviceStatus, History, devices_view, plan_file_view, plan_view
from galaxy.serving.dashboard_http import COOKIE
from galaxy.serving.monitor import Monitor
from galaxy.serving.server import Server
from planner.plan import DevicePlan, DeviceTiming, ModelRef, Plan, StrategyResult

KEY = "k-123"


def _info(name: str, address: str, rss: int = 100) -> DeviceInfo:
    return DeviceInfo(address, name, 4, 2, "cpu", 8 << 30, 4 << 30, 1 << 30, "loaded", rss, 0, 2.0, "h", 4)


def get(address: str, path: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body bytes) of one request."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tiny():
    with galaxy.connect(local=2, transport="inproc") as session:
        model = session.load(random_init="tiny-llama", strategy="galaxy")
        model.generate([1, 2, 3, 4, 5], max_new_tokens=3)  # the engine has run steps
        yield model


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    assert [t.name for t in threading.enumerate() if t.name.startswith("galaxy-serve")] == []


# --- the views ----------------------------------------------------------------------------------------

def test_history_turns_counters_into_rates_between_samples():
    h = History(size=3)
    engine = {"running": 1, "waiting": 2, "kv_blocks_used": 3, "kv_blocks": 10, "prefix_hit_rate": 0.5,
              "preemptions": 0, "generated_tokens": 100, "steps": 40}
    first = h.add(10.0, engine, {"ttft_sum": 1.0, "ttft_count": 2, "tpot_sum": 0.0, "tpot_count": 0})
    assert first["tokens_per_s"] is None and first["ttft_s"] is None  # a rate needs two samples
    second = h.add(12.0, {**engine, "generated_tokens": 130, "steps": 50},
                   {"ttft_sum": 1.9, "ttft_count": 5, "tpot_sum": 0.0, "tpot_count": 0})
    assert second["tokens_per_s"] == pytest.approx(15.0) and second["steps_per_s"] == pytest.approx(5.0)
    assert second["ttft_s"] == pytest.approx(0.3)  # the 3 requests that finished in between: 0.9 s / 3
    assert second["tpot_s"] is None  # none finished with a TPOT
    assert (second["running"], second["waiting"], second["prefix_hit_rate"]) == (1, 2, 0.5)
    h.add(13.0, engine, {})
    h.add(14.0, engine, {})
    assert [s["t"] for s in h.view(1.0)["samples"]] == [12.0, 13.0, 14.0]  # the last `size`


def test_history_refuses_a_size_that_holds_no_rate():
    with pytest.raises(ValueError, match="size=1"):
        History(1)


def test_a_down_device_keeps_what_it_last_reported_and_says_why():
    up = DeviceStatus(0, True, _info("a", "h:1"), "", 100.0, 100.0)
    down = DeviceStatus(1, False, _info("b", "h:2"), "PeerUnreachable: refused", 105.0, 95.0)
    rows = devices_view(["device 0", "device 1"], [up, down], now=105.0)
    assert [r["state"] for r in rows] == ["up", "down"]
    assert rows[1]["name"] == "b" and rows[1]["address"] == "h:2" and "refused" in rows[1]["error"]
    assert rows[1]["last_seen_s"] == pytest.approx(10.0)
    assert rows[0]["memory"]["limit"] == 1 << 30  # the budget, when the worker has one


def test_devices_of_an_inprocess_executor_are_local_and_kv_use_follows_the_blocks():
    engine = {"kv_blocks": 100, "kv_blocks_used": 25, "kv_bytes": {"d0": 4000, "d1": 2000}}
    rows = devices_view(["d0", "d1"], [], engine=engine)
    assert [r["state"] for r in rows] == ["local", "local"]
    assert [r["kv"]["used_bytes"] for r in rows] == [1000, 500]


def test_plan_view_covers_every_head_column_and_row_once():
    cfg = preset("tiny-llama")
    part = weighted_partition(cfg, [2.0, 1.0, 1.0])
    view = plan_view(part, cfg, names=["a", "b", "c"])
    assert view["strategy"] == "galaxy" and "uneven" in view["reason"]
    for dim, total in (("heads", cfg.n_heads), ("cols", cfg.ffn), ("vocab", cfg.vocab_size)):
        ranges = [d[dim] for d in view["devices"]]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (dim, ranges)
    assert view["devices"][0]["share"]["tokens"] == [0.0, pytest.approx(0.5)]


def _plan(cfg, strategy: str = "galaxy") -> Plan:
    heads, cols, vocab, tokens = (4, 2), (50, 26), (70, 39), (6, 2)
    devices = tuple(DevicePlan(f"d{i}", f"10.0.0.{i}:50051", heads[i], cols[i], vocab[i], tokens[i], cfg.n_layers,
                               predicted=DeviceTiming(0.002, 0.001)) for i in range(2))
    return Plan(strategy, devices, seq_len=8, model=ModelRef.of(cfg), latency_s=0.01,
                strategies=(StrategyResult("galaxy", 0.01, "fastest"), StrategyResult("megatron", 0.02, "slower")),
                reason="galaxy: 2x faster than megatron")


def test_a_plan_file_is_drawn_as_the_partition_it_becomes():
    cfg = preset("tiny-llama")
    plan = _plan(cfg)
    from_file = plan_file_view(plan, ["d0", "d1"])
    loaded = plan_view(plan.to_partition(cfg), cfg, plan, ["d0", "d1"])
    for a, b in zip(from_file["devices"], loaded["devices"]):
        assert {k: a[k] for k in ("heads", "cols", "vocab", "layers")} == {k: b[k] for k in ("heads", "cols",
                                                                                         "vocab", "layers")}
        assert a["share"] == pytest.approx(b["share"])
    assert from_file["reason"] == plan.reason and [s["chosen"] for s in from_file["strategies"]] == [True, False]


# --- the monitor ----------------------------------------------------------------------------------------

class _Devices:
    """An executor whose device 1 stops answering when `dead` is set."""

    names, world = ["device 0", "device 1"], 2

    def __init__(self):
        self.dead = False

    def hello_each(self, timeout):
        return [_info("a", "h:1"), PeerUnreachable("device 1: refused") if self.dead else _info("b", "h:2")]


def test_the_monitor_marks_a_device_down_once_it_stops_answering(caplog):
    ex = _Devices()
    mon = Monitor(ex, measure_links=False)
    assert [s.up for s in mon.poll()] == [True, True]
    ex.dead = True
    with caplog.at_level(logging.WARNING, logger="galaxy.serving.monitor"):
        statuses = mon.poll()
        mon.poll()
    assert [s.up for s in statuses] == [True, False]
    assert statuses[1].info.name == "b" and "refused" in statuses[1].error
    assert len([r for r in caplog.records if "is down" in r.getMessage()]) == 1  # said once, not every poll


def test_monitor_settings_are_checked():
    with pytest.raises(ValueError, match="poll_s=0"):
        Monitor(_Devices(), poll_s=0)
    with pytest.raises(ValueError, match="history_s=1"):
        Monitor(_Devices(), history_s=1, sample_s=1)


# --- HTTP: routes, the key, read-only ---------------------------------------------------------------------

def test_the_dashboard_needs_the_api_key_and_its_cookie_opens_nothing_else(tiny):
    with Server(tiny, api_key=KEY).start() as server:
        a = server.address
        status, _, body = get(a, "/dashboard")
        assert status == 401 and b"API key" in body  # the sign-in form
        assert get(a, "/dashboard/state.json")[0] == 401
        assert get(a, "/dashboard?key=wrong")[0] == 401
        status, headers, _ = get(a, f"/dashboard?key={KEY}")
        assert status == 303 and headers["Location"] == "/dashboard"  # the key leaves the address bar
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert cookie.startswith(f"{COOKIE}=") and KEY not in cookie and "HttpOnly" in headers["Set-Cookie"]
        status, headers, body = get(a, "/dashboard", {"Cookie": cookie})
        assert status == 200 and b"dashboard.js" in body and "default-src 'self'" in headers["Content-Security-Policy"]
        assert get(a, "/dashboard/static/dashboard.js", {"Cookie": cookie})[0] == 200
        assert get(a, "/dashboard/state.json", {"Authorization": f"Bearer {KEY}"})[0] == 200
        assert get(a, "/v1/models", {"Cookie": cookie})[0] == 401  # the cookie is not the key
        assert get(a, "/dashboard/state.json", {"Cookie": cookie}, method="POST")[0] == 405  # read-only
        assert get(a, "/dashboard/static/../server.py", {"Cookie": cookie})[0] == 404


def test_the_dashboard_json_matches_the_engine_and_metrics(tiny):
    with Server(tiny).start() as server:
        state = json.loads(get(server.address, "/dashboard/state.json")[2])
        timeline = json.loads(get(server.address, "/dashboard/timeline.json")[2])
        history = json.loads(get(server.address, "/dashboard/history.json")[2])
        metrics = get(server.address, "/metrics")[2].decode()
    load = tiny.engine.load
    assert [d["state"] for d in state["devices"]] == ["local", "local"]
    assert state["plan"]["strategy"] == "galaxy" and [d["heads"] for d in state["plan"]["devices"]] == [[0, 3], [3, 6]]
    assert state["engine"]["steps"] == load["steps"] and f"galaxy_engine_steps_total {load['steps']}.0" in metrics
    assert f"galaxy_kv_blocks {load['kv_blocks']}.0" in metrics and state["engine"]["kv_blocks"] == load["kv_blocks"]
    assert timeline["step"] == load["steps"] and len(timeline["devices"]) == 2
    assert history["samples"] and history["samples"][0]["kv_blocks"] == load["kv_blocks"]


def test_a_dashboard_only_server_serves_no_api(tiny):
    session = tiny.session
    with Server(session, api=False, dashboard=True).start() as server:
        assert get(server.address, "/v1/models")[0] == 404
        assert get(server.address, "/dashboard")[0] == 200
        state = json.loads(get(server.address, "/dashboard/state.json")[2])
    assert state["api"] is False and state["engine"] is None and len(state["devices"]) == 2


def test_no_dashboard_means_no_route_and_no_polling(tiny):
    with Server(tiny, dashboard=False).start() as server:
        assert get(server.address, "/dashboard")[0] == 404
        assert not [t for t in threading.enumerate() if t.name.startswith("galaxy-serve-monitor")]


def test_strategy_names_in_the_plan_view_are_the_cli_names():
    cfg = preset("tiny-llama")
    for s in Strategy:
        assert plan_view(even_partition(cfg, 2, s), cfg)["strategy"] == s.value
