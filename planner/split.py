"""Integer splits of one set of devices: how many heads, MLP columns, vocabulary rows and tokens
each holds, for galaxy (HMP). Both searches in solver.py use it -- the exact one over every
subset and the polynomial one (search.py) over the subsets it grows and shrinks.

For a subset: (1) heads, columns and vocabulary rows by water-filling, the closed form of the
greedy "give the next unit to the device that would finish it soonest" (optimal for the min-max
of each phase when memory does not bind); tokens evenly; (2) memory repair: while a device is
over budget, take away the units of the kind whose removal costs the least time per byte freed,
re-water-filling that kind over the devices with room; (3) local search on the full cost model
for the layouts worth refining: moves of heads / columns / vocabulary rows / tokens between two
devices in steps from a quarter of the total down to one, and memory-neutral exchanges of two
kinds, accepted while the predicted latency improves.
"""

from __future__ import annotations

import itertools
import math

from galaxy.parallel.sharding import ShardSpec, split_even

from .cost import CostModel, Estimate, Layout, weight_bytes
from .profile import activation_bytes, attention_flops, head_flops, mlp_flops
from .ring import exact_orders

KINDS = ("heads", "cols", "vocab", "tokens")
NARROW_DESTINATIONS = 3  # narrow local search: devices a unit may move to


# --- integer splits ------------------------------------------------------------------------------

def water_fill(total: int, lines: list[tuple[float, float]], caps: list[int]) -> list[int] | None:
    """Split `total` units minimising max_i f_i(x_i), f_i(x) = o_i + a_i x for x > 0, f_i(0) = 0,
    with x_i <= caps[i]; None if the caps cannot hold `total`.

    The same optimum as the greedy that gives each next unit to the device whose cost after
    taking it is smallest (the greedy takes the `total` smallest values of the merged sequences
    f_i(1), f_i(2), ...), found by bisection on the level T instead of unit by unit.
    """
    n = len(lines)
    caps = [max(0, min(c, total)) for c in caps]
    if sum(caps) < total:
        return None
    if total == 0:
        return [0] * n

    starts = [(o + a * (1 - 1e-12) - 1e-300, o, a, c) for (o, a), c in zip(lines, caps)]

    def units(t: float) -> list[int]:  # units each device takes below level t
        return [0 if t < s else c if a <= 0 else min(c, int((t - o) / a * (1 + 1e-12) + 1e-9))
                for s, o, a, c in starts]

    def cost(i: int, x: int) -> float:
        return 0.0 if x == 0 else lines[i][0] + lines[i][1] * x

    lo, hi = 0.0, max(cost(i, caps[i]) for i in range(n))
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(units(mid)) >= total:
            hi = mid
        else:
            lo = mid
    x = units(hi)
    for _ in range(sum(x) - total):  # drop the units that reach the level last
        i = max((i for i in range(n) if x[i] > 0), key=lambda i: (cost(i, x[i]), -i))
        x[i] -= 1
    return x


def fill_by_room(total: int, room: list[float], caps: list[int]) -> list[int] | None:
    """Units that cost no time (an encoder's vocabulary rows): in proportion to free memory."""
    caps = [max(0, min(c, total)) for c in caps]
    if sum(caps) < total:
        return None
    w = [max(r, 0.0) if c > 0 else 0.0 for r, c in zip(room, caps)]
    x = [0] * len(caps)
    if sum(w) > 0:
        x = [min(c, int(total * wi / sum(w))) for c, wi in zip(caps, w)]
    i = 0
    while sum(x) < total:  # top up, most room first
        order = sorted(range(len(x)), key=lambda j: -(w[j] - x[j]))
        j = next(j for j in order if x[j] < caps[j])
        x[j] += 1
        i += 1
    return x


# --- galaxy ----------------------------------------------------------------------------------

class GalaxySplit:
    """Integer splits of galaxy layouts of one cost model: construction, memory repair, local search."""

    def __init__(self, cm: CostModel):
        self.cm, cfg, S, b = cm, cm.cfg, cm.S, cm.b
        L, H, hd, g = cfg.n_layers, cfg.hidden, cfg.head_dim, cfg.group
        self.total = {"heads": cfg.n_heads, "cols": cfg.ffn, "vocab": cfg.vocab_size, "tokens": S}
        mats = 2 if cfg.gated_mlp else 1
        bias_h = hd * (1 + 2 / g) if cfg.attn_bias else 0.0
        self.unit_bytes = {  # memory one more unit costs (weights of every layer + activations)
            "heads": L * b * (2 * H * hd + 2 * H * hd / g + bias_h) + b * (3 * S * hd + S * S),
            "cols": L * b * ((mats + 1) * H + (mats if cfg.mlp_bias else 0)) + b * S * mats,
            "vocab": b * H * (2 if cfg.causal and not cfg.tie_embeddings else 1) + (b * S if cfg.causal else 0),
            "tokens": 4 * H * b,
        }
        base = ShardSpec((0, 0), (0, 0), (0, 0), (0, L))
        # + the LM head's gathered input; with GQA up to two partly held KV groups (replicated K/V)
        kv_extra = 2 * L * b * (2 * H * hd + (2 * hd if cfg.attn_bias else 0)) if g > 1 else 0
        self.fixed_bytes = (weight_bytes(cfg, base, b) + activation_bytes(cfg, S, 0, 0, 0, b) + kv_extra
                            + (b * S * H if cfg.causal else 0))
        self.lines = {k: [] for k in KINDS}
        f_head = attention_flops(cfg, 1, S, 1 / g)
        for d in cm.devices:
            att, mlp, hm = d.attention, d.mlp, d.head or d.mlp
            self.lines["heads"].append((L * att.overhead_s, L * f_head / att.flops_per_s))
            self.lines["cols"].append((L * mlp.overhead_s, L * mlp_flops(cfg, 1, S) / mlp.flops_per_s))
            self.lines["vocab"].append((hm.overhead_s, head_flops(cfg, 1, 1) / hm.flops_per_s) if cfg.causal
                                       else (0.0, 0.0))
            con = d.connective
            self.lines["tokens"].append((2 * L * con.overhead_s, 2 * L * 8.0 * H / con.flops_per_s))
        self.room = [d.memory_bytes - self.fixed_bytes for d in cm.devices]
        # the same accounting without the safety margins: a lower bound on what the model needs
        self.unit_exact = dict(self.unit_bytes, vocab=self.unit_bytes["vocab"] - (b * S if cfg.causal else 0))
        floor = weight_bytes(cfg, base, b) + activation_bytes(cfg, S, 0, 0, 0, b)
        self.room_exact = [d.memory_bytes - floor for d in cm.devices]

    def rates(self) -> list[float]:
        """1 / seconds each device would take for the whole model alone, memory aside: the ranking
        of the subset search (search.py)."""
        return [1.0 / max(1e-300, sum(o + a * self.total[k] for k in KINDS for o, a in [self.lines[k][i]]))
                for i in range(self.cm.n)]

    def may_fit(self, sub) -> bool:
        """False only if the subset certainly cannot hold the model."""
        return sum(max(0.0, self.room_exact[i]) for i in sub) >= sum(
            self.total[k] * self.unit_exact[k] for k in KINDS)

    def starts(self, order) -> list[Layout]:
        """Other starting points for local search: an even split, and a split by memory budget."""
        n = len(order)
        budget = [max(1.0, self.room_exact[i]) for i in order]
        even = [tuple(split_even(self.total[k], n)) for k in KINDS]
        by_mem = [tuple(fill_by_room(self.total[k], budget, [self.total[k]] * n)) for k in KINDS]
        return [Layout("galaxy", tuple(order), *even), Layout("galaxy", tuple(order), *by_mem)]

    # (1) + (2): an order-free split for a subset ----------------------------------------
    def allocate(self, sub: tuple[int, ...], heads: list[int] | None = None) -> dict[str, list[int]] | None:
        """Water-filled split of every kind (heads given: only the others), then memory repair:
        first with the conservative memory model, else with the tight one (the cost model checks)."""
        return self._allocate(sub, heads, self.room, self.unit_bytes) or self._allocate(
            sub, heads, self.room_exact, self.unit_exact)

    def _allocate(self, sub, heads, room, ub) -> dict[str, list[int]] | None:
        if any(room[i] < 0 for i in sub) or sum(room[i] for i in sub) < sum(self.total[k] * ub[k] for k in KINDS):
            return None
        x = {"tokens": split_even(self.total["tokens"], len(sub))}
        big = [10**18] * len(sub)
        for k in ("heads", "cols"):
            x[k] = water_fill(self.total[k], self.lines_of(k, sub), big)
        if heads is not None:
            x["heads"] = list(heads)
        if self.cm.cfg.causal:
            x["vocab"] = water_fill(self.total["vocab"], self.lines_of("vocab", sub), big)
        else:
            free = [room[i] - sum(ub[k] * x[k][r] for k in ("heads", "cols", "tokens")) for r, i in enumerate(sub)]
            x["vocab"] = fill_by_room(self.total["vocab"], free, big)
        movable = ("vocab", "cols", "tokens") if heads is not None else KINDS
        return self.repair(sub, x, room, ub, movable)

    def unrepaired(self, sub: tuple[int, ...]) -> dict[str, list[int]]:
        """The water-filled split with memory ignored: where a subset the repair cannot fit would
        like to be (a starting point for local search, which makes it fit first)."""
        x = {"tokens": split_even(self.total["tokens"], len(sub))}
        big = [10**18] * len(sub)
        for k in ("heads", "cols"):
            x[k] = water_fill(self.total[k], self.lines_of(k, sub), big)
        if self.cm.cfg.causal:
            x["vocab"] = water_fill(self.total["vocab"], self.lines_of("vocab", sub), big)
        else:
            x["vocab"] = fill_by_room(self.total["vocab"], [max(1.0, self.room_exact[i]) for i in sub], big)
        return x

    def lines_of(self, k, sub) -> list[tuple[float, float]]:
        """(overhead, seconds per unit) of kind k on each device of `sub`, as fast as it is there."""
        fast = self.cm.speedup(sub)
        return [(a / fast[i], b / fast[i]) for i, (a, b) in ((i, self.lines[k][i]) for i in sub)]

    def level(self, sub, k, xs) -> float:
        return max((0.0 if v == 0 else a + b * v) for (a, b), v in zip(self.lines_of(k, sub), xs))

    def repair(self, sub, x, room, ub, movable=KINDS):
        """Move units off devices over budget, cheapest time per freed byte first."""
        for _ in range(64 * len(sub)):
            free = [room[i] - sum(ub[k] * x[k][r] for k in KINDS) for r, i in enumerate(sub)]
            over = [r for r in range(len(sub)) if free[r] < 0]
            if not over:
                return x
            best = None
            for r in over:
                for k in movable:
                    if x[k][r] == 0:
                        continue
                    d = min(x[k][r], math.ceil(-free[r] / ub[k]))
                    caps = [x[k][j] + int(free[j] // ub[k]) if j != r else x[k][r] - d for j in range(len(sub))]
                    y = self._refill(sub, k, caps, free)
                    if y is None:
                        continue
                    delta = self.level(sub, k, y) - self.level(sub, k, x[k])
                    key = (delta / (d * ub[k]), -d)
                    if best is None or key < best[0]:
                        best = (key, k, y)
            if best is None:
                return None
            x = dict(x)
            x[best[1]] = best[2]
        return None

    def _refill(self, sub, k, caps, free):
        if k == "tokens":
            return fill_by_room(self.total[k], [1.0] * len(sub), caps)
        if k == "vocab" and not self.cm.cfg.causal:
            return fill_by_room(self.total[k], free, caps)
        return water_fill(self.total[k], self.lines_of(k, sub), caps)

    # ring orders ----------------------------------------------------------------------------
    def orders(self, sub: tuple[int, ...]):
        """The ring orders the exact search prices (ring.exact_orders)."""
        return exact_orders(self.cm, sub)

    def layout(self, order, sub, x, strategy="galaxy") -> Layout:
        pos = {i: r for r, i in enumerate(sub)}
        return Layout(strategy, tuple(order), *(tuple(x[k][pos[i]] for i in order) for k in KINDS))

    # (3): local search -------------------------------------------------------------------
    def local_search(self, est: Estimate, max_moves: int = 400, kinds=KINDS, narrow: bool = False,
                     max_evals: int | None = None) -> Estimate:
        """First-improvement descent over single-kind moves and memory-neutral exchanges.

        narrow (large rings): each move goes from one of the devices that finish a phase last to
        one of the NARROW_DESTINATIONS that finish it first, instead of to any device; with
        max_evals the descent stops after that many layouts priced."""
        n = len(est.layout.order)
        if n == 1:
            return est
        kinds = [k for k in kinds if self.cm.cfg.causal or k != "vocab" or not est.feasible]
        best, key, moves, evals = est, search_key(est), 0, 0
        improved = True
        while improved and moves < max_moves:
            improved = False
            for changes in self._moves(best, kinds, narrow):
                cand = apply_changes(best.layout, changes)
                if cand is None:
                    continue
                e = self.cm.estimate(cand)
                evals += 1
                k = search_key(e)
                if k < key:
                    best, key, improved = e, k, True
                    moves += 1
                if max_evals is not None and evals >= max_evals:
                    return best
        return best

    def repair_descent(self, est: Estimate, descend, rounds: int = 3) -> Estimate:
        """Moves of one kind whose memory the repair then restores with the other kinds, each
        followed by `descend` (a local search) while that helps: the compound moves local search
        cannot make one unit at a time (a head to a device that must give back columns and a
        token to take it). Only where memory binds."""
        best = est
        for _ in range(rounds):
            if not best.feasible or all(m.used_bytes < 0.9 * m.budget_bytes for m in best.memory):
                return best
            lay = best.layout
            sub = tuple(sorted(lay.order))
            at = {i: r for r, i in enumerate(lay.order)}
            cands = []
            for k1 in KINDS:
                for step in steps(self.total[k1], len(sub))[-2:]:  # the finest: a coarse move repairs coarsely
                    for a, b in itertools.permutations(range(len(sub)), 2):
                        x = {k: [getattr(lay, k)[at[i]] for i in sub] for k in KINDS}
                        if x[k1][a] < step:
                            continue
                        x[k1][a] -= step
                        x[k1][b] += step
                        for room, ub in ((self.room, self.unit_bytes), (self.room_exact, self.unit_exact)):
                            y = self.repair(sub, x, room, ub, [k for k in KINDS if k != k1])
                            if y is not None:
                                e = self.cm.estimate(self.layout(lay.order, sub, y))
                                if e.feasible and e.latency_s < best.latency_s:
                                    cands.append(e)
                                break
            if not cands:
                return best
            nxt = descend(min(cands, key=search_key))
            if not search_key(nxt) < search_key(best):
                return best
            best = nxt
        return best

    def _moves(self, est: Estimate, kinds, narrow: bool = False):
        """Move descriptors [(kind, from, to, units), ...]. Compute-only kinds move off the two
        busiest devices of their phase (only they can lower a min-max); tokens between any pair.
        narrow: tokens off the devices sending the most over the slowest links, everything to
        the few least busy (or, for tokens, least sending) devices."""
        n = len(est.layout.order)
        busy = busy_by_kind(est)
        src = {k: sorted(range(n), key=lambda r: -busy[k][r])[:2] for k in KINDS}
        src["tokens"] = list(range(n))
        dst = {k: list(range(n)) for k in KINDS}
        if narrow:
            links = self.cm.ring_links(est.layout.order)
            send = [t * spb for t, (spb, _) in zip(est.layout.tokens, links)]
            src["tokens"] = sorted(range(n), key=lambda r: (-send[r], r))[:NARROW_DESTINATIONS]
            dst = {k: sorted(range(n), key=lambda r: (busy[k][r], r))[:NARROW_DESTINATIONS] for k in KINDS}
            dst["tokens"] = sorted(range(n), key=lambda r: (send[r], r))[:NARROW_DESTINATIONS]
        if not est.feasible:  # make room: any device may give
            src = {k: list(range(n)) for k in KINDS}
        for k in kinds:
            for step in steps(self.total[k], n):
                for i in src[k]:
                    for j in dst[k]:
                        if i != j:
                            yield [(k, i, j, step)]
        if all(m.used_bytes < 0.9 * m.budget_bytes for m in est.memory):
            return  # exchanges only help where memory binds
        for k1, k2 in itertools.permutations(kinds, 2):  # give k1, take back about as many bytes of k2
            ratio = self.unit_bytes[k1] / self.unit_bytes[k2]
            for step in steps(self.total[k1], n):
                r = step * ratio
                backs = {math.ceil(r), *(max(1, int(r) >> m) for m in range(3))}
                for back in sorted(backs):
                    for i in src[k1]:
                        for j in dst[k1]:
                            if i != j:
                                yield [(k1, i, j, step), (k2, j, i, back)]


def apply_changes(lay: Layout, changes) -> Layout | None:
    new = {k: list(getattr(lay, k)) for k in KINDS}
    for k, i, j, d in changes:
        if new[k][i] < d:
            return None
        new[k][i] -= d
        new[k][j] += d
    return Layout(lay.strategy, lay.order, *(tuple(new[k]) for k in KINDS))


def busy_by_kind(e: Estimate) -> dict[str, list[float]]:
    """Each device's compute per kind of unit (heads: attention phases, cols: MLP, vocab: head)."""
    n = len(e.layout.order)
    out = {k: [0.0] * n for k in KINDS}
    which = {"attn": "heads", "mlp": "cols", "head.allgather": "vocab", "con": "tokens", "embed.con": "tokens"}
    for p in (*e.phases, *e.once):
        k = next((v for pre, v in which.items() if p.name.startswith(pre)), None)
        if k:
            for r in range(n):
                out[k][r] += p.compute_s[r]
    return out


def splits_near(center: tuple[int, ...], total: int, radius: int):
    """Every split of `total` over len(center) parts within `radius` of `center` on each part."""
    n = len(center)

    def rec(r: int, left: int):
        if r == n - 1:
            if abs(left - center[r]) <= radius:
                yield (left,)
            return
        for v in range(max(0, center[r] - radius), min(left, center[r] + radius) + 1):
            for rest in rec(r + 1, left - v):
                yield (v, *rest)

    yield from rec(0, total)


def compositions(total: int, parts: int):
    """Every way to write total as an ordered sum of `parts` non-negative integers."""
    for cuts in itertools.combinations_with_replacement(range(total + 1), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def steps(total: int, n: int) -> list[int]:
    """Move sizes: a quarter of an even share, then every fourth, down to one unit."""
    out, s = [], max(1, total // (4 * n))
    while s > 1:
        out.append(s)
        s //= 4
    return out + [1]


def search_key(e: Estimate):
    """Lexicographic: memory overflow first, then latency, then balance (breaks min-max plateaus)."""
    over = sum(max(0, m.used_bytes - m.budget_bytes) for m in e.memory)
    balance = sum(sum(c * c for c in p.compute_s) for p in e.phases)
    return (over, round(e.latency_s, 12), balance)


def by_head_split(gx: GalaxySplit, order, keep: int = 2, near: tuple[int, ...] | None = None,
                  radius: int = 2) -> list[Estimate]:
    """Every split of the heads (the coarsest unit, where local search stalls), the other kinds
    water-filled and repaired around it; the best `keep`. near: only the splits within `radius`
    heads of it on every device (per device of `order`)."""
    sub, n = tuple(sorted(order)), len(order)
    pos = {i: r for r, i in enumerate(order)}
    out = []
    splits = compositions(gx.total["heads"], n) if near is None else splits_near(near, gx.total["heads"], radius)
    for h in splits:
        x = gx.allocate(sub, heads=[h[pos[i]] for i in sub])
        if x is not None:
            e = gx.cm.estimate(gx.layout(order, sub, x))
            if e.feasible:
                out.append(e)
    return sorted(out, key=lambda e: e.latency_s)[:keep]


def gx_missing(gx: GalaxySplit) -> int:
    """Bytes the whole cluster lacks for galaxy (0: enough in total, the split is what fails)."""
    need = sum(gx.total[k] * gx.unit_exact[k] for k in KINDS)
    return max(0, int(need - sum(max(0.0, r) for r in gx.room_exact)))
