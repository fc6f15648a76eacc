"""A real emulated LAN (root only): namespaces, tbf links, cgroups, workers; inference; no leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from devices import layout as L
from devices import system as S
from devices.check import check_running
from devices.emulate import cluster_endpoints, down, emulated, find_stale, read_state, set_link_rate, status, up
from devices.spec import load_cluster
from galaxy.errors import GalaxyError
from galaxy.transport.client import Cluster

NOT_ROOT = S.why_not_root()
needs_root = pytest.mark.skipif(NOT_ROOT is not None, reason=f"emulated LAN needs root: {NOT_ROOT}")
TOL = 1e-4


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("GALAXY_STATE_DIR", str(d))
    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path / "cache"))  # the workers' shard caches, not $HOME
    return d


def cluster_file(tmp_path, name, devices, **top) -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "devices": devices, **top}))
    return str(p)


def leftovers(name: str, pids=()) -> list[str]:
    """Everything of cluster `name` still on the machine: namespaces, links, qdiscs, cgroups, processes."""
    out = [S.describe(r) for r in find_stale(name)]
    tag = L.cluster_tag(name)
    out += [line for line in S.run(["tc", "qdisc", "show"]).stdout.splitlines() if f"dev {tag}" in line]
    out += [f"process {p}" for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    return out


def source_and_request():
    from galaxy.model.checkpoints.random import RandomWeights
    from galaxy.model.config import preset
    from galaxy.model.defaults import DefaultModelMissing
    from galaxy.runtime.sources import make_request, open_source

    try:
        src = open_source(None)
    except DefaultModelMissing:
        src = RandomWeights(preset("tiny-llama"), seed=3)
    return src, make_request(src, seq_len=None if src.tokenizer() else 12)[0]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@needs_root
def test_three_device_lan_runs_real_inference_and_leaves_nothing(tmp_path):
    from galaxy.parallel.executor import LoadOptions
    from galaxy.parallel.sharding import even_partition, weighted_partition
    from galaxy.runtime.sources import reference_output
    from galaxy.transport.client import model_ref

    path = cluster_file(tmp_path, "gxt-e2e", [
        {"name": "fast", "cpu": 0.9, "memory": "640MiB", "link": "100mbit", "latency_ms": 1},
        {"name": "mid", "cpu": 0.6, "memory": "640MiB", "link": "1gbit"},
        {"name": "slow", "cpu": 0.4, "memory": "640MiB", "link": "ethernet-1g"},
    ])
    spec = load_cluster(path)
    src, req = source_and_request()
    with emulated(spec) as ec:
        pids = [d["pid"] for d in ec.devices]
        assert ec.mode == "emulated" and len(ec.addresses) == 3
        for d in ec.devices:  # each worker runs inside its own namespace and cgroups
            assert S.run(["ip", "netns", "identify", str(d["pid"])]).stdout.strip() == d["netns"]
            assert open(f"/proc/{d['pid']}/cgroup").read().count(d["cgroup"]) >= 2  # cpu and memory
        addrs, token = cluster_endpoints(path)  # what `galaxy run --cluster FILE` uses
        assert addrs == ec.addresses and token == ec.token
        with Cluster(addrs, token=token) as c:
            assert [i.name for i in c.hello()] == ["fast", "mid", "slow"]
            # memory reserved for this request's length: at the default 512 tokens a reply of every
            # token's logits (114 MiB on 'fast', which holds half the vocabulary) no longer fits its budget
            c.load_ref(model_ref(src), weighted_partition(src.config, spec.weights()),
                       LoadOptions(seq_len=max(64, int(req.ids.shape[0]))))
            out = c.forward(req).output
        err = float((out.float() - reference_output(src, req)).abs().max())
        assert err <= TOL
        with pytest.raises(GalaxyError, match="UNAUTHENTICATED|token"):
            Cluster(addrs[:1], token="wrong").hello()
        if src.tokenizer() is not None:  # the real 513 MiB model: no single 640 MiB device can take it
            with Cluster(addrs[:1], token=token) as c, pytest.raises(GalaxyError, match="memory budget"):
                c.load_ref(model_ref(src), even_partition(src.config, 1))

        def shaped() -> list[str]:  # each device's rate, as tc reports it on both ends of its link
            return [" ".join(w for line in (S.run(["tc", "qdisc", "show", "dev", d["host_link"]]).stdout,
                                            S.run(["tc", "-n", d["netns"], "qdisc", "show", "dev", L.NS_IFACE]).stdout)
                             for w in line.split() if w.endswith("bit")) for d in ec.devices]

        before = set_link_rate(spec.name, 5e7)  # a bandwidth sweep re-shapes the running links ...
        assert shaped() == ["50Mbit 50Mbit"] * 3
        set_link_rate(spec.name, before)  # ... and puts back what each device had
        assert shaped() == ["100Mbit 100Mbit", "1Gbit 1Gbit", "1Gbit 1Gbit"]
    assert leftovers("gxt-e2e", pids) == []
    assert read_state("gxt-e2e") is None


@needs_root
def test_interrupted_up_cleans_up_after_itself(tmp_path, state_dir):
    path = cluster_file(tmp_path, "gxt-int", [{"name": "a", "cpu": 0.9, "link": "1gbit"},
                                              {"name": "b", "cpu": 0.9, "link": "1gbit"}])
    env = {**os.environ, "GALAXY_STATE_DIR": str(state_dir)}
    # a suite started in the background runs with SIGINT ignored and `devices up` would inherit that: it
    # never saw the Ctrl-C and came up whole (exit 0); give it the disposition a terminal's Ctrl-C reaches
    proc = subprocess.Popen([sys.executable, "-m", "devices", "up", path], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        state = wait_for(lambda: (read_state("gxt-int") or {}).get("objects") and
                         [o for o in read_state("gxt-int")["objects"] if o["kind"] == "process"] and
                         read_state("gxt-int"), 60, "workers to be started")
        pids = [o["pid"] for o in state["objects"] if o["kind"] == "process"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C while the workers start
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "failed: removing what was made" in err
    assert leftovers("gxt-int", pids) == [] and read_state("gxt-int") is None


@needs_root
def test_up_after_a_crash_removes_stale_objects_then_links_are_shaped(tmp_path, state_dir):
    path = cluster_file(tmp_path, "gxt-crash", [{"name": "a", "cpu": 0.9, "link": "100mbit"},
                                                {"name": "b", "cpu": 0.9, "link": "1gbit"}])
    env = {**os.environ, "GALAXY_STATE_DIR": str(state_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "devices", "up", path], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(o["kind"] == "cgroup" for o in (read_state("gxt-crash") or {}).get("objects", [])),
                 60, "cgroups to be made")
        proc.kill()  # a crash: no cleanup at all
        proc.wait(timeout=10)
    finally:
        proc.kill()
    stale = read_state("gxt-crash")
    assert find_stale("gxt-crash"), "the crash should have left objects behind"
    spec = load_cluster(path)
    ec = up(spec, detached=False)
    pids = [o["pid"] for o in stale["objects"] if o["kind"] == "process"] + [d["pid"] for d in ec.devices]
    try:
        assert [c["state"] for c in status("gxt-crash")] == ["up"]
        rep = check_running(read_state("gxt-crash")["devices"], seconds=1.5, cpu=False)
        link = rep["links"][0]
        assert link["configured_bps"] == 100e6 and link["ok"], json.dumps(rep)
    finally:
        down(path)
    assert leftovers("gxt-crash", pids) == [] and read_state("gxt-crash") is None


def test_loopback_fallback_is_explicit_and_cleans_up(tmp_path):
    """What runs without root (forced here): plain loopback workers, said so, found via the state file."""
    path = cluster_file(tmp_path, "gxt-loop", [{"name": "a", "cpu": 0.5, "link": "1gbit", "latency_ms": 2},
                                               {"name": "b", "cpu": 0.5, "link": "1gbit"}])
    spec = load_cluster(path)
    ec = up(spec, loopback=True, detached=False)
    pids = [d["pid"] for d in ec.devices]
    try:
        assert ec.mode == "loopback" and any("NOT EMULATED" in n for n in ec.notes)
        assert all(a.startswith("127.0.0.1:") for a in ec.addresses)
        addrs, token = cluster_endpoints(path)
        with Cluster(addrs, token=token) as c:
            assert [i.name for i in c.hello()] == ["a", "b"]
        assert up(spec, loopback=True).reused  # a second `up` finds it running
    finally:
        down(path)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    with pytest.raises(GalaxyError, match="not up"):
        cluster_endpoints(path)


@needs_root
def test_workers_are_discovered_and_receive_their_shards_over_the_lan(tmp_path, monkeypatch, minilm_path):
    """No addresses typed, no model file read by any worker: `galaxy run --discover` on the LAN."""
    import torch

    import galaxy
    from galaxy.model.checkpoints import open_checkpoint
    from galaxy.parallel.sharding import full_spec, load_shard
    from galaxy.transport.discovery import discovered_addresses

    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path / "cache"))  # the workers' shard caches
    path = cluster_file(tmp_path, "gxt-disc", [
        {"name": n, "cpu": 0.6, "memory": "1GiB", "link": "1gbit"} for n in ("d0", "d1", "d2")])
    with emulated(load_cluster(path)) as ec:
        found = discovered_addresses("gxt-disc", timeout_s=5.0, expect=3, token=ec.token)
        assert found == ec.addresses
        src = open_checkpoint(minilm_path)
        ids = src.tokenizer().encode("found on the LAN")
        with galaxy.connect(found, token=ec.token) as session:
            enc = session.load(src, weights=[3, 2, 1])  # streamed: remote devices need no file
            out = enc.forward(ids)
        want = load_shard(src, full_spec(src.config))(torch.tensor(ids))
        assert float((out - want).abs().max()) <= TOL
        shards = sorted((tmp_path / "cache" / "shards").glob("*/*.safetensors"))
        assert [p.parent.name for p in shards] == ["d0", "d1", "d2"]  # one pushed shard per device
    assert leftovers("gxt-disc") == []
