"""How long a step takes for how many tokens, learnt from the steps the engine ran, and the prompt
chunk that keeps a step with running decodes near a decode step's time (Sarathi-Serve's point).

A step's time on a split model is about `a + b * tokens`: `a` the per-step cost that does not grow
with the batch (two collectives per layer, each a round trip between the devices, the coordinator's
share), `b` the compute of one more token. On the emulated hetero trio a decode step of one sequence
took 0.3 s and a 128-token prompt step 2 s: a fixed budget of 256 tokens let every step that carried
a prompt chunk stretch the running streams' inter-token time seven-fold. The budget of prompt tokens
in a step that also decodes is therefore derived, not set: the largest chunk `c` with
`a + b * (decodes + c) <= max_stall * (a + b * decodes)`, so a running stream's tokens come at most
`max_stall` times slower while prompts are prefilled beside it. A step with no running decode
stalls nobody and keeps the whole token budget (a lone request's TTFT is unchanged).

A bound relative to the decode step of the streams now running lets the step grow with them: beside
four streams it is 1.5x a step that is itself longer than one stream's, so the inter-token time is
~1.8x the unloaded TPOT at the median, and its P99 above 2x. An objective in the field's terms
(Sarathi-Serve derives the token budget from the TBT objective) is therefore offered too: with
`itl_target`, a step beside streams takes at most `itl_target` times the *unloaded* TPOT -- the
one-stream decode step, measured from the engine's own lone decodes when it ran any, else the line at
one token -- whatever number of streams it carries: `a + b * (decodes + c) <= itl_target * t1`.

The fit is Theil-Sen (the median of the slopes between samples of different sizes, the intercept the
median residual) over the last `window` steps: the devices share their cores with other work, and
one slow step (a first step, a burst of foreign load) must not move the budget as it would move a
least-squares line.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque


class StepCost:
    """The line `seconds = a + b * tokens` through the engine's recent steps."""

    def __init__(self, window: int = 48):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.fit: tuple[float, float] | None = None  # (a, b) once steps of two sizes were seen
        self.lone: deque[float] = deque(maxlen=window)  # steps of one decode and nothing else: the unloaded TPOT

    def observe(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))
        slopes = [(s2 - s1) / (n2 - n1) for (n1, s1), (n2, s2) in itertools.combinations(self.samples, 2) if n2 != n1]
        if not slopes:  # every step the same size: nothing to separate a from b (keep the last fit)
            return
        b = max(statistics.median(slopes), 1e-9)  # a step never gets cheaper with more tokens
        a = max(statistics.median(s - b * n for n, s in self.samples), 0.0)
        self.fit = (a, b)

    def prompt_tokens(self, decodes: int, max_stall: float) -> int | None:
        """Most prompt tokens a step with `decodes` running decodes may carry so that it takes at
        most `max_stall` times the decode-only step; None before the fit."""
        if self.fit is None:
            return None
        a, b = self.fit
        return int((max_stall - 1.0) * (a + b * decodes) / b)

    def observe_lone(self, seconds: float) -> None:
        """A step that ran one decode and nothing else: one stream alone, what its unloaded TPOT is."""
        self.lone.append(seconds)

    def unloaded_step(self) -> float | None:
        """The one-stream decode step: the median of the lone decodes seen, else the line at one token;
        None before either."""
        if self.lone:
            return statistics.median(self.lone)
        return None if self.fit is None else self.fit[0] + self.fit[1]

    def objective_tokens(self, decodes: int, itl_target: float) -> int | None:
        """Most prompt tokens a step with `decodes` running decodes may carry so that it takes at most
        `itl_target` times the unloaded TPOT (may be <= 0: the decodes alone reach it); None before the fit."""
        t1 = self.unloaded_step()
        if self.fit is None or t1 is None:
            return None
        a, b = self.fit
        return int((itl_target * t1 - a) / b) - decodes

    def slack_tokens(self, decodes: int, seconds: float | None) -> int | None:
        """Most prompt tokens a step with `decodes` decodes may carry to take at most `seconds` (the streams'
        TPOT slack); None before the fit or without a slack. Past the tensor-parallel sizes a step runs HMP,
        cheaper a token than this line (fitted to steps beside streams, mostly small): the chunk errs short."""
        if self.fit is None or seconds is None:
            return None
        a, b = self.fit
        return int((seconds - a) / b) - decodes
