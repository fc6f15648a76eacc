"""Clusters and brute force shared by the planner tests (and the gap measurement in docs/planner.md)."""

from __future__ import annotations

import itertools
import math
import random

from galaxy.model.config import make_config
from planner.cost import CostModel, Layout
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link

# A model small enough to enumerate every integer split: 4 heads, 8 MLP columns, 5 vocabulary rows.
TINY = make_config("gpt2", vocab_size=5, hidden=8, n_layers=2, n_heads=4, ffn=8, max_positions=16, name="bf-tiny")
TINY3 = make_config("gpt2", vocab_size=3, hidden=8, n_layers=2, n_heads=3, ffn=6, max_positions=16, name="bf-tiny3")


def device(name: str, flops: float, memory: float, overhead: float = 0.0, head: float | None = None) -> DeviceProfile:
    cm = ComputeModel(flops, overhead)
    return DeviceProfile(name, f"{name}:50051", cm, cm, ComputeModel(flops / 10, overhead), int(memory),
                         None if head is None else ComputeModel(head, overhead))


def cluster(devices, bandwidth_bps: float = 1e9, latency_s: float = 1e-4, links=None) -> ClusterProfile:
    n = len(devices)
    if links is None:
        links = [[None if i == j else Link(bandwidth_bps, latency_s) for j in range(n)] for i in range(n)]
    return ClusterProfile(list(devices), links)


def compositions(total: int, parts: int):
    """Every way to write total as an ordered sum of `parts` non-negative integers."""
    for cuts in itertools.combinations_with_replacement(range(total + 1), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def brute_force_galaxy(cm: CostModel, min_devices: int = 2) -> float:
    """Lowest feasible galaxy latency over every subset, ring order and integer split."""
    cfg, best = cm.cfg, math.inf
    for k in range(min(min_devices, cm.n), cm.n + 1):
        for sub in itertools.combinations(range(cm.n), k):
            for rest in itertools.permutations(sub[1:]):
                order = (sub[0], *rest)
                for h, c, v, s in itertools.product(compositions(cfg.n_heads, k), compositions(cfg.ffn, k),
                                                    compositions(cfg.vocab_size, k), compositions(cm.S, k)):
                    e = cm.estimate(Layout("galaxy", order, h, c, v, s))
                    if e.feasible and e.latency_s < best:
                        best = e.latency_s
    return best


def random_cluster(rng: random.Random, n: int, cfg, seq_len: int, tight: bool) -> ClusterProfile:
    """Heterogeneous speeds, overheads, budgets (tight: some below an even share) and links."""
    full = CostModel(cfg, seq_len, cluster([device("x", 1e6, 1e12)])).estimate(
        Layout("local", (0,), (cfg.n_heads,), (cfg.ffn,), (cfg.vocab_size,), (seq_len,))).memory[0].used_bytes
    devs = []
    for i in range(n):
        mem = full * (rng.uniform(0.35, 0.9) if tight else 4.0)
        devs.append(device(f"d{i}", rng.uniform(2e5, 2e6), mem, overhead=rng.choice([0.0, 1e-5, 1e-4])))
    links = [[None if i == j else Link(rng.choice([1e5, 1e6, 1e7, 1e8]), rng.choice([1e-5, 1e-4, 1e-3]))
              for j in range(n)] for i in range(n)]
    return cluster(devs, links=links)

TINY_3DEV = make_config("gpt2", vocab_size=2, hidden=8, n_layers=2, n_heads=3, ffn=3, max_positions=16,
                        name="bf-tiny-3dev")


def edge_cluster(bandwidth_bps: float, memory=(4e9, 4e9, 4e9), gflops=(20, 10, 5), latency_s=1e-3):
    """Three boards of different speeds on one switch (GPT2-large needs ~3.1 GB in float32)."""
    names = ("xavier", "tx2", "nano", "pi5", "orin", "m1", "n100", "rk3588")
    devs = [device(names[i], g * 1e9, m, overhead=1e-4) for i, (g, m) in enumerate(zip(gflops, memory))]
    return cluster(devs, bandwidth_bps, latency_s)
