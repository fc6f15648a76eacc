"""LAN discovery: the datagram, where announcements go, discovery on loopback, and (as root) across
two network namespaces on a bridge. Loopback tests send only to 127.255.255.255."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.errors import PeerUnreachable, PlanMismatch
from galaxy.transport.discovery import (
    MAX_DATAGRAM,
    Announcement,
    Announcer,
    BadDatagram,
    DiscoveryError,
    Found,
    Iface,
    Listener,
    decode,
    devices_ls,
    discover,
    discovered_addresses,
    discovery_key,
    encode,
    format_table,
    plan_routes,
    start_announcer,
)

FAST = 0.05  # announcement interval in these tests (s)
ANN = Announcement("lab", "nano", "10.0.0.5:50051", tls=True, token_required=True, interval_s=1.0,
                   sent_at=time.time(), instance=b"12345678")


@pytest.fixture
def port() -> int:
    """A UDP port free on loopback's broadcast address (every socket here uses SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.255.255.255", 0))
        return s.getsockname()[1]


def loopback_announcer(name: str, grpc_port: int, port: int, cluster: str = "lab", **kw) -> Announcer:
    a = Announcer(name, f"127.0.0.1:{grpc_port}", cluster, interval_s=FAST, port=port, **kw)
    assert a.destinations == [("127.255.255.255", port)]
    return a


def assert_loopback_only(*announcers: Announcer) -> None:
    for a in announcers:
        assert a.sent, f"{a.name} sent nothing"
        assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in a.sent), a.sent


def send_raw(data: bytes, port: int, source: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.bind((source, 0))
        s.sendto(data, ("127.255.255.255", port))


# -- the datagram ------------------------------------------------------------------------------
def test_datagram_round_trip_carries_no_secret():
    key = discovery_key("s3cret-token", "lab")
    data = encode(ANN, key)
    assert len(data) <= MAX_DATAGRAM
    assert b"s3cret-token" not in data and key not in data
    got = decode(data, key)
    assert (got.cluster, got.name, got.address, got.tls, got.token_required) == ("lab", "nano", "10.0.0.5:50051",
                                                                                  True, True)
    assert got.signed and got.verified and got.instance == b"12345678"
    assert decode(data).signed and not decode(data).verified  # without the token: accepted, unverified
    with pytest.raises(BadDatagram, match="signature"):
        decode(data, discovery_key("another-token", "lab"))
    with pytest.raises(BadDatagram, match="signature"):  # the same token keys another cluster differently
        decode(data, discovery_key("s3cret-token", "lab2"))
    with pytest.raises(BadDatagram, match="unsigned"):
        decode(encode(ANN), key)


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:4] + b"\x02" + d[5:], "version"),
    (lambda d: d[:5] + b"\x80" + d[6:], "flags"),
    (lambda d: d[:20], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"x", "trailing"),
    (lambda d: d + b"\0" * MAX_DATAGRAM, "oversize"),
])
def test_malformed_datagrams_are_refused(mutate, reason):
    with pytest.raises(BadDatagram) as e:
        decode(mutate(encode(ANN)))
    assert e.value.reason == reason


@pytest.mark.parametrize("field, value", [("name", "evil\x1b[2J"), ("name", "x" * 65), ("cluster", ""),
                                          ("address", "example.com:80"), ("address", "10.0.0.5:0"),
                                          ("address", "10.0.0.5")])
def test_fields_are_validated_both_ways(field, value):
    bad = Announcement(**{**ANN.__dict__, field: value})
    with pytest.raises(BadDatagram):
        encode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_DATAGRAM + 40))
def test_decode_of_random_bytes_only_raises_bad_datagram(data):
    try:
        decode(data, discovery_key("t", "lab"))
    except BadDatagram:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(1, 255))
def test_a_flipped_byte_never_verifies(pos, xor):
    key = discovery_key("t", "lab")
    data = bytearray(encode(ANN, key))
    data[pos % len(data)] ^= xor
    with pytest.raises(BadDatagram):
        decode(bytes(data), key)


# -- where announcements go --------------------------------------------------------------------
TABLE = [Iface("lo", "127.0.0.1", 8, loopback=True), Iface("eth0", "192.168.1.20", 24),
         Iface("wlan0", "10.1.0.7", 16), Iface("tun0", "10.9.0.2", 32), Iface("eth1", "172.16.0.3", 24, up=False)]


def test_routes_follow_the_listen_address():
    (r,) = plan_routes("127.0.0.1:50051", None, TABLE)
    assert (r.interface, r.source, r.broadcast, r.address) == ("lo", "127.0.0.1", "127.255.255.255", "127.0.0.1:50051")
    (r,) = plan_routes("127.0.0.2:7", None, TABLE)  # any 127.x is on loopback
    assert (r.interface, r.source, r.broadcast) == ("lo", "127.0.0.2", "127.255.255.255")
    (r,) = plan_routes("192.168.1.20:50051", None, TABLE)
    assert (r.interface, r.broadcast, r.address) == ("eth0", "192.168.1.255", "192.168.1.20:50051")
    # all interfaces: every up, broadcast-capable, non-loopback one, each naming its own address
    wild = plan_routes("0.0.0.0:50051", None, TABLE)
    assert [(r.interface, r.broadcast, r.address) for r in wild] == [
        ("eth0", "192.168.1.255", "192.168.1.20:50051"), ("wlan0", "10.1.255.255", "10.1.0.7:50051")]
    assert [r.interface for r in plan_routes("[::]:50051", ["wlan0"], TABLE)] == ["wlan0"]
    assert [r.interface for r in plan_routes("0.0.0.0:1", None, TABLE[:1])] == ["lo"]  # nothing else


@pytest.mark.parametrize("address, interfaces, match", [
    ("192.168.9.9:50051", None, "not an address of this device"),
    ("10.9.0.2:50051", None, "no broadcast address"),
    ("172.16.0.3:50051", None, "down"),
    ("192.168.1.20:50051", ["wlan0"], "listens on 192.168.1.20 only"),
    ("0.0.0.0:50051", ["eth9"], "no interface or local IPv4 address 'eth9'"),
    ("[fd00::2]:50051", None, "IPv4"),
    ("0.0.0.0:0", None, "bound port"),
])
def test_routes_refuse_what_they_cannot_confine(address, interfaces, match):
    with pytest.raises(DiscoveryError, match=match):
        plan_routes(address, interfaces, TABLE)


# -- loopback ----------------------------------------------------------------------------------
def test_three_workers_are_found_in_name_order(port):
    names = {"tx2": 50061, "nano": 50062, "xavier": 50063}
    anns = [loopback_announcer(n, p, port, token="tok", tls=n == "tx2") for n, p in names.items()]
    try:
        for a in anns:
            a.start()
        found = discover("lab", timeout_s=0.4, port=port, bind="127.0.0.1", token="tok")
    finally:
        for a in anns:
            a.stop()
    assert [f.name for f in found] == ["nano", "tx2", "xavier"]
    assert [f.address for f in found] == ["127.0.0.1:50062", "127.0.0.1:50061", "127.0.0.1:50063"]
    assert all(f.cluster == "lab" and f.token_required and f.verified for f in found)
    assert [f.tls for f in found] == [False, True, False]
    assert_loopback_only(*anns)


def test_other_clusters_are_ignored(port):
    anns = [loopback_announcer("a", 1, port), loopback_announcer("b", 2, port, cluster="lab2"),
            loopback_announcer("c", 3, port, cluster="other")]
    with Listener("lab", port=port, bind="lo") as listener:
        for a in anns:
            a.start()
        found = listener.wait(0.4)
        for a in anns:
            a.stop()
    assert [f.name for f in found] == ["a"]
    assert listener.other_clusters == {"lab2", "other"} and "lab2" in listener.diagnosis()
    assert_loopback_only(*anns)


def test_forged_and_malformed_datagrams_are_ignored(port):
    rng = random.Random(0)
    good = loopback_announcer("real", 50070, port, token="tok")
    forged = Announcement("lab", "fake", "127.0.0.1:50099", False, True, FAST, time.time(), b"f" * 8)
    junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))) for _ in range(50)]
    junk += [b"", b"GXDA", b"XXXX" + encode(forged)[4:], encode(forged) + b"\0" * MAX_DATAGRAM,
             encode(forged),  # unsigned, but the listener knows the cluster's token
             encode(forged, discovery_key("wrong-token", "lab")),
             encode(Announcement(**{**forged.__dict__, "sent_at": time.time() - 3600}), discovery_key("tok", "lab")),
             encode(Announcement(**{**forged.__dict__, "address": "127.0.0.9:50099"}), discovery_key("tok", "lab"))]
    with Listener("lab", token="tok", port=port, bind="127.0.0.1") as listener:
        for data in junk:
            send_raw(data, port)
        with good:
            found = listener.wait(1.0, expect=1)
        assert listener.alive
    assert [(f.name, f.address, f.verified) for f in found] == [("real", "127.0.0.1:50070", True)]
    bad = listener.rejected
    assert bad["unsigned"] == 1 and bad["signature"] == 1 and bad["stale"] == 1 and bad["source"] == 1
    assert bad["oversize"] == 1 + sum(len(j) > MAX_DATAGRAM for j in junk[:50])
    assert sum(bad.values()) == len(junk)
    assert "same --token" in listener.diagnosis()
    assert_loopback_only(good)


def test_announcer_stops_cleanly_and_says_goodbye(port):
    a = loopback_announcer("leaving", 50080, port)
    with Listener("lab", port=port, bind="127.0.0.1") as listener:
        a.start()
        assert a.running and [f.name for f in listener.wait(0.5, expect=1)] == ["leaving"]
        t0 = time.monotonic()
        a.stop()
        assert time.monotonic() - t0 < 1.0 and not a.running and not a._socks
        deadline = time.monotonic() + 1.0
        while listener.workers() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.workers() == []  # the goodbye removed it before it expired
        sent = sum(a.sent.values())
        time.sleep(3 * FAST)
        assert sum(a.sent.values()) == sent  # nothing after stop
    a.stop()  # idempotent
    assert not any(t.name.startswith("galaxy-announce-leaving") for t in threading.enumerate())
    assert_loopback_only(a)


def test_silent_workers_expire_from_the_live_view(port):
    with Listener("lab", port=port, bind="127.0.0.1") as listener:
        ann = Announcement("lab", "ghost", "127.0.0.1:50090", False, False, 0.3, time.time(), b"g" * 8)
        assert listener.handle(encode(ann), "127.0.0.1") is not None
        assert [f.name for f in listener.workers()] == ["ghost"]
        time.sleep(3 * 0.3 + 0.1)
        assert listener.workers() == []


def test_discovered_addresses_ring_order_and_errors(port):
    anns = [loopback_announcer(n, p, port) for n, p in (("b", 50102), ("a", 50101), ("c", 50103))]
    try:
        for a in anns:
            a.start()
        assert discovered_addresses("lab", 1.0, 3, port=port, bind="lo") == [
            "127.0.0.1:50101", "127.0.0.1:50102", "127.0.0.1:50103"]
        with pytest.raises(PeerUnreachable, match=r"heard 3 of 4 workers of cluster 'lab'.*a at 127.0.0.1:50101"):
            discovered_addresses("lab", 0.3, 4, port=port, bind="lo")
        with pytest.raises(PlanMismatch, match="expected 2"):
            discovered_addresses("lab", 0.3, 2, port=port, bind="lo")
        with loopback_announcer("a", 50104, port):  # a second worker also named "a"
            with pytest.raises(PlanMismatch, match="several workers are named 'a'"):
                discovered_addresses("lab", 0.3, port=port, bind="lo")
        with pytest.raises(PeerUnreachable) as e:
            discovered_addresses("nowhere", 0.3, port=port, bind="127.0.0.1")
    finally:
        for a in anns:
            a.stop()
    msg = str(e.value)
    assert "heard no workers of cluster 'nowhere' on lo (127.255.255.255)" in msg
    assert "within 0.3 s; are they started with --announce?" in msg and "'lab'" in msg
    assert_loopback_only(*anns)


def test_devices_ls_prints_a_table(port, capsys):
    with loopback_announcer("nano", 50111, port, token="t"), loopback_announcer("pi", 50112, port, cluster="home"):
        assert devices_ls(None, 0.3, port=port, bind="127.0.0.1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "ADDRESS", "CLUSTER", "REQUIRES", "ANNOUNCEMENT", "SEEN"]
    assert out[1].split()[:5] == ["nano", "127.0.0.1:50111", "lab", "token", "signed"]
    assert out[2].split()[:5] == ["pi", "127.0.0.1:50112", "home", "nothing", "unsigned"]
    assert devices_ls("lab", 0.2, port=port, bind="127.0.0.1") == 1
    assert "heard no workers of cluster 'lab'" in capsys.readouterr().out
    with pytest.raises(DiscoveryError, match="cluster name"):
        devices_ls(None, 0.1, token="t", port=port)


def test_format_table_marks_multi_homed_workers():
    f = Found("w", "10.0.0.2:1", "lab", True, True, 100.0, True, True, 1.0, ("10.0.0.2:1", "10.1.0.2:1"))
    assert format_table([f], now=101.25).splitlines()[1].split() == [
        "w", "10.0.0.2:1", "(+1", "more)", "lab", "tls+token", "verified", "1.2", "s", "ago"]


def test_start_announcer_uses_the_worker_settings(port):
    from galaxy.transport.worker import WorkerSettings

    a = start_announcer(WorkerSettings(name="edge", token="tok"), "localhost:50120", "lab", interval_s=FAST,
                        port=port)
    try:
        assert a.running and a.destinations == [("127.255.255.255", port)]
        found = discover("lab", 0.3, port=port, bind="127.0.0.1", token="tok")
    finally:
        a.stop()
    assert [(f.name, f.address, f.tls, f.token_required, f.verified) for f in found] == [
        ("edge", "127.0.0.1:50120", False, True, True)]


# -- two network namespaces on a bridge (root) -------------------------------------------------
PREFIX = "gx-disc-"
REPO = Path(__file__).resolve().parents[2]


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ours() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}{os.getpid()}-")]


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr.strip()}"


def _in_ns(ns: str, code: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", BARE_PACKAGE + code], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# galaxy/__init__ imports torch (2 s per process); discovery needs only the package's path
BARE_PACKAGE = f"""
import sys, types
sys.modules["galaxy"] = types.ModuleType("galaxy")
sys.modules["galaxy"].__path__ = [{str(REPO / "galaxy")!r}]
"""
ANNOUNCE = """
import json, sys
from galaxy.transport.discovery import Announcer
anns = [Announcer("edge-a", "10.78.0.2:50051", "lab", token="tok", interval_s=0.1).start(),
        Announcer("edge-any", "0.0.0.0:50052", "lab", token="tok", interval_s=0.1).start()]
print(json.dumps({a.name: sorted([r.interface, r.broadcast, r.address] for r in a.routes) for a in anns}), flush=True)
sys.stdin.read()  # until the test closes our stdin
for a in anns:
    a.stop()
print(json.dumps(sorted({ip for a in anns for ip, _ in a.sent})), flush=True)
"""
DISCOVER = """
import json
from galaxy.transport.discovery import discover
print(json.dumps([[f.name, f.address, f.verified] for f in discover("lab", timeout_s=1.0, token="tok")]))
"""


def test_discovery_across_network_namespaces():
    """Worker namespace a is on the bridged LAN 10.78.0.0/24 with b, and on 10.78.1.0/24 with c alone.
    edge-a listens on 10.78.0.2 and is heard by b only; edge-any listens on 0.0.0.0 and is heard by
    both, each at its address on their subnet."""
    why = _netns_unavailable()
    if why:
        pytest.skip(f"network namespace test skipped: {why}")
    ns = {k: f"{PREFIX}{os.getpid()}-{k}" for k in ("lan", "a", "b", "c")}
    procs: list[subprocess.Popen] = []
    try:
        for name in ns.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", ns["lan"], "link", "add", "gxd-br", "type", "bridge")
        _ip("-n", ns["lan"], "link", "set", "gxd-br", "up")
        for k, host in (("a", "10.78.0.2/24"), ("b", "10.78.0.3/24")):
            _ip("-n", ns[k], "link", "add", f"gxd-{k}", "type", "veth", "peer", "name", f"gxd-{k}-br",
                "netns", ns["lan"])
            _ip("-n", ns["lan"], "link", "set", f"gxd-{k}-br", "master", "gxd-br", "up")
            _ip("-n", ns[k], "addr", "add", host, "dev", f"gxd-{k}")
            _ip("-n", ns[k], "link", "set", f"gxd-{k}", "up")
        _ip("-n", ns["a"], "link", "add", "gxd-ac", "type", "veth", "peer", "name", "gxd-ca", "netns", ns["c"])
        _ip("-n", ns["a"], "addr", "add", "10.78.1.2/24", "dev", "gxd-ac")
        _ip("-n", ns["c"], "addr", "add", "10.78.1.3/24", "dev", "gxd-ca")
        _ip("-n", ns["a"], "link", "set", "gxd-ac", "up")
        _ip("-n", ns["c"], "link", "set", "gxd-ca", "up")

        announcer = _in_ns(ns["a"], ANNOUNCE)
        procs.append(announcer)
        routes = json.loads(announcer.stdout.readline() or "null")
        assert routes is not None, announcer.stderr.read()
        assert routes == {"edge-a": [["gxd-a", "10.78.0.255", "10.78.0.2:50051"]],
                          "edge-any": [["gxd-a", "10.78.0.255", "10.78.0.2:50052"],
                                       ["gxd-ac", "10.78.1.255", "10.78.1.2:50052"]]}
        listeners = {k: _in_ns(ns[k], DISCOVER) for k in ("b", "c")}
        procs.extend(listeners.values())
        heard = {}
        for k, p in listeners.items():
            out, err = p.communicate(timeout=15)
            assert p.returncode == 0, err
            heard[k] = json.loads(out)
        out, err = announcer.communicate("", timeout=10)
        assert announcer.returncode == 0, err
        assert heard == {"b": [["edge-a", "10.78.0.2:50051", True], ["edge-any", "10.78.0.2:50052", True]],
                         "c": [["edge-any", "10.78.1.2:50052", True]]}
        assert json.loads(out.splitlines()[-1]) == ["10.78.0.255", "10.78.1.255"]  # every datagram sent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        assert _ours() == [], f"namespaces left behind: {_ours()}"
