"""Orders of a set of devices from the measured link matrix: galaxy and megatron rings, pipeline chains.

A ring collective moves every chunk over every link of the ring, one step per device; with equal
chunks each step lasts as long as its slowest link, so a ring is as fast as its worst link
(a bottleneck travelling-salesman tour), then as its total. The exact search prices every ring
order of up to MAX_ORDER_DEVICES devices on the cost model ((k-1)! of them); `ring_order` builds
one in polynomial time instead:

1. greedy arcs: take the cheapest directed links first, each device sending to one and hearing
   from one, never closing a cycle early (the greedy heuristic of the asymmetric TSP), O(k^2 log k);
2. 2-opt and or-opt: reverse a stretch of the ring, or move a stretch of 1-3 devices elsewhere,
   while that lowers sum(cost^4) -- a smooth stand-in for the bottleneck that still prefers a
   cheaper total among rings of one bottleneck. Reversing a stretch turns its links around, which
   on asymmetric links changes their cost (prefix sums of both directions make each try O(1));
   moving one keeps its direction. A pass is O(k^2);
3. the direction (and its reverse) with the lower (worst link, total).

A message's cost is its time on the link (bytes x seconds per byte + latency), for the chunk a
device of the ring would send, so a slow link weighs more when chunks are large and latency
weighs more when they are small.
"""

from __future__ import annotations

import itertools
import math

from .cost import CostModel

MAX_ORDER_DEVICES = 6  # the exact search prices every ring order up to this many devices
TWO_OPT_PASSES = 8


def exact_orders(cm: CostModel, sub: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The ring orders the exact search prices: every order with the first device fixed (rotations
    are equivalent) up to MAX_ORDER_DEVICES; one order when the subset's links are all alike;
    nearest-fast-link order beyond."""
    if len(sub) == 1:
        return [sub]
    if any(not cm.has_link(i, j) for i in sub for j in sub if i != j) and len(sub) > MAX_ORDER_DEVICES:
        return [o for o in [nearest_link_order(cm, sub)] if o]
    if uniform_links(cm, sub):
        return [sub]
    if len(sub) <= MAX_ORDER_DEVICES:
        out = [(sub[0], *p) for p in itertools.permutations(sub[1:])]
        return [o for o in out if all(cm.has_link(o[r], o[(r + 1) % len(o)]) for r in range(len(o)))]
    return [o for o in [nearest_link_order(cm, sub)] if o]


def uniform_links(cm: CostModel, sub) -> bool:
    """Every pair of `sub` linked, all links alike: every ring order costs the same."""
    links = set()
    for i in sub:
        for j in sub:
            if i != j:
                if not cm.has_link(i, j):
                    return False
                links.add(cm.link(i, j))
    return len(links) <= 1


def nearest_link_order(cm: CostModel, sub) -> tuple[int, ...] | None:
    """Greedy ring: from the first device, always on to the unvisited one with the fastest link."""
    order, left = [sub[0]], set(sub[1:])
    while left:
        cur = order[-1]
        nxt = [j for j in left if cm.has_link(cur, j)]
        if not nxt:
            return None
        j = min(nxt, key=lambda j: (cm.link(cur, j)[0], cm.link(cur, j)[1], j))
        order.append(j)
        left.discard(j)
    if len(order) > 1 and not cm.has_link(order[-1], order[0]):
        return None
    return tuple(order)


def message_costs(cm: CostModel, sub, nbytes: float) -> list[list[float]]:
    """c[a][b]: seconds for one message of nbytes from sub[a] to sub[b] (inf: no link)."""
    out = []
    for i in sub:
        row = []
        for j in sub:
            if i == j or not cm.has_link(i, j):
                row.append(math.inf)
            else:
                spb, lat = cm.link(i, j)
                row.append(nbytes * spb + lat)
        out.append(row)
    return out


def ring_order(cm: CostModel, sub, nbytes: float) -> tuple[int, ...] | None:
    """A ring through every device of `sub` (see the module docstring), starting at sub[0];
    None when the links cannot close one."""
    sub = tuple(sub)
    k = len(sub)
    if k == 1:
        return sub
    if uniform_links(cm, sub):
        return sub
    c = message_costs(cm, sub, nbytes)
    if k == 2:
        return sub if math.isfinite(c[0][1]) and math.isfinite(c[1][0]) else None
    tour = _greedy_arcs(c, close=True)
    if tour is None:
        return nearest_link_order(cm, sub)
    scale = min(min(x for x in row if math.isfinite(x)) for row in c) or 1.0
    w = [[(x / scale) ** 4 for x in row] for row in c]
    tour = _improve(tour, w, ring=True)
    best = None
    for t in (tour, tour[:1] + tour[1:][::-1]):
        arcs = [c[t[r]][t[(r + 1) % k]] for r in range(k)]
        key = (max(arcs), sum(arcs))
        if math.isfinite(key[0]) and (best is None or key < best[0]):
            best = (key, t)
    if best is None:
        return nearest_link_order(cm, sub)
    t = best[1]
    r0 = t.index(0)
    return tuple(sub[t[(r0 + r) % k]] for r in range(k))


def refine_ring(order: tuple[int, ...], price, budget: int) -> tuple[tuple[int, ...], float]:
    """Move one device elsewhere in the ring, or reverse a stretch of it, while `price(order)`
    (seconds, lower is better; None: invalid) drops, at most `budget` prices: the cost model's own
    say on what sum(cost^4) only approximates (which devices' slow links sit next to which busy
    ones). Returns the order and its price."""
    best, cost = tuple(order), price(tuple(order))
    k, spent = len(order), 1

    def moves(o):
        for i in range(1, k):  # the first device stays first (rotations are the same ring)
            rest = o[:i] + o[i + 1:]
            for j in range(1, k):
                if j != i:
                    yield rest[:j] + (o[i],) + rest[j:]
        for a in range(1, k - 1):
            for b in range(a + 2, k + 1):
                yield o[:a] + o[a:b][::-1] + o[b:]

    improved = True
    while improved and spent < budget and k > 3:
        improved = False
        for cand in moves(best):
            p = price(cand)
            spent += 1
            if p is not None and p < cost * (1 - 1e-12):
                best, cost, improved = cand, p, True
                break
            if spent >= budget:
                break
    return best, cost


def chain_orders(cm: CostModel, sub, nbytes: float) -> list[tuple[int, ...]]:
    """Pipeline chains through `sub` worth pricing: every order up to 5 devices; beyond, a
    cheap open path (greedy arcs + 2-opt on the total hand-off time) in both directions -- the
    first and last stage also hold the embedding and the LM head, so the caller prices both."""
    sub = tuple(sub)
    k = len(sub)
    if k <= 5:
        return [p for p in itertools.permutations(sub)
                if all(cm.has_link(p[r], p[r + 1]) for r in range(k - 1))]
    c = message_costs(cm, sub, nbytes)
    path = _greedy_arcs(c, close=False)
    if path is None:
        return []
    path = _improve(path, c, ring=False)
    out = []
    for p in (path, path[::-1]):
        if all(math.isfinite(c[p[r]][p[r + 1]]) for r in range(k - 1)):
            out.append(tuple(sub[a] for a in p))
    return out


def _greedy_arcs(c: list[list[float]], close: bool) -> list[int] | None:
    """Cheapest arcs first, at most one out and one in per node, no early cycle: a Hamiltonian
    path (positions), closed into a ring when `close` needs its last arc to exist."""
    k = len(c)
    arcs = sorted((c[a][b], a, b) for a in range(k) for b in range(k) if a != b and math.isfinite(c[a][b]))
    nxt, has_in = [-1] * k, [False] * k
    root = list(range(k))

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    added = 0
    for _, a, b in arcs:
        if added == k - 1:
            break
        if nxt[a] != -1 or has_in[b] or find(a) == find(b):
            continue
        nxt[a], has_in[b] = b, True
        root[find(a)] = find(b)
        added += 1
    if added < k - 1:
        return None
    start = next(a for a in range(k) if not has_in[a])
    path = [start]
    while nxt[path[-1]] != -1:
        path.append(nxt[path[-1]])
    if close and not math.isfinite(c[path[-1]][path[0]]):
        return None
    return path


def _improve(tour: list[int], w: list[list[float]], ring: bool) -> list[int]:
    """2-opt and or-opt, alternately, until neither lowers the sum of w over the tour's arcs."""
    t = list(tour)
    for _ in range(TWO_OPT_PASSES):
        before = _total(t, w, ring)
        t = _or_opt(_two_opt(t, w, ring), w, ring)
        if not _total(t, w, ring) < before:
            break
    return t


def _total(t: list[int], w: list[list[float]], ring: bool) -> float:
    k = len(t)
    return sum(w[t[r]][t[r + 1]] for r in range(k - 1)) + (w[t[-1]][t[0]] if ring and k > 1 else 0.0)


def _better(new: float, old: float) -> bool:
    return new < old and (math.isinf(old) or old - new > 1e-12 * old)


def _or_opt(tour: list[int], w: list[list[float]], ring: bool) -> list[int]:
    """Move a stretch of 1-3 nodes elsewhere, same direction, while that lowers the sum of w:
    what 2-opt cannot do in one step on asymmetric links (it would turn stretches around)."""
    t = list(tour)
    k = len(t)
    improved = True
    while improved:
        improved = False
        for length in (1, 2, 3):
            if length > k - 2:
                break
            for i in range(k if ring else k - length + 1):
                seg = [t[(i + m) % k] for m in range(length)]
                rest = [t[(i + length + m) % k] for m in range(k - length)] if ring else t[:i] + t[i + length:]
                # rest is the tour without the stretch; ring: it starts right after the stretch
                p = rest[-1] if ring else (t[i - 1] if i > 0 else None)
                q = rest[0] if ring else (t[i + length] if i + length < k else None)
                gain = (w[p][seg[0]] if p is not None else 0.0) + (w[seg[-1]][q] if q is not None else 0.0)
                gain -= w[p][q] if p is not None and q is not None else 0.0
                slots = range(len(rest) if ring else len(rest) + 1)
                for j in slots:  # insert between rest[j-1] and rest[j]
                    u = rest[j - 1] if (ring or j > 0) else None
                    v = rest[j] if j < len(rest) else (rest[0] if ring else None)
                    if (u, v) == (p, q):
                        continue
                    cost = (w[u][seg[0]] if u is not None else 0.0) + (w[seg[-1]][v] if v is not None else 0.0)
                    cost -= w[u][v] if u is not None and v is not None else 0.0
                    if _better(cost, gain):
                        t = rest[:j] + seg + rest[j:] if j < len(rest) or not ring else rest + seg
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break
    return t


def _two_opt(tour: list[int], w: list[list[float]], ring: bool) -> list[int]:
    """Reverse stretches t[a+1..b] while the sum of w over the tour's arcs drops (w asymmetric:
    the stretch's own arcs turn around). A ring keeps t[0] in place; a path may reverse from its start."""
    k = len(tour)
    t = list(tour)
    fwd, bwd = [0.0] * k, [0.0] * k

    def prefix():  # fwd[r]: w over arcs t[0]->t[1] .. t[r-1]->t[r]; bwd: the same arcs turned around
        for r in range(1, k):
            fwd[r] = fwd[r - 1] + w[t[r - 1]][t[r]]
            bwd[r] = bwd[r - 1] + w[t[r]][t[r - 1]]

    prefix()
    for _ in range(TWO_OPT_PASSES):
        improved = False
        for a in range(0 if ring else -1, k - 2):
            for b in range(a + 2, k):
                if ring and a == 0 and b == k - 1:
                    continue  # the stretch t[1..k-1] reversed is the same ring turned around
                old = fwd[b] - fwd[a + 1]
                new = bwd[b] - bwd[a + 1]
                if a >= 0:
                    old += w[t[a]][t[a + 1]]
                    new += w[t[a]][t[b]]
                if b + 1 < k or ring:
                    nb = t[(b + 1) % k]
                    old += w[t[b]][nb]
                    new += w[t[a + 1]][nb]
                if _better(new, old):
                    t[a + 1:b + 1] = t[a + 1:b + 1][::-1]
                    prefix()
                    improved = True
        if not improved:
            break
    return t
