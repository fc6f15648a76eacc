"""The step-cost line the engine learns from its own steps, and the prompt chunk it allows beside
running decodes (stall-free prefill, galaxy/engine/step_cost.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.scheduler import SchedulerConfigError
from galaxy.engine.step_cost import StepCost


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


def test_before_the_fit_chunks_are_min_chunk_then_half_of_it_so_steady_traffic_gets_a_second_size():
    engine = SimpleNamespace(config=EngineConfig(min_chunk=16), cost=StepCost())
    assert Engine._prompt_budget(engine, 4) == 16  # nothing seen yet
    for _ in range(3):  # a long prompt beside the same 4 streams: every step 4 + 16 tokens
        engine.cost.observe(20, 0.26)
    assert engine.cost.fit is None and engine.cost.one_size
    assert Engine._prompt_budget(engine, 4) == 8  # the second size the line needs
    engine.cost.observe(12, 0.21)
    assert engine.cost.fit is not None and not engine.cost.one_size


def test_once_fitted_the_bound_alone_sets_the_chunk_even_below_min_chunk():
    """a = 0.12 s, b = 6.3 ms/token (three loopback workers): beside 4 streams at max_stall 1.5 the bound
    allows 11 prompt tokens; a floor of 16 would make every such step 1.69x the decode step."""
    engine = SimpleNamespace(config=EngineConfig(min_chunk=16, max_stall=1.5), cost=StepCost())
    for n in (4, 20, 12, 20):
        engine.cost.observe(n, 0.12 + 0.0063 * n)
    c = Engine._prompt_budget(engine, 4)
    assert c == 11 < 16
    assert 0.12 + 0.0063 * (4 + c) <= 1.5 * (0.12 + 0.0063 * 4)


@pytest.mark.parametrize("kw,msg", [
    ({"max_stall": 1.0}, "max_stall=1.0 must be a number > 1"),
    ({"max_stall": "2"}, "max_stall='2' must be a number > 1"),
    ({"min_chunk": 0}, "min_chunk=0 must be an integer >= 1"),
])
def test_stall_settings_out_of_range_are_refused_by_name(kw, msg):
    with pytest.raises(SchedulerConfigError, match=msg):
        EngineConfig(**kw)
