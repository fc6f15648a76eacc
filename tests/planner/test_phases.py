"""Phase placements (planner/phases.py, planner/serving.py): decode from the measured step (or bandwidth
for a profile without it), the KV transfer along the runtime's path, and which placement the planner picks
on small synthetic clusters."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from galaxy.model.config import preset
from galaxy.model.quant import WeightFormat, decode_bytes
from planner.phases import (
    KV_MESSAGE_BYTES,
    LOGIT_BYTES,
    TOP1_BYTES,
    DecodeLayout,
    KVPath,
    PhaseModel,
    PrefillCurve,
    kv_bytes_per_token,
    phase_costs,
    placements,
    streaming_rate,
)
from planner.plan import Plan, PlanError
from planner.profile import ClusterProfile, ComputeModel, DecodeTiming, DeviceProfile, Link, Tenancy
from planner.serving import Objective, ServeGoals, choose, table
from planner.simulate import Objectives, Workload, simulate

SCHEMA = json.loads((Path(__file__).parents[2] / "planner" / "plan.schema.json").read_text())
CFG = preset("smollm2-135m")
GB = 1e9


def dev(name: str, gflops: float, bytes_per_s: float, memory: float, overhead: float = 1e-4, tenancy=None):
    """A device whose LM head streams `bytes_per_s` in float32 (2 flops per 4-byte weight)."""
    cm = ComputeModel(gflops * 1e9, overhead)
    return DeviceProfile(name, f"{name}:50051", cm, cm, ComputeModel(gflops * 1e8, overhead / 5), int(memory),
                         head=ComputeModel(bytes_per_s / 2, overhead), tenancy=tenancy)


def cluster(devices, bandwidth_bps: float, latency_s: float) -> ClusterProfile:
    n = len(devices)
    return ClusterProfile(list(devices), [[None if i == j else Link(bandwidth_bps, latency_s) for j in range(n)]
                                          for i in range(n)])


def test_a_devices_decode_rate_is_its_head_profiles_streaming_rate():
    d = dev("a", 20, 12 * GB, 4 * GB)
    assert streaming_rate(d, 4) == pytest.approx(12 * GB)


def test_without_decode_timings_one_device_decodes_in_the_time_it_reads_the_weights():
    d = dev("a", 1000, 10 * GB, 4 * GB, overhead=0.0)
    pm = PhaseModel(CFG, cluster([d], 1e9, 1e-4), step_overhead_s=0.0)
    lay = pm.tp_layout((0,))
    assert pm.decode_s(lay, 1, 0) == pytest.approx(decode_bytes(CFG, WeightFormat("fp32")) / (10 * GB))
    # a compact format streams fewer bytes at the same bytes/s
    int8 = PhaseModel(CFG, cluster([d], 1e9, 1e-4), fmt=WeightFormat("int8"), step_overhead_s=0.0)
    assert int8.decode_s(lay, 1, 0) == pytest.approx(decode_bytes(CFG, WeightFormat("int8")) / (10 * GB))
    # and each sequence's KV is read too
    ctx = 1000
    assert pm.decode_s(lay, 2, ctx) == pytest.approx(
        (decode_bytes(CFG, WeightFormat("fp32")) + ctx * kv_bytes_per_token(CFG)) / (10 * GB))


def test_a_split_decode_reads_shares_in_parallel_and_pays_two_all_reduces_per_layer():
    devs = [dev(n, 1000, 10 * GB, 4 * GB, overhead=0.0) for n in "abc"]
    latency = 1e-3
    pm = PhaseModel(CFG, cluster(devs, 1e12, latency), step_overhead_s=0.0, greedy=False)
    alone = pm.decode_s(pm.tp_layout((0,)), 1, 0)
    split = pm.decode_s(pm.tp_layout((0, 1, 2)), 1, 0)
    wire = (2 * CFG.n_layers + 1) * (latency + CFG.hidden * 4 * 8 / 1e12)
    logits = CFG.vocab_size * LOGIT_BYTES * 8 / 1e12  # the logit rows back to the coordinator, in parallel
    assert split == pytest.approx((alone - logits) / 3 + logits / 3 + wire)


def test_co_tenants_of_one_machine_share_its_memory_bus():
    t = [Tenancy("host", 1.0, 2) for _ in range(2)]
    devs = [dev("a", 1000, 10 * GB, 4 * GB, 0.0, t[0]), dev("b", 1000, 10 * GB, 4 * GB, 0.0, t[1])]
    pm = PhaseModel(CFG, cluster(devs, 1e12, 0.0))
    assert sum(pm.bandwidths((0, 1), (0, 1))) == pytest.approx(20 * GB)  # profiled together: the bus
    t3 = [Tenancy("host", 1.0, 2) for _ in range(3)]  # three one-core workers on two cores
    devs3 = [dev(n, 1000, 10 * GB, 4 * GB, 0.0, t3[k]) for k, n in enumerate("abc")]
    pm3 = PhaseModel(CFG, cluster(devs3, 1e12, 0.0))
    assert pm3.bandwidths((0,), (0,))[0] == pytest.approx(15 * GB)  # alone it gets a whole core's share
    assert sum(pm3.bandwidths((0, 1, 2), (0, 1, 2))) == pytest.approx(30 * GB)  # never beyond the bus


def test_a_kv_transfer_is_hidden_behind_the_prefill_but_its_last_layer():
    pm = PhaseModel(CFG, cluster([dev("a", 20, GB, 4 * GB)], 1e9, 0.0))
    L = CFG.n_layers
    assert pm.exposed_transfer_s(0.3, 10.0) == pytest.approx(0.3 / L)  # short: only the last layer's part shows
    assert pm.exposed_transfer_s(30.0, 1.0) == pytest.approx(30.0 - 1.0 * (L - 1) / L)  # long: the link bounds it


def test_the_kv_transfer_time_is_the_prompts_kv_over_the_link():
    devs = [dev("a", 20, GB, 4 * GB), dev("b", 20, GB, 4 * GB)]
    pm = PhaseModel(CFG, cluster(devs, 100e6, 1e-3))
    plan = pm.prefill_plan((0,), 64)
    assert [d.name for d in plan.devices] == ["a"]
    t = pm.transfer_s(plan, pm.tp_layout((1,)), 1000)
    assert t == pytest.approx(1000 * kv_bytes_per_token(CFG) * 8 / 100e6 + 1e-3)
    assert pm.transfer_s(plan, pm.tp_layout((0,)), 1000) == 0.0  # already there (mixed)


def test_the_prefill_curve_is_linear_between_solved_lengths():
    c = PrefillCurve(((16, 0.2), (128, 1.0), (256, 2.2)))
    assert c(16) == 0.2 and c(72) == pytest.approx(0.6) and c(512) == pytest.approx(4.6)
    assert c(8) == pytest.approx(0.2 - 8 * 0.8 / 112)  # below the first point: the first segment's line,
    assert PrefillCurve(((16, 0.1), (32, 0.3)))(8) == pytest.approx(0.05)  # never below the proportional share


def test_a_decode_layout_must_split_all_the_weights():
    with pytest.raises(PlanError, match="sum to 1"):
        DecodeLayout("tp", (0, 1), (0.5, 0.4))


def test_an_encoder_has_no_decode_phase():
    with pytest.raises(PlanError, match="causal"):
        PhaseModel(preset("bert-base"), cluster([dev("a", 20, GB, 4 * GB)], 1e9, 0.0))


GOALS = dict(rate=0.5, input_len=128, output_len=16, num_requests=40)


def test_a_slow_link_keeps_both_phases_on_one_device():
    devs = [dev("a", 40, 10 * GB, 4 * GB), dev("b", 40, 10 * GB, 4 * GB)]
    choice = choose(PhaseModel(CFG, cluster(devs, 1e6, 5e-3)), ServeGoals(**GOALS))
    assert choice.chosen.kind == "colocated" and len(choice.chosen.prefill) == 1
    disaggregated = [c for c in choice.candidates if c.kind == "disaggregated"]
    # 5.9 MB of KV at 1 Mbit/s, once (direct, the default path), before the second token
    assert disaggregated and all(c.unloaded_tpot * (GOALS["output_len"] - 1) > 45 for c in disaggregated)
    assert choice.kv_path == "direct" and choice.plan(ServeGoals(**GOALS)).serve.kv_path == ""  # colocated


def test_a_fast_device_with_memory_for_the_model_becomes_the_decode_device():
    # two boards too small to hold the model alone, one with the memory and the bandwidth
    devs = [dev("big", 40, 20 * GB, 8 * GB), dev("small-a", 40, 5 * GB, 0.45 * GB),
            dev("small-b", 40, 5 * GB, 0.45 * GB)]
    choice = choose(PhaseModel(CFG, cluster(devs, 1e9, 1e-3)), ServeGoals(**GOALS))
    assert choice.chosen.decode == ("big",)
    assert choice.fastest_alone[0] == "big"
    assert any("small-a cannot decode alone" in n for n in choice.notes)


@pytest.fixture(scope="module")
def two_boards():
    """Two alike boards on 1 ms links, absolute objectives: (goals, choice)."""
    devs = [dev("a", 40, 10 * GB, 4 * GB), dev("b", 40, 10 * GB, 4 * GB)]
    goals = ServeGoals(**GOALS, ttft=Objective(5.0), tpot=Objective.parse("200ms"))
    return goals, choose(PhaseModel(CFG, cluster(devs, 1e9, 1e-3)), goals)


def test_a_split_decode_slower_than_the_fastest_device_alone_is_never_picked(two_boards):
    # 1 ms links: 61 all-reduces per token cost more than the split saves
    _, choice = two_boards
    name, alone = choice.fastest_alone
    split = [c for c in choice.candidates if len(c.decode) > 1]
    assert split and all(c.excluded.startswith("its decode") and name in c.excluded for c in split)
    assert choice.chosen.decode_s <= alone * 1.001
    assert "never picked" in table(choice) and "not picked: its decode" in table(choice)


def test_the_chosen_placement_round_trips_through_the_plan_file(two_boards):
    goals, choice = two_boards
    plan = choice.plan(goals)
    text = plan.to_json()
    jsonschema.validate(json.loads(text), SCHEMA)
    back = Plan.from_json(text, CFG)
    assert back == plan and back.serve.placement == choice.chosen.kind
    assert back.serve.ttft_slo_s == 5.0 and back.serve.tpot_slo_s == pytest.approx(0.2)
    assert back.serve.predicted.goodput_rps == choice.chosen.goodput
    assert sorted(back.serve.prefill) == sorted(d.name for d in back.devices)
    # the K/V route the prediction assumed (the runtime's default, direct), which `load` then takes
    assert back.serve.kv_path == ("" if choice.chosen.kind == "colocated" else "direct") == plan.serve.kv_path


@pytest.mark.parametrize("edit,message", [
    (lambda s, d: s.update(placement="split"), "serve.placement"),
    (lambda s, d: s.update(decode=list(s["prefill"]), placement="disaggregated"), "also prefill"),
    (lambda s, d: s.update(decode=["nobody"], placement="colocated"), "colocated decodes on the prefill devices"),
    (lambda s, d: s.update(prefill=["nobody"]), "are not the plan's devices"),
    (lambda s, d: s["predicted"].update(attainment=1.5), "attainment"),
    (lambda s, d: s["workload"].update(rate=0), "serve.workload.rate"),
    (lambda s, d: s.update(extra=1), "unknown key 'extra' in serve"),
    (lambda s, d: s.update(kv_path="pigeon"), "serve.kv_path"),
])
def test_a_broken_serve_section_is_refused_naming_the_field(edit, message, two_boards):
    goals, choice = two_boards
    d = json.loads(choice.plan(goals).to_json())
    edit(d["serve"], d)
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(d)


def test_relative_and_absolute_objectives_parse():
    assert Objective.parse("3x") == Objective(3.0, relative=True)
    assert Objective.parse("250ms").value == pytest.approx(0.25) and Objective.parse("2").value == 2.0
    with pytest.raises(PlanError, match="expected seconds"):
        Objective.parse("fast")


# --- the decode step from what was measured on the device (profile.DecodeTiming) ---------------------------

def timed(name: str, layer_s: float, per_seq_s: float, head_s: float, tenancy=None) -> DeviceProfile:
    """A device whose decode step was measured: a layer in layer_s (+ per_seq_s per further sequence),
    its whole LM head in head_s for one token (overheads zero, so shares scale exactly)."""
    d = dev(name, 40, 10 * GB, 4 * GB, overhead=0.0, tenancy=tenancy)
    head = ComputeModel(2.0 * CFG.hidden * CFG.vocab_size / head_s, 0.0)
    return DeviceProfile(d.name, d.address, d.attention, d.mlp, d.connective, d.memory_bytes, head=head,
                         tenancy=tenancy, decode=DecodeTiming(layer_s, per_seq_s))


def test_a_measured_decode_step_is_its_layers_its_head_and_the_engines_fixed_cost():
    pm = PhaseModel(CFG, cluster([timed("a", 3e-3, 0.0, 20e-3)], 1e9, 0.0), step_overhead_s=2e-3)
    lay = pm.tp_layout((0,))
    assert pm.decode_s(lay, 1, 0) == pytest.approx(CFG.n_layers * 3e-3 + 20e-3 + 2e-3)
    # the bytes/s of the head's profile no longer decide it: a device measured twice as slow is twice as slow
    slow = PhaseModel(CFG, cluster([timed("a", 6e-3, 0.0, 40e-3)], 1e9, 0.0), step_overhead_s=2e-3)
    assert slow.decode_s(lay, 1, 0) - 2e-3 == pytest.approx(2 * (pm.decode_s(lay, 1, 0) - 2e-3))


def test_the_decode_step_grows_with_the_batch_as_measured():
    pm = PhaseModel(CFG, cluster([timed("a", 3e-3, 0.5e-3, 20e-3)], 1e9, 0.0), step_overhead_s=0.0)
    lay = pm.tp_layout((0,))
    one, eight = pm.decode_s(lay, 1, 0), pm.decode_s(lay, 8, 0)
    layers_8 = CFG.n_layers * (3e-3 + 7 * 0.5e-3)
    assert eight == pytest.approx(layers_8 + 20e-3 * layers_8 / (CFG.n_layers * 3e-3))  # the head grows alike
    assert one < eight < 8 * one  # the weights are read once for the whole batch


def test_a_measured_decode_step_returns_each_sampled_sequences_logits_over_the_devices_link():
    devs = [timed("a", 3e-3, 0.0, 20e-3), timed("b", 3e-3, 0.0, 20e-3)]
    pm = PhaseModel(CFG, cluster(devs, 100e6, 0.0), step_overhead_s=0.0, greedy=False)
    lay = pm.tp_layout((0,))
    per_seq = CFG.vocab_size * LOGIT_BYTES * 8 / 100e6
    assert pm.decode_s(lay, 4, 0) - pm.decode_s(lay, 1, 0) == pytest.approx(3 * per_seq)


def test_a_greedy_decode_step_returns_each_sequences_top1_not_its_logit_row():
    # the engine asks greedy rows' argmax of the devices (parallel/top1.py): a value and an id per row come back
    devs = [timed("a", 3e-3, 0.0, 20e-3), timed("b", 3e-3, 0.0, 20e-3)]
    link = cluster(devs, 100e6, 0.0)
    greedy = PhaseModel(CFG, link, step_overhead_s=0.0)
    sampled = PhaseModel(CFG, link, step_overhead_s=0.0, greedy=False)
    alone, split = greedy.tp_layout((0,)), greedy.tp_layout((0, 1))
    assert greedy.decode_s(alone, 4, 0) - greedy.decode_s(alone, 1, 0) == pytest.approx(3 * TOP1_BYTES * 8 / 100e6)
    row = CFG.vocab_size * LOGIT_BYTES * 8 / 100e6  # SmolLM2 at 100 Mbit/s: 16.5 ms a sequence a step
    assert sampled.decode_s(alone, 1, 0) - greedy.decode_s(alone, 1, 0) == pytest.approx(row - TOP1_BYTES * 8 / 100e6)
    # split: every vocabulary holder sends its top-1, in parallel; sampled, each its share of the row
    share = max(split.shares) * row
    assert sampled.decode_s(split, 1, 0) - greedy.decode_s(split, 1, 0) == pytest.approx(
        share - TOP1_BYTES * 8 / 100e6)


def test_a_decode_device_alone_on_shared_cores_runs_faster_than_beside_the_prefill():
    t = [Tenancy("host", 1.0, 2) for _ in range(3)]  # three one-thread workers on two cores, profiled all busy
    devs = [timed(n, 3e-3, 0.0, 20e-3, t[k]) for k, n in enumerate("abc")]
    pm = PhaseModel(CFG, cluster(devs, 1e15, 0.0), step_overhead_s=0.0)  # links: the logits' return ~free
    lay = pm.tp_layout((2,))
    busy = pm.decode_s(lay, 1, 0, busy=(0, 1, 2))
    assert pm.decode_s(lay, 1, 0, busy=(2,)) == pytest.approx(busy / 1.5)  # 2/3 of a core -> a whole one


# --- the K/V move along the runtime's path ---------------------------------------------------------------

def two_boards_pm(route: str, stream: bool = False, bandwidth: float = 100e6, latency: float = 1e-3):
    devs = [timed("a", 3e-3, 0.0, 20e-3), timed("b", 3e-3, 0.0, 20e-3)]
    return PhaseModel(CFG, cluster(devs, bandwidth, latency), kv_path=KVPath(route, stream), step_overhead_s=0.0)


def test_through_the_coordinator_the_kv_cross_two_hops_and_direct_one():
    via, direct = two_boards_pm("coordinator"), two_boards_pm("direct")
    plan, lay = via.prefill_plan((0,), 64), via.tp_layout((1,))
    nbytes = 128 * kv_bytes_per_token(CFG)
    hop = nbytes * 8 / 100e6
    trips = 2 * 1e-3 * -(-nbytes // KV_MESSAGE_BYTES)  # a round trip per message of at most 4 MiB
    move = via.kv_move(plan, lay, 128)
    assert move.pull == pytest.approx(hop + trips) and move.push == pytest.approx(hop + trips)
    assert move.wire == 0.0
    one = direct.kv_move(plan, lay, 128)
    assert one.total == pytest.approx(hop + 1e-3) and one.pull == one.push == 0.0
    assert move.total - 2 * trips == pytest.approx(2 * hop)  # twice one hop's bytes over the same link


def test_the_pull_stalls_the_prefill_loop_and_the_push_the_decode_loop():
    pm = two_boards_pm("coordinator")
    cands, _ = placements(pm, 128, 160)
    dis = next(p for p in cands if p.kind == "disaggregated")
    costs = phase_costs(pm, dis, [16, 128, 256])
    move = pm.kv_move(dis.prefill, dis.decode, 128)
    lone = simulate(costs, Workload(1.0, 128, 8, num_requests=1), Objectives(10.0, 10.0)).requests[0]
    assert lone.ttft == pytest.approx(costs.prefill_s(128))  # the first token is the prefill group's
    decodes = sum(costs.decode_s(1, 128 + k) for k in range(7))  # tokens 2..8 on the decode group
    assert lone.last_s - lone.first_s == pytest.approx(move.pull + move.push + decodes)
    # two prompts at once, one a step: the second prompt's prefill waits for the first one's pull
    one_a_step = phase_costs(pm, dis, [16, 128, 256], max_batched_tokens=128)
    both = simulate(one_a_step, Workload(1e6, 128, 8, num_requests=2), Objectives(10.0, 10.0)).requests
    assert both[1].first_s == pytest.approx(2 * costs.prefill_s(128) + move.pull)


def test_a_streamed_move_hides_behind_the_prefill_and_stalls_neither_loop():
    pm = two_boards_pm("coordinator", stream=True)
    cands, _ = placements(pm, 128, 160)
    dis = next(p for p in cands if p.kind == "disaggregated")
    costs = phase_costs(pm, dis, [16, 128, 256])
    assert costs.pull_s(128) == costs.push_s(128) == 0.0
    total = pm.kv_move(dis.prefill, dis.decode, 128).total
    assert costs.transfer_s(128, 1.0) == pytest.approx(pm.exposed_transfer_s(total, 1.0))


def test_a_kv_path_names_a_route_the_planner_knows():
    with pytest.raises(PlanError, match="route='pigeon'"):
        KVPath("pigeon")
