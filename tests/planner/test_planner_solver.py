"""The solver: against brute force, under memory pressure, dropping devices, choosing strategies."""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import replace

import pytest
from planner_cases import TINY, TINY_3DEV, brute_force_galaxy, cluster, device, edge_cluster, random_cluster

from galaxy.model.config import preset
from planner.cost import CostModel
from planner.plan import RUNNABLE, PlanError
from planner.profile import Tenancy
from planner.solver import solve, solve_galaxy, water_fill

# Measured on these instances (docs/planner.md): the solver matches brute force on every 2-device
# instance here; the bound below is what the test guards.
GAP_2_DEVICES = 0.01
GAP_3_DEVICES = 0.15


@pytest.mark.parametrize("seed", range(10))
def test_galaxy_matches_brute_force_on_two_devices(seed):
    rng = random.Random(seed)
    cl = random_cluster(rng, 2, TINY, 4, tight=seed % 2 == 0)
    cm = CostModel(TINY, 4, cl)
    best = brute_force_galaxy(cm)
    got = solve_galaxy(cm)[0]
    if math.isinf(best):
        assert got.estimate is None
        return
    assert got.estimate is not None and got.estimate.feasible
    assert got.latency_s <= best * (1 + GAP_2_DEVICES)


@pytest.mark.parametrize("seed", [0])
def test_galaxy_near_brute_force_on_three_devices(seed):
    rng = random.Random(100 + seed)
    cl = random_cluster(rng, 3, TINY_3DEV, 3, tight=seed == 0)
    cm = CostModel(TINY_3DEV, 3, cl)
    best = brute_force_galaxy(cm)
    got = solve_galaxy(cm)[0]
    assert got.estimate is not None and got.latency_s <= best * (1 + GAP_3_DEVICES)


def test_water_fill_is_the_greedy_optimum():
    rng = random.Random(3)
    for _ in range(200):
        n, total = rng.randint(1, 4), rng.randint(0, 30)
        lines = [(rng.choice([0.0, 0.5, 2.0]), rng.uniform(0.1, 3.0)) for _ in range(n)]
        caps = [rng.randint(0, 20) for _ in range(n)]
        got = water_fill(total, lines, caps)

        def cost(i, x, lines=lines):
            return 0.0 if x == 0 else lines[i][0] + lines[i][1] * x

        splits = [s for s in itertools.product(*(range(c + 1) for c in caps)) if sum(s) == total]
        if not splits:
            assert got is None
            continue
        best = min(max(cost(i, x) for i, x in enumerate(s)) for s in splits)
        assert sum(got) == total and all(x <= c for x, c in zip(got, caps))
        assert max(cost(i, x) for i, x in enumerate(got)) == pytest.approx(best)


def test_too_little_memory_says_how_much_is_missing():
    cl = edge_cluster(1e9, memory=(5e8, 5e8, 5e8))
    with pytest.raises(PlanError, match=r"the cluster can hold .* the model needs .* GiB missing; add a device"):
        solve(preset("gpt2-large"), 128, cl)
    with pytest.raises(PlanError, match="strategy local is infeasible: no device can hold the whole model"):
        solve(preset("gpt2-large"), 128, edge_cluster(1e9, memory=(2e9, 2e9, 2e9)), strategy="local")


def test_one_device_runs_locally():
    cfg = preset("gpt2")
    plan = solve(cfg, 32, cluster([device("solo", 1e10, 4e9)]))
    assert plan.strategy == "local" and plan.addresses() == ["solo:50051"]
    part = plan.to_partition(cfg)
    assert part.world == 1 and part.strategy == "galaxy" and part.tokens(32) == [32]


def test_a_slow_device_and_a_tiny_one_are_left_out():
    cfg = preset("gpt2")
    devs = [device("fast", 2e10, 4e9), device("fast2", 2e10, 4e9), device("snail", 2e7, 4e9),
            device("crumb", 2e10, 1e6)]
    plan = solve(cfg, 64, cluster(devs, 1e9, 1e-4), strategy="galaxy")
    assert [d.name for d in plan.devices] == ["fast", "fast2"]
    why = dict(plan.unused)
    assert "slower" in why["snail"]
    assert "budget" in why["crumb"] and "below the replicated weights" in why["crumb"]


def test_workers_sharing_too_few_cores_are_not_all_used():
    """Three one-thread workers on two cores, profiled all busy (2/3 of a core each): two of them get a
    core each, the same compute as three with less traffic. Measured by `galaxy bench --quick`: the
    planner's three-worker galaxy ran 0.87x local, the two-worker galaxy it picks now 1.40x."""
    cfg = preset("gpt2")
    shared = [replace(device(f"w{i}", 1e10, 4e9), tenancy=Tenancy("boot-a", 1.0, 2)) for i in range(3)]
    plan = solve(cfg, 64, cluster(shared, 1e10, 1e-4), strategy="galaxy")
    assert len(plan.devices) == 2
    [(_, why)] = plan.unused
    assert "slower" in why  # adding the third makes the pass slower
    apart = [device(f"w{i}", 1e10, 4e9) for i in range(3)]  # the same speeds on machines of their own
    assert len(solve(cfg, 64, cluster(apart, 1e10, 1e-4), strategy="galaxy").devices) == 3


def test_heterogeneous_speeds_give_proportional_splits():
    cfg = preset("gpt2-large")
    plan = solve(cfg, 256, edge_cluster(1e10, memory=(8e9,) * 3, gflops=(40, 20, 10), latency_s=1e-5),
                 strategy="galaxy")
    speed = {"xavier": 4, "tx2": 2, "nano": 1}
    for d in plan.devices:
        share = speed[d.name] / 7
        assert abs(d.heads - cfg.n_heads * share) <= 1.5
        assert abs(d.mlp_cols / cfg.ffn - share) < 0.03
        assert abs(d.vocab_rows / cfg.vocab_size - share) < 0.03


def test_memory_caps_move_work_off_the_small_device():
    cfg = preset("gpt2-large")
    roomy = solve(cfg, 128, edge_cluster(1e10, memory=(8e9,) * 3), strategy="galaxy")
    tight = solve(cfg, 128, edge_cluster(1e10, memory=(6e8, 8e9, 8e9)), strategy="galaxy")
    fast_roomy = next(d for d in roomy.devices if d.name == "xavier")
    fast_tight = next(d for d in tight.devices if d.name == "xavier")
    assert fast_tight.memory.weights_bytes < fast_roomy.memory.weights_bytes / 2
    assert fast_tight.memory.used_bytes <= 6e8 and fast_tight.memory.used_bytes > 0.9 * 6e8
    assert tight.latency_s > roomy.latency_s
    for d in tight.devices:
        assert d.memory.used_bytes <= d.memory.budget_bytes


def test_strategy_flips_from_galaxy_to_local_or_pipeline_on_slow_links():
    cfg = preset("gpt2-large")
    fast = solve(cfg, 128, edge_cluster(1e9))
    assert fast.strategy == "galaxy" and fast.latency_s < fast.result("local").latency_s
    slow = solve(cfg, 128, edge_cluster(1e7))
    assert slow.strategy in ("local", "pipeline")
    assert slow.result("galaxy").latency_s > slow.latency_s
    assert "wins" in slow.reason
    # no single device holds GPT2-large: at 10 Mbit/s one pipeline hand-off beats HMP's per-layer traffic
    split = solve(cfg, 128, edge_cluster(1e7, memory=(2.5e9, 2.5e9, 2.5e9)))
    assert split.strategy == "pipeline" and split.result("local").latency_s is None
    assert sum(d.layers for d in split.devices) == cfg.n_layers
    assert split.to_partition(cfg).strategy == "pipeline"


def test_every_strategy_is_reported_and_only_runnable_ones_are_chosen():
    cfg = preset("gpt2-large")
    plan = solve(cfg, 128, edge_cluster(1e8))
    assert {r.strategy for r in plan.strategies} == {"galaxy", "galaxy-no-overlap", "megatron", "seqpar", "pipeline",
                                                      "local"}
    assert plan.strategy in RUNNABLE
    g, g0 = plan.result("galaxy").latency_s, plan.result("galaxy-no-overlap").latency_s
    assert g < g0
    sp = solve(cfg, 128, edge_cluster(1e8), strategy="seqpar")
    assert sp.strategy == "seqpar"
    part = sp.to_partition(cfg)  # the whole model on each device, the planned tokens
    assert part.strategy == "seqpar" and part.tokens(128) == [d.tokens for d in sp.devices]
    meg = solve(cfg, 128, edge_cluster(1e8), strategy="megatron")
    heads = [d.heads for d in meg.devices]
    assert max(heads) - min(heads) <= 1


def test_solve_is_fast_enough():
    cfg = preset("gpt2-large")
    t0 = time.perf_counter()
    solve(cfg, 128, edge_cluster(1e9))
    assert time.perf_counter() - t0 < 5
