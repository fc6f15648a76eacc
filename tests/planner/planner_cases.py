"""Clusters and brute force shared by the planner tests (and the gap measurement in docs/planner.md)."""

from __future__ import annotations

from planner.brute_force import TINY, TINY3, TINY_3DEV, brute_force_galaxy, tiny_cluster
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link
from planner.split import compositions

__all__ = ["TINY", "TINY3", "TINY_3DEV", "brute_force_galaxy", "cluster", "compositions", "device", "edge_cluster",
           "random_cluster"]

# Models small enough to enumerate every integer split (4 heads, 8 MLP columns, 5 vocabulary rows;
# 3 / 3 / 2 for three devices), their seeded clusters and the brute force live in planner/brute_force.py,
# which planner/scaling.py measures the solver with too.
random_cluster = tiny_cluster


def device(name: str, flops: float, memory: float, overhead: float = 0.0, head: float | None = None) -> DeviceProfile:
    cm = ComputeModel(flops, overhead)
    return DeviceProfile(name, f"{name}:50051", cm, cm, ComputeModel(flops / 10, overhead), int(memory),
                         None if head is None else ComputeModel(head, overhead))


def cluster(devices, bandwidth_bps: float = 1e9, latency_s: float = 1e-4, links=None) -> ClusterProfile:
    n = len(devices)
    if links is None:
        links = [[None if i == j else Link(bandwidth_bps, latency_s) for j in range(n)] for i in range(n)]
    return ClusterProfile(list(devices), links)


def edge_cluster(bandwidth_bps: float, memory=(4e9, 4e9, 4e9), gflops=(20, 10, 5), latency_s=1e-3):
    """Three boards of different speeds on one switch (GPT2-large needs ~3.1 GB in float32)."""
    names = ("xavier", "tx2", "nano", "pi5", "orin", "m1", "n100", "rk3588")
    devs = [device(names[i], g * 1e9, m, overhead=1e-4) for i, (g, m) in enumerate(zip(gflops, memory))]
    return cluster(devs, bandwidth_bps, latency_s)
