"""`galaxy dashboard`: the page of a cluster and a plan file, without a model and without the API."""

from __future__ import annotations

import http.client
import json
import re
import selectors
import signal
import subprocess
import sys
import time

from galaxy.model.config import preset
from planner.plan import DevicePlan, ModelRef, Plan

KEY = "cli-key"


def _address_from_stderr(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen, deadline = "", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = re.search(r"at http://([0-9.]+:[0-9]+)/dashboard", seen)
            if m:
                return m.group(1)
            if proc.poll() is not None:
                break
            if sel.select(timeout=1.0):
                seen += proc.stderr.readline().decode(errors="replace")
        raise AssertionError(f"galaxy dashboard printed no address; stderr: {seen!r}")
    finally:
        sel.close()


def _get(address: str, path: str) -> tuple[int, dict]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_galaxy_dashboard_shows_the_devices_and_the_plan_file_then_stops_on_sigterm(tmp_path):
    cfg = preset("tiny-llama")
    plan = Plan("local", (DevicePlan("here", "127.0.0.1:50999", cfg.n_heads, cfg.ffn, cfg.vocab_size, 8,
                                     cfg.n_layers),), seq_len=8, model=ModelRef.of(cfg),
                reason="one device: nothing to split")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    proc = subprocess.Popen([sys.executable, "-m", "galaxy.cli", "dashboard", "--local", "1", "--plan", str(plan_file),
                             "--port", "0", "--api-key", KEY, "--no-link-test"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        address = _address_from_stderr(proc)
        status, state = _get(address, "/dashboard/state.json")
        assert status == 200
        assert state["api"] is False and state["model"] is None and state["engine"] is None
        assert [d["state"] for d in state["devices"]] == ["up"] and state["devices"][0]["name"] == "local0"
        assert state["plan"]["strategy"] == "local" and state["plan"]["reason"] == "one device: nothing to split"
        assert state["plan"]["devices"][0]["heads"] == [0, cfg.n_heads]
        assert _get(address, "/v1/models")[0] == 404  # no API here
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "galaxy dashboard: stopped" in err.decode()
