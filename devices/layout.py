"""What an emulated cluster consists of: names, addresses, cgroup values and the exact commands.

Pure: builds lists, runs nothing (devices/system.py runs them). One cluster is a bridge in the
root namespace holding the coordinator's address (.1), and per device a network namespace whose
`eth0` is one end of a veth pair; the other end is a port of the bridge. Bandwidth is shaped by
tbf on both ends of each veth: the namespace end shapes what the device sends, the bridge end
what it receives, so traffic from A to B passes min(rate A, rate B). tbf adds no propagation
delay (and netem is not available), so a device's latency goes to its worker's --link-delay-ms.

Names carry the cluster so stale objects of a crashed `up` can be found without its state file:
namespaces and cgroups are `gx-CLUSTER.DEVICE` ('.' never occurs in a cluster name, so one
cluster's prefix never matches another's), links `gxHHHHHbr` / `gxHHHHHdI` with HHHHH a hash of
the cluster name (interface names are limited to 15 characters).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import sys
from dataclasses import dataclass

from .spec import ClusterSpec

PREFIX = "gx"
SUBNET_POOL = "10.77.0.0/16"  # default subnets are the /24s of this pool: 10.77.1.0/24, 10.77.2.0/24, ...
FIRST_HOST = 10  # device i gets .FIRST_HOST+i; .1 is the bridge (the coordinator)
TBF_MIN_BURST = 64 * 1024  # bytes; MACHINE.md: 64 KB keeps tbf exact at 100 Mbit/s and 1 Gbit/s
TBF_LATENCY = "50ms"  # bounds the tbf queue (not a delay)
NS_IFACE = "eth0"
# CPU weight of a device's cgroup: the maximum, so a busy device gets its whole quota even while other
# work runs on the machine (the quota still caps it; the caps add up to at most the machine's cores).
CPU_SHARES_V1 = 262144
CPU_WEIGHT_V2 = 10000


@dataclass(frozen=True)
class DeviceLayout:
    index: int
    name: str
    netns: str
    cgroup: str  # directory name under each controller's parent cgroup
    host_link: str  # the veth end on the bridge (root namespace)
    ip: str
    address: str  # ip:port the worker serves on
    cpu: float
    threads: int
    period_us: int
    quota_us: int
    memory: int | None
    memory_budget: int
    rate_bps: float
    latency_ms: float
    cpus: tuple[int, ...] = ()  # CPUs the worker is pinned to (pack_cpus); empty: any


@dataclass(frozen=True)
class NetLayout:
    cluster: str
    tag: str  # gxHHHHH: prefix of every link of this cluster
    subnet: str
    bridge: str
    bridge_ip: str
    prefixlen: int
    devices: tuple[DeviceLayout, ...]

    @property
    def netns_prefix(self) -> str:
        return f"{PREFIX}-{self.cluster}."

    @property
    def addresses(self) -> list[str]:
        return [d.address for d in self.devices]


def cluster_tag(name: str) -> str:
    return PREFIX + hashlib.sha1(name.encode()).hexdigest()[:5]


def netns_prefix(name: str) -> str:
    return f"{PREFIX}-{name}."


def pick_subnet(used: set[str], pool: str = SUBNET_POOL) -> str:
    """The first /24 of the pool (skipping .0.0/24) that overlaps nothing in `used`."""
    taken = [ipaddress.ip_network(u, strict=False) for u in used]
    for i, net in enumerate(ipaddress.ip_network(pool).subnets(new_prefix=24)):
        if i == 0:
            continue
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise ValueError(f"every /24 of {pool} is in use")


def assign_addresses(subnet: str, n: int) -> tuple[str, list[str]]:
    """(bridge ip, device ips) in `subnet`: the bridge .1, devices from .FIRST_HOST on."""
    net = ipaddress.ip_network(subnet)
    if net.num_addresses - 2 < FIRST_HOST + n:
        raise ValueError(f"subnet {subnet} is too small for {n} devices (they start at .{FIRST_HOST})")
    return str(net[1]), [str(net[FIRST_HOST + i]) for i in range(n)]


def cfs_values(share: float, period_us: int) -> tuple[int, int]:
    """(period, quota) in µs for a CPU share; the period grows if the quota would fall below 1 ms."""
    period = max(period_us, math.ceil(1000 / share))
    return period, max(1000, round(share * period))


SPILL_TOLERANCE = 0.1  # a CPU may be oversubscribed by this much before a device spills over two CPUs


def pack_cpus(shares: list[float], cpus: list[int]) -> list[tuple[int, ...]]:
    """The CPUs each device is pinned to: largest share first, each on the least-loaded CPU.

    Without pinning, the scheduler often runs two capped devices on one CPU while the other idles
    through their throttled time: measured here with shares 0.9 + 0.6 + 0.45 running GEMMs at once,
    the 0.9-core device got 55-80% of the speed it has alone; pinned to a CPU of its own it got
    99-104%. A device that fits no single CPU (load above 1 + SPILL_TOLERANCE) spills over the CPUs
    with room left; one of more than a core gets that many CPUs; with too few CPUs, all of them.
    """
    load = {c: 0.0 for c in cpus}
    out: list[tuple[int, ...]] = [()] * len(shares)
    for i in sorted(range(len(shares)), key=lambda i: (-shares[i], i)):
        share, k = shares[i], max(1, math.ceil(shares[i] - 1e-9))
        by_load = sorted(cpus, key=lambda c: (load[c], c))
        if k > len(cpus):
            pick = list(cpus)
        elif k == 1 and load[by_load[0]] + share > 1 + SPILL_TOLERANCE:
            pick, room = [], 0.0  # spill: the emptiest CPUs until their free time covers the share
            for c in by_load:
                pick.append(c)
                room += max(0.0, 1 - load[c])
                if room >= share:
                    break
        else:
            pick = by_load[:k]
        for c in pick:
            load[c] += share / len(pick)
        out[i] = tuple(sorted(pick))
    return out


def machine_cpus() -> list[int]:
    """The CPUs this process may run on (a container may see fewer than the machine has)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def tbf_burst(rate_bps: float) -> int:
    """Bucket size: at least TBF_MIN_BURST and 1 ms worth of traffic."""
    return max(TBF_MIN_BURST, int(rate_bps / 8 / 1000))


def make_layout(spec: ClusterSpec, subnet: str, cpus: list[int] | None = None) -> NetLayout:
    if not spec.emulated:
        raise ValueError(f"cluster {spec.name} lists real worker addresses; there is nothing to emulate")
    bridge_ip, ips = assign_addresses(subnet, len(spec.devices))
    tag = cluster_tag(spec.name)
    pins = pack_cpus([d.cpu for d in spec.devices], machine_cpus() if cpus is None else cpus)
    devs = []
    for i, (d, ip) in enumerate(zip(spec.devices, ips)):
        period, quota = cfs_values(d.cpu, spec.cfs_period_us)
        devs.append(DeviceLayout(i, d.name, f"{netns_prefix(spec.name)}{d.name}", f"{netns_prefix(spec.name)}{d.name}",
                                 f"{tag}d{i}", ip, f"{ip}:{spec.port}", d.cpu, d.threads, period, quota, d.memory,
                                 d.memory_budget, d.link_bps, d.latency_ms, pins[i]))
    return NetLayout(spec.name, tag, subnet, f"{tag}br", bridge_ip, ipaddress.ip_network(subnet).prefixlen, tuple(devs))


# -- commands ----------------------------------------------------------------------------------


def bridge_commands(lay: NetLayout) -> list[list[str]]:
    return [
        ["ip", "link", "add", lay.bridge, "type", "bridge"],
        ["ip", "link", "set", "dev", lay.bridge, "alias", f"galaxy:{lay.cluster}"],
        ["ip", "addr", "add", f"{lay.bridge_ip}/{lay.prefixlen}", "dev", lay.bridge],
        ["ip", "link", "set", "dev", lay.bridge, "up"],
    ]


def netns_commands(d: DeviceLayout) -> list[list[str]]:
    return [["ip", "netns", "add", d.netns], ["ip", "-n", d.netns, "link", "set", "dev", "lo", "up"]]


def veth_commands(lay: NetLayout, d: DeviceLayout) -> list[list[str]]:
    """The pair, created with its far end already inside the namespace, then wired and addressed."""
    return [
        ["ip", "link", "add", d.host_link, "type", "veth", "peer", "name", NS_IFACE, "netns", d.netns],
        ["ip", "link", "set", "dev", d.host_link, "alias", f"galaxy:{lay.cluster}:{d.name}"],
        ["ip", "link", "set", "dev", d.host_link, "master", lay.bridge],
        ["ip", "link", "set", "dev", d.host_link, "up"],
        ["ip", "-n", d.netns, "addr", "add", f"{d.ip}/{lay.prefixlen}", "dev", NS_IFACE],
        ["ip", "-n", d.netns, "link", "set", "dev", NS_IFACE, "up"],
    ]


def tbf_args(rate_bps: float) -> list[str]:
    return ["root", "tbf", "rate", f"{int(rate_bps)}bit", "burst", str(tbf_burst(rate_bps)), "latency", TBF_LATENCY]


def shaping_commands(d: DeviceLayout) -> list[list[str]]:
    """tbf on both ends: the device's uplink (namespace side) and downlink (bridge side)."""
    return [
        ["tc", "qdisc", "replace", "dev", d.host_link, *tbf_args(d.rate_bps)],
        ["tc", "-n", d.netns, "qdisc", "replace", "dev", NS_IFACE, *tbf_args(d.rate_bps)],
    ]


def cgroup_values(d: DeviceLayout, version: int) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write, in order, to cap the device's CPU and memory."""
    if version == 2:
        out = [("cpu", "cpu.max", f"{d.quota_us} {d.period_us}"), ("cpu", "cpu.weight", str(CPU_WEIGHT_V2))]
        if d.memory is not None:
            out += [("memory", "memory.max", str(d.memory)), ("memory", "memory.swap.max", "0")]
        return out
    out = [("cpu", "cpu.cfs_period_us", str(d.period_us)), ("cpu", "cpu.cfs_quota_us", str(d.quota_us)),
           ("cpu", "cpu.shares", str(CPU_SHARES_V1))]
    if d.memory is not None:
        out.append(("memory", "memory.limit_in_bytes", str(d.memory)))
    return out


def worker_command(d: DeviceLayout, detached: bool, python: str = sys.executable, cluster: str = "") -> list[str]:
    """`galaxy worker` for device d; `detached` workers outlive the process that started them.
    With a cluster name the worker announces itself on its subnet (`galaxy run --discover`)."""
    from galaxy.transport.spawn import worker_command as base

    extra = ["--memory-budget", str(d.memory_budget), "--link-delay-ms", f"{d.latency_ms:g}",
             "--cache-own-shards"]  # benchmarks reload shards often: keep them on the device's disk
    if cluster:
        extra += ["--announce", "--cluster-name", cluster]
    cmd = base(d.address, d.name, d.threads, extra=extra)
    if python != sys.executable:
        cmd[0] = python
    if detached:  # base() always asks to die with the parent; `galaxy devices up` exits right after
        cmd = [a for a in cmd if a != "--exit-with-parent"]
    return cmd


def enter_command(netns: str | None, procs_files: list[str], cmd: list[str], python: str = sys.executable,
                  cpus: tuple[int, ...] | list[int] = ()) -> list[str]:
    """Run cmd inside a network namespace and cgroups, pinned to cpus (devices/enter.py joins them,
    then execs)."""
    out = [python, "-m", "devices.enter"]
    if netns:
        out += ["--netns", netns]
    if cpus:
        out += ["--cpus", ",".join(map(str, cpus))]
    for p in procs_files:
        out += ["--cgroup-procs", p]
    return out + ["--", *cmd]
