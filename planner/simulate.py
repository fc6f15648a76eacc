"""A discrete-event simulator of the serving engine, for the phase-placement search (DistServe's method).

DistServe picks its placement by simulating the serving engine under a workload rather than by
closed forms: queueing, batching and interference decide TTFT and TPOT under load, and a single
request's latency does not show them. This module does the same for Galaxy's engine
(docs/engine.md), with the step costs of a placement given as functions (planner/phases.py
derives them from the profiles):

- **Requests** arrive as a Poisson process at `rate` (seeded; the same seed at another rate
  scales the same arrival pattern, so attainment falls smoothly with the rate), with input and
  output lengths uniform in [L(1-r), L(1+r)], as `galaxy bench serve` draws them.
- **One step loop per group, iterations not requests** (Orca / Sarathi-Serve, as the engine's
  scheduler): every step runs one decode token for each running sequence (up to `max_running`),
  then prompt chunks in arrival order within `max_batched_tokens`. Its time is the placement's
  cost of that batch.
- **colocated**: one loop on the devices that run both phases; a step carrying prompt tokens
  stretches the running decodes (interference). The prompt's last chunk samples the first token.
- **disaggregated**: a prefill loop (prompt chunks only) on the prefill group and a decode loop
  (decodes only, no prompt ever stalls them) on the decode group, running side by side. A prompt
  whose prefill ends has its first token (its last chunk's logits, sampled on the prefill group, as
  the runtime does: engine/disagg.py), waits for the part of its KV move the prefill did not hide,
  then joins the decode batch: the move and the first decode step there show in its second token,
  i.e. in TPOT, not TTFT (measured on the emulated trio at 100 Mbit/s: TTFT 671 ms, the 2nd token at
  1780 ms; Mooncake #62's TTFT would count them).
- **mixed**: one loop (the decode devices also run the prefill, so their steps alternate), a
  prompt's KV then moves to the decode devices as in disaggregated.

Not simulated: KV memory (the pool is assumed to hold `max_running` sequences: no preemption),
the prefix cache, a prompt chunk's attention over the chunks before it (a chunk costs a prompt of
its length), sampling and the coordinator's own time.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .plan import PlanError

ATTAINMENT_GOAL = 0.9  # goodput: the highest rate at which this share of requests meets both objectives
PLACEMENTS = ("colocated", "disaggregated", "mixed")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise PlanError(msg)


@dataclass(frozen=True)
class Workload:
    """What arrives: a Poisson process of `num_requests` requests, lengths uniform in [L(1-r), L(1+r)]."""

    rate: float  # requests per second
    input_len: int = 128
    output_len: int = 32
    range_ratio: float = 0.0
    num_requests: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        _need(self.rate > 0 and math.isfinite(self.rate), f"workload: rate={self.rate} must be a positive number")
        _need(self.input_len >= 1, f"workload: input_len={self.input_len} must be >= 1")
        _need(self.output_len >= 1, f"workload: output_len={self.output_len} must be >= 1")
        _need(0 <= self.range_ratio < 1, f"workload: range_ratio={self.range_ratio} must be in [0, 1)")
        _need(self.num_requests >= 1, f"workload: num_requests={self.num_requests} must be >= 1")

    def requests(self) -> list[tuple[float, int, int]]:
        """(arrival s, prompt tokens, output tokens) per request, arrival order. The arrival pattern
        is drawn at rate 1 and scaled, so one seed gives the same pattern at every rate."""
        rnd = random.Random(f"galaxy-serve-sim-{self.seed}")
        out, t = [], 0.0
        for _ in range(self.num_requests):
            n_in = max(1, round(rnd.uniform(self.input_len * (1 - self.range_ratio),
                                            self.input_len * (1 + self.range_ratio))))
            n_out = max(1, round(rnd.uniform(self.output_len * (1 - self.range_ratio),
                                             self.output_len * (1 + self.range_ratio))))
            out.append((t / self.rate, n_in, n_out))
            t += rnd.expovariate(1.0)
        return out


@dataclass(frozen=True)
class Objectives:
    """Per request: time to first token and time per output token (seconds)."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        _need(self.ttft_s > 0, f"objectives: ttft_s={self.ttft_s} must be > 0")
        _need(self.tpot_s > 0, f"objectives: tpot_s={self.tpot_s} must be > 0")


@dataclass(frozen=True)
class PhaseCosts:
    """A placement's step costs, in seconds.

    prefill_s(tokens): a step of `tokens` prompt tokens on the prefill group.
    decode_s(batch, context): a decode step of `batch` sequences holding `context` KV positions in all.
    transfer_s(tokens, prefill_s): the part of a prompt's KV transfer its prefill did not hide, in flight
    off both groups' loops (0: colocated).
    pull_s(tokens) / push_s(tokens): the part of a prompt's KV move its prefill loop spends after the
    prompt's last chunk (pulling the K/V out) / its decode loop spends adopting it (pushing them in):
    no step of that loop runs meanwhile (the runtime moves K/V through the coordinator between steps).
    decode_contended_s(batch, context): a decode step while the prefill group computes beside it (devices
    sharing a machine's cores with it run it slower); None: decode_s always (the prefill loop is not
    simulated apart). A step is priced between the two by the share of it the prefill loop is busy.
    colocated_s(tokens, batch, context): a colocated step of prompt tokens and decodes together
    (None: the placement is not colocated)."""

    placement: str
    prefill_s: Callable[[int], float]
    decode_s: Callable[[int, int], float]
    transfer_s: Callable[[int, float], float] = lambda tokens, prefill_s: 0.0
    colocated_s: Callable[[int, int, int], float] | None = None
    max_batched_tokens: int = 256
    max_running: int = 64
    pull_s: Callable[[int], float] = lambda tokens: 0.0
    push_s: Callable[[int], float] = lambda tokens: 0.0
    decode_contended_s: Callable[[int, int], float] | None = None

    def __post_init__(self) -> None:
        _need(self.placement in PLACEMENTS, f"placement: {self.placement!r} is not one of {PLACEMENTS}")
        _need(self.max_batched_tokens >= 1, f"max_batched_tokens={self.max_batched_tokens} must be >= 1")
        _need(1 <= self.max_running <= self.max_batched_tokens,
              f"max_running={self.max_running} must be in 1..max_batched_tokens={self.max_batched_tokens}")
        _need((self.colocated_s is not None) == (self.placement == "colocated"),
              "colocated_s: given exactly when the placement is colocated")


@dataclass(frozen=True)
class RequestTimes:
    arrival_s: float
    first_s: float  # first token
    last_s: float  # last token
    output_len: int

    @property
    def ttft(self) -> float:
        return self.first_s - self.arrival_s

    @property
    def tpot(self) -> float | None:
        return None if self.output_len < 2 else (self.last_s - self.first_s) / (self.output_len - 1)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100] (numpy's default); nan for no values."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class SimResult:
    rate: float
    requests: tuple[RequestTimes, ...]
    objectives: Objectives

    def _ttfts(self) -> list[float]:
        return [r.ttft for r in self.requests]

    def _tpots(self) -> list[float]:
        return [t for r in self.requests if (t := r.tpot) is not None]

    def ttft(self, q: float) -> float:
        return percentile(self._ttfts(), q)

    def tpot(self, q: float) -> float:
        return percentile(self._tpots(), q)

    @property
    def attainment(self) -> float:
        """Share of requests meeting both objectives."""
        o = self.objectives
        met = sum(1 for r in self.requests if r.ttft <= o.ttft_s and (r.tpot is None or r.tpot <= o.tpot_s))
        return met / len(self.requests)

    @property
    def throughput(self) -> float:
        """Completed requests per second, from the first arrival to the last token."""
        span = max(r.last_s for r in self.requests) - min(r.arrival_s for r in self.requests)
        return len(self.requests) / span if span > 0 else math.inf


class _Seq:
    __slots__ = ("k", "arrival", "n_in", "n_out", "left", "gen", "ctx", "first", "last", "prefill_s")

    def __init__(self, k: int, arrival: float, n_in: int, n_out: int):
        self.k, self.arrival, self.n_in, self.n_out = k, arrival, n_in, n_out
        self.left = n_in  # prompt tokens not yet prefilled
        self.gen = 0  # tokens generated
        self.ctx = 0  # KV positions held
        self.first = self.last = math.nan
        self.prefill_s = 0.0  # step time spent on its chunks (what its KV transfer may hide behind)


def _busy_share(spans: list[tuple[float, float]], starts: list[float], t0: float, t1: float) -> float:
    """The share of [t0, t1] covered by `spans` (sorted, disjoint; starts: their start times)."""
    if t1 <= t0 or not spans:
        return 0.0
    k = max(0, bisect.bisect_right(starts, t0) - 1)
    covered = 0.0
    while k < len(spans) and spans[k][0] < t1:
        covered += max(0.0, min(t1, spans[k][1]) - max(t0, spans[k][0]))
        k += 1
    return covered / (t1 - t0)


def _loop(seqs: list[_Seq], ready: list[float], costs: PhaseCosts, prefill: bool, decode: bool,
          handoff: Callable[[_Seq, float], float | None] | None, spans: list[tuple[float, float]] | None = None,
          beside: list[tuple[float, float]] | None = None) -> None:
    """One group's step loop over `seqs`, each available from ready[k] (its arrival, or its KV's).
    spans: where to record when this loop is busy; beside: another loop's busy spans, which make its
    decode steps cost decode_contended_s for the share of them they cover.

    prefill: the loop runs prompt chunks; decode: it runs decodes. A prompt that finishes here is
    decoded here with the first token its last chunk sampled (handoff None: colocated), or handed
    off: handoff(seq, t) returns when its KV is back in this loop's decode devices (mixed), or None
    when another loop decodes it (disaggregated)."""
    pending = [(ready[s.k], s.k) for s in seqs]
    heapq.heapify(pending)
    waiting: deque[_Seq] = deque()
    running: list[_Seq] = []
    t, left = 0.0, len(seqs)
    budget = costs.max_batched_tokens
    starts = [a for a, _ in beside or ()]
    while left:
        while pending and pending[0][0] <= t:
            s = seqs[heapq.heappop(pending)[1]]
            if s.gen >= s.n_out:  # finished where it was prefilled (one token): never handed over
                left -= 1
                continue
            if not s.left:  # prefilled elsewhere: its K/V are pushed in before the next step
                push = costs.push_s(s.n_in)
                _span(spans, t, t + push)
                t += push
            (waiting if s.left else running).append(s)
        batch = running[:costs.max_running] if decode else []
        chunks = []
        room = budget - len(batch)
        for s in waiting if prefill else ():
            if room <= 0:
                break
            take = min(s.left, room)
            chunks.append((s, take))
            room -= take
        if not batch and not chunks:
            t = max(t, pending[0][0])  # idle until the next sequence is ready
            continue
        tokens = sum(c for _, c in chunks)
        context = sum(s.ctx for s in batch)
        if not chunks:
            dt = costs.decode_s(len(batch), context)
            if beside and costs.decode_contended_s is not None:
                share = _busy_share(beside, starts, t, t + dt)
                dt += share * (costs.decode_contended_s(len(batch), context) - dt)
        elif not batch:
            dt = costs.prefill_s(tokens)
        elif costs.colocated_s is not None:
            dt = costs.colocated_s(tokens, len(batch), context)
        else:  # mixed: the decode devices run the prompt chunk with the prefill group, then the decodes
            dt = costs.prefill_s(tokens) + costs.decode_s(len(batch), context)
        _span(spans, t, t + dt)
        t += dt
        done = t  # the step's end: every prompt it finishes has its first token here
        for s in batch:
            s.gen += 1
            s.ctx += 1
            if s.gen == s.n_out:
                s.last = t
                running.remove(s)
                left -= 1
        for s, take in chunks:
            s.left -= take
            s.ctx += take
            s.prefill_s += dt
            if s.left:
                continue
            waiting.remove(s)
            s.gen, s.first = 1, done  # the last chunk's logits give the first token, wherever it decodes
            if s.n_out == 1:  # done: nothing to decode, no K/V to move
                s.last = done
                left -= 1
                continue
            if handoff is None:
                running.append(s)
                continue
            pull = costs.pull_s(s.n_in)  # its K/V out to the coordinator before the loop's next step
            _span(spans, t, t + pull)
            t += pull
            back = handoff(s, t)
            if back is None:
                left -= 1
            else:
                heapq.heappush(pending, (back, s.k))


def _span(spans: list[tuple[float, float]] | None, t0: float, t1: float) -> None:
    """Record [t0, t1] as busy, merged with the last span when they touch."""
    if spans is None or t1 <= t0:
        return
    if spans and spans[-1][1] >= t0:
        spans[-1] = (spans[-1][0], max(spans[-1][1], t1))
    else:
        spans.append((t0, t1))


def simulate(costs: PhaseCosts, workload: Workload, objectives: Objectives) -> SimResult:
    """Every request's first and last token time under `costs` (see the module docstring)."""
    reqs = workload.requests()
    seqs = [_Seq(k, a, n_in, n_out) for k, (a, n_in, n_out) in enumerate(reqs)]
    arrivals = [a for a, _, _ in reqs]
    if costs.placement == "colocated":
        _loop(seqs, arrivals, costs, prefill=True, decode=True, handoff=None)
    elif costs.placement == "disaggregated":
        kv_ready = [0.0] * len(seqs)

        def handoff(s: _Seq, t: float) -> None:
            kv_ready[s.k] = t + costs.transfer_s(s.n_in, s.prefill_s)

        busy: list[tuple[float, float]] = []
        _loop(seqs, arrivals, costs, prefill=True, decode=False, handoff=handoff, spans=busy)
        _loop(seqs, kv_ready, costs, prefill=False, decode=True, handoff=None, beside=busy)
    else:
        _loop(seqs, arrivals, costs, prefill=True, decode=True,
              handoff=lambda s, t: t + costs.transfer_s(s.n_in, s.prefill_s))
    return SimResult(workload.rate, tuple(RequestTimes(s.arrival, s.first, s.last, s.n_out) for s in seqs),
                     objectives)


def goodput(costs: PhaseCosts, workload: Workload, objectives: Objectives, start_rate: float,
            tolerance: float = 0.02) -> float:
    """The highest request rate at which at least ATTAINMENT_GOAL of the requests meet both
    objectives (DistServe's goodput), within `tolerance` (relative); 0 when even a lone request
    misses them. Bracketed by doubling / halving from start_rate, then bisected (geometric)."""
    _need(start_rate > 0, f"start_rate={start_rate} must be > 0")

    def ok(rate: float) -> bool:
        w = Workload(rate, workload.input_len, workload.output_len, workload.range_ratio, workload.num_requests,
                     workload.seed)
        return simulate(costs, w, objectives).attainment >= ATTAINMENT_GOAL

    lo, hi = 0.0, start_rate
    if ok(start_rate):
        lo = start_rate
        for _ in range(40):
            hi = lo * 2
            if not ok(hi):
                break
            lo = hi
        else:
            return lo
    else:
        for _ in range(40):
            hi = hi / 2
            if ok(hi):
                lo, hi = hi, hi * 2
                break
        else:
            return 0.0
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
