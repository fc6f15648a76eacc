"""The step-cost line the engine learns from its own steps, and the prompt chunk it allows beside
running decodes (stall-free prefill, galaxy/engine/step_cost.py)."""

from __future__ import annotations

import itertools
import random
import statistics
import time
from types import SimpleNamespace

import pytest

from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.scheduler import SchedulerConfigError
from galaxy.engine.step_cost import MIN_PAIRS, StepCost


def test_no_budget_before_steps_of_two_sizes_are_seen():
    cost = StepCost()
    for _ in range(5):
        cost.observe(4, 0.3)
    assert cost.fit is None and cost.prompt_tokens(4, 1.5) is None


def test_the_fit_recovers_the_line_and_ignores_one_slow_step():
    cost = StepCost()
    a, b = 0.25, 0.01
    for n in (1, 2, 4, 8, 64, 128, 3, 17, 33, 5):
        cost.observe(n, a + b * n)
    cost.observe(8, 5.0)  # a first step, or foreign load: far off the line
    fa, fb = cost.fit
    assert fa == pytest.approx(a) and fb == pytest.approx(b)


def test_the_prompt_chunk_keeps_a_mixed_step_within_max_stall_of_the_decode_step():
    cost = StepCost()
    a, b = 0.3, 0.013  # the emulated trio's decode step and per-token prefill cost, roughly
    for n in (1, 128, 2, 64):
        cost.observe(n, a + b * n)
    for decodes in (1, 4, 8):
        c = cost.prompt_tokens(decodes, 1.5)
        decode_step = a + b * decodes
        assert a + b * (decodes + c) <= 1.5 * decode_step < a + b * (decodes + c + 1)


def test_a_window_forgets_old_steps():
    cost = StepCost(window=4)
    for n in (1, 100, 1, 100):
        cost.observe(n, 1.0 + 0.1 * n)
    for n in (1, 100, 1, 100):  # the devices got faster: only these remain
        cost.observe(n, 0.1 + 0.01 * n)
    assert cost.fit == pytest.approx((0.1, 0.01))


def test_decodes_and_prompt_tokens_are_priced_apart_once_steps_allow_and_the_chunk_uses_the_prompt_price():
    """Steps whose sizes vary mostly by their decodes make one line take a decode's cost (7 ms here) for a
    prompt token's (2 ms): the chunk would be a third of what the bound means. With pairs of steps that
    differ in one kind only, both are fitted, through one slow step."""
    cost = StepCost()
    a, bd, bp = 0.15, 0.007, 0.002
    shapes = [(d, c) for d in (2, 3, 4, 5, 6) for c in (0, 16)] + [(4, 8), (4, 12)]
    for d, c in shapes:
        cost.observe_shape(d, c, a + bd * d + bp * c)
    cost.observe_shape(4, 16, 2.0)  # foreign load
    fa, fbd, fbp = cost.split
    assert (fa, fbd, fbp) == pytest.approx((a, bd, bp), rel=1e-6)
    assert cost.prompt_tokens(4, 1.5) == int(0.5 * (a + bd * 4) / bp)  # 44, where the one line allows fewer
    assert cost.objective_tokens(4, 2.0) == pytest.approx((2.0 * (a + bd) - a - bd * 4) / bp, abs=1)


def test_the_split_fit_waits_for_enough_pairs_of_each_kind():
    cost = StepCost()
    for d, c in ((4, 16), (4, 0), (4, 16), (4, 0)):  # prompt pairs only: the decodes' price is unknown
        cost.observe_shape(d, c, 0.15 + 0.007 * d + 0.002 * c)
    assert cost.split is None and cost.prompt_tokens(4, 1.5) == int(0.5 * cost.decode_step(4) / cost.fit[1])


def test_while_every_step_carries_the_same_chunk_every_fourth_is_a_decode_only_probe_until_the_split_fits():
    cost = StepCost()
    engine = SimpleNamespace(config=EngineConfig(min_chunk=16), cost=cost)
    engine._prompt_budget = lambda d: Engine._prompt_budget(engine, d)
    budgets = []
    for _ in range(40):  # four decodes beside a prompt that always waits
        n = Engine._step_budget(engine, 4)
        budgets.append(n)
        cost.observe_shape(4, n, 0.15 + 0.007 * 4 + 0.002 * n)
    assert budgets[:4] == [16, 16, 16, 0] and cost.split == pytest.approx((0.178, 0.0, 0.002))
    assert 0 not in budgets[-8:] and budgets[-1] == int(0.5 * 0.178 / 0.002)  # the chunk the bound means: 44
    assert Engine._step_budget(SimpleNamespace(config=EngineConfig(max_stall=None), cost=cost,
                                               _prompt_budget=lambda d: 256), 4) == 256  # no bound: no probe


def _theil_sen(steps: list[tuple[int, int, float]]) -> tuple[tuple[float, float] | None, tuple | None]:
    """The line and the split over `steps` (decodes, prompt tokens, seconds), written out from the definitions
    (docstring of step_cost.py) without the class: the fit the engine must keep."""
    slopes = [(s2 - s1) / (n2 - n1) for (d1, c1, s1), (d2, c2, s2) in itertools.combinations(steps, 2)
              if (n1 := d1 + c1) != (n2 := d2 + c2)]
    line = None
    if slopes:
        b = max(statistics.median(slopes), 1e-9)
        line = (max(statistics.median(s - b * (d + c) for d, c, s in steps), 0.0), b)
    pairs = list(itertools.combinations(steps, 2))
    bps = [(s2 - s1) / (c2 - c1) for (d1, c1, s1), (d2, c2, s2) in pairs if d1 == d2 and c1 != c2]
    bds = [(s2 - s1) / (d2 - d1) for (d1, c1, s1), (d2, c2, s2) in pairs if c1 == c2 and d1 != d2]
    if len(bps) < MIN_PAIRS:
        return line, None
    bp = max(statistics.median(bps), 1e-9)
    bd = max(statistics.median(bds), 0.0) if len(bds) >= MIN_PAIRS else 0.0
    return line, (max(statistics.median(s - bd * d - bp * c for d, c, s in steps), 0.0), bd, bp)


def test_a_step_recorded_once_keeps_the_line_and_the_split_and_the_line_stops_once_the_split_fits():
    """The engine records a step once (observe_shape) and both fits read it: on a fixed, noisy sequence of steps,
    longer than the window, the line equals Theil-Sen's over the window until the split is fitted, the split
    equals Theil-Sen's from then on, and the line is no longer computed (every bound reads the split)."""
    rng, window = random.Random(7), 12
    cost, steps, line_when_split, kept = StepCost(window=window), [], None, None
    for i in range(40):
        d = rng.choice((1, 2, 4)) if i < 6 else rng.choice((2, 3, 4, 5))
        c = rng.choice((0, 0, 16, 32)) if i >= 6 else 8 * d  # the first steps tell the kinds apart by size only
        step = (d, c, 0.12 + 0.006 * d + 0.002 * c + rng.uniform(0.0, 0.01))
        steps.append(step)
        cost.observe_shape(*step)
        line, split = _theil_sen(steps[-window:])
        split = kept = split or kept  # a window with too few pairs keeps the split fitted before
        if split is None:
            assert cost.split is None and cost.fit == pytest.approx(line, rel=1e-12)
        else:
            line_when_split = line_when_split or cost.fit
            assert cost.split == pytest.approx(split, rel=1e-12) and cost.fit == line_when_split
    assert line_when_split is not None and 0 < len(cost.shapes) == window


def test_the_unloaded_step_is_the_lone_decodes_median_else_the_line_at_one_token():
    cost = StepCost()
    assert cost.unloaded_step() is None
    for n in (4, 20, 4, 20):
        cost.observe(n, 0.1 + 0.005 * n)
    assert cost.unloaded_step() == pytest.approx(0.105)  # no stream ran alone yet: the line at one token
    for s in (0.09, 0.5, 0.08):  # one slow lone step (foreign load) does not move the median
        cost.observe_lone(s)
    assert cost.unloaded_step() == pytest.approx(0.09)


def test_the_objective_chunk_keeps_a_mixed_step_within_itl_target_of_the_unloaded_step_whatever_the_streams():
    """Unlike max_stall, whose allowance grows with the decode step of the streams running, the
    objective is one time for every batch: more streams leave fewer prompt tokens."""
    cost = StepCost()
    a, b = 0.1, 0.005
    for n in (1, 30, 5, 60):
        cost.observe(n, a + b * n)
    target = 1.6 * (a + b)
    chunks = [cost.objective_tokens(d, 1.6) for d in (1, 4, 8)]
    for d, c in zip((1, 4, 8), chunks):
        assert a + b * (d + c) <= target + 1e-12 < a + b * (d + c + 1)
    assert chunks[0] > chunks[1] > chunks[2]
    assert cost.objective_tokens(40, 1.6) < 0  # the decodes alone take longer than the objective


def test_the_engine_takes_the_smaller_bound_and_never_less_than_min_chunk():
    cost = StepCost()
    a, b = 0.1, 0.005
    for n in (1, 30, 5, 60):
        cost.observe(n, a + b * n)
    budget = lambda **kw: Engine._prompt_budget(SimpleNamespace(config=EngineConfig(**kw), cost=cost), 4)  # noqa: E731
    stall, objective = cost.prompt_tokens(4, 1.5), cost.objective_tokens(4, 1.6)
    assert budget(max_stall=1.5, min_chunk=1) == stall
    assert budget(max_stall=None, itl_target=1.6, min_chunk=1) == objective
    assert budget(max_stall=1.5, itl_target=1.6, min_chunk=1) == min(stall, objective)
    assert budget(max_stall=1.5, itl_target=1.6, min_chunk=64) == 64
    assert budget(max_stall=None, itl_target=None) == EngineConfig().max_batched_tokens


def _engine_with_streams(cost, config, first_token_ago_and_tokens):
    """An engine's budget state: the cost line and streams that got `tokens` tokens, the first `ago` s ago."""
    now = time.perf_counter()
    streams = {i: SimpleNamespace(submitted=now - ago - 1.0, generation=SimpleNamespace(token_times=[1.0] * n))
               for i, (ago, n) in enumerate(first_token_ago_and_tokens)}
    engine = SimpleNamespace(config=config, cost=cost, streams=streams)
    engine._step_slack = lambda target: Engine._step_slack(engine, target)
    return engine


def test_tpot_slack_lets_a_step_grow_past_the_per_gap_bound_only_when_every_stream_has_slack():
    """Streams that decoded quickly have TPOT to spare: the next step may carry a burst of prompt tokens.
    One stream that just got its first token has none beyond one objective's step, and holds it back."""
    cost = StepCost()
    a, b = 0.1, 0.005
    for n in (1, 30, 5, 60):
        cost.observe(n, a + b * n)
    cfg = EngineConfig(max_stall=1.5, tpot_target=2.0, min_chunk=1)
    tau = 2.0 * (a + b)
    stall = cost.prompt_tokens(4, 1.5)
    rich = _engine_with_streams(cost, cfg, [(0.5, 20)] * 4)  # 20 tokens in 0.5 s: 3.7 s of slack
    assert Engine._prompt_budget(rich, 4) == pytest.approx(int((20 * tau - 0.5 - a) / b) - 4, abs=2)
    fresh = _engine_with_streams(cost, cfg, [(0.5, 20)] * 3 + [(0.0, 1)])  # its first gap: tau at most
    assert Engine._prompt_budget(fresh, 4) == pytest.approx(max(stall, int((tau - a) / b) - 4), abs=1)
    late = _engine_with_streams(cost, cfg, [(0.5, 20)] * 3 + [(5.0, 10)])  # already over its objective
    assert Engine._prompt_budget(late, 4) == stall  # the per-gap bound still holds: prompts progress
    alone = _engine_with_streams(cost, EngineConfig(max_stall=None, tpot_target=2.0, min_chunk=3),
                                 [(5.0, 10)])
    assert Engine._prompt_budget(alone, 1) == 3  # no per-gap bound: min_chunk, never nothing


def test_a_huge_factor_or_slack_is_a_capped_budget_not_an_overflow():
    """A step's chunk is seconds over a per-token price floored at 1e-9 s: a factor near the float limit
    must still give the scheduler a whole count to cut to its token budget."""
    cost = StepCost()
    for n in (1, 30, 5, 60):
        cost.observe(n, 0.1 + 0.005 * n)
    assert cost.prompt_tokens(4, 1e308) == cost.objective_tokens(4, 1e308) == cost.slack_tokens(4, float("inf"))
    assert cost.slack_tokens(4, float("inf")) > EngineConfig().max_batched_tokens


@pytest.mark.parametrize("kw,msg", [
    ({"max_stall": 1.0}, "max_stall=1.0 must be a finite number > 1"),
    ({"max_stall": "2"}, "max_stall='2' must be a finite number > 1"),
    ({"min_chunk": 0}, "min_chunk=0 must be an integer >= 1"),
    ({"itl_target": 1.0}, "itl_target=1.0 must be a finite number > 1"),
    ({"tpot_target": 0.5}, "tpot_target=0.5 must be a finite number > 1"),
    ({"itl_target": float("inf")}, "itl_target=inf must be a finite number > 1"),
    ({"max_stall": float("nan")}, "max_stall=nan must be a finite number > 1"),
])
def test_stall_settings_out_of_range_are_refused_by_name(kw, msg):
    with pytest.raises(SchedulerConfigError, match=msg):
        EngineConfig(**kw)
