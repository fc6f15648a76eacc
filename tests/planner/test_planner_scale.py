"""The polynomial search for large clusters: its gap to brute force and to the exact search,
feasibility, determinism, the emulated clusters, ring orders, and the measurement script.

Gaps here are bounds the tests guard; the measured figures (more clusters, larger sizes, solve
times) are in docs/planner.md, produced by `python -m planner.scaling` (options: `galaxy bench
planner`). No test here is timed.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from planner_cases import TINY, TINY_3DEV, brute_force_galaxy, cluster, device, random_cluster

from galaxy.cli import main
from galaxy.model.config import preset
from planner.cost import CostModel, Layout
from planner.plan import PlanError
from planner.profile import ClusterProfile, Link, Tenancy
from planner.ring import exact_orders, refine_ring, ring_order
from planner.solver import EXACT_DEVICES, solve, solve_galaxy, solve_megatron, solve_pipeline, solve_seqpar
from planner.synthetic import EMULATED, emulated_cluster, synthetic_cluster

GAP_BRUTE_FORCE = 0.02  # the bound on the enumerable cases
GAP_EXACT = 0.05  # the bound wherever the exact search finishes
CFG = preset("gpt2-large")


def _plan_dict(plan) -> dict:
    d = plan.to_dict()
    d.pop("solver")
    return d


@pytest.mark.parametrize("seed", range(10))
def test_heuristic_within_2_percent_of_brute_force_on_two_devices(seed):
    cm = CostModel(TINY, 4, random_cluster(random.Random(seed), 2, TINY, 4, tight=seed % 2 == 0))
    best = brute_force_galaxy(cm)
    got = solve_galaxy(cm, "heuristic")[0]
    if math.isinf(best):
        assert got.estimate is None
        return
    assert got.estimate.feasible and got.latency_s <= best * (1 + GAP_BRUTE_FORCE)


@pytest.mark.parametrize("seed", [100, 106])
def test_heuristic_within_2_percent_of_brute_force_on_three_devices(seed):
    """Seed 106 is the instance the exact search was 5 % off before local search also started from
    all tokens on one device (docs/planner.md)."""
    cm = CostModel(TINY_3DEV, 3, random_cluster(random.Random(seed), 3, TINY_3DEV, 3, tight=seed % 2 == 0))
    best = brute_force_galaxy(cm)
    for method in ("heuristic", "exact"):
        got = solve_galaxy(cm, method)[0]
        assert got.estimate.feasible and got.latency_s <= best * (1 + GAP_BRUTE_FORCE), method


@pytest.mark.parametrize("n,seed", [(5, 0), (5, 3), (6, 1)])
def test_heuristic_within_5_percent_of_exact_for_every_strategy(n, seed):
    cl = synthetic_cluster(n, seed)
    h, e = solve(CFG, 256, cl, method="heuristic"), solve(CFG, 256, cl, method="exact")
    assert h.solver.method == "heuristic" and e.solver.method == "exact"
    assert h.latency_s <= e.latency_s * (1 + GAP_EXACT)
    for s in ("galaxy", "megatron", "seqpar", "pipeline", "local"):
        a, b = h.result(s).latency_s, e.result(s).latency_s
        assert (a is None) == (b is None), s
        if a is not None:
            assert a <= b * (1 + GAP_EXACT), s


@pytest.mark.parametrize("n,seed", [(12, 0), (16, 1), (24, 2)])
def test_every_strategy_fits_memory_on_large_clusters(n, seed):
    cm = CostModel(CFG, 256, synthetic_cluster(n, seed))
    outcomes = [solve_galaxy(cm, "heuristic")[0], solve_megatron(cm, "heuristic"), solve_seqpar(cm, "heuristic"),
                solve_pipeline(cm, "heuristic")]
    assert any(o.estimate is not None for o in outcomes)
    for o in outcomes:
        if o.estimate is not None:
            assert all(m.used_bytes <= m.budget_bytes for m in o.estimate.memory), o.strategy
            assert len(set(o.estimate.layout.order)) == len(o.estimate.layout.order)
    plan = solve(CFG, 256, synthetic_cluster(n, seed))
    assert plan.solver.method == "heuristic" and plan.solver.devices == n
    for d in plan.devices:
        assert d.memory.used_bytes <= d.memory.budget_bytes


def test_memory_starved_devices_make_the_search_use_several():
    """No device of this cluster holds GPT2-Large: the plan must spread it."""
    cl = synthetic_cluster(16, 3)
    cl = ClusterProfile([replace(d, memory_bytes=min(d.memory_bytes, int(1.2 * 2**30))) for d in cl.devices],
                        cl.links)
    plan = solve(CFG, 256, cl)
    assert plan.result("local").latency_s is None and len(plan.devices) >= 3
    assert sum(d.memory.weights_bytes for d in plan.devices) >= 3.0e9


def test_same_seed_same_cluster_and_same_plan():
    assert synthetic_cluster(16, 4).to_json() == synthetic_cluster(16, 4).to_json()
    assert synthetic_cluster(16, 4).to_json() != synthetic_cluster(16, 5).to_json()
    a, b = (solve(CFG, 256, synthetic_cluster(16, 4), method="heuristic") for _ in range(2))
    assert _plan_dict(a) == _plan_dict(b)


@pytest.mark.parametrize("name", sorted(EMULATED))
def test_emulated_clusters_get_the_exact_plan(name):
    """The clusters of devices/clusters/*.yaml: small enough for the exact search (what `auto`
    runs on them), and the heuristic picks the same strategy on the same devices in the same ring
    order; its local search has a budget, so the split may differ by a few units (measured: at
    most 0.003 %, docs/planner.md)."""
    cfg = preset(EMULATED[name][0])
    cl = emulated_cluster(name)
    auto = solve(cfg, 256, cl)
    assert len(cl.devices) <= EXACT_DEVICES and auto.solver.method == "exact"
    assert _plan_dict(auto) == _plan_dict(solve(cfg, 256, cl, method="exact"))
    h = solve(cfg, 256, cl, method="heuristic")
    assert (h.strategy, h.addresses()) == (auto.strategy, auto.addresses())
    assert h.latency_s <= auto.latency_s * (1 + 1e-3)


def test_co_tenants_on_loopback_are_found():
    """Three workers share an oversubscribed 2-core machine (profiled all busy, at 2/5 of what they
    get alone) and talk over loopback; the other devices profile faster but sit on slow Wi-Fi.
    The search must rank the workers at the speed they have with their co-tenants idle, and keep
    to the machine."""
    devs = [device(f"wifi{i}", 3e10, 8e9, overhead=1e-4) for i in range(6)]
    devs += [replace(device(f"vm{i}", 1.5e10, 8e9, overhead=1e-4), tenancy=Tenancy("box", c, 2))
             for i, c in enumerate((2.0, 1.0, 2.0))]
    n = len(devs)
    links = [[None if i == j else Link(10e9, 2e-5) if i >= 6 and j >= 6 else Link(20e6, 5e-3) for j in range(n)]
             for i in range(n)]
    plan = solve(CFG, 256, cluster(devs, links=links), strategy="galaxy", method="heuristic")
    assert {d.name for d in plan.devices} <= {"vm0", "vm1", "vm2"}
    exact = solve(CFG, 256, cluster(devs[3:], links=[row[3:] for row in links[3:]]), strategy="galaxy",
                  method="exact")
    assert plan.latency_s <= exact.latency_s * (1 + GAP_EXACT)


def test_solve_rejects_an_unknown_method():
    with pytest.raises(PlanError, match="method: 'fast' is not one of"):
        solve(CFG, 256, synthetic_cluster(3, 0), method="fast")


def test_ring_order_is_a_ring_through_every_device_and_follows_cheap_links():
    """Devices on a line, each linked fast to its neighbours only: a ring through all of them needs
    one slow link (from one end back to the other), and the heuristic ring has no more."""
    n = 7
    devs = [device(f"d{i}", 1e10, 8e9) for i in range(n)]
    links = [[None if i == j else Link(1e9 if abs(i - j) == 1 else 1e7, 1e-4) for j in range(n)] for i in range(n)]
    cm = CostModel(CFG, 256, cluster(devs, links=links))
    sub = tuple(random.Random(1).sample(range(n), n))
    order = ring_order(cm, sub, 1e5)
    assert order[0] == sub[0] and sorted(order) == list(range(n))
    slow = sum(abs(order[r] - order[(r + 1) % n]) != 1 for r in range(n))
    assert slow == 1  # a line closed into a ring: one slow link, the fewest possible


def test_refined_ring_is_never_worse_and_matches_every_order_on_a_small_ring():
    cm = CostModel(TINY, 4, random_cluster(random.Random(5), 5, TINY, 4, tight=False))

    def price(order):
        return cm.estimate(Layout("galaxy", order, (1, 1, 1, 1, 0), (2, 2, 2, 1, 1), (1, 1, 1, 1, 1),
                                  (1, 1, 1, 1, 0))).latency_s

    start = ring_order(cm, tuple(range(5)), 32.0)
    order, lat = refine_ring(start, price, 500)
    assert lat <= price(start) and sorted(order) == list(range(5))
    best = min(price(o) for o in exact_orders(cm, tuple(range(5))))
    assert lat <= best * (1 + GAP_EXACT)


def test_scaling_script_prints_the_tables(capsys):
    assert main(["bench", "planner", "--sizes", "5", "--seeds", "1", "--exact-up-to", "5", "--reps", "1",
                 "--random-init", "gpt2", "--seq-len", "32", "--brute-force", "1,0", "--no-emulated"]) == 0
    out = capsys.readouterr().out
    assert "| devices | clusters |" in out and "\n| 5 | 1 |" in out
    assert "brute force" in out and "| heuristic |" in out
