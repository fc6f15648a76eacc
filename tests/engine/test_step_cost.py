"""The step-cost line the engine learns from its own steps, and the prompt chunk it allows beside
running decodes (stall-free prefill, galaxy/engine/step_cost.py)."""

from __future__ import annotations

import pytest

from galaxy.engine.engine import EngineConfig
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


@pytest.mark.parametrize("kw,msg", [
    ({"max_stall": 1.0}, "max_stall=1.0 must be a number > 1"),
    ({"max_stall": "2"}, "max_stall='2' must be a number > 1"),
    ({"min_chunk": 0}, "min_chunk=0 must be an integer >= 1"),
])
def test_stall_settings_out_of_range_are_refused_by_name(kw, msg):
    with pytest.raises(SchedulerConfigError, match=msg):
        EngineConfig(**kw)
