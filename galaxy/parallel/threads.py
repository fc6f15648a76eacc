"""How many intra-op threads each step of a device runs with: all of the device's for a step of many
tokens (prefill), fewer -- often one -- for a step of a few (decode).

Why two counts: a decode step of a small model is bound by memory bandwidth and per-op overhead, not
by arithmetic. A second OpenMP thread splits each matmul of one row in two and pays a fork / join per
op (hundreds a step), more than it gains; on a prompt chunk of hundreds of rows the same thread halves
the arithmetic. Measured on this 2-core host (SmolLM2 Q4_1 in int4, docs/decode-formats.md): the
engine's decode step took 17.0 ms at 1 thread and 21.7 at 2, while the 256-token prefill went from
0.79 s to 0.48 s. llama.cpp keeps the same two counts apart (`n_threads`, `n_threads_batch`).

What a step runs with is `StepThreads.for_tokens(tokens)`: the decode count for steps of at most
`decode_max_tokens` tokens, the prefill count above. The decode count is measured per device at load
(`measure_step_threads`: the shard's own matmuls on one row, timed at 1 and at the prefill count,
interleaved, within MEASURE_BUDGET_S and one more pass), then confirmed on the device's first real
decode steps (`DecodeTuner`), unless given (`LoadOptions.decode_threads`, `--decode-threads`).

Thread safety: `torch.set_num_threads` on this build (OpenMP, libgomp) sets the *calling thread's*
team size (OpenMP's nthreads ICV is per thread) and a process-wide default that a thread takes on its
first parallel op. So `intra_op_threads` switches the count on the thread running the step and
puts it back after; a prefill running on another thread of the process keeps its own count
(tests/parallel/test_step_threads.py pins this), and every rank's step sets its count itself rather
than rely on the process-wide default. A switch costs well under a microsecond (measured: 0.2 us for
a set-and-restore pair), against a decode step of milliseconds.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlanMismatch
from ..model.quant import QuantLinear
from ..model.transformer import Transformer

# Steps of at most this many tokens run with the decode count: a batch of decodes (and a decode beside a
# short chunk) is still one or a few rows per matmul, bound by reading the weights, not by arithmetic.
DECODE_MAX_TOKENS = 16
MEASURE_BUDGET_S = 0.5  # at most this long timing a shard's decode matmuls at load
MEASURE_REPS = 5  # interleaved rounds per candidate count (fewer if the budget runs out)
# A larger count must beat a smaller one by this fraction to be chosen: on a tie the spare cores are
# worth more to whatever else runs (the coordinator, a peer worker on the same host) than noise is.
PREFER_FEWER = 0.03
TUNE_STEPS = 4  # timed real decode steps per candidate count before a measured count is settled for good


class DecodeTuner:
    """The decode count settled on the device's own decode steps, after the load's matmul timing.

    Why: the load times the shard's matmuls alone, but a real step also runs a dozen small ops per
    layer, each paying the OpenMP fork / join of every extra thread, so the matmuls' winner can lose
    the step. Measured on this quiet 2-core host (`galaxy bench decode --local 3`, SmolLM2 int4): the
    load picked 2 decode threads and the step took 24.4 ms, against 17.9 at 1. So the first decode
    steps run the candidate counts in turn, steps of one token count compared with each other only (a
    batch of 8 is not a batch of 1), each count's first step dropped (its thread team is new), and
    once every count has TUNE_STEPS timed steps of one size the fastest median wins (a larger count
    only by PREFER_FEWER, as at load) for the rest of the load. Every rank of a split sees the same
    steps in the same order, so all of them try the same count on the same step."""

    def __init__(self, counts: tuple[int, ...], steps: int = TUNE_STEPS):
        self.counts, self.steps = tuple(sorted(set(counts))), steps
        self.settled: int | None = self.counts[0] if len(self.counts) == 1 else None
        self._seen: dict[int, dict[int, list[float]]] = {}  # step tokens -> count -> seconds, in order
        self._lock = threading.Lock()

    def count(self, tokens: int) -> int:
        """The count a decode step of `tokens` tokens runs with."""
        if self.settled is not None:
            return self.settled
        with self._lock:
            turn = sum(map(len, self._seen.get(tokens, {}).values()))
        return self.counts[turn % len(self.counts)]

    def observe(self, tokens: int, count: int, seconds: float) -> None:
        """A decode step's time; settles the count once every candidate has enough steps of one size."""
        if self.settled is not None or count not in self.counts:
            return
        with self._lock:
            seen = self._seen.setdefault(tokens, {n: [] for n in self.counts})
            seen[count].append(seconds)
            if all(len(ts) > self.steps for ts in seen.values()):
                self.settled = choose_decode_threads({n: statistics.median(ts[1:]) for n, ts in seen.items()})
                self._seen.clear()


@dataclass(frozen=True)
class StepThreads:
    """A device's intra-op thread counts: `prefill` for steps of many tokens, `decode` for steps of at
    most `decode_max_tokens` tokens."""

    prefill: int
    decode: int  # given, or the load's measured count (`tuner` may settle on another)
    decode_max_tokens: int = DECODE_MAX_TOKENS
    tuner: DecodeTuner | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "decode_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PlanMismatch(f"step threads: {name}={v!r} must be an integer >= 1")

    def for_tokens(self, tokens: int) -> int:
        """The thread count of a step of `tokens` tokens."""
        if tokens > self.decode_max_tokens:
            return self.prefill
        return self.decode if self.tuner is None else self.tuner.count(tokens)

    def observe(self, tokens: int, count: int, seconds: float) -> None:
        """A step's time at the count it ran with (what the tuner, if any, settles on)."""
        if self.tuner is not None and tokens <= self.decode_max_tokens:
            self.tuner.observe(tokens, count, seconds)

    @property
    def decode_now(self) -> int:
        """The decode count steps run with now: the tuner's, once settled, else the load's."""
        return self.decode if self.tuner is None or self.tuner.settled is None else self.tuner.settled


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads on this thread, and put the count back after."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def candidates(threads: int) -> tuple[int, ...]:
    """The decode counts worth timing on a device of `threads` threads: 1, the powers of two below, all."""
    out, n = {1, threads}, 2
    while n < threads:
        out.add(n)
        n *= 2
    return tuple(sorted(out))


def _decode_kernels(model: Transformer) -> list:
    """Callables running each of the shard's matmuls of one decode step on one row: every linear of
    its blocks (fused Q|K|V, output, gate|up, down) and its LM head. The embedding is a lookup, not
    a matmul, so its table (a compact module too) is left out."""
    kernels, seen = [], set()
    for name, m in model.named_modules():
        if name.startswith("embed") or id(m) in seen:
            continue
        if isinstance(m, nn.Linear) and m.weight.numel():
            seen.add(id(m))
            kernels.append((m, torch.zeros(1, m.in_features)))
        elif isinstance(m, QuantLinear) and m.n and m.k:
            seen.add(id(m))
            kernels.append((m.forward, torch.zeros(1, m.k)))
    if model.head is None and model.lm_head is not None and model.lm_head.numel():
        kernels.append((model.head_logits, torch.zeros(1, model.cfg.hidden)))
    return kernels


@torch.inference_mode()
def time_decode_threads(model: Transformer, counts: tuple[int, ...], reps: int = MEASURE_REPS,
                        budget_s: float = MEASURE_BUDGET_S) -> dict[int, float]:
    """Median seconds of one pass over the shard's decode matmuls at each thread count, the counts
    interleaved round by round (so drift on a shared host hits them alike), within `budget_s`."""
    kernels = _decode_kernels(model)
    if not kernels:
        return {}

    def one_pass() -> float:
        t0 = time.perf_counter()
        for fn, x in kernels:
            fn(x)
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {n: [] for n in counts}
    deadline = time.perf_counter() + budget_s
    # the first round warms caches and each count's thread team, and is dropped; a round is cut short
    # when the budget runs out (a pass under heavy foreign load can take tens of times its usual time)
    for rnd in range(reps + 1):
        for n in counts:
            if rnd and time.perf_counter() > deadline:
                break
            with intra_op_threads(n):
                times[n].append(one_pass())
        else:
            continue
        break
    return {n: statistics.median(ts[1:] or ts) for n, ts in times.items()}


def choose_decode_threads(timings: dict[int, float], fallback: int = 1) -> int:
    """The count with the fastest decode matmuls; a larger count only if it beats every smaller one by
    PREFER_FEWER."""
    best = None
    for n in sorted(timings):
        if best is None or timings[n] < timings[best] * (1 - PREFER_FEWER):
            best = n
    return fallback if best is None else best


def measure_step_threads(model: Transformer, prefill: int, decode: int = 0) -> tuple[StepThreads, dict[int, float]]:
    """A device's StepThreads: `decode` if given (>= 1), else measured on its shard's matmuls and then
    confirmed on its first decode steps (DecodeTuner). Returns the timings too (empty when nothing was
    measured), for the load's log and report."""
    if decode:
        return StepThreads(prefill, decode), {}
    timings = time_decode_threads(model, candidates(prefill)) if prefill > 1 else {}
    chosen = choose_decode_threads(timings, fallback=1 if timings else prefill)
    return StepThreads(prefill, chosen, tuner=DecodeTuner(tuple(timings)) if len(timings) > 1 else None), timings
