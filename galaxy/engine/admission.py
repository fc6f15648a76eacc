"""Early rejection (Mooncake): refuse a request at once when its time to first token is predicted to
miss the objective, instead of queueing it behind work that makes it -- and every request after it --
miss.

Without it, an engine past its capacity accepts everything: the queue of prompts grows, each new
request waits for all of them, and soon *no* request meets its TTFT objective although the devices
run flat out. Rejecting the requests that cannot make it keeps the queue at what the devices drain
within the objective, so the requests admitted still meet it, and the client that is refused learns
so in milliseconds, with a hint of when to retry, rather than after a timeout.

**The prediction** replays the engine's own scheduling on what it holds now, step by step, with the
step costs the engine measured:

- the work ahead: the prompt tokens not yet run of every sequence admitted or waiting (arrival
  order, as the scheduler runs them), then the new prompt; the decodes running now, each with the
  tokens it has left to generate;
- each simulated step runs one token of every running decode, then prompt chunks within the token
  budget -- `max_batched_tokens` less the decodes, and, beside running decodes, the stall bound's
  prompt budget (step_cost.py) exactly as the engine computes it -- admitting waiting prompts up to
  `max_running` sequences;
- a prompt whose last chunk ran becomes a decode (its first token came with that chunk), with its
  output budget less one token; a decode that generated its budget leaves;
- a step of `n` tokens costs `a + b * n` seconds: a Theil-Sen line through the last steps the engine
  ran, every step (prompt chunks and decodes: StepCost), so foreign load on the devices moves it;
- the predicted TTFT is the time at which the new prompt's last chunk ends, plus what is left of
  the step running now (taken as one step of the current batch).

What it leaves out, each making it err on the side of admitting or of refusing as noted: requests
that end early at an end-of-sequence token or a stop string (refuses a little early), the prefix
cache (a prompt whose prefix is cached runs fewer tokens: refuses early), KV blocks that run out and
preempt (admits late), attention's cost growing with the context (admits late). Before the engine has
run steps of two sizes there is no line to predict with, and every request is admitted.

**The decision**: admit while predicted TTFT <= headroom x objective (default headroom 0.9: the
prediction is a median-line estimate, and a request predicted right at the objective misses it about
half the time). Refused: `Overloaded` (errors.py) with the prediction, the objective, the queue and a
retry hint: the predicted drain time -- how long until, with no further arrivals, the work ahead of a
new request shrinks enough for it to be admitted: predicted TTFT - headroom x objective, rounded up
to whole seconds, at least 1 (HTTP's Retry-After counts whole seconds).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import GalaxyError, Overloaded
from .step_cost import StepCost

MAX_SIMULATED_STEPS = 20_000  # a backlog needing more steps is predicted as far as this (a lower bound)


class AdmissionConfigError(GalaxyError, ValueError):
    """An admission setting out of range; the message names the field and both numbers."""


@dataclass(frozen=True)
class AdmissionConfig:
    slo_ttft_s: float  # the TTFT objective, seconds
    headroom: float = 0.9  # admit while predicted TTFT <= headroom x slo_ttft_s

    def __post_init__(self):
        if not (isinstance(self.slo_ttft_s, (int, float)) and math.isfinite(self.slo_ttft_s) and self.slo_ttft_s > 0):
            raise AdmissionConfigError(f"admission: slo_ttft_s={self.slo_ttft_s!r} must be a positive number of "
                                       "seconds")
        if not (isinstance(self.headroom, (int, float)) and 0 < self.headroom <= 1):
            raise AdmissionConfigError(f"admission: headroom={self.headroom!r} must be in (0, 1] (admit while the "
                                       "predicted TTFT is at most headroom x the objective)")

    @property
    def bound_s(self) -> float:
        return self.headroom * self.slo_ttft_s


@dataclass(frozen=True)
class Backlog:
    """What the engine holds, as the predictor needs it."""

    decodes: tuple[int, ...]  # tokens each running decode has left to generate
    prompts: tuple[tuple[int, int, bool], ...]  # (prompt tokens left, output tokens, admitted) in run order
    max_batched_tokens: int
    max_running: int
    chunk: int  # most prompt tokens of one sequence in a step

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(p[0] for p in self.prompts)


def backlog_of(sched) -> Backlog:
    """The scheduler's sequences as a Backlog (called under the engine's lock)."""
    decodes, prompts = [], []
    for seq in sched.running:
        left = seq.params.max_new_tokens - len(seq.generated)
        if seq.num_uncomputed > 1 or seq.num_tokens == seq.num_prompt:  # still in its prompt (or a resumed one)
            prompts.append((seq.num_uncomputed, left, True))
        elif left > 0:
            decodes.append(left)
    for seq in sched.waiting:
        prompts.append((seq.num_uncomputed, seq.params.max_new_tokens - len(seq.generated), False))
    cfg = sched.cfg
    return Backlog(tuple(decodes), tuple(prompts), cfg.max_batched_tokens, cfg.max_running, cfg.chunk)


def predict_ttft(backlog: Backlog, prompt_tokens: int, fit: tuple[float, float],
                 prompt_budget: Callable[[int], int] | None = None) -> float:
    """Seconds from now until the first token of a new `prompt_tokens`-token prompt queued behind
    `backlog`, steps costing `a + b * tokens` (fit = (a, b)). prompt_budget(decodes): prompt tokens a
    step beside that many decodes may carry (the engine's stall bound); None: only the token budget."""
    a, b = fit
    # decodes as the step at which each finishes: the live ones are those finishing after the current step
    finish = list(backlog.decodes)
    heapq.heapify(finish)
    queue = [[left, out, admitted] for left, out, admitted in backlog.prompts] + [[prompt_tokens, 1, False]]
    running = len(backlog.decodes) + sum(1 for p in backlog.prompts if p[2])
    mine = queue[-1]
    # what is left of the step running now: one step of the batch the engine holds (decodes and a chunk)
    busy = len(finish) + sum(p[0] for p in backlog.prompts if p[2])
    t = a + b * min(backlog.max_batched_tokens, busy) if busy else 0.0
    step = 0
    while step < MAX_SIMULATED_STEPS:
        while finish and finish[0] <= step:
            heapq.heappop(finish)
            running -= 1
        decodes = len(finish)
        budget = backlog.max_batched_tokens - decodes
        if prompt_budget is not None and decodes:
            budget = min(budget, max(1, prompt_budget(decodes)))
        tokens, done = decodes, []
        for item in queue:
            if budget <= 0:
                break
            if not item[2]:
                if running >= backlog.max_running:
                    break
                item[2], running = True, running + 1
            n = min(item[0], budget, backlog.chunk)
            item[0] -= n
            budget -= n
            tokens += n
            if item[0] == 0:
                done.append(item)
        step += 1
        t += a + b * tokens
        for item in done:
            if item is mine:
                return t
            queue.remove(item)
            if item[1] > 1:
                heapq.heappush(finish, step + item[1] - 1)  # its first token came with its last chunk
            else:
                running -= 1
    return t


class Admission:
    """The engine's early-rejection gate: measures every step, predicts each new request's TTFT."""

    def __init__(self, config: AdmissionConfig):
        self.config = config
        self.cost = StepCost()  # every step, prompt chunks and decodes: the line the prediction runs on
        self.rejected = 0
        self.last_prediction_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        self.cost.observe(tokens, seconds)

    def check(self, sched, prompt_tokens: int, prompt_budget: Callable[[int], int] | None) -> float | None:
        """The predicted TTFT of a `prompt_tokens` prompt submitted now (None: nothing to predict with yet);
        raises Overloaded if it misses the objective (called under the engine's lock, before the request
        is queued: a refusal changes nothing)."""
        if self.cost.fit is None:  # steps of two sizes not seen yet: nothing to predict with
            self.last_prediction_s = None
            return None
        backlog = backlog_of(sched)
        ttft = predict_ttft(backlog, prompt_tokens, self.cost.fit, prompt_budget)
        self.last_prediction_s = ttft
        c = self.config
        if ttft <= c.bound_s:
            return ttft
        self.rejected += 1
        retry = max(1, math.ceil(ttft - c.bound_s))
        raise Overloaded(
            f"the objective cannot be met: predicted time to first token {ttft:.2f} s > {c.headroom:g} x the "
            f"objective {c.slo_ttft_s:g} s ({len(sched.waiting)} requests waiting, {len(sched.running)} running, "
            f"{backlog.queued_prompt_tokens} prompt tokens queued ahead); retry in {retry} s",
            predicted_ttft_s=ttft, slo_ttft_s=c.slo_ttft_s, waiting=len(sched.waiting), running=len(sched.running),
            queued_prompt_tokens=backlog.queued_prompt_tokens, retry_after_s=retry)
