"""How the solver scales, and what the polynomial search gives up: the figures in docs/planner.md.

    PYTHONPATH=$PWD flock /tmp/galaxy-cpu.lock python -m planner.scaling          # the default tables
    PYTHONPATH=$PWD flock /tmp/galaxy-cpu.lock python -m galaxy.cli bench planner --sizes 4,8,16  # chosen

prints these tables:

1. devices x solve time x gap: on seeded synthetic clusters (planner/synthetic.py) of each size,
   the median solve time of the heuristic search (and of the exact one where it still runs, up to
   --exact-up-to devices), and the gap of the heuristic's predicted latency to the exact one's:
   of the chosen plan and of each strategy's best layout. A negative gap: the heuristic found the
   better layout (both split by construction and local search, neither is optimal).
2. the gap of each search to brute force (planner/brute_force.py) on the tiny models the tests
   enumerate, over more seeded clusters than the tests use.
3. the emulated clusters of devices/clusters (synthetic.EMULATED): the exact search's plan (what
   `auto` runs on them) and the heuristic's;
4. with --rings N: the heuristic's ring orders against every order, on N random subsets.

Times are wall-clock medians over --reps solves in one process (after one warm-up solve), on
whatever machine runs it: run it under the CPU lock, with nothing else busy.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass

from galaxy.model.config import preset

from .brute_force import TINY, TINY_3DEV, brute_force_galaxy, tiny_cluster
from .cost import CostModel
from .plan import PlanError
from .ring import nearest_link_order, refine_ring, ring_order
from .solver import solve, solve_galaxy
from .split import GalaxySplit
from .synthetic import EMULATED, emulated_cluster, synthetic_cluster

STRATEGIES = ("galaxy", "megatron", "seqpar", "pipeline")


def _timed(cfg, seq_len, cluster, method, repeats):
    """(plan, median seconds) of `repeats` solves; plan None when nothing fits the cluster."""
    times, plan = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            plan = solve(cfg, seq_len, cluster, method=method)
        except PlanError:
            plan = None
        times.append(time.perf_counter() - t0)
    return plan, statistics.median(times)


def _gap(h, e) -> float | None:
    return None if h is None or e is None else h / e - 1


def _fmt_gap(gaps) -> str:
    gaps = [g for g in gaps if g is not None]
    if not gaps:
        return "-"
    return f"{100 * max(gaps):+.2f} %"


def size_table(sizes, seeds, exact_up_to, repeats, cfg, seq_len) -> list[str]:
    solve(cfg, seq_len, synthetic_cluster(4, 0), method="heuristic")  # warm up imports and caches
    head = ("| devices | clusters | exact s (median / max) | heuristic s (median / max) | plan gap (median / max) "
            "| " + " | ".join(f"{s} gap max" for s in STRATEGIES) + " | heuristic worse / same / better |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for n in sizes:
        ht, et, plan_gaps, worse, same, better = [], [], [], 0, 0, 0
        by_strategy = {s: [] for s in STRATEGIES}
        missed = {s: 0 for s in (*STRATEGIES, "plan")}  # exact found a layout, the heuristic none
        unplanned = 0  # clusters nothing fits
        for seed in range(seeds):
            cl = synthetic_cluster(n, seed)
            h, t = _timed(cfg, seq_len, cl, "heuristic", repeats)
            ht.append(t)
            if n > exact_up_to:
                continue
            e, t = _timed(cfg, seq_len, cl, "exact", repeats)
            et.append(t)
            if h is None or e is None:  # nothing fits: both must say so
                unplanned += 1
                missed["plan"] += h is None and e is not None
                continue
            g = _gap(h.latency_s, e.latency_s)
            plan_gaps.append(g)
            worse, same, better = worse + (g > 1e-9), same + (abs(g) <= 1e-9), better + (g < -1e-9)
            for s in STRATEGIES:
                a, b = h.result(s).latency_s, e.result(s).latency_s
                by_strategy[s].append(_gap(a, b))
                missed[s] += a is None and b is not None
        cell = (lambda ts: f"{statistics.median(ts):.3f} / {max(ts):.3f}" if ts else "-")
        pg = f"{100 * statistics.median(plan_gaps):+.2f} / {100 * max(plan_gaps):+.2f} %" if plan_gaps else "-"
        strat = [_fmt_gap(by_strategy[s]) + (f" ({missed[s]} missed)" if missed[s] else "") for s in STRATEGIES]
        counts = f"{worse} / {same} / {better}" if plan_gaps else "-"
        counts += f" ({unplanned} unplannable)" if unplanned else ""
        counts += f" ({missed['plan']} MISSED)" if missed["plan"] else ""
        lines.append(f"| {n} | {seeds} | {cell(et)} | {cell(ht)} | {pg} | " + " | ".join(strat) + f" | {counts} |")
        print(lines[-1], flush=True)
    return lines


def brute_force_table(two: int, three: int) -> list[str]:
    """Both searches' galaxy against brute force; the tests' instances are the first of each kind
    (two devices: seeds 0-9; three devices: seed 100)."""
    head = "| case | instances | method | exact (gap 0) | gap max | gap mean | brute force s (median) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    kinds = [("2 devices, 4 heads / 8 cols / 5 vocab / 4 tokens", TINY, 4, 2, range(two)),
             ("3 devices, 3 heads / 3 cols / 2 vocab / 3 tokens", TINY_3DEV, 3, 3, range(100, 100 + three))]
    for label, cfg, seq_len, n, seeds in kinds:
        if not seeds:
            continue
        gaps = {"exact": [], "heuristic": []}
        bf_t = []
        for seed in seeds:
            tight = (seed - seeds.start) % 2 == 0
            cl = tiny_cluster(random.Random(seed), n, cfg, seq_len, tight=tight)
            t0 = time.perf_counter()
            best = brute_force_galaxy(CostModel(cfg, seq_len, cl))
            bf_t.append(time.perf_counter() - t0)
            for method in gaps:
                got = solve_galaxy(CostModel(cfg, seq_len, cl), method)[0]
                if best == float("inf"):
                    gaps[method].append(0.0 if got.estimate is None else None)
                else:
                    gaps[method].append(None if got.estimate is None else got.latency_s / best - 1)
        for method, gs in gaps.items():
            ok = [g for g in gs if g is not None]
            missed = "" if len(ok) == len(gs) else f" {len(gs) - len(ok)} missed"
            lines.append(f"| {label} | {len(gs)} | {method} | {sum(g <= 1e-12 for g in ok)} | "
                         f"{100 * max(ok):.2f} % | {100 * statistics.mean(ok):.3f} % | "
                         f"{statistics.median(bf_t):.2f} |{missed}")
            print(lines[-1], flush=True)
    return lines


def emulated_table(seq_lens) -> list[str]:
    head = "| cluster | model | seq_len | exact plan | heuristic plan | heuristic gap |"
    lines = [head, "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, (model, _, _) in EMULATED.items():
        cfg = preset(model)
        for s in seq_lens:
            try:
                e = solve(cfg, s, emulated_cluster(name), method="exact")
                h = solve(cfg, s, emulated_cluster(name), method="heuristic")
            except PlanError as err:
                lines.append(f"| {name} | {model} | {s} | {err} | | |")
                print(lines[-1], flush=True)
                continue

            def show(p):
                return f"{p.strategy} on {'+'.join(d.name for d in p.devices)}, {p.latency_s:.6g} s"

            lines.append(f"| {name} | {model} | {s} | {show(e)} | {show(h)} | "
                         f"{100 * (h.latency_s / e.latency_s - 1):+.4f} % |")
            print(lines[-1], flush=True)
    return lines


def ring_table(subsets: int, cfg, seq_len) -> list[str]:
    """Ring orders against every order, priced on the cost model with the subset's constructive
    galaxy split: random 4-6-device subsets of 12-device clusters and 7-8-device subsets of
    16-device clusters (720 / 5040 orders each)."""
    head = "| subsets | devices | order | gap max | gap mean | best order found |"
    lines = [head, "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n, sizes in ((12, (4, 5, 6)), (16, (7, 8))):
        gaps = {"nearest fast link": [], "ring_order": [], "ring_order + refine_ring": []}
        for seed in range(subsets):
            rng = random.Random(f"rings-{n}-{seed}")
            cm = CostModel(cfg, seq_len, synthetic_cluster(n, seed))
            gx = GalaxySplit(cm)
            k = rng.choice(sizes)
            sub = tuple(sorted(rng.sample(range(n), k)))
            x = gx.allocate(sub)
            if x is None:
                continue

            def price(order, sub=sub, x=x, cm=cm, gx=gx):
                e = cm.estimate(gx.layout(order, sub, x))
                return e.latency_s if e.feasible else None

            every = [(sub[0], *rest) for rest in itertools.permutations(sub[1:])]  # all (k-1)! rings
            best = min(p for p in map(price, every) if p is not None)
            ring = ring_order(cm, sub, seq_len / k * cfg.hidden * cm.b)
            gaps["nearest fast link"].append(price(nearest_link_order(cm, sub)) / best - 1)
            gaps["ring_order"].append(price(ring) / best - 1)
            gaps["ring_order + refine_ring"].append(refine_ring(ring, price, 300)[1] / best - 1)
        for name, gs in gaps.items():
            lines.append(f"| {len(gs)} | {min(sizes)}-{max(sizes)} of {n} | {name} | {100 * max(gs):.2f} % | "
                         f"{100 * statistics.mean(gs):.2f} % | {sum(g <= 1e-12 for g in gs)} |")
            print(lines[-1], flush=True)
    return lines


@dataclass(frozen=True)
class ScalingConfig:
    """What `run` measures. The defaults are the full tables (minutes, under the CPU lock); `galaxy bench
    planner` sets them from its options (this module reads no argv: only galaxy.cli does)."""

    sizes: tuple[int, ...] = (4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)  # cluster sizes (devices)
    seeds: int = 10  # synthetic clusters per size
    exact_up_to: int = 8  # largest cluster the exact search also solves
    repeats: int = 3  # solves timed per cluster (median)
    model: str = "gpt2-large"  # a preset (galaxy.model.config.PRESETS)
    seq_len: int = 256
    brute_force: tuple[int, int] = (100, 20)  # two-device, three-device instances ((0, 0): skip)
    emulated: bool = True  # plan the emulated clusters too
    rings: int = 0  # random subsets whose ring orders to check (0: skip)

    def __post_init__(self):
        for name in ("seeds", "repeats", "seq_len"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name}: {getattr(self, name)} must be at least 1")
        if not self.sizes or min(self.sizes) < 1:
            raise PlanError(f"sizes: {self.sizes} must be at least 1 device each")
        if len(self.brute_force) != 2 or min(self.brute_force) < 0:
            raise PlanError(f"brute_force: {self.brute_force} must be two counts >= 0 (two-, three-device)")
        if self.rings < 0:
            raise PlanError(f"rings: {self.rings} must be >= 0")


def run(sc: ScalingConfig) -> None:
    """Print the tables `sc` asks for (each row as soon as it is measured)."""
    cfg = preset(sc.model)
    if not 1 <= sc.seq_len <= cfg.max_positions:
        raise PlanError(f"seq_len: {sc.seq_len} outside 1..{cfg.max_positions} of {cfg.name}")
    print(f"## solve time and gap: {sc.model}, {sc.seq_len} tokens, synthetic clusters seeds 0-{sc.seeds - 1}, "
          f"median of {sc.repeats}")
    size_table(sc.sizes, sc.seeds, sc.exact_up_to, sc.repeats, cfg, sc.seq_len)
    two, three = sc.brute_force
    if two or three:
        print("\n## galaxy against brute force")
        brute_force_table(two, three)
    if sc.emulated:
        print("\n## emulated clusters")
        emulated_table([128, 256])
    if sc.rings:
        print("\n## ring orders against every order")
        ring_table(sc.rings, cfg, sc.seq_len)


if __name__ == "__main__":  # the default tables; options: galaxy bench planner --help
    run(ScalingConfig())
