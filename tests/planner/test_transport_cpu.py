"""The transport CPU of a ring collective, which every device of a split pays whole (profile.collective_cpu_s):
measured by the worker's probe, carried by the profile, charged by the cost model at the device's share of a core."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from planner_cases import cluster, device

from galaxy.backends.profiling import Sample
from galaxy.model.config import preset
from galaxy.transport.collective_probe import PROBE_KIND, collective_cpu_s, probe_rows
from planner.cost import CostModel, Layout
from planner.profile import ClusterProfile, Tenancy
from planner.profiler import COLLECTIVE, collective_cpu, fit_samples

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
