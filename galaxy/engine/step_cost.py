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

A decode and a prompt token do not cost the same: a decode is a sequence of its own (its own K/V
gather and attention, its own logit row), a prompt chunk's tokens share one. On the emulated trio a
decode added ~7 ms to a step and a prompt token 2-3 ms; one line through steps whose sizes vary mostly
by their decodes takes the decode's cost for a prompt token's and allows a third of the chunk the
bound means. Once the steps allow it the engine therefore also fits `seconds = a + bd * decodes +
bp * prompt_tokens` (`observe_shape`): `bp` the median slope between steps with the same decodes and
different prompt tokens, `bd` between steps with the same prompt tokens and different decodes (0 while
the decodes hardly vary), `a` the median residual; every bound then uses it (`split`), and the one
line until then. While prompts always wait, every step carries the same chunk, so until the split is
fitted every fourth step beside streams is a probe that carries no prompt tokens (`probe`).

The fit is Theil-Sen (the median of the slopes between samples of different sizes, the intercept the
median residual) over the last `window` steps: the devices share their cores with other work, and
one slow step (a first step, a burst of foreign load) must not move the budget as it would move a
least-squares line.

A step is recorded once, by what it carried (`observe_shape`): the one line reads its size off the same
record, in the same pass over the pairs as the split, and stops being fitted once the split is (nothing
reads it then: every bound uses the split). `observe` records a step known by its size only (the TTFT
prediction's line, admission.py), which the split never reads.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque

MIN_PAIRS = 8  # pairs of steps differing in prompt tokens only before the split fit is trusted over the one line
MAX_TOKENS = 1 << 30  # a step's prompt tokens are bounded far below this (max_batched_tokens)
PROBE_EVERY = 4  # until then, every 4th step beside streams is decode-only (probe)


class StepCost:
    """The line `seconds = a + b * tokens` through the engine's recent steps."""

    def __init__(self, window: int = 48):
        # (decodes, prompt tokens, seconds) of the last `window` steps; decodes None: known by its size only
        self.shapes: deque[tuple[int | None, int, float]] = deque(maxlen=window)
        self.fit: tuple[float, float] | None = None  # (a, b) once steps of two sizes were seen
        self.lone: deque[float] = deque(maxlen=window)  # steps of one decode and nothing else: the unloaded TPOT
        self.split: tuple[float, float, float] | None = None  # (a, bd, bp) once MIN_PAIRS of prompt pairs were seen
        self._beside = 0  # steps beside streams observed: every PROBE_EVERY-th is a probe until the split is fitted

    def observe(self, tokens: int, seconds: float) -> None:
        """A step known by its size only: feeds the one line."""
        self.shapes.append((None, tokens, seconds))
        self._refit(split=False)

    def observe_shape(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        """A step beside running streams, by what it carried: feeds the split fit (decodes apart from prompt
        tokens) and, until that is fitted, the one line."""
        self.shapes.append((decodes, prompt_tokens, seconds))
        self._beside += 1
        self._refit(split=True)

    def _refit(self, split: bool) -> None:
        """One pass over the pairs of the window: the line's slopes (pairs of different sizes) while no split is
        fitted, the split's (pairs differing in one kind) when asked."""
        line = self.split is None
        slopes, per_prompt, per_decode = [], [], []
        for (d1, c1, s1), (d2, c2, s2) in itertools.combinations(self.shapes, 2):
            if line:
                n1, n2 = c1 + (d1 or 0), c2 + (d2 or 0)
                if n1 != n2:
                    slopes.append((s2 - s1) / (n2 - n1))
            if not split or d1 is None or d2 is None:
                continue
            if d1 == d2 and c1 != c2:
                per_prompt.append((s2 - s1) / (c2 - c1))
            elif c1 == c2 and d1 != d2:
                per_decode.append((s2 - s1) / (d2 - d1))
        if slopes:  # (every step the same size: nothing to separate a from b; keep the last fit)
            b = max(statistics.median(slopes), 1e-9)  # a step never gets cheaper with more tokens
            a = max(statistics.median(s - b * (c + (d or 0)) for d, c, s in self.shapes), 0.0)
            self.fit = (a, b)
        if len(per_prompt) < MIN_PAIRS:
            return  # too few to price a prompt token apart: the one line (keep any split fitted before)
        bp = max(statistics.median(per_prompt), 1e-9)
        # decodes that hardly varied: their price does not matter (a is then the prevailing decode step)
        bd = max(statistics.median(per_decode), 0.0) if len(per_decode) >= MIN_PAIRS else 0.0
        a = max(statistics.median(s - bd * d - bp * c for d, c, s in self.shapes if d is not None), 0.0)
        self.split = (a, bd, bp)

    def probe(self) -> bool:
        """Whether the next step beside streams should carry no prompt tokens: while prompts always wait, every
        step carries the same chunk and a prompt token's price cannot be told from a decode's; a decode-only
        step now and then (every PROBE_EVERY-th, until the split is fitted) gives pairs that differ in prompt
        tokens only. It stalls nobody: it is the streams' quickest step."""
        return self.split is None and self._beside % PROBE_EVERY == PROBE_EVERY - 1

    def decode_step(self, decodes: int) -> float | None:
        """A step of `decodes` decodes and nothing else, on the fit (split, else the line); None before."""
        if self.split is not None:
            a, bd, _ = self.split
            return a + bd * decodes
        return None if self.fit is None else self.fit[0] + self.fit[1] * decodes

    def _per_prompt_token(self) -> float:
        return self.split[2] if self.split is not None else self.fit[1]

    def prompt_tokens(self, decodes: int, max_stall: float) -> int | None:
        """Most prompt tokens a step with `decodes` running decodes may carry so that it takes at most
        `max_stall` times the decode-only step; None before the fit."""
        if self.fit is None and self.split is None:
            return None
        return _whole((max_stall - 1.0) * self.decode_step(decodes) / self._per_prompt_token())

    def observe_lone(self, seconds: float) -> None:
        """A step that ran one decode and nothing else: one stream alone, what its unloaded TPOT is."""
        self.lone.append(seconds)

    def unloaded_step(self) -> float | None:
        """The one-stream decode step: the median of the lone decodes seen, else the fit at one decode;
        None before either."""
        if self.lone:
            return statistics.median(self.lone)
        return self.decode_step(1)

    def objective_tokens(self, decodes: int, itl_target: float) -> int | None:
        """Most prompt tokens a step with `decodes` running decodes may carry so that it takes at most
        `itl_target` times the unloaded TPOT (may be <= 0: the decodes alone reach it); None before the fit."""
        t1 = self.unloaded_step()
        if t1 is None or self.decode_step(decodes) is None:
            return None
        return self.slack_tokens(decodes, itl_target * t1)

    def slack_tokens(self, decodes: int, seconds: float | None) -> int | None:
        """Most prompt tokens a step with `decodes` decodes may carry to take at most `seconds` (the streams'
        TPOT slack); None before the fit or without a slack. Past the tensor-parallel sizes a step runs HMP,
        cheaper a token than this fit (of steps beside streams, mostly small): the chunk errs short."""
        step = self.decode_step(decodes)
        if step is None or seconds is None:
            return None
        return _whole((seconds - step) / self._per_prompt_token())


def _whole(tokens: float) -> int:
    """A token count from seconds over a per-token price that may be tiny (its floor is 1e-9 s): capped, so
    a huge quotient (or inf) is a budget the scheduler's own bounds then cut, not an OverflowError."""
    return int(min(tokens, MAX_TOKENS))
