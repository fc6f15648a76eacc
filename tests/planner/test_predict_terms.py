"""Two terms of the serving prediction that the profile alone missed: the transport CPU of a ring collective, which
every device of a split pays whole (profile.collective_cpu_s, measured by the worker's probe, charged by the cost model
at the device's share of a core), the coordinator's CPU beside co-tenant devices while it serves (phases.Coordinator),
and a decode step of several sequences priced apart from one sequence's (profile.DecodeTiming.multi_s)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from planner_cases import cluster, device

from galaxy.backends.profiling import Sample
from galaxy.model.config import preset
from galaxy.transport.collective_probe import PROBE_KIND, collective_cpu_s, probe_rows
from planner.cost import CostModel, Layout
from planner.phases import Coordinator, PhaseModel
from planner.plan import PlanError
from planner.profile import ClusterProfile, DecodeTiming, Tenancy, co_tenant_speedup
from planner.profiler import COLLECTIVE, collective_cpu, fit_decode, fit_samples

CFG, S = preset("gpt2"), 32


def _pair(cpu_s=(0.0, 0.0), cores=(None, None)):
    devs = []
    for i, (c, k) in enumerate(zip(cpu_s, cores)):
        d = replace(device(f"w{i}", 1e9, 1e12), collective_cpu_s=c)
        devs.append(d if k is None else replace(d, tenancy=Tenancy("boot-a", k, 2)))
    return cluster(devs)


def _galaxy(prof: ClusterProfile, strategy: str = "galaxy"):
    lay = Layout(strategy, (0, 1), (6, 6), (1536, 1536), (CFG.vocab_size // 2, CFG.vocab_size - CFG.vocab_size // 2),
                 (S // 2, S // 2))
    return CostModel(CFG, S, prof).estimate(lay)


@pytest.mark.parametrize("strategy", ["galaxy", "galaxy-no-overlap"])
def test_every_collective_of_a_split_adds_the_slowest_devices_transport_cpu_at_its_share_of_a_core(strategy):
    base = _galaxy(_pair(), strategy).latency_s
    # 1 ms of CPU a ring step on a device capped at half a core is 2 ms of wall; its peer's 0.5 ms on a whole core less
    est = _galaxy(_pair((0.5e-3, 1e-3), (1.0, 0.5)), strategy)
    collectives = 4 * CFG.n_layers + 2  # per layer AG, RS, AG, RS; once the embedding's RS and the head's AG
    assert est.latency_s - base == pytest.approx(collectives * 2e-3)
    per_layer = [p for p in est.phases if "allgather" in p.name or "reducescatter" in p.name]
    assert len(per_layer) == 4 and all(p.compute_s[1] - p.compute_s[0] >= 1.5e-3 - 1e-12 for p in per_layer)


def test_a_device_alone_pays_no_transport_cpu():
    prof = _pair((1e-3, 1e-3), (0.5, 0.5))
    full = (12,), (3072,), (CFG.vocab_size,), (S,)
    alone = CostModel(CFG, S, prof).estimate(Layout("local", (1,), *full)).latency_s
    assert alone == pytest.approx(CostModel(CFG, S, _pair()).estimate(Layout("local", (1,), *full)).latency_s)


def test_megatron_pays_both_halves_of_each_ring_all_reduce():
    lay = Layout("megatron", (0, 1), (6, 6), (1536, 1536), (CFG.vocab_size // 2, CFG.vocab_size - CFG.vocab_size // 2))
    base = CostModel(CFG, S, _pair()).estimate(lay).latency_s
    got = CostModel(CFG, S, _pair((1e-3, 1e-3))).estimate(lay).latency_s
    assert got - base == pytest.approx((2 * CFG.n_layers + 1) * 2 * 1e-3)  # RS + AG: two ring steps each


def test_the_wall_time_of_transport_cpu_is_its_cpu_over_the_devices_share_of_a_core():
    d = replace(device("w", 1e9, 1e12), collective_cpu_s=0.9e-3)
    assert d.collective_wall_s() == pytest.approx(0.9e-3)  # no tenancy: a core of its own
    assert replace(d, tenancy=Tenancy("h", 0.45, 2)).collective_wall_s() == pytest.approx(2e-3)
    assert replace(d, tenancy=Tenancy("h", 4.0, 8)).collective_wall_s() == pytest.approx(0.9e-3)  # one thread's core
    assert d.faster(1.5).collective_cpu_s == pytest.approx(0.6e-3)


def test_the_profile_carries_the_probes_median_and_the_block_fit_ignores_it():
    samples = [Sample("mlp", 64, 32, 1e-3), Sample("mlp", 128, 32, 2e-3),
               *(Sample(COLLECTIVE, 16, 768, t) for t in (3e-4, 1e-4, 2e-4))]
    assert collective_cpu(samples) == pytest.approx(2e-4)
    assert collective_cpu(samples[:2]) == 0.0  # a profile before the probe prices no transport CPU
    assert set(fit_samples(CFG, samples)) == {"mlp"} and COLLECTIVE == PROBE_KIND
    prof = _pair((2e-4, 3e-4), (0.6, None))
    back = ClusterProfile.from_json(prof.to_json())
    assert [d.collective_cpu_s for d in back.devices] == [2e-4, 3e-4]
    old = json.loads(prof.to_json())
    for d in old["devices"]:
        del d["collective_cpu_s"]  # written before cache v8
    assert ClusterProfile.from_json(json.dumps(old)).devices[0].collective_cpu_s == 0.0


def test_the_probe_runs_a_two_rank_ring_over_the_data_plane_and_reports_cpu_per_collective():
    cpu, wall = collective_cpu_s(4, 8, rounds=2)
    assert cpu > 0 and wall > 0
    assert probe_rows([128]) == 64 and probe_rows([1]) == 1 and probe_rows([100000]) == 512
    with pytest.raises(ValueError, match="rows=0"):
        collective_cpu_s(0, 8)


def _trio(host: str = "boot-a"):
    quotas = (("x", 0.9), ("t", 0.6), ("n", 0.45))
    return [replace(device(n, 1e9, 1e12), tenancy=Tenancy(host, c, 2)) for n, c in quotas]


def test_a_serving_coordinator_slows_co_tenants_that_together_ask_for_more_than_the_machine():
    trio = _trio()
    assert co_tenant_speedup(trio, [0, 1, 2]) == [1.0, 1.0, 1.0]  # 1.95 of 2 cores: as profiled
    beside = co_tenant_speedup(trio, [0, 1, 2], {"boot-a": 0.45})  # 2.4 cores asked of 2
    assert beside == pytest.approx([2 / 2.4] * 3)
    assert co_tenant_speedup(trio, [0], {"boot-a": 0.45}) == [1.0]  # 1.35 of 2: room for both
    assert co_tenant_speedup(trio, [0, 1, 2], {"elsewhere": 5.0}) == [1.0, 1.0, 1.0]


def test_the_phase_model_prices_decode_and_prefill_beside_the_serving_coordinator():
    prof = ClusterProfile(_trio(), cluster(_trio()).links)
    cfg = preset("smollm2-135m")
    bare, served = PhaseModel(cfg, prof), PhaseModel(cfg, prof, coordinator=Coordinator("boot-a", 0.45))
    everyone = (0, 1, 2)
    assert served.speedups((0,), everyone) == pytest.approx([2 / 2.4])
    assert served.prefill_slowdown((1, 2), everyone) == pytest.approx(2.4 / 2)
    assert served.prefill_slowdown((1, 2), (1, 2)) == 1.0 and bare.prefill_slowdown((1, 2), everyone) == 1.0
    assert served.bandwidths((0,), everyone)[0] == pytest.approx(bare.bandwidths((0,), everyone)[0] * 2 / 2.4)
    with pytest.raises(PlanError, match="cores=-1"):
        Coordinator("boot-a", -1)


def test_a_step_of_two_sequences_is_priced_on_the_multi_row_line_not_the_one_row_step():
    # the trio's xavier-nx as profiled (ms a layer): 1.367 alone, 1.915 at 4 sequences, 2.756 at 16
    samples = [Sample("decode", b, 8, 8 * t) for b, t in ((1, 1.367e-3), (4, 1.915e-3), (16, 2.756e-3))]
    t = fit_decode(samples)
    slope = (2.756e-3 - 1.915e-3) / 12
    assert t.layer_s == pytest.approx(1.367e-3) and t.per_seq_s == pytest.approx(slope)
    assert t.seconds(1, 2) == pytest.approx(1.915e-3 - 2 * slope)  # on the line through 4 and 16, 1.30x one alone
    assert t.seconds(30, 16) == pytest.approx(30 * 2.756e-3)
    assert t.faster(2.0).seconds(1, 4) == pytest.approx(1.915e-3 / 2)
    old = DecodeTiming(1.5e-3, 0.1e-3)  # a profile fitted before: one line through every batch
    assert old.seconds(1, 2) == pytest.approx(1.6e-3)
    assert DecodeTiming(**json.loads(json.dumps({"layer_s": 1.5e-3, "per_seq_s": 0.1e-3}))) == old


def test_a_worker_whose_probe_breaks_its_barrier_still_answers_the_profile_without_the_probe(servers, monkeypatch):
    import threading

    from galaxy.model.config import make_config
    from galaxy.transport import worker
    from galaxy.transport.client import Cluster

    def broken(*args, **kwargs):  # a probe rank timed out at the barrier, or failed before it
        raise threading.BrokenBarrierError

    monkeypatch.setattr(worker, "probe_samples", broken)
    cfg = make_config("llama", vocab_size=97, hidden=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn=64,
                      max_positions=32, name="probe-tiny")
    with Cluster(servers.start(1)) as c:
        reply = c.profile(cfg, [4], repeats=1)[0]
    kinds = {s.kind for s in reply.samples}
    assert kinds and PROBE_KIND not in kinds
