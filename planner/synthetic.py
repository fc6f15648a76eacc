"""Seeded synthetic clusters: the households, labs and classrooms the solver is measured on.

Real profiles come from planner/profiler.py, one worker per device; measuring how the solver
scales needs clusters of 4 to 64 devices that nobody has on a desk. These are made of device
classes whose speeds, budgets and network interfaces span what a home or a lab holds (a Pi on
Wi-Fi to a desktop on Ethernet), with the three things that make the search hard:

- memory-starved devices (a budget below a fifth of GPT2-Large in float32), so the memory bound
  binds and a fast device cannot always take its share;
- uneven, slightly asymmetric links: a pair talks at the slower of its two interfaces, each
  direction a little differently, so ring orders matter;
- co-tenant groups: several workers on one machine (emulated devices, loopback workers), profiled
  all busy at once and asking for more cores than the machine has (profile.Tenancy), linked by
  loopback, so leaving one of them out speeds the others up.

Everything is drawn from `random.Random(seed)`: the same (n, seed) gives the same cluster.
The figures are illustrative ranges, not measurements of the named devices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .plan import PlanError
from .profile import ClusterProfile, ComputeModel, DeviceProfile, Link, Tenancy

GIB = 2**30


@dataclass(frozen=True)
class DeviceClass:
    name: str
    gflops: tuple[float, float]  # MLP GEMM rate, GFLOP/s (uniform in the range)
    memory_gib: tuple[float, float]  # budget for a shard (uniform in the range)
    nics: tuple[str, ...]  # network interfaces it may have (NICS)
    weight: float  # how common it is


CLASSES = (
    DeviceClass("pi", (3.0, 12.0), (0.6, 3.0), ("wifi5", "ethernet-1g", "wifi-slow"), 3.0),
    DeviceClass("phone", (10.0, 40.0), (1.0, 4.0), ("wifi5", "wifi6", "wifi-slow"), 3.0),
    DeviceClass("jetson", (20.0, 80.0), (2.0, 6.0), ("ethernet-1g", "ethernet-100m"), 2.0),
    DeviceClass("laptop", (40.0, 150.0), (4.0, 12.0), ("wifi6", "wifi5", "ethernet-1g"), 2.0),
    DeviceClass("desktop", (100.0, 300.0), (8.0, 24.0), ("ethernet-1g",), 1.0),
)
NICS = {  # (goodput bit/s, one-way latency s), as devices/links.yaml
    "ethernet-100m": (100e6, 0.2e-3),
    "ethernet-1g": (1e9, 0.1e-3),
    "wifi5": (200e6, 2e-3),
    "wifi6": (400e6, 1.5e-3),
    "wifi-slow": (20e6, 5e-3),
}
LOOPBACK = Link(10e9, 20e-6)  # co-tenants on one machine
STARVED = 0.25  # share of devices whose budget is cut to STARVED_GIB
STARVED_GIB = (0.3, 0.6)
CO_TENANT_HOSTS = 0.2  # share of devices that are the first worker of a shared machine


def synthetic_cluster(n: int, seed: int) -> ClusterProfile:
    """n heterogeneous devices (see the module docstring); the same (n, seed), the same cluster."""
    if n < 1:
        raise PlanError(f"n: {n} must be at least 1")
    rng = random.Random(f"galaxy-synthetic-{n}-{seed}")
    devices: list[DeviceProfile] = []
    nics: list[tuple[float, float]] = []
    hosts: list[str | None] = []
    while len(devices) < n:
        cls = rng.choices(CLASSES, weights=[c.weight for c in CLASSES])[0]
        nic = NICS[rng.choice(cls.nics)]
        group = 1
        if n - len(devices) >= 2 and rng.random() < CO_TENANT_HOSTS:
            group = rng.randint(2, min(4, n - len(devices)))
        host_cpus = rng.choice([2, 4]) if group > 1 else 0
        host = f"host-{len(devices)}" if group > 1 else None
        for _ in range(group):
            k = len(devices)
            g = rng.uniform(*cls.gflops) * 1e9
            mem = rng.uniform(*cls.memory_gib) * GIB
            if rng.random() < STARVED:
                mem = rng.uniform(*STARVED_GIB) * GIB
            over = rng.choice([50e-6, 200e-6, 500e-6])
            tenancy = None
            if host is not None:  # co-tenants: g is the speed each has with all of them busy
                tenancy = Tenancy(host, float(rng.choice([1, 2])), host_cpus)
            devices.append(DeviceProfile(
                f"{cls.name}-{k}", f"10.0.{k // 250}.{k % 250 + 2}:50051",
                attention=ComputeModel(g * rng.uniform(0.6, 0.9), over),
                mlp=ComputeModel(g, over),
                connective=ComputeModel(g * rng.uniform(0.03, 0.08), over / 5),
                memory_bytes=int(mem),
                head=ComputeModel(g * rng.uniform(0.15, 0.4), over),
                tenancy=tenancy))
            nics.append(nic)
            hosts.append(host)
    links: list[list[Link | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if hosts[i] is not None and hosts[i] == hosts[j]:
                links[i][j] = LOOPBACK
                continue
            rate = min(nics[i][0], nics[j][0]) * rng.uniform(0.8, 1.0)
            links[i][j] = Link(rate, (nics[i][1] + nics[j][1]) * rng.uniform(0.9, 1.1))
    return ClusterProfile(devices, links)


# --- the emulated clusters of devices/clusters/*.yaml, as the solver sees them ------------------------
# Each emulated device is a worker on this 2-core machine with a CPU share and a shaped link; these
# profiles resemble them (speed in proportion to the share, memory as the catalog, the link preset),
# for checking that the solver plans them as before. Not measured profiles: the speed per core is an
# illustrative figure.
EMULATED_GFLOPS_PER_CORE = 40.0
EMULATED = {  # name: (model preset, [(device, cores, memory GiB)], link preset)
    "hetero-trio": ("gpt2-large", [("xavier-nx", 0.92, 8.0), ("tx2", 0.72, 8.0), ("nano", 0.26, 4.0)],
                    "ethernet-100m"),
    "hetero-bench": ("gpt2-large", [("xavier-nx", 0.9, 8.0), ("tx2", 0.6, 8.0), ("nano", 0.45, 4.0)],
                     "ethernet-1g"),
    "homo-trio": ("gpt2-large", [("nano-a", 0.63, 4.0), ("nano-b", 0.63, 4.0), ("nano-c", 0.63, 4.0)],
                  "ethernet-1g"),
    "slow-wifi": ("gpt2-large", [("pi5-a", 0.82, 8.0), ("pi5-b", 0.82, 8.0), ("pi4", 0.26, 4.0)], "wifi-slow"),
    "mem-starved": ("smollm2-135m", [("pi4-a", 0.63, 0.375), ("pi4-b", 0.63, 0.375), ("pi4-c", 0.63, 0.375)],
                    "ethernet-1g"),
}


def emulated_cluster(name: str) -> ClusterProfile:
    """A profile resembling devices/clusters/<name>.yaml (see EMULATED): co-tenants of one 2-core host."""
    if name not in EMULATED:
        raise PlanError(f"emulated cluster: {name!r} is not one of {sorted(EMULATED)}")
    _, devs, nic = EMULATED[name]
    rate, latency = NICS[nic]
    devices = []
    for k, (dev, cores, gib) in enumerate(devs):
        g = cores * EMULATED_GFLOPS_PER_CORE * 1e9
        devices.append(DeviceProfile(dev, f"127.0.0.1:{50051 + k}", attention=ComputeModel(0.7 * g, 100e-6),
                                     mlp=ComputeModel(g, 100e-6), connective=ComputeModel(0.05 * g, 20e-6),
                                     memory_bytes=int(gib * GIB), head=ComputeModel(0.25 * g, 100e-6),
                                     tenancy=Tenancy("emulated-host", cores, 2)))
    n = len(devices)
    return ClusterProfile(devices, [[None if i == j else Link(rate, latency) for j in range(n)] for i in range(n)])
