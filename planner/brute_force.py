"""The yardstick for the solver's optimality gap: every galaxy layout of a tiny model, priced.

On a model of a few heads, columns, vocabulary rows and tokens, every subset of devices, every
ring order and every integer split can be enumerated (thousands to a million layouts); the lowest
feasible latency is the true optimum of the cost model, which neither search (exact or heuristic)
guarantees, since both split by construction and local search. tests/planner and
planner/scaling.py measure both against it on the same seeded clusters.
"""

from __future__ import annotations

import itertools
import math
import random

from galaxy.model.config import make_config

from .cost import CostModel, Layout
from .profile import ClusterProfile, ComputeModel, DeviceProfile, Link
from .split import compositions

# Models small enough to enumerate every integer split.
TINY = make_config("gpt2", vocab_size=5, hidden=8, n_layers=2, n_heads=4, ffn=8, max_positions=16, name="bf-tiny")
TINY3 = make_config("gpt2", vocab_size=3, hidden=8, n_layers=2, n_heads=3, ffn=6, max_positions=16, name="bf-tiny3")
TINY_3DEV = make_config("gpt2", vocab_size=2, hidden=8, n_layers=2, n_heads=3, ffn=3, max_positions=16,
                        name="bf-tiny-3dev")


def _device(name: str, flops: float, memory: float, overhead: float = 0.0) -> DeviceProfile:
    cm = ComputeModel(flops, overhead)
    return DeviceProfile(name, f"{name}:50051", cm, cm, ComputeModel(flops / 10, overhead), int(memory))


def tiny_cluster(rng: random.Random, n: int, cfg, seq_len: int, tight: bool) -> ClusterProfile:
    """Heterogeneous speeds, overheads, budgets (tight: some below an even share) and links,
    asymmetric, drawn from `rng`."""
    one = ClusterProfile([_device("x", 1e6, 1e12)], [[None]])
    full = CostModel(cfg, seq_len, one).estimate(
        Layout("local", (0,), (cfg.n_heads,), (cfg.ffn,), (cfg.vocab_size,), (seq_len,))).memory[0].used_bytes
    devs = []
    for i in range(n):
        mem = full * (rng.uniform(0.35, 0.9) if tight else 4.0)
        devs.append(_device(f"d{i}", rng.uniform(2e5, 2e6), mem, overhead=rng.choice([0.0, 1e-5, 1e-4])))
    links = [[None if i == j else Link(rng.choice([1e5, 1e6, 1e7, 1e8]), rng.choice([1e-5, 1e-4, 1e-3]))
              for j in range(n)] for i in range(n)]
    return ClusterProfile(devs, links)


def brute_force_galaxy(cm: CostModel, min_devices: int = 2) -> float:
    """Lowest feasible galaxy latency over every subset, ring order and integer split (inf: none fits)."""
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
