"""Which devices take part, in polynomial time: the subset search of every strategy on large clusters.

The exact search (solver.py) prices every subset of up to 8 devices, 2^N of them, and every ring
order of up to 6: 16 devices took a minute. This search prices O(N * k) subsets instead, where k
is the size of the subset it ends with:

1. **Rank** the devices by how fast they run the whole model alone (their profiled speed, and
   for co-tenants of a machine the speed they have when the others idle).
2. **Start** from several subsets: the k fastest devices that can hold a share of k, for growing k
   (stopping when the latency has not improved for PATIENCE sizes); the workers of each shared
   machine (the two fastest, and all of them: co-tenants talk over loopback and speed each other
   up by idling, which no single addition shows); and growth from each of the SEEDS fastest
   devices: add the candidate that gives the lowest predicted latency, priced on the cost model
   (the strategy's own split inside the subset, a ring order from ring.ring_order), until the
   latency has not improved for PATIENCE additions. While no subset can hold the model yet, add
   the candidate bringing the most speed x useful memory. On a large cluster only a shortlist is
   priced at each step: the fastest candidates, those best linked to the subset, and the
   co-tenants of its members.
3. **Refine** the best subset by local search over it: drop a member, add a candidate, swap a
   member for a candidate; the best move while it helps, at most REFINE_ROUNDS rounds.

Each strategy brings its own pricing (galaxy: water-filled split with memory repair; megatron:
the even split; seqpar: tokens water-filled among devices that hold the whole model; pipeline:
the chain arithmetic of stages.py). Every price is cached by subset, so a subset is priced once.
The result is deterministic: ties go to the lower device index.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .cost import CostModel

PATIENCE = 2  # additions without improvement before growth stops
SHORTLIST = 12  # candidates priced per step on a large cluster (all of them up to this many)
SWAP_CANDIDATES = 4  # candidates each member may be swapped for
SEEDS = 3  # growths started, from the fastest devices
REFINE_ROUNDS = 6


class SubsetSearch:
    """Grow-and-refine over subsets of `items` (device indices) for one pricing function.

    price(sub) -> latency in seconds, or None when the subset cannot run the strategy; `sub`
    is a sorted tuple. rate[i]: how fast device i is (higher is better), for ranking. room[i]:
    bytes it can hold beyond what every member must (None: memory is not the search's concern);
    need: bytes the subset must hold in total."""

    def __init__(self, cm: CostModel, items, price: Callable, rate: list[float], min_size: int = 1,
                 room: list[float] | None = None, need: float = 0.0, nbytes: float = 0.0,
                 fits: Callable[[int, int], bool] | None = None):
        self.cm, self.items, self._price = cm, list(items), price
        self.min_size, self.room, self.need, self.nbytes = min_size, room, need, nbytes
        self.fits = fits or (lambda i, k: True)
        # ranked as fast as each is with its co-tenants idle: a pair of workers that share a machine
        # may together be the fastest devices even though each was profiled slow beside the others
        self.rate = [r * cm.speedup((i,))[i] for i, r in enumerate(rate)]
        self.prices: dict[tuple[int, ...], float | None] = {}

    def price(self, sub) -> float | None:
        sub = tuple(sorted(sub))
        if sub not in self.prices:
            self.prices[sub] = self._price(sub)
        return self.prices[sub]

    def run(self) -> tuple[tuple[int, ...], float] | None:
        """The best subset found and its latency (None: no subset can run the strategy)."""
        ranked = sorted(self.items, key=lambda i: (-self.rate[i], i))
        found = [self._prefixes(ranked), *self._machines(ranked)] + [self._grow(seed) for seed in ranked[:SEEDS]]
        found = [f for f in found if f is not None]
        if not found:
            return None
        return self._refine(*min(found, key=lambda f: (f[1], len(f[0]), f[0])))

    def _machines(self, ranked):
        """The workers of each shared machine, its two fastest and all of them: co-tenants talk over
        loopback and speed each other up by idling, which no single addition to a subset shows."""
        hosts: dict[str, list[int]] = {}
        for i in ranked:
            t = self.cm.devices[i].tenancy
            if t is not None and t.host:
                hosts.setdefault(t.host, []).append(i)
        out = []
        for group in hosts.values():
            for sub in {tuple(sorted(group[:2])), tuple(sorted(group))}:
                lat = self.price(sub) if len(sub) >= self.min_size else None
                if lat is not None:
                    out.append((sub, lat))
        return out

    def _prefixes(self, ranked):
        """The k fastest devices that can take part in a subset of k, for growing k (a device that
        cannot hold a share of k, e.g. an even split, is passed over)."""
        best, stall = None, 0
        for k in range(max(1, self.min_size), len(ranked) + 1):
            sub = [i for i in ranked if self.fits(i, k)][:k]
            if len(sub) < k:
                continue
            lat = self.price(sub)
            if lat is None:
                continue
            if best is None or lat < best[1]:
                best, stall = (tuple(sorted(sub)), lat), 0
            else:
                stall += 1
                if stall >= PATIENCE:
                    break
        return best

    # growth -----------------------------------------------------------------------------
    def _grow(self, seed: int):
        """Add the candidate that prices lowest while it helps (PATIENCE); memory first while nothing fits."""
        cur = (seed,)
        best = None
        lat = self.price(cur) if self.min_size <= 1 else None
        if lat is not None:
            best = (cur, lat)
        stall = 0
        while len(cur) < len(self.items):
            cands = self._shortlist(cur, [j for j in self.items if j not in cur])
            priced = [(self.price(cur + (j,)), j) for j in cands]
            feasible = [(lat, j) for lat, j in priced if lat is not None]
            if feasible:
                lat, j = min(feasible)
                cur = tuple(sorted(cur + (j,)))
                if len(cur) >= self.min_size and (best is None or lat < best[1]):
                    best, stall = (cur, lat), 0
                elif best is not None:
                    stall += 1
                    if stall >= PATIENCE:
                        break
            elif best is not None:
                break  # it fitted before and no addition prices: growing further will not help
            else:
                j = max(cands, key=lambda j: (self._memory_score(cur, j), -j))
                cur = tuple(sorted(cur + (j,)))
        return best

    def _memory_score(self, cur, j) -> float:
        """Speed x memory toward what the subset still lacks."""
        if self.room is None:
            return self.rate[j]
        missing = max(1.0, self.need - sum(max(0.0, self.room[i]) for i in cur))
        return self.rate[j] * min(max(0.0, self.room[j]), missing)

    def _shortlist(self, cur, cands) -> list[int]:
        if len(cands) <= SHORTLIST:
            return cands
        by_rate = sorted(cands, key=lambda j: (-self.rate[j], j))
        by_link = sorted(cands, key=lambda j: (self._link_cost(cur, j), j))
        hosts = {self.cm.devices[i].tenancy.host for i in cur if self.cm.devices[i].tenancy is not None}
        out = [j for j in cands if self.cm.devices[j].tenancy is not None and self.cm.devices[j].tenancy.host in hosts]
        for j in (x for pair in zip(by_rate, by_link) for x in pair):
            if len(out) >= SHORTLIST:
                break
            if j not in out:
                out.append(j)
        if self.room is not None:  # and the candidates that bring the most speed x memory
            for j in sorted(cands, key=lambda j: (-self._memory_score(cur, j), j))[:SHORTLIST // 4]:
                if j not in out:
                    out.append(j)
        return sorted(out)

    def _link_cost(self, cur, j) -> float:
        """Cost of the two cheapest ways to hook j into a ring of `cur` (one message each way)."""
        costs = []
        for i in cur:
            if self.cm.has_link(i, j) and self.cm.has_link(j, i):
                (a, la), (b, lb) = self.cm.link(i, j), self.cm.link(j, i)
                costs.append(max(self.nbytes * a + la, self.nbytes * b + lb))
        costs.sort()
        return sum(costs[:2]) if costs else math.inf

    # refinement ---------------------------------------------------------------------------
    def _refine(self, cur, lat):
        for _ in range(REFINE_ROUNDS):
            out = [j for j in self.items if j not in cur]
            moves = []
            if len(cur) > self.min_size:
                moves += [tuple(i for i in cur if i != d) for d in cur]
            short = self._shortlist(cur, out)
            moves += [tuple(sorted(cur + (j,))) for j in short]
            swap_in = sorted(short, key=lambda j: (-self.rate[j], j))[:SWAP_CANDIDATES]
            swap_in += [j for j in sorted(short, key=lambda j: (self._link_cost(cur, j), j))[:SWAP_CANDIDATES]
                        if j not in swap_in]
            moves += [tuple(sorted((*(i for i in cur if i != d), j))) for d in cur for j in swap_in]
            best = None
            for sub in moves:
                p = self.price(sub)
                if p is not None and p < lat * (1 - 1e-9) and (best is None or (p, len(sub), sub) < best):
                    best = (p, len(sub), sub)
            if best is None:
                break
            lat, _, cur = best
        return cur, lat
