"""The partition solver: which devices, in which ring order, hold how many heads, MLP columns,
vocabulary rows, tokens or layers -- the layout with the lowest predicted latency (cost.py)
whose shards fit every device's memory.

`solve` searches each strategy and compares them:

- galaxy (HMP). For every subset of devices (all of them up to 8 devices; backward elimination
  beyond): (1) split heads, columns and vocabulary rows by water-filling, the closed form of
  the greedy "give the next unit to the device that would finish it soonest" (optimal for the
  min-max of each phase when memory does not bind); tokens evenly; (2) repair memory: while a
  device is over budget, take away the units of the kind whose removal costs the least time
  per byte freed, re-water-filling that kind over the devices with room; (3) evaluate every
  ring order (all of them up to 6 devices, first device fixed; one order when the links are
  all alike; nearest-fast-link order beyond). The best few (subset, order) candidates then go
  through (4) local search on the full cost model: moves of heads / columns / vocabulary rows /
  tokens between two devices in steps from a quarter of the total down to one, and memory-
  neutral exchanges of two kinds, accepted while the predicted latency improves.
- megatron: even split (split_even) over the best subset and ring order.
- seqpar: every device holds the whole model; tokens water-filled by per-token time.
- pipeline: every ordered set of stages (up to 6; greedy order beyond); each stage one layer,
  the rest to the fastest stages up to their memory -- exact for a single request, whose
  latency is the sum of stage compute plus the hand-offs.
- local: the fastest device that can hold the whole model.

The automatic choice takes the fastest of RUNNABLE. docs/planner.md
gives the complexity and the measured gap to brute force.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

from galaxy.config import ModelConfig
from galaxy.sharding import ShardSpec, split_even
from galaxy.units import fmt_bytes, fmt_rate

from .cost import CostModel, Estimate, Layout, seqpar_activation_bytes, weight_bytes
from .plan import (
    RUNNABLE,
    DeviceMemory,
    DevicePlan,
    DeviceTiming,
    ModelRef,
    Plan,
    PlanError,
    StrategyResult,
)
from .profile import ClusterProfile, activation_bytes, attention_flops, head_flops, mlp_flops
from .ring import MAX_ORDER_DEVICES, nearest_link_order
from .split import KINDS, GalaxySplit, by_head_split, gx_missing, search_key, steps, water_fill

log = logging.getLogger(__name__)

MAX_SUBSET_DEVICES = 8  # all subsets up to this many devices; backward elimination beyond
LOCAL_SEARCH_CANDIDATES = 3  # (subset, order) pairs refined by local search (1 beyond 4 devices)
PREFERENCE = ("local", "pipeline", "galaxy", "megatron", "seqpar")  # tie-break: the simplest runnable first
HEAD_SPLITS_ENUMERATED = 300  # enumerate every head split of a candidate when there are at most this many


@dataclass(frozen=True)
class Outcome:
    """One strategy's best layout (or why there is none)."""

    strategy: str
    estimate: Estimate | None
    reason: str
    missing_bytes: int = 0  # > 0: memory the cluster lacks for this strategy

    @property
    def latency_s(self) -> float | None:
        return None if self.estimate is None else self.estimate.latency_s


# --- galaxy ----------------------------------------------------------------------------------

def _subsets(n: int, smallest: int = 1):
    idx = range(n)
    for k in range(min(smallest, n), n + 1):
        yield from itertools.combinations(idx, k)


def solve_galaxy(cm: CostModel) -> tuple[Outcome, dict[tuple[int, ...], float]]:
    """Best HMP layout, and the best constructive latency of every feasible subset (for reasons)."""
    gx = GalaxySplit(cm)
    by_subset: dict[tuple[int, ...], float] = {}
    cands: list[tuple[float, Estimate]] = []

    def consider(sub) -> float | None:
        x = gx.allocate(sub)
        if x is None:
            if gx.may_fit(sub):
                hard.append(sub)
            return None
        best = None
        for order in gx.orders(sub):
            e = cm.estimate(gx.layout(order, sub, x))
            if not e.feasible:  # the linear memory model is conservative, so this is rare
                continue
            cands.append((e.latency_s, e))
            best = e.latency_s if best is None else min(best, e.latency_s)
        if best is not None:
            by_subset[sub] = best
        return best

    hard: list[tuple[int, ...]] = []  # subsets the conservative split could not fit, but might fit
    if cm.n <= MAX_SUBSET_DEVICES:
        for sub in _subsets(cm.n, 2):
            consider(sub)
    else:  # backward elimination from the whole cluster
        cur = tuple(range(cm.n))
        cur_lat = consider(cur)
        while len(cur) > 1:
            trials = [(consider(tuple(i for i in cur if i != d)), d) for d in cur]
            trials = [(t, d) for t, d in trials if t is not None]
            if not trials or (cur_lat is not None and min(trials)[0] >= cur_lat):
                break
            cur_lat, d = min(trials)
            cur = tuple(i for i in cur if i != d)
    cands.sort(key=lambda c: c[0])
    picked, seen = [], set()
    for _, e in cands:  # the best few, at most one order per subset
        sub = tuple(sorted(e.layout.order))
        if sub not in seen:
            seen.add(sub)
            picked.append(e)
        if len(picked) == (LOCAL_SEARCH_CANDIDATES if len(sub) <= 4 else 1):
            break
    if not picked:  # nothing fitted by construction: search for a fit from plain starting points
        for sub in sorted(hard, key=len)[:LOCAL_SEARCH_CANDIDATES]:
            picked += [cm.estimate(lay) for lay in gx.starts(gx.orders(sub)[0])]
    refined = [gx.local_search(e) for e in picked]
    top = min(refined, key=lambda e: (search_key(e), len(e.layout.order)), default=None)
    if top is not None and top.feasible:  # the best one: also descend from other starting points
        order = top.layout.order
        if len(order) <= 4:
            refined += [gx.local_search(cm.estimate(lay)) for lay in gx.starts(order)]
        if math.comb(cm.cfg.n_heads + len(order) - 1, len(order) - 1) <= HEAD_SPLITS_ENUMERATED:
            refined += [gx.local_search(x, kinds=KINDS[1:]) for x in by_head_split(gx, order, keep=3)]
    refined = [e for e in refined if e.feasible]
    for e in list(refined):  # a device left holding no weights only relays: try the ring without it
        lay = e.layout
        idle = [r for r in range(len(lay.order)) if not (lay.heads[r] or lay.cols[r] or lay.vocab[r])]
        if idle and len(lay.order) - len(idle) >= 2:
            keep = [r for r in range(len(lay.order)) if r not in idle]
            tokens = [lay.tokens[r] for r in keep]
            tokens[0] += cm.S - sum(tokens)
            smaller = Layout("galaxy", *(tuple(v[r] for r in keep) for v in
                                         (lay.order, lay.heads, lay.cols, lay.vocab)), tuple(tokens))
            refined.append(gx.local_search(cm.estimate(smaller)))
    refined = [e for e in refined if e.feasible]
    if not refined:
        return Outcome("galaxy", None, "no subset of devices can hold the model's shards", gx_missing(gx)), by_subset
    best = min(refined, key=lambda e: (e.latency_s, len(e.layout.order)))
    sub = tuple(sorted(best.layout.order))
    by_subset[sub] = min(by_subset.get(sub, math.inf), best.latency_s)
    return Outcome("galaxy", best, _galaxy_summary(cm, best)), by_subset


# --- megatron, seqpar, pipeline, local -------------------------------------------------------

def solve_megatron(cm: CostModel) -> Outcome:
    cfg, best = cm.cfg, None
    gx = GalaxySplit(cm)
    for sub in _subsets(cm.n, 2) if cm.n <= MAX_SUBSET_DEVICES else [tuple(range(cm.n))]:
        k = len(sub)
        split = [split_even(t, k) for t in (cfg.n_heads, cfg.ffn, cfg.vocab_size)]
        if min(gx.room[i] for i in sub) < 0:
            continue
        for order in gx.orders(sub):
            e = cm.estimate(Layout("megatron", order, *map(tuple, split)))
            if e.feasible and (best is None or e.latency_s < best.latency_s):
                best = e
    if best is None:
        return Outcome("megatron", None, "no subset can hold an even split of the model")
    return Outcome("megatron", best, f"even split over {len(best.layout.order)} devices, "
                   f"{_comm_phrase(cm, best)}")


def solve_seqpar(cm: CostModel) -> Outcome:
    cfg, S, b, L = cm.cfg, cm.S, cm.b, cm.cfg.n_layers
    full = weight_bytes(cfg, ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (0, L)), b)
    per_tok = seqpar_activation_bytes(cfg, S, 1, b) - seqpar_activation_bytes(cfg, S, 0, b)
    base = seqpar_activation_bytes(cfg, S, 0, b)
    caps = [max(-1, int((d.memory_bytes - full - base) // per_tok)) for d in cm.devices]
    able = [i for i in range(cm.n) if caps[i] >= 1]
    if not able:
        biggest = max(d.memory_bytes for d in cm.devices)
        return Outcome("seqpar", None, f"every device would hold the whole model ({fmt_bytes(full + base)}), "
                       f"the largest budget is {fmt_bytes(biggest)}", int(full + base + per_tok - biggest))
    gx = GalaxySplit(cm)
    lines = []
    for d in cm.devices:
        fa = attention_flops(cfg, cfg.n_heads, 1, cfg.n_kv_heads) + 4.0 * (S - 1) * cfg.head_dim * cfg.n_heads
        t = L * (fa / d.attention.flops_per_s + mlp_flops(cfg, cfg.ffn, 1) / d.mlp.flops_per_s
                 + 16.0 * cfg.hidden / d.connective.flops_per_s)
        o = L * (d.attention.overhead_s + d.mlp.overhead_s + 2 * d.connective.overhead_s)
        lines.append((o, t))
    best = None
    subs = _subsets(len(able), 2) if len(able) <= MAX_SUBSET_DEVICES else [tuple(range(len(able)))]
    for sub_pos in subs:
        sub = tuple(able[p] for p in sub_pos)
        x = water_fill(S, [lines[i] for i in sub], [caps[i] for i in sub])
        if x is None:
            continue
        for order in gx.orders(sub):
            pos = {i: r for r, i in enumerate(sub)}
            e = cm.estimate(Layout("seqpar", order, tokens=tuple(x[pos[i]] for i in order)))
            if e.feasible and (best is None or e.latency_s < best.latency_s):
                best = e
    if best is None:
        return Outcome("seqpar", None, "no set of devices holding the whole model can split the tokens")
    best = _token_search(cm, best)
    return Outcome("seqpar", best, f"whole model on each of {len(best.layout.order)} devices, "
                   f"{_comm_phrase(cm, best)}")


def _token_search(cm: CostModel, est: Estimate) -> Estimate:
    lay, n = est.layout, len(est.layout.order)
    improved = True
    while improved:
        improved = False
        for step in steps(cm.S, n):
            for i, j in itertools.permutations(range(n), 2):
                t = list(lay.tokens)
                if t[i] < step:
                    continue
                t[i] -= step
                t[j] += step
                e = cm.estimate(Layout(lay.strategy, lay.order, tokens=tuple(t)))
                if e.feasible and e.latency_s < est.latency_s * (1 - 1e-12):
                    est, lay, improved = e, e.layout, True
    return est


def solve_pipeline(cm: CostModel) -> Outcome:
    cfg, S, b, L = cm.cfg, cm.S, cm.b, cm.cfg.n_layers
    full_h, full_c, full_v = (0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size)
    per_layer = weight_bytes(cfg, ShardSpec(full_h, full_c, full_v, (0, 1), embed=False, head=False), b)
    role_bytes = {role: weight_bytes(cfg, ShardSpec(full_h, full_c, full_v, (0, 0), embed=e, head=h), b)
                  for role, e, h in (("first", True, False), ("last", False, True), ("only", True, True),
                                     ("mid", False, False))}
    act = activation_bytes(cfg, S, cfg.n_heads, cfg.ffn, S, b)
    act_last = max(act, cm.head_activation(cfg.vocab_size))
    t_layer = [cm.full_layer_s(i) for i in range(cm.n)]
    t_first = [cm.con_s(i, S) for i in range(cm.n)]
    t_last = [(cm.con_s(i, S) + cm.head_model(i).seconds(head_flops(cfg, cfg.vocab_size, 1))) if cfg.causal else 0.0
              for i in range(cm.n)]
    hand = S * cfg.hidden * b

    def cap(i, role):
        a = act_last if role in ("last", "only") else act
        return int((cm.devices[i].memory_bytes - a - role_bytes[role]) // per_layer)

    caps = {role: [cap(i, role) for i in range(cm.n)] for role in role_bytes}
    best = None
    sizes = range(2, cm.n + 1) if cm.n > 1 else [1]
    uniform = len({cm.link(i, j) for i in range(cm.n) for j in range(cm.n) if cm.has_link(i, j)}) <= 1 and all(
        cm.has_link(i, j) for i in range(cm.n) for j in range(cm.n) if i != j)

    def sequences(m):
        if uniform:  # only the first and last stage matter: they hold the embedding and the head
            for sub in itertools.combinations(range(cm.n), m):
                for a, z in itertools.permutations(sub, 2) if m > 1 else [(sub[0], sub[0])]:
                    yield (a, *(i for i in sub if i not in (a, z)), z) if m > 1 else sub
        elif m <= MAX_ORDER_DEVICES:
            yield from itertools.permutations(range(cm.n), m)
        else:
            yield from (o for o in (nearest_link_order(cm, s) for s in itertools.combinations(range(cm.n), m)) if o)

    for m in sizes:
        for seq in sequences(m):
            if m == 1:
                c = [caps["only"][seq[0]]]
            else:
                c = [caps["first"][seq[0]], *(caps["mid"][i] for i in seq[1:-1]), caps["last"][seq[-1]]]
            if min(c) < 1 or sum(c) < L:
                continue
            if any(not cm.has_link(seq[r], seq[r + 1]) for r in range(m - 1)):
                continue
            layers = [1] * m
            left = L - m
            if left < 0:
                continue
            for r in sorted(range(m), key=lambda r: t_layer[seq[r]]):  # the rest to the fastest stages
                extra = min(left, c[r] - 1)
                layers[r] += extra
                left -= extra
            lat = sum(n * t_layer[i] for n, i in zip(layers, seq)) + t_first[seq[0]] + t_last[seq[-1]]
            lat += sum(cm.link(seq[r], seq[r + 1])[0] * hand + cm.link(seq[r], seq[r + 1])[1] for r in range(m - 1))
            if best is None or lat < best[0] - 1e-15:
                best = (lat, seq, layers)
    if best is None:
        most = sum(sorted((max(0, caps["mid"][i]) for i in range(cm.n)), reverse=True))
        missing = (L - most) * per_layer + role_bytes["only"] - role_bytes["mid"] if most < L else 0
        return Outcome("pipeline", None, f"the devices can hold at most {most} of the {L} layers "
                       f"({fmt_bytes(per_layer)} each) besides their activations", int(max(0, missing)))
    e = cm.estimate(Layout("pipeline", best[1], layers=tuple(best[2])))
    return Outcome("pipeline", e, f"{len(best[1])} stages, layers {list(best[2])}, hands "
                   f"{fmt_bytes(hand)} down {len(best[1]) - 1} time(s)")


def solve_local(cm: CostModel) -> Outcome:
    cfg, best = cm.cfg, None
    for i in range(cm.n):
        e = cm.estimate(Layout("local", (i,), (cfg.n_heads,), (cfg.ffn,), (cfg.vocab_size,), (cm.S,)))
        if e.feasible and (best is None or e.latency_s < best.latency_s):
            best = e
    if best is None:
        e = cm.estimate(Layout("local", (0,), (cfg.n_heads,), (cfg.ffn,), (cfg.vocab_size,), (cm.S,)))
        need, biggest = e.memory[0].used_bytes, max(d.memory_bytes for d in cm.devices)
        return Outcome("local", None, f"no device can hold the whole model ({fmt_bytes(need)}); the largest "
                       f"budget is {fmt_bytes(biggest)}", need - biggest)
    return Outcome("local", best, f"the whole model on {cm.devices[best.layout.order[0]].name}, no network")


# --- reasons ---------------------------------------------------------------------------------

def _slowest_link(cm: CostModel, order) -> float:
    return 8.0 / max(spb for spb, _ in cm.ring_links(order))


def _comm_phrase(cm: CostModel, e: Estimate) -> str:
    if len(e.layout.order) == 1:
        return "no network"
    return (f"sends {fmt_bytes(e.wire_bytes)} per device per pass over links down to "
            f"{fmt_rate(_slowest_link(cm, e.layout.order))}, {e.exposed_comm_s:.3g} s of it not hidden")


def _galaxy_summary(cm: CostModel, e: Estimate) -> str:
    hidden = sum(p.hidden_s for p in e.phases) * e.repeat + sum(p.hidden_s for p in e.once)
    return (f"HMP over {len(e.layout.order)} devices, {_comm_phrase(cm, e)} (overlap hides {hidden:.3g} s)")


def _choice_reason(cm: CostModel, win: Outcome, outcomes: dict[str, Outcome], forced: bool) -> str:
    lat = win.latency_s
    others = [o for s, o in outcomes.items() if s in RUNNABLE and s != win.strategy and o.estimate is not None]
    head = f"{win.strategy} predicted {lat:.3g} s"
    if forced:
        head += " (strategy forced)"
    if others:
        run = min(others, key=lambda o: o.latency_s)
        head += f", next best {run.strategy} {run.latency_s:.3g} s"
        if win.strategy in ("galaxy", "megatron") or run.strategy in ("galaxy", "megatron"):
            tp = win if win.strategy in ("galaxy", "megatron") else run
            head += f"; {tp.strategy} {_comm_phrase(cm, tp.estimate)}"
            other = run if tp is win else win
            if other.strategy == "pipeline":
                n = len(other.estimate.layout.order)
                head += f", pipeline moves {fmt_bytes(other.estimate.wire_bytes)} {n - 1} time(s)"
            elif other.strategy == "local":
                head += ", local sends nothing"
    head += f": {win.strategy} wins" if not forced else ""
    return head


# --- the entry point -----------------------------------------------------------------------------

def solve(cfg: ModelConfig, seq_len: int, cluster: ClusterProfile, strategy: str | None = None,
          dtype_bytes: int = 4) -> Plan:
    """The plan with the lowest predicted prefill latency whose shards fit every device.

    strategy: None picks the fastest runnable strategy; "galaxy", "megatron", "pipeline", "local"
    or "seqpar" forces one. Raises PlanError when nothing fits (saying how many bytes are missing)
    or the forced strategy is infeasible.
    """
    choices = ("galaxy", "megatron", "pipeline", "local", "seqpar")
    if strategy is not None and strategy not in choices:
        raise PlanError(f"strategy: {strategy!r} is not one of {choices}")
    cm = CostModel(cfg, seq_len, cluster, dtype_bytes)
    galaxy, by_subset = solve_galaxy(cm)
    outcomes = {"galaxy": galaxy, "megatron": solve_megatron(cm), "seqpar": solve_seqpar(cm),
                "pipeline": solve_pipeline(cm), "local": solve_local(cm)}
    if galaxy.estimate is not None:
        e = cm.estimate(Layout("galaxy-no-overlap", *_fields(galaxy.estimate.layout)))
        outcomes["galaxy-no-overlap"] = Outcome("galaxy-no-overlap", e, "the galaxy layout with communication and "
                                                "compute added (no tile overlap)")
    if strategy is not None:
        win = outcomes[strategy]
        if win.estimate is None:
            raise PlanError(f"strategy {strategy} is infeasible: {win.reason}" + _missing_text(cm, outcomes, strategy))
    else:
        ok = [o for s, o in outcomes.items() if s in RUNNABLE and o.estimate is not None]
        if not ok:
            raise PlanError(_missing_text(cm, outcomes, None).lstrip("; ") + " (" + "; ".join(
                f"{s}: {o.reason}" for s, o in outcomes.items() if s in choices) + ")")
        win = min(ok, key=lambda o: (round(o.latency_s, 12), PREFERENCE.index(o.strategy)))
    reason = _choice_reason(cm, win, outcomes, strategy is not None)
    return _to_plan(cm, win, outcomes, by_subset, reason)


def _fields(lay: Layout):
    return lay.order, lay.heads, lay.cols, lay.vocab, lay.tokens


def _missing_text(cm: CostModel, outcomes, strategy) -> str:
    gx = GalaxySplit(cm)
    missing = gx_missing(gx)
    if strategy is not None and strategy != "galaxy":
        missing = outcomes[strategy].missing_bytes
    if missing <= 0:
        return ""
    if strategy is not None and strategy != "galaxy":
        return f"; {fmt_bytes(missing)} missing; add a device or raise --memory-budget"
    need = sum(gx.total[k] * gx.unit_bytes[k] for k in KINDS) + gx.fixed_bytes
    can = sum(max(0.0, r) for r in gx.room) + gx.fixed_bytes
    return (f"; the cluster can hold {fmt_bytes(can)} of weights and activations, the model needs "
            f"{fmt_bytes(need)} at seq_len {cm.S}: {fmt_bytes(missing)} missing; add a device or raise "
            f"--memory-budget")


def _to_plan(cm: CostModel, win: Outcome, outcomes, by_subset, reason) -> Plan:
    cfg, e = cm.cfg, win.estimate
    lay = e.layout
    n = len(lay.order)
    devices = []
    lo = 0
    heads_r, cols_r, vocab_r = _ranges(lay.heads), _ranges(lay.cols), _ranges(lay.vocab)
    for r, i in enumerate(lay.order):
        d = cm.devices[i]
        if lay.strategy == "pipeline":
            hi = lo + lay.layers[r]
            spec = ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (lo, hi), embed=r == 0,
                             head=r == n - 1)
            counts = (cfg.n_heads, cfg.ffn, cfg.vocab_size, cm.S, lay.layers[r])
            lo = hi
        elif lay.strategy == "seqpar":
            spec = ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (0, cfg.n_layers))
            counts = (cfg.n_heads, cfg.ffn, cfg.vocab_size, lay.tokens[r], cfg.n_layers)
        else:
            spec = ShardSpec(heads_r[r], cols_r[r], vocab_r[r], (0, cfg.n_layers))
            tokens = cm.S if lay.strategy == "megatron" else lay.tokens[r]
            counts = (lay.heads[r], lay.cols[r], lay.vocab[r], tokens, cfg.n_layers)
        mem = DeviceMemory(weight_bytes(cfg, spec, cm.b), e.memory[r].activation_bytes, int(d.memory_bytes))
        if mem.used_bytes > mem.budget_bytes:
            raise PlanError(f"{d.name}: its shard needs {fmt_bytes(mem.used_bytes)}, "
                            f"budget {fmt_bytes(d.memory_bytes)}")
        devices.append(DevicePlan(d.name, d.address, *counts, memory=mem,
                                  predicted=DeviceTiming(e.compute_s[r], e.comm_s[r])))
    results = tuple(StrategyResult(s, o.latency_s, o.reason) for s, o in outcomes.items())
    unused = tuple((cm.devices[i].name, _unused_reason(cm, i, lay, win, by_subset))
                   for i in range(cm.n) if i not in lay.order)
    return Plan(lay.strategy, tuple(devices), cm.S, ModelRef.of(cfg), cm.b, e.latency_s, results, reason, unused)


def _ranges(counts):
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def _unused_reason(cm: CostModel, i: int, lay: Layout, win: Outcome, by_subset) -> str:
    d = cm.devices[i]
    if win.strategy != "galaxy":
        return f"not needed by the {win.strategy} plan"
    gx = GalaxySplit(cm)
    if gx.room[i] < 0:
        return (f"its budget {fmt_bytes(d.memory_bytes)} is below the replicated weights and activations every "
                f"galaxy device holds ({fmt_bytes(gx.fixed_bytes)})")
    with_it = by_subset.get(tuple(sorted((*lay.order, i))))
    if with_it is None:
        return "no feasible layout includes it"
    return f"adding it makes the pass {with_it - win.latency_s:.3g} s slower ({with_it:.3g} s vs {win.latency_s:.3g} s)"
