"""LAN discovery: workers announce themselves by UDP broadcast, coordinators listen.

This file owns the announcement datagram (format and threat model in docs/discovery.md), the
`Announcer` thread a worker runs, the `Listener` / `discover()` a coordinator runs, and the helpers
behind `galaxy devices ls` and `galaxy run --discover`.

Discovery only *proposes* addresses. Every gRPC call is still authenticated by the cluster token
and/or TLS, so a forged announcement can at worst make a coordinator try a wrong address. When a
token is configured, announcements carry an HMAC keyed by a slow hash of it (the token itself never
leaves the device), and a listener that knows the token drops unsigned or forged ones.

Announcements are broadcast to the directed broadcast address of the one interface that carries
the worker's listen address (every interface, if it listens on all of them), with TTL 1: they never
leave that subnet and never go anywhere the worker is not already reachable.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TextIO

from ..addresses import AddressError, split_address
from ..errors import GalaxyError, PeerUnreachable, PlanMismatch

log = logging.getLogger(__name__)

DISCOVERY_PORT = 50050  # UDP; one below the default worker port
DEFAULT_CLUSTER = "galaxy"
MAGIC = b"GXDA"  # Galaxy Discovery Announcement
VERSION = 1
MAX_DATAGRAM = 512  # bytes; anything longer is dropped unread
MAX_FIELD = 64  # bytes of UTF-8 in the cluster, name and address fields
MAC_BYTES = 32  # HMAC-SHA256
KDF_ITERATIONS = 100_000  # PBKDF2 rounds between the token and the HMAC key (~50 ms once per process)
EXPIRE_INTERVALS = 3  # a live view forgets a worker silent for this many of its intervals
MIN_SETTLE_S = 0.5  # wait(expect=...) listens at least this long, so scheduling jitter hides no worker

FLAG_TLS = 1  # the worker requires mutual TLS
FLAG_TOKEN = 2  # the worker requires the cluster token
FLAG_SIGNED = 4  # a 32-byte HMAC trailer follows the fields
FLAG_LEAVING = 8  # the worker is stopping: forget it now
_KNOWN_FLAGS = FLAG_TLS | FLAG_TOKEN | FLAG_SIGNED | FLAG_LEAVING

# magic, version, flags, interval (ms), sent at (unix ms), instance id (random per Announcer)
_HEADER = struct.Struct("!4sBBIQ8s")


class DiscoveryError(GalaxyError):
    """Discovery cannot run as configured (no such interface, no broadcast address, bad field)."""


class BadDatagram(ValueError):
    """A datagram that is not a valid announcement; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- the datagram ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Announcement:
    cluster: str
    name: str
    address: str  # gRPC host:port to dial (IPv4 literal)
    tls: bool
    token_required: bool
    interval_s: float  # how often the worker repeats it
    sent_at: float  # unix seconds on the worker's clock
    instance: bytes  # 8 random bytes per Announcer: tells a restarted or same-named worker apart
    leaving: bool = False
    signed: bool = False  # carried an HMAC trailer
    verified: bool = False  # ... and we checked it against our own token


@lru_cache(maxsize=8)
def discovery_key(token: str, cluster: str) -> bytes:
    """The HMAC key of a cluster's announcements: PBKDF2 of the token, salted by the cluster name.

    Slow on purpose: a signed announcement lets an eavesdropper test token guesses offline.
    """
    salt = b"galaxy-discovery-v1\0" + cluster.encode()
    return hashlib.pbkdf2_hmac("sha256", token.encode(), salt, KDF_ITERATIONS)


def _check_text(what: str, value: str) -> bytes:
    raw = value.encode()
    if not 1 <= len(raw) <= MAX_FIELD or not value.isprintable():
        raise BadDatagram(what, f"{value[:80]!r} must be 1..{MAX_FIELD} bytes of printable UTF-8")
    return raw


def _check_address(address: str) -> None:
    try:
        ipaddress.IPv4Address(split_address(address)[0])
        ok = "[" not in address
    except ValueError:  # AddressError is one
        ok = False
    if not ok:
        raise BadDatagram("address", f"{address!r} is not IPv4-host:port")


def encode(ann: Announcement, key: bytes | None = None) -> bytes:
    """The datagram of `ann`, signed with `key` (from `discovery_key`) when given."""
    flags = (FLAG_TLS * ann.tls) | (FLAG_TOKEN * ann.token_required) | (FLAG_LEAVING * ann.leaving)
    flags |= FLAG_SIGNED * (key is not None)
    _check_address(ann.address)
    body = _HEADER.pack(MAGIC, VERSION, flags, round(ann.interval_s * 1000), round(ann.sent_at * 1000), ann.instance)
    for what, text in (("cluster", ann.cluster), ("name", ann.name), ("address", ann.address)):
        raw = _check_text(what, text)
        body += bytes([len(raw)]) + raw
    return body + (hmac.digest(key, body, "sha256") if key is not None else b"")


def decode(data: bytes, key: bytes | None = None) -> Announcement:
    """Parse an untrusted datagram; raises BadDatagram (never anything else) if it is not valid.

    With `key`, only announcements signed with it are accepted (verified=True). Without one,
    signed announcements are accepted unverified.
    """
    if len(data) > MAX_DATAGRAM:
        raise BadDatagram("oversize", f"{len(data)} bytes")
    if len(data) < _HEADER.size:
        raise BadDatagram("truncated", f"{len(data)} bytes")
    magic, version, flags, interval_ms, sent_ms, instance = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadDatagram("magic")
    if version != VERSION:
        raise BadDatagram("version", f"version {version}, this listener speaks {VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise BadDatagram("flags", f"unknown flags {flags:#x}")
    pos, fields = _HEADER.size, []
    for what in ("cluster", "name", "address"):
        n = data[pos] if pos < len(data) else 0
        raw = data[pos + 1 : pos + 1 + n]
        if n == 0 or len(raw) != n:
            raise BadDatagram("truncated", what)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise BadDatagram(what, "not UTF-8") from None
        _check_text(what, text)
        fields.append(text)
        pos += 1 + n
    _check_address(fields[2])
    signed = bool(flags & FLAG_SIGNED)
    if len(data) != pos + MAC_BYTES * signed:
        raise BadDatagram("truncated" if len(data) < pos + MAC_BYTES * signed else "trailing")
    if key is not None:
        if not signed:
            raise BadDatagram("unsigned", "this cluster's announcements must carry its HMAC")
        if not hmac.compare_digest(data[pos:], hmac.digest(key, data[:pos], "sha256")):
            raise BadDatagram("signature", "HMAC does not match our token")
    return Announcement(fields[0], fields[1], fields[2], bool(flags & FLAG_TLS), bool(flags & FLAG_TOKEN),
                        interval_ms / 1000, sent_ms / 1000, instance, bool(flags & FLAG_LEAVING), signed,
                        signed and key is not None)


# -- interfaces and where to send --------------------------------------------------------------
@dataclass(frozen=True)
class Iface:
    """One IPv4 address of a network interface."""

    name: str
    address: str
    prefixlen: int
    up: bool = True
    loopback: bool = False

    @property
    def broadcast(self) -> str | None:
        """The subnet's directed broadcast (the kernel routes it out of this interface only)."""
        net = ipaddress.IPv4Interface(f"{self.address}/{self.prefixlen}").network
        if self.prefixlen >= 31 and not self.loopback:  # point-to-point links have none
            return None
        return str(net.broadcast_address)

    def __str__(self) -> str:
        return f"{self.name} {self.address}/{self.prefixlen}"


def local_interfaces() -> list[Iface]:
    """IPv4 addresses of this device's interfaces (psutil: already a dependency, and portable)."""
    import psutil

    stats = psutil.net_if_stats()
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{a.netmask}").prefixlen
            st = stats.get(name)
            out.append(Iface(name, a.address, prefix, up=bool(st and st.isup),
                             loopback=ipaddress.IPv4Address(a.address).is_loopback))
    return sorted(out, key=lambda i: (i.name, i.address))


@dataclass(frozen=True)
class Route:
    """One announcement path: send from `source` on `interface` to `broadcast`, naming `address`."""

    interface: str
    source: str
    broadcast: str
    address: str  # the gRPC address announced on this subnet


def _split(address: str) -> tuple[str, int]:
    try:
        return split_address(address)
    except AddressError:
        raise DiscoveryError(f"{address!r} is not HOST:PORT with a bound port") from None


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _select(wanted: Sequence[str], table: Sequence[Iface]) -> list[Iface]:
    """Interfaces named in `wanted` by interface name or by one of their IPv4 addresses."""
    out = []
    for w in wanted:
        hits = [i for i in table if w in (i.name, i.address)]
        if not hits:
            raise DiscoveryError(f"no interface or local IPv4 address {w!r} (this device has: "
                                 f"{', '.join(map(str, table)) or 'none'})")
        out += [i for i in hits if i not in out]
    return out


def _carrying(host: str, table: Sequence[Iface]) -> list[Iface]:
    """The interface whose address is `host` (for 127.x: the loopback interface of its net)."""
    ip = ipaddress.IPv4Address(host)
    exact = [i for i in table if i.address == host]
    if exact or not ip.is_loopback:
        return exact[:1]
    return [i for i in table if i.loopback and ip in ipaddress.IPv4Interface(f"{i.address}/{i.prefixlen}").network][:1]


def plan_routes(grpc_address: str, interfaces: Sequence[str] | None, table: Sequence[Iface]) -> list[Route]:
    """Where a worker serving `grpc_address` announces itself, given this device's `table`.

    A worker bound to one address announces on the interface that carries it (127.x: loopback
    only); one bound to all interfaces announces on every up, broadcast-capable, non-loopback
    interface (loopback if there is none), each time naming its address on that subnet.
    `interfaces` (names or local addresses) narrows this to the ones listed.
    """
    host, port = _split(grpc_address)
    if not _is_wildcard(host):
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            raise DiscoveryError(f"cannot announce {grpc_address}: {host!r} is not an IP address") from None
        if version != 4:
            raise DiscoveryError(f"cannot announce {grpc_address}: discovery is IPv4 broadcast only; "
                                 "listen on an IPv4 address (or 0.0.0.0)")
    if interfaces:
        chosen = _select(interfaces, table)
        if not _is_wildcard(host):
            stray = [str(i) for i in chosen if i.address != host and i not in _carrying(host, table)]
            if stray:
                raise DiscoveryError(f"the worker listens on {host} only, which is not on {', '.join(stray)}; "
                                     "listen on 0.0.0.0 to serve (and announce on) several interfaces")
    elif _is_wildcard(host):
        usable = [i for i in table if i.up and i.broadcast]
        chosen = [i for i in usable if not i.loopback] or [i for i in usable if i.loopback]
    else:
        chosen = _carrying(host, table)
        if not chosen:
            raise DiscoveryError(f"{host} is not an address of this device (interfaces: "
                                 f"{', '.join(map(str, table)) or 'none'})")
    routes = []
    for i in chosen:
        if not i.up or not i.broadcast:
            raise DiscoveryError(f"cannot announce on {i}: " + ("it is down" if not i.up else
                                 "a point-to-point /31 or /32 address has no broadcast address"))
        source = host if (not _is_wildcard(host) and i.loopback) else i.address
        routes.append(Route(i.name, source, i.broadcast, f"{source}:{port}"))
    if not routes:
        raise DiscoveryError(f"no interface to announce {grpc_address} on (interfaces: "
                             f"{', '.join(map(str, table)) or 'none'})")
    return routes


def _resolve(address: str) -> str:
    """`address` with a hostname (e.g. localhost) replaced by its IPv4 address."""
    host, port = _split(address)
    if _is_wildcard(host):
        return f"0.0.0.0:{port}"
    try:
        ipaddress.ip_address(host)
        return f"{host}:{port}"
    except ValueError:
        pass
    try:
        return f"{socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]}:{port}"
    except OSError as e:
        raise DiscoveryError(f"cannot resolve {host!r} to an IPv4 address: {e}") from None


# -- the worker side ---------------------------------------------------------------------------
class Announcer:
    """A daemon thread that broadcasts this worker's announcement every `interval_s` seconds.

    `token` only derives the HMAC key and sets the token-required flag; it is never sent.
    `routes` / `destinations` say exactly where datagrams go; `sent` counts what was sent where.
    """

    def __init__(self, name: str, grpc_address: str, cluster_name: str = DEFAULT_CLUSTER,
                 interfaces: Sequence[str] | None = None, interval_s: float = 1.0, *, tls: bool = False,
                 token: str | None = None, port: int = DISCOVERY_PORT, table: Sequence[Iface] | None = None):
        if not 0.01 <= interval_s <= 3600:
            raise DiscoveryError(f"interval_s={interval_s} must be within 0.01..3600 s")
        for what, text in (("cluster name", cluster_name), ("worker name", name)):
            try:
                _check_text(what, text)
            except BadDatagram as e:
                raise DiscoveryError(str(e)) from None
        self.name, self.cluster, self.interval_s, self.port = name, cluster_name, interval_s, port
        self.tls, self.token_required = tls, bool(token)
        self._key = discovery_key(token, cluster_name) if token else None
        self.instance = os.urandom(8)
        self.routes = plan_routes(_resolve(grpc_address), interfaces,
                                  local_interfaces() if table is None else table)
        self.destinations = sorted({(r.broadcast, port) for r in self.routes})
        self.sent: Counter[tuple[str, int]] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socks: list[socket.socket] = []

    def datagram(self, route: Route, leaving: bool = False) -> bytes:
        ann = Announcement(self.cluster, self.name, route.address, self.tls, self.token_required,
                           self.interval_s, time.time(), self.instance, leaving)
        return encode(ann, self._key)

    def start(self) -> Announcer:
        if self._thread is not None:
            return self
        try:
            self._socks = [_send_socket(r) for r in self.routes]
        except OSError:
            self._close()
            raise
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"galaxy-announce-{self.name}")
        self._thread.start()
        log.info("announcing %s of cluster %r on %s every %g s", self.name, self.cluster,
                 ", ".join(f"{r.interface} ({r.broadcast}:{self.port})" for r in self.routes), self.interval_s)
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop repeating, say goodbye once (listeners forget us at once), close the sockets."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("announcer of %s did not stop within %g s", self.name, timeout_s)
        else:
            self._send_all(leaving=True)
        self._close()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Announcer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        failing: set[str] = set()
        while not self._stop.is_set():
            failing = self._send_all(failing=failing)
            self._stop.wait(self.interval_s)

    def _send_all(self, leaving: bool = False, failing: set[str] | None = None) -> set[str]:
        now_failing = set()
        for route, sock in zip(self.routes, self._socks):
            dest = (route.broadcast, self.port)
            try:
                sock.sendto(self.datagram(route, leaving), dest)
                self.sent[dest] += 1
            except OSError as e:  # interface down, network unreachable: keep trying
                now_failing.add(route.interface)
                if failing is None or route.interface not in failing:
                    log.warning("cannot announce %s on %s (%s:%d): %s", self.name, route.interface, *dest, e)
        return now_failing

    def _close(self) -> None:
        for s in self._socks:
            s.close()
        self._socks = []


def _send_socket(route: Route) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)  # never past the first router
        if hasattr(socket, "SO_BINDTODEVICE"):
            try:  # pins the interface even with overlapping subnets; needs CAP_NET_RAW on older kernels
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, route.interface.encode())
            except OSError:
                pass  # the directed broadcast address alone already selects the interface
        s.bind((route.source, 0))
    except OSError as e:
        s.close()
        raise DiscoveryError(f"cannot announce from {route.source} on {route.interface}: {e}") from None
    return s


def start_announcer(settings, bound_address: str, cluster_name: str = DEFAULT_CLUSTER, *,
                    interfaces: Sequence[str] | None = None, interval_s: float = 1.0,
                    port: int = DISCOVERY_PORT) -> Announcer:
    """Start announcing a worker (galaxy.transport.worker.WorkerSettings) serving at `bound_address`.

    Call after the port is bound (`start_server` returns the address); `stop()` it on shutdown.
    """
    return Announcer(settings.name or socket.gethostname(), bound_address, cluster_name, interfaces, interval_s,
                     tls=settings.tls is not None, token=settings.token, port=port).start()


# -- the coordinator side ----------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    """A worker heard on the LAN."""

    name: str
    address: str  # gRPC host:port to dial
    cluster: str
    tls: bool
    token_required: bool
    last_seen: float  # unix seconds (our clock) of the latest announcement heard
    verified: bool = False  # its HMAC matched our token
    signed: bool = False
    interval_s: float = 1.0
    addresses: tuple[str, ...] = ()  # every address it announced (a worker serving several subnets)


@dataclass(frozen=True)
class _Entry:
    found: Found
    heard: float  # time.monotonic() of the latest announcement


class Listener:
    """Hears announcements in a background thread; `workers()` is the live view.

    `cluster_name=None` hears every cluster (unverified). With `token`, announcements of the
    cluster must carry its HMAC and be no older than `max_clock_skew_s` (None: no age check).
    `bind` is "" for all interfaces, or an interface name / local address to hear only its subnet.
    `rejected` counts ignored datagrams by reason; `other_clusters` names the clusters filtered out.
    """

    MAX_WORKERS = 256  # forged announcements with endless names cannot grow the table beyond this

    def __init__(self, cluster_name: str | None = DEFAULT_CLUSTER, *, token: str | None = None,
                 port: int = DISCOVERY_PORT, bind: str = "", max_clock_skew_s: float | None = 300.0,
                 table: Sequence[Iface] | None = None):
        if token and cluster_name is None:
            raise DiscoveryError("a token authenticates one cluster's announcements: pass its cluster name too")
        self.cluster, self.max_clock_skew_s = cluster_name, max_clock_skew_s
        self._key = discovery_key(token, cluster_name) if token else None
        table = local_interfaces() if table is None else table
        if bind in ("", "0.0.0.0"):
            bind_ip = "0.0.0.0"
            self.where = f"all interfaces ({', '.join(str(i) for i in table if i.up) or 'none up'})"
        else:
            hits = [i for i in _select([bind], table) if i.broadcast]
            if not hits:
                raise DiscoveryError(f"{bind!r} has no broadcast address to listen on")
            bind_ip = hits[0].broadcast  # a socket bound to a unicast address hears no broadcasts
            self.where = f"{hits[0].name} ({bind_ip})"
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # several listeners per port
        if hasattr(socket, "SO_REUSEPORT"):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self._sock.bind((bind_ip, port))
        except OSError as e:
            self._sock.close()
            raise DiscoveryError(f"cannot listen for announcements on {bind_ip}:{port}: {e}") from None
        self.port = self._sock.getsockname()[1]
        self.where += f" port {self.port}"
        self.rejected: Counter[str] = Counter()
        self.other_clusters: set[str] = set()
        self._entries: dict[tuple[str, bytes], _Entry] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Listener:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="galaxy-discovery-listen")
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.1)
            if not ready:
                continue
            try:
                data, (source, _) = self._sock.recvfrom(MAX_DATAGRAM + 1)  # +1: oversize shows as too long
            except OSError:
                continue
            self.handle(data, source)

    def handle(self, data: bytes, source: str, now: float | None = None) -> Announcement | None:
        """Take in one datagram from `source`; returns the accepted announcement, None if ignored."""
        try:
            ann = decode(data)  # structure first: cheap, and tells which cluster's key to use
            if self.cluster is not None and ann.cluster != self.cluster:
                if len(self.other_clusters) < 32:
                    self.other_clusters.add(ann.cluster)
                raise BadDatagram("other-cluster")
            if self._key is not None:
                ann = decode(data, self._key)
                skew = abs((now or time.time()) - ann.sent_at)
                if self.max_clock_skew_s is not None and skew > self.max_clock_skew_s:
                    raise BadDatagram("stale", f"sent {skew:.0f} s from our clock")
            if ann.address.rpartition(":")[0] != source:
                raise BadDatagram("source", f"{ann.address} announced from {source}")
        except BadDatagram as e:
            with self._cond:
                self.rejected[e.reason] += 1
            log.debug("ignored an announcement from %s: %s", source, e)
            return None
        self._record(ann)
        return ann

    def _record(self, ann: Announcement) -> None:
        key = (ann.name, ann.instance)
        with self._cond:
            if ann.leaving:
                self._entries.pop(key, None)
                self._cond.notify_all()
                return
            entry = self._entries.get(key)
            if entry is None and len(self._entries) >= self.MAX_WORKERS:
                self.rejected["table-full"] += 1
                return
            addresses = tuple(sorted({ann.address, *(entry.found.addresses if entry else ())}))
            found = Found(ann.name, addresses[0], ann.cluster, ann.tls, ann.token_required, time.time(),
                          ann.verified, ann.signed, ann.interval_s, addresses)
            self._entries[key] = _Entry(found, time.monotonic())
            self._cond.notify_all()

    def workers(self) -> list[Found]:
        """Workers heard and not silent for EXPIRE_INTERVALS of their own interval, by name."""
        now = time.monotonic()
        with self._cond:
            for key, e in list(self._entries.items()):
                if now - e.heard > EXPIRE_INTERVALS * e.found.interval_s:
                    del self._entries[key]
            return sorted((e.found for e in self._entries.values()), key=lambda f: (f.name, f.address))

    def wait(self, timeout_s: float, expect: int | None = None) -> list[Found]:
        """Listen up to `timeout_s`; with `expect`, return early once that many workers are heard
        and every worker had time to announce itself (their longest interval, at least MIN_SETTLE_S,
        has passed), so that more workers than expected are noticed too."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        with self._cond:
            while (now := time.monotonic()) < deadline:
                found = self.workers()
                if expect and len(found) >= expect and now - t0 >= max(MIN_SETTLE_S, *(f.interval_s for f in found)):
                    break
                self._cond.wait(min(0.05, deadline - now))
        return self.workers()

    def diagnosis(self) -> str:
        """Why nothing (or not enough) was heard, from what was ignored; '' if nothing was."""
        notes = []
        bad = self.rejected
        if bad["signature"] or bad["unsigned"]:
            notes.append(f"{bad['signature'] + bad['unsigned']} announcements of cluster {self.cluster!r} failed "
                         "authentication: do the workers use the same --token?")
        if bad["stale"]:
            notes.append(f"{bad['stale']} signed announcements were more than {self.max_clock_skew_s:g} s old "
                         "(clocks out of sync? check NTP) or replayed")
        if self.other_clusters:
            notes.append(f"heard other clusters: {', '.join(sorted(map(repr, self.other_clusters)))} "
                         "(--cluster-name?)")
        rest = sum(n for r, n in bad.items() if r not in ("signature", "unsigned", "stale", "other-cluster"))
        if rest:
            notes.append(f"ignored {rest} malformed datagrams on port {self.port}")
        return "; ".join(notes)


def discover(cluster_name: str | None = DEFAULT_CLUSTER, timeout_s: float = 2.0, port: int = DISCOVERY_PORT,
             bind: str = "", *, token: str | None = None) -> list[Found]:
    """The distinct workers of `cluster_name` heard within `timeout_s`, sorted by name."""
    with Listener(cluster_name, token=token, port=port, bind=bind) as listener:
        return listener.wait(timeout_s)


def discovered_addresses(cluster_name: str = DEFAULT_CLUSTER, timeout_s: float = 2.0, expect: int | None = None,
                         *, token: str | None = None, port: int = DISCOVERY_PORT, bind: str = "") -> list[str]:
    """Addresses of the cluster's workers in ring order (by name), for `galaxy run --discover`.

    Pass the coordinator's `token`: then only announcements signed with it count, so a forged one
    cannot lure the coordinator into sending its token to another host. Raises PeerUnreachable if
    fewer than `expect` (or no) workers are heard, PlanMismatch if more, or two share a name.
    """
    with Listener(cluster_name, token=token, port=port, bind=bind) as listener:
        found = listener.wait(timeout_s, expect)
    hint = listener.diagnosis()
    hint = f" ({hint})" if hint else ""
    names = ", ".join(f"{f.name} at {f.address}" for f in found)
    if not found:
        raise PeerUnreachable(f"heard no workers of cluster {cluster_name!r} on {listener.where} within "
                              f"{timeout_s:g} s; are they started with --announce?{hint}")
    if expect is not None and len(found) < expect:
        raise PeerUnreachable(f"heard {len(found)} of {expect} workers of cluster {cluster_name!r} on "
                              f"{listener.where} within {timeout_s:g} s ({names}); are the others started with "
                              f"--announce?{hint}")
    if expect is not None and len(found) > expect:
        raise PlanMismatch(f"heard {len(found)} workers of cluster {cluster_name!r} but expected {expect} ({names}); "
                           "stop the extra ones, or list the ones to use with --workers")
    by_name = Counter(f.name for f in found)
    twins = sorted(n for n, k in by_name.items() if k > 1)
    if twins:
        raise PlanMismatch(f"several workers are named {', '.join(map(repr, twins))} ({names}); give each device "
                           "a distinct --name")
    return [f.address for f in found]


def format_table(found: Sequence[Found], now: float | None = None) -> str:
    """The `galaxy devices ls` table."""
    now = time.time() if now is None else now
    rows = [("NAME", "ADDRESS", "CLUSTER", "REQUIRES", "ANNOUNCEMENT", "SEEN")]
    for f in found:
        requires = "+".join(x for x, on in (("tls", f.tls), ("token", f.token_required)) if on) or "nothing"
        auth = "verified" if f.verified else "signed" if f.signed else "unsigned"
        addr = f.address + (f" (+{len(f.addresses) - 1} more)" if len(f.addresses) > 1 else "")
        rows.append((f.name, addr, f.cluster, requires, auth, f"{max(0.0, now - f.last_seen):.1f} s ago"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def devices_ls(cluster_name: str | None = None, timeout_s: float = 2.0, *, token: str | None = None,
               port: int = DISCOVERY_PORT, bind: str = "", out: TextIO | None = None) -> int:
    """`galaxy devices ls`: listen for `timeout_s` and print what was heard. Exit code 1 if nothing."""
    out = out or sys.stdout
    with Listener(cluster_name, token=token, port=port, bind=bind) as listener:
        found = listener.wait(timeout_s)
    which = "any cluster" if cluster_name is None else f"cluster {cluster_name!r}"
    if found:
        print(format_table(found), file=out)
        print(f"{len(found)} workers of {which} heard on {listener.where} in {timeout_s:g} s", file=out)
    else:
        print(f"heard no workers of {which} on {listener.where} within {timeout_s:g} s; are they started with "
              "--announce?", file=out)
    if hint := listener.diagnosis():
        print(f"note: {hint}", file=out)
    return 0 if found else 1


__all__ = ["DISCOVERY_PORT", "DEFAULT_CLUSTER", "Announcement", "Announcer", "BadDatagram", "DiscoveryError", "Found",
           "Iface", "Listener", "Route", "decode", "devices_ls", "discover", "discovered_addresses", "discovery_key",
           "encode", "format_table", "local_interfaces", "plan_routes", "start_announcer"]
