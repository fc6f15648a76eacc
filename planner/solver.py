"""The partition solver: which devices, in which ring order, hold how many heads, MLP columns,
vocabulary rows, tokens or layers -- the layout with the lowest predicted latency (cost.py)
whose shards fit every device's memory.

`solve` searches each strategy and compares them. Which devices take part is searched one of two
ways (`method`): "exact" prices every subset (up to 8 devices) and every ring order (up to 6),
2^N subsets; "heuristic" (search.py) prices O(N * k) subsets, grown from the fastest devices and
refined by dropping, adding and swapping, each with one TSP-style ring (ring.py). "auto" takes
the exact search up to EXACT_DEVICES devices. Within a subset both split the same way:

- galaxy (HMP): water-filled heads, columns and vocabulary rows, tokens even, memory repaired
  (split.py); the best few (subset, order) candidates then go through local search on the full
  cost model, also from an even split, a split by memory, all tokens on one device and every
  head split (near the best one, for the heuristic, when there are many).
- megatron: even split (split_even) over the best subset and ring order.
- seqpar: every device holds the whole model; tokens water-filled by per-token time.
- pipeline: chains of stages (every ordered set up to 6 for exact; chain_orders of the searched
  sets for the heuristic); each stage one layer, the rest to the fastest stages up to their
  memory -- exact for a single request, whose latency is the sum of stage compute plus the
  hand-offs (stages.py).
- local: the fastest device that can hold the whole model.

The automatic choice takes the fastest of RUNNABLE. docs/planner.md gives the complexity, the
solve times and the measured gap of each search to the other and to brute force.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, replace

from galaxy.model.config import ModelConfig
from galaxy.parallel.sharding import ShardSpec, split_even
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
    SolverRun,
    StrategyResult,
)
from .profile import ClusterProfile, attention_flops, mlp_flops
from .ring import (
    MAX_ORDER_DEVICES,
    chain_orders,
    exact_orders,
    nearest_link_order,
    refine_ring,
    ring_order,
    uniform_links,
)
from .search import SubsetSearch
from .split import (
    KINDS,
    NARROW_DESTINATIONS,
    GalaxySplit,
    by_head_split,
    gx_missing,
    search_key,
    steps,
    water_fill,
)
from .stages import Chains

log = logging.getLogger(__name__)

MAX_SUBSET_DEVICES = 8  # all subsets up to this many devices; backward elimination beyond
LOCAL_SEARCH_CANDIDATES = 3  # (subset, order) pairs refined by local search (1 beyond 4 devices)
PREFERENCE = ("local", "pipeline", "galaxy", "megatron", "seqpar")  # tie-break: the simplest runnable first
HEAD_SPLITS_ENUMERATED = 300  # enumerate every head split of a candidate when there are at most this many
HEAD_SPLITS_NEAR = 30  # heuristic: beyond this many, only the splits within 2 heads per device of the best
HARD_CANDIDATES = 2  # subsets the split could not fit, refined when they would be faster than the best that fits
TOKEN_START_DEVICES = 4  # local search also starts from all tokens on one device, up to this many devices
EXACT_DEVICES = 3  # method="auto": the exact search up to this many devices (the emulated trios), the heuristic beyond
NARROW_ABOVE = 8  # heuristic: rings of more devices get the narrow local search
LOCAL_SEARCH_EVALS = 600  # heuristic: layouts one local search may price
SECONDARY_SHARE = 3  # heuristic: descents from the other starting points get a third of that
ORDER_REFINE_EVALS = 300  # heuristic: rings ring.refine_ring may price for the best subset
METHODS = ("auto", "exact", "heuristic")


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


# --- subsets and ring orders ---------------------------------------------------------------

def _subsets(n: int, smallest: int = 1):
    idx = range(n)
    for k in range(min(smallest, n), n + 1):
        yield from itertools.combinations(idx, k)


def _orders(cm: CostModel, sub, method: str, nbytes: float) -> list[tuple[int, ...]]:
    """Ring orders to price: the exact search's (every order up to 6 devices), or, for the
    heuristic, every order of up to 3 devices (two) and one TSP-style ring beyond."""
    if method == "exact" or len(sub) <= 3:
        return exact_orders(cm, sub)
    return [o for o in [ring_order(cm, sub, nbytes)] if o]


def _chunk_bytes(cm: CostModel, k: int) -> float:
    """Bytes one device sends per ring step when k devices split the tokens evenly."""
    return cm.S / k * cm.cfg.hidden * cm.b


# --- galaxy ----------------------------------------------------------------------------------

def solve_galaxy(cm: CostModel, method: str = "exact") -> tuple[Outcome, dict[tuple[int, ...], float]]:
    """Best HMP layout, and the best constructive latency of every feasible subset priced (for reasons).

    exact: every subset of up to MAX_SUBSET_DEVICES devices (backward elimination beyond), every
    ring order of up to 6. heuristic: search.SubsetSearch over subsets, one TSP-style ring each."""
    gx = GalaxySplit(cm)
    by_subset: dict[tuple[int, ...], float] = {}
    cands: list[tuple[float, Estimate]] = []
    hard: list[tuple[float, tuple[int, ...], Estimate]] = []  # subsets the split could not fit, but might fit

    def consider(sub) -> float | None:
        x = gx.allocate(sub)
        if x is None:
            orders = _orders(cm, sub, method, _chunk_bytes(cm, len(sub))) if gx.may_fit(sub) else []
            if orders:  # priced as if memory did not bind: how good it might be
                e = cm.estimate(gx.layout(orders[0], sub, gx.unrepaired(sub)))
                hard.append((e.latency_s, sub, e))
            return None
        best = None
        for order in _orders(cm, sub, method, _chunk_bytes(cm, len(sub))):
            e = cm.estimate(gx.layout(order, sub, x))
            if not e.feasible:  # the linear memory model is conservative, so this is rare
                continue
            cands.append((e.latency_s, e))
            best = e.latency_s if best is None else min(best, e.latency_s)
        if best is not None:
            by_subset[sub] = best
        return best

    if method == "heuristic":
        usable = [i for i in range(cm.n) if gx.room_exact[i] >= 0]
        need = sum(gx.total[k] * gx.unit_exact[k] for k in KINDS)
        found = SubsetSearch(cm, usable, consider, gx.rates(), min_size=min(2, len(usable)), room=gx.room_exact,
                             need=need, nbytes=_chunk_bytes(cm, 2)).run() if usable else None
        if found is not None and len(found[0]) <= MAX_ORDER_DEVICES:  # the best subset: every ring order
            x = gx.allocate(found[0])
            cands += [(e.latency_s, e) for e in (cm.estimate(gx.layout(o, found[0], x))
                                                 for o in exact_orders(cm, found[0])) if e.feasible]
        elif found is not None:  # or the cost model's say on its ring
            e = _refine_order(cm, min((c for c in cands if tuple(sorted(c[1].layout.order)) == found[0]),
                                      key=lambda c: c[0])[1])
            cands.append((e.latency_s, e))
        if found is None and not hard and usable and gx.may_fit(usable):
            consider(tuple(usable))
    elif cm.n <= MAX_SUBSET_DEVICES:
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
    best = _refine_galaxy(cm, gx, cands, hard, method)
    if best is None:
        return Outcome("galaxy", None, "no subset of devices can hold the model's shards", gx_missing(gx)), by_subset
    sub = tuple(sorted(best.layout.order))
    by_subset[sub] = min(by_subset.get(sub, math.inf), best.latency_s)
    if method == "heuristic":  # what each left-out device would cost (the reasons in plan.unused)
        for i in range(cm.n):
            if i not in sub and tuple(sorted((*sub, i))) not in by_subset:
                consider(tuple(sorted((*sub, i))))
    return Outcome("galaxy", best, _galaxy_summary(cm, best)), by_subset


def _refine_galaxy(cm: CostModel, gx: GalaxySplit, cands, hard, method: str) -> Estimate | None:
    """Local search on the best (subset, order) candidates, from other starting points, and
    over every head split when there are few; then rings without the devices left idle."""
    narrow, budget = False, None
    cands = sorted(cands, key=lambda c: c[0])
    picked, seen = [], set()
    for _, e in cands:  # the best few, at most one order per subset
        sub = tuple(sorted(e.layout.order))
        if sub not in seen:
            seen.add(sub)
            picked.append(e)
        limit = LOCAL_SEARCH_CANDIDATES if len(sub) <= 4 else 1
        # The exact search stops only at exactly `limit`: after a small subset, a larger one never
        # stops it, and every subset gets refined (kept: it is the reference the heuristic is measured by).
        if len(picked) == limit or (method == "heuristic" and len(picked) > limit):
            break
    if method == "heuristic":
        narrow = bool(picked) and len(picked[0].layout.order) > NARROW_ABOVE
        budget = LOCAL_SEARCH_EVALS
    if not picked:  # nothing fitted by construction: search for a fit from plain starting points
        for _, _, e in sorted(hard, key=lambda h: len(h[1]))[:LOCAL_SEARCH_CANDIDATES]:
            picked += [cm.estimate(lay) for lay in gx.starts(e.layout.order)]
    else:  # and in the subsets the split could not fit that would be faster if they did
        bar = picked[0].latency_s
        for _, _, e in sorted((h for h in hard if h[0] < bar), key=lambda h: (h[0], len(h[1])))[:HARD_CANDIDATES]:
            picked += [e, *(cm.estimate(lay) for lay in gx.starts(e.layout.order))]

    def descend(e, kinds=KINDS, main=False):
        cap = budget if main or budget is None else budget // SECONDARY_SHARE
        return gx.local_search(e, kinds=kinds, narrow=narrow, max_evals=cap)

    refined = [descend(e, main=True) for e in picked]
    for e in list(refined):  # and from each small candidate with all its tokens on one device
        lay, k = e.layout, len(e.layout.order)  # (empty chunks send nothing: fewer, longer messages)
        if 1 < k <= TOKEN_START_DEVICES:
            alts = [cm.estimate(replace(lay, tokens=tuple(cm.S if q == r else 0 for q in range(k)))) for r in range(k)]
            refined.append(descend(min(alts, key=search_key)))
    top = min(refined, key=lambda e: (search_key(e), len(e.layout.order)), default=None)
    if top is not None and top.feasible:  # the best one: also descend from other starting points
        order = top.layout.order
        if len(order) <= 4:
            refined += [descend(cm.estimate(lay)) for lay in gx.starts(order)]
        splits = math.comb(cm.cfg.n_heads + len(order) - 1, len(order) - 1)
        near = top.layout.heads if method == "heuristic" and splits > HEAD_SPLITS_NEAR else None
        if splits <= HEAD_SPLITS_ENUMERATED:
            refined += [descend(x, KINDS[1:]) for x in by_head_split(gx, order, keep=3, near=near)]
    refined = [e for e in refined if e.feasible]
    top = min(refined, key=lambda e: (e.latency_s, len(e.layout.order)), default=None)
    if top is not None and len(top.layout.order) <= TOKEN_START_DEVICES:  # compound moves where memory binds
        refined.append(gx.repair_descent(top, descend))
    for e in list(refined):  # a device left holding no weights only relays: try the ring without it
        lay = e.layout
        idle = [r for r in range(len(lay.order)) if not (lay.heads[r] or lay.cols[r] or lay.vocab[r])]
        if idle and len(lay.order) - len(idle) >= 2:
            keep = [r for r in range(len(lay.order)) if r not in idle]
            tokens = [lay.tokens[r] for r in keep]
            tokens[0] += cm.S - sum(tokens)
            smaller = Layout("galaxy", *(tuple(v[r] for r in keep) for v in
                                         (lay.order, lay.heads, lay.cols, lay.vocab)), tuple(tokens))
            refined.append(descend(cm.estimate(smaller)))
    refined = [e for e in refined if e.feasible]
    return min(refined, key=lambda e: (e.latency_s, len(e.layout.order)), default=None)


# --- megatron, seqpar, pipeline, local -------------------------------------------------------

def solve_megatron(cm: CostModel, method: str = "exact") -> Outcome:
    cfg, best = cm.cfg, None
    gx = GalaxySplit(cm)

    def price(sub) -> Estimate | None:
        k, out = len(sub), None
        split = [split_even(t, k) for t in (cfg.n_heads, cfg.ffn, cfg.vocab_size)]
        if min(gx.room[i] for i in sub) < 0:
            return None
        for order in _orders(cm, sub, method, cm.S / k * cfg.hidden * cm.b):
            e = cm.estimate(Layout("megatron", order, *map(tuple, split)))
            if e.feasible and (out is None or e.latency_s < out.latency_s):
                out = e
        return out

    if method == "heuristic":
        def fits(i, k):  # holds the largest share of an even split over k devices
            h, c, v = (split_even(t, k)[0] for t in (cfg.n_heads, cfg.ffn, cfg.vocab_size))
            spec = ShardSpec((0, h), (0, c), (0, v), (0, cfg.n_layers))
            return cm.memory(i, spec, cm.activations(h, c, cm.S, v)).fits

        best = _heuristic_best(cm, price, [i for i in range(cm.n) if gx.room[i] >= 0], gx.rates(), 2,
                               gx.room, sum(gx.total[k] * gx.unit_bytes[k] for k in KINDS), _chunk_bytes(cm, 2), fits,
                               follow_devices=False)
    else:
        for sub in _subsets(cm.n, 2) if cm.n <= MAX_SUBSET_DEVICES else [tuple(range(cm.n))]:
            e = price(sub)
            if e is not None and (best is None or e.latency_s < best.latency_s):
                best = e
    if best is None:
        return Outcome("megatron", None, "no subset can hold an even split of the model")
    return Outcome("megatron", best, f"even split over {len(best.layout.order)} devices, "
                   f"{_comm_phrase(cm, best)}")


def _refine_order(cm: CostModel, est: Estimate, follow_devices: bool = True) -> Estimate:
    """The best ring of a layout's devices: every order up to MAX_ORDER_DEVICES, else the
    heuristic ring improved on the cost model (ring.refine_ring); follow_devices: each device
    keeps its share (else each position does)."""
    lay = est.layout
    if len(lay.order) <= 3:
        return est  # the search priced every order already
    pos = {i: r for r, i in enumerate(lay.order)}
    fields = [f for f in ("heads", "cols", "vocab", "tokens") if getattr(lay, f)] if follow_devices else []

    def relayout(order):
        return replace(lay, order=order, **{f: tuple(getattr(lay, f)[pos[i]] for i in order) for f in fields})

    def price(order):
        e = cm.estimate(relayout(order))
        return e.latency_s if e.feasible else None

    if len(lay.order) <= MAX_ORDER_DEVICES:
        priced = [(p, o) for o, p in ((o, price(o)) for o in exact_orders(cm, lay.order)) if p is not None]
        order = min(priced)[1] if priced and min(priced)[0] < est.latency_s else lay.order
    else:
        order = refine_ring(lay.order, price, ORDER_REFINE_EVALS)[0]
    return est if order == lay.order else cm.estimate(relayout(order))


def _heuristic_best(cm: CostModel, price, items, rate, min_size, room=None, need=0.0, nbytes=0.0, fits=None,
                    follow_devices=True):
    """search.SubsetSearch with a price that returns an Estimate: the best Estimate found, its
    ring refined on the cost model."""
    ests: dict[tuple[int, ...], Estimate] = {}

    def latency(sub):
        e = price(sub)
        if e is None:
            return None
        ests[sub] = e
        return e.latency_s

    if not items:
        return None
    found = SubsetSearch(cm, items, latency, rate, min(min_size, len(items)), room, need, nbytes, fits).run()
    return None if found is None else _refine_order(cm, ests[found[0]], follow_devices)


def solve_seqpar(cm: CostModel, method: str = "exact") -> Outcome:
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
    lines = []
    for d in cm.devices:
        fa = attention_flops(cfg, cfg.n_heads, 1, cfg.n_kv_heads) + 4.0 * (S - 1) * cfg.head_dim * cfg.n_heads
        t = L * (fa / d.attention.flops_per_s + mlp_flops(cfg, cfg.ffn, 1) / d.mlp.flops_per_s
                 + 16.0 * cfg.hidden / d.connective.flops_per_s)
        o = L * (d.attention.overhead_s + d.mlp.overhead_s + 2 * d.connective.overhead_s)
        lines.append((o, t))

    def price(sub) -> Estimate | None:
        x = water_fill(S, [lines[i] for i in sub], [caps[i] for i in sub])
        if x is None:
            return None
        out = None
        pos = {i: r for r, i in enumerate(sub)}
        kv_bytes = S / len(sub) * 2 * cfg.n_kv_heads * cfg.head_dim * b
        for order in _orders(cm, sub, method, kv_bytes):
            e = cm.estimate(Layout("seqpar", order, tokens=tuple(x[pos[i]] for i in order)))
            if e.feasible and (out is None or e.latency_s < out.latency_s):
                out = e
        return out

    best = None
    if method == "heuristic":
        best = _heuristic_best(cm, price, able, [1.0 / (o + t * S) for o, t in lines], 2)
    else:
        subs = _subsets(len(able), 2) if len(able) <= MAX_SUBSET_DEVICES else [tuple(range(len(able)))]
        for sub_pos in subs:
            e = price(tuple(able[p] for p in sub_pos))
            if e is not None and (best is None or e.latency_s < best.latency_s):
                best = e
    if best is None:
        return Outcome("seqpar", None, "no set of devices holding the whole model can split the tokens")
    best = _token_search(cm, best, narrow=method == "heuristic" and len(best.layout.order) > NARROW_ABOVE)
    return Outcome("seqpar", best, f"whole model on each of {len(best.layout.order)} devices, "
                   f"{_comm_phrase(cm, best)}")


def _token_search(cm: CostModel, est: Estimate, narrow: bool = False) -> Estimate:
    """Move tokens between two devices while it helps; narrow (large rings): from the devices
    that compute longest to those that compute shortest."""
    lay, n = est.layout, len(est.layout.order)
    improved = True
    while improved:
        improved = False
        pairs = list(itertools.permutations(range(n), 2))
        if narrow:
            slow = sorted(range(n), key=lambda r: (-est.compute_s[r], r))[:NARROW_DESTINATIONS]
            fast = sorted(range(n), key=lambda r: (est.compute_s[r], r))[:NARROW_DESTINATIONS]
            pairs = [(i, j) for i in slow for j in fast if i != j]
        for step in steps(cm.S, n):
            for i, j in pairs:
                t = list(lay.tokens)
                if t[i] < step:
                    continue
                t[i] -= step
                t[j] += step
                e = cm.estimate(Layout(lay.strategy, lay.order, tokens=tuple(t)))
                if e.feasible and e.latency_s < est.latency_s * (1 - 1e-12):
                    est, lay, improved = e, e.layout, True
    return est


def solve_pipeline(cm: CostModel, method: str = "exact") -> Outcome:
    L = cm.cfg.n_layers
    ch = Chains(cm)
    best = None

    if method == "heuristic":
        seqs: dict[tuple[int, ...], tuple[float, tuple[int, ...], list[int]]] = {}

        def latency(sub):
            out = None
            for seq in chain_orders(cm, sub, ch.hand) if len(sub) > 1 else [sub]:
                got = ch.price(seq)
                if got is not None and (out is None or got[0] < out[0] - 1e-15):
                    out = (got[0], seq, got[1])
            if out is None:
                return None
            seqs[sub] = out
            return out[0]

        items = [i for i in range(cm.n) if max(ch.caps[r][i] for r in ch.caps) >= 1]
        room = [max(0, ch.caps["mid"][i]) * ch.per_layer for i in range(cm.n)]
        if items:
            found = SubsetSearch(cm, items, latency, [1.0 / ch.t_layer[i] for i in range(cm.n)],
                                 min(2 if cm.n > 1 else 1, len(items)), room, L * ch.per_layer, ch.hand).run()
            best = None if found is None else seqs[found[0]]
    else:
        sizes = range(2, cm.n + 1) if cm.n > 1 else [1]
        uniform = uniform_links(cm, range(cm.n))

        def sequences(m):
            if uniform:  # only the first and last stage matter: they hold the embedding and the head
                for sub in itertools.combinations(range(cm.n), m):
                    for a, z in itertools.permutations(sub, 2) if m > 1 else [(sub[0], sub[0])]:
                        yield (a, *(i for i in sub if i not in (a, z)), z) if m > 1 else sub
            elif m <= MAX_ORDER_DEVICES:
                yield from itertools.permutations(range(cm.n), m)
            else:
                yield from (o for o in (nearest_link_order(cm, s) for s in itertools.combinations(range(cm.n), m))
                            if o)

        for m in sizes:
            for seq in sequences(m):
                got = ch.price(seq)
                if got is not None and (best is None or got[0] < best[0] - 1e-15):
                    best = (got[0], seq, got[1])
    if best is None:
        most = sum(sorted((max(0, ch.caps["mid"][i]) for i in range(cm.n)), reverse=True))
        missing = (L - most) * ch.per_layer + ch.role_bytes["only"] - ch.role_bytes["mid"] if most < L else 0
        return Outcome("pipeline", None, f"the devices can hold at most {most} of the {L} layers "
                       f"({fmt_bytes(ch.per_layer)} each) besides their activations", int(max(0, missing)))
    e = cm.estimate(Layout("pipeline", best[1], layers=tuple(best[2])))
    return Outcome("pipeline", e, f"{len(best[1])} stages, layers {list(best[2])}, hands "
                   f"{fmt_bytes(ch.hand)} down {len(best[1]) - 1} time(s)")


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
          dtype_bytes: int = 4, method: str = "auto") -> Plan:
    """The plan with the lowest predicted prefill latency whose shards fit every device.

    strategy: None picks the fastest runnable strategy; "galaxy", "megatron", "pipeline", "local"
    or "seqpar" forces one. method: "exact" prices every subset (and ring order) of a small
    cluster, "heuristic" searches them in polynomial time (search.py), "auto" takes the exact
    search up to EXACT_DEVICES devices. The plan records the method and the seconds it took
    (Plan.solver). Raises PlanError when nothing fits (saying how many bytes are missing) or the
    forced strategy is infeasible.
    """
    t0 = time.perf_counter()
    if strategy is not None and strategy not in RUNNABLE:
        raise PlanError(f"strategy: {strategy!r} is not one of {', '.join(map(str, RUNNABLE))}")
    if method not in METHODS:
        raise PlanError(f"method: {method!r} is not one of {METHODS}")
    cm = CostModel(cfg, seq_len, cluster, dtype_bytes)
    if method == "auto":
        method = "exact" if cm.n <= EXACT_DEVICES else "heuristic"
    galaxy, by_subset = solve_galaxy(cm, method)
    outcomes = {"galaxy": galaxy, "megatron": solve_megatron(cm, method), "seqpar": solve_seqpar(cm, method),
                "pipeline": solve_pipeline(cm, method), "local": solve_local(cm)}
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
                f"{s}: {o.reason}" for s, o in outcomes.items() if s in RUNNABLE) + ")")
        win = min(ok, key=lambda o: (round(o.latency_s, 12), PREFERENCE.index(o.strategy)))
    reason = _choice_reason(cm, win, outcomes, strategy is not None)
    plan = _to_plan(cm, win, outcomes, by_subset, reason)
    return replace(plan, solver=SolverRun(method, time.perf_counter() - t0, cm.n))


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
    gx = GalaxySplit(cm)
    unused = tuple((cm.devices[i].name, _unused_reason(cm, gx, i, lay, win, by_subset))
                   for i in range(cm.n) if i not in lay.order)
    return Plan(lay.strategy, tuple(devices), cm.S, ModelRef.of(cfg), cm.b, e.latency_s, results, reason, unused)


def _ranges(counts):
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def _unused_reason(cm: CostModel, gx: GalaxySplit, i: int, lay: Layout, win: Outcome, by_subset) -> str:
    d = cm.devices[i]
    if win.strategy != "galaxy":
        return f"not needed by the {win.strategy} plan"
    if gx.room[i] < 0:
        return (f"its budget {fmt_bytes(d.memory_bytes)} is below the replicated weights and activations every "
                f"galaxy device holds ({fmt_bytes(gx.fixed_bytes)})")
    with_it = by_subset.get(tuple(sorted((*lay.order, i))))
    if with_it is None:
        return "no feasible layout includes it"
    return f"adding it makes the pass {with_it - win.latency_s:.3g} s slower ({with_it:.3g} s vs {win.latency_s:.3g} s)"
