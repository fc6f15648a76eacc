"""The serving simulator (planner/simulate.py) on step costs given as simple functions."""

from __future__ import annotations

import pytest

from planner.plan import PlanError
from planner.simulate import ATTAINMENT_GOAL, Objectives, PhaseCosts, Workload, goodput, percentile, simulate

PREFILL = 0.1  # s for any prompt step (prompts below the budget run whole)
DECODE = 0.02  # s per decode step
TRANSFER = 0.05  # s of KV transfer not hidden


def costs(placement: str, decode=lambda b, ctx: DECODE, budget=256) -> PhaseCosts:
    kw = {"colocated_s": lambda tokens, batch, ctx: PREFILL + decode(batch, ctx)} if placement == "colocated" else {}
    transfer = (lambda tokens, prefill: 0.0) if placement == "colocated" else (lambda tokens, prefill: TRANSFER)
    return PhaseCosts(placement, lambda tokens: PREFILL, decode, transfer, max_batched_tokens=budget, max_running=64,
                      **kw)


LOOSE = Objectives(10.0, 10.0)


def test_a_lone_disaggregated_request_gets_its_first_token_from_the_prefill_and_its_second_after_the_move():
    # as the runtime: the prefill group samples the first token, the K/V move delays the second
    r = simulate(costs("disaggregated"), Workload(1.0, 100, 5, num_requests=1), LOOSE).requests[0]
    assert r.ttft == pytest.approx(PREFILL)
    assert r.tpot == pytest.approx((TRANSFER + 4 * DECODE) / 4)


def test_a_lone_colocated_request_gets_its_first_token_from_the_prefill():
    r = simulate(costs("colocated"), Workload(1.0, 100, 5, num_requests=1), LOOSE).requests[0]
    assert r.ttft == pytest.approx(PREFILL)
    assert r.tpot == pytest.approx(DECODE)


def test_a_lone_mixed_request_decodes_after_its_kv_moved():
    r = simulate(costs("mixed"), Workload(1.0, 100, 5, num_requests=1), LOOSE).requests[0]
    assert r.ttft == pytest.approx(PREFILL)
    assert r.last_s - r.first_s == pytest.approx(TRANSFER + 4 * DECODE)


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks():
    r = simulate(costs("colocated", budget=64), Workload(1.0, 200, 2, num_requests=1), LOOSE).requests[0]
    assert r.ttft == pytest.approx(4 * PREFILL)  # 64 + 64 + 64 + 8 tokens


@pytest.mark.parametrize("placement", ["colocated", "disaggregated", "mixed"])
def test_throughput_never_exceeds_the_prefill_capacity(placement):
    # every request needs one whole PREFILL step of its own (100 tokens, budget 100): at most 10 per second
    res = simulate(costs(placement, budget=100), Workload(1000.0, 100, 3, num_requests=60), LOOSE)
    assert res.throughput <= 1 / PREFILL * 1.001
    assert res.throughput > 0.5 / PREFILL  # and the loop keeps the group busy


def test_attainment_falls_as_the_rate_rises():
    objectives = Objectives(1.0, 0.05)
    rates = [0.5, 2, 4, 8, 16, 64]
    att = [simulate(costs("colocated"), Workload(r, 100, 20, num_requests=80), objectives).attainment for r in rates]
    assert att == sorted(att, reverse=True)
    assert att[0] == 1.0 and att[-1] < 0.5


def test_a_dedicated_decode_group_is_not_stalled_by_prompts():
    objectives = Objectives(1.0, 0.05)
    w = Workload(4.0, 100, 20, num_requests=80)
    colocated = simulate(costs("colocated"), w, objectives)
    disaggregated = simulate(costs("disaggregated"), w, objectives)
    # decode steps only, and the one move before the second token (plus the wait for a step in progress to end)
    assert DECODE + TRANSFER / 19 <= disaggregated.tpot(90) <= DECODE + (TRANSFER + DECODE) / 19 + 1e-12
    assert colocated.tpot(90) > 2 * DECODE  # prompt steps stretch the inter-token time


def test_decode_batching_shares_the_weights_read():
    # step time grows with the batch far less than one step per sequence: throughput above 1/DECODE tokens/s
    res = simulate(costs("disaggregated", decode=lambda b, ctx: DECODE + 0.001 * b),
                   Workload(50.0, 100, 50, num_requests=40), LOOSE)
    tokens = sum(r.output_len for r in res.requests)
    span = max(r.last_s for r in res.requests) - min(r.first_s for r in res.requests)
    assert tokens / span > 2 / DECODE


def test_goodput_is_the_highest_rate_meeting_the_goal():
    objectives = Objectives(0.5, 0.05)
    c, w = costs("disaggregated", budget=100), Workload(1.0, 100, 10, num_requests=100)  # one prompt a step
    g = goodput(c, w, objectives, start_rate=1.0)
    at = simulate(c, Workload(g, 100, 10, num_requests=100), objectives).attainment
    above = simulate(c, Workload(g * 1.5, 100, 10, num_requests=100), objectives).attainment
    assert at >= ATTAINMENT_GOAL > above
    assert g < 1 / PREFILL  # never beyond the prefill group's capacity


def test_goodput_is_zero_when_a_lone_request_misses_the_objectives():
    assert goodput(costs("disaggregated"), Workload(1.0, 100, 10, num_requests=20), Objectives(0.1, 1.0), 1.0) == 0


def test_the_same_seed_gives_the_same_requests_scaled_by_the_rate():
    a, b = Workload(1.0, 100, 10, 0.5, 30, seed=3).requests(), Workload(4.0, 100, 10, 0.5, 30, seed=3).requests()
    assert [x[1:] for x in a] == [x[1:] for x in b]
    assert [x[0] / 4 for x in a] == pytest.approx([x[0] for x in b])


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 90) == 5.0


@pytest.mark.parametrize("kwargs,message", [
    ({"rate": 0}, "rate=0"), ({"rate": 1, "range_ratio": 1.0}, "range_ratio=1.0"), ({"rate": 1, "input_len": 0},
                                                                                     "input_len=0")])
def test_bad_workloads_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Workload(**kwargs)


def test_a_colocated_placement_needs_its_mixed_step_cost():
    with pytest.raises(PlanError, match="colocated_s"):
        PhaseCosts("colocated", lambda t: 0.1, lambda b, c: 0.01)
