"""The dashboard in a real browser, on a real cluster: two local worker processes on loopback, the
embedded SmolLM2 split across them, `galaxy serve`'s server, and Debian's headless Chromium.

The page must fill in from live data (each device, the split, the last step, the serving numbers
-- the same as /metrics), and a worker killed while the page is open must show as down, without a
reload, within the cluster's heartbeat window. The screenshot it takes is docs/img/dashboard.png
(set GALAXY_DASHBOARD_SCREENSHOT=PATH to write it there; it always goes to the test's tmp dir).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from headless_chromium import Chromium, find_chromium  # tests/serving/headless_chromium.py

import galaxy
from galaxy.serving.server import Server

KEY = "dashboard-test-key"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser_binary():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no headless browser: the dashboard's browser test needs Debian's `chromium` package "
                    "(apt-get install chromium)")
    pytest.importorskip("websocket", reason="the browser test drives Chromium over DevTools: pip install "
                        "websocket-client")
    return binary


def _post_chat(address: str, name: str, content: str, max_tokens: int) -> dict:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        body = {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        payload = resp.read()
        assert resp.status == 200, payload
        return json.loads(payload)
    finally:
        conn.close()


def _metrics(address: str) -> dict[str, float]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+) (\S+)$", text, re.M)}  # unlabelled


def _page(c: Chromium, js: str):
    return c.evaluate(f"(() => {{ {js} }})()")


def test_dashboard_shows_the_live_cluster_and_a_killed_worker_goes_down_without_a_reload(
        browser_binary, smollm2_path, tmp_path):
    with galaxy.connect(local=2) as session:
        model = session.load(smollm2_path, decode_layout="split")
        cluster = session.executor
        window_s = cluster.heartbeat_s * cluster.heartbeat_misses  # when the cluster itself gives a device up
        server = Server(model, api_key=KEY, served_model_name="smollm2", poll_interval=0.5).start()
        try:
            # a few requests at once: a batch on the devices, a shared prompt prefix, TTFT and TPOT
            with ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda q: _post_chat(server.address, "smollm2", q, max_tokens=16),
                                        ["Name three colours.", "Name three animals.", "Name three rivers."]))
            assert all(a["choices"][0]["message"]["content"] for a in answers)
            with Chromium(browser_binary, width=1280, height=900) as c:
                # the key once in the address, then a cookie (the redirect drops the key from the bar)
                c.navigate(f"http://{server.address}/dashboard?key={KEY}")
                assert c.evaluate("location.pathname + location.search") == "/dashboard"
                # live data: two refreshes, both devices up, the link measured, the step drawn
                c.wait_for("+document.body.dataset.updates >= 2 && document.body.dataset.live === 'true' && "
                           "document.querySelectorAll('.device[data-state=up]').length === 2 && "
                           "document.getElementById('timeline').dataset.step !== '' && "
                           "[...document.querySelectorAll('.device')].every(d => d.textContent.includes('→ rank'))",
                           timeout=20)

                # each device: its name, address, CPU share, memory, link, up
                cards = _page(c, "return [...document.querySelectorAll('.device')].map(d => ({rank: +d.dataset.rank, "
                              "name: d.dataset.name, state: d.dataset.state, text: d.textContent}))")
                infos = session.devices()
                assert [d["rank"] for d in cards] == [0, 1]
                for card, info in zip(cards, infos):
                    assert card["name"] == info.name and card["state"] == "up"
                    for label in (info.address, "CPU share", "memory", "KV cache", "→ rank"):
                        assert label in card["text"], (label, card["text"])

                # the split: strategy, reason, and each device's share of heads, MLP columns, vocab rows
                part = model.partition
                assert c.evaluate("document.getElementById('plan').dataset.strategy") == part.strategy.value
                assert c.evaluate("document.getElementById('plan-reason').textContent").strip()
                for dim, counts in (("heads", part.heads), ("cols", part.cols), ("vocab", part.vocab)):
                    shown = _page(c, f"return [...document.querySelectorAll('#plan-svg rect[data-dim={dim}]')]"
                                  ".map(r => +r.dataset.rank)")
                    assert sorted(shown) == [r for r in range(part.world) if counts[r] > 0], dim
                table = _page(c, "return [...document.querySelectorAll('#plan-table tr[data-rank]')]"
                              ".map(tr => [...tr.cells].slice(1, 4).map(td => +td.textContent))")
                assert table == [[part.heads[r], part.cols[r], part.vocab[r]] for r in range(part.world)]

                # the last step, per device and layer
                layers = _page(c, "return [...document.querySelectorAll('.tl-device')].map(g => +g.dataset.layers)")
                assert len(layers) == 2 and all(n >= model.config.n_layers for n in layers), layers

                # the serving numbers are /metrics' numbers
                m = _metrics(server.address)
                kv_text = c.evaluate("document.querySelector('[data-metric=kv_blocks_used] .value').textContent")
                assert kv_text.endswith(f"of {int(m['galaxy_kv_blocks'])}"), kv_text
                assert {"requests", "ttft", "tpot", "tokens_per_s", "kv_blocks_used", "prefix_hit_rate"} <= set(
                    _page(c, "return [...document.querySelectorAll('.metric')].map(e => e.dataset.metric)"))
                c.wait_for("document.querySelector('[data-metric=ttft] .value').textContent !== '-'", timeout=10)

                shot = c.screenshot(tmp_path / "dashboard.png")
                data = shot.read_bytes()
                assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a drawn page, not a blank one
                if os.environ.get("GALAXY_DASHBOARD_SCREENSHOT"):
                    shutil.copyfile(shot, os.environ["GALAXY_DASHBOARD_SCREENSHOT"])

                # kill a worker: down on the open page (no reload) within the heartbeat window
                c.evaluate("window.__sameDocument = true")
                session._owned.procs[1].kill()
                killed = time.monotonic()
                c.wait_for("document.querySelector('.device[data-rank=\"1\"]').dataset.state === 'down'",
                           timeout=window_s, poll=0.05)
                shown_after = time.monotonic() - killed
                assert c.evaluate("window.__sameDocument === true"), "the page was reloaded"
                assert c.evaluate("document.querySelector('.device[data-rank=\"0\"]').dataset.state") == "up"
                assert "1 of 2 devices up" in c.evaluate("document.getElementById('summary').textContent")
                assert shown_after <= window_s
        finally:
            server.stop()
