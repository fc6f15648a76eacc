"""The cost model: exact weight bytes, profiled block times, ring collectives, strategies."""

from __future__ import annotations

from dataclasses import replace

import pytest
from planner_cases import cluster, device

from galaxy.model.config import PRESETS, preset
from galaxy.parallel.sharding import ShardSpec, even_partition, full_spec, shard_bytes, weighted_partition
from planner.cost import CostModel, Layout, all_gather_time, reduce_scatter_time, weight_bytes
from planner.plan import PlanError
from planner.profile import (
    ClusterProfile,
    Link,
    Tenancy,
    attention_flops,
    co_tenant_speedup,
    connective_flops,
    head_flops,
    mlp_flops,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_weight_bytes_equal_shard_bytes(name):
    cfg = preset(name)
    specs = [full_spec(cfg)]
    for n in (2, 3):
        for p in (weighted_partition(cfg, [3, 1, 2][:n]), even_partition(cfg, n, "pipeline")):
            specs += [p.spec(r, cfg) for r in range(n)]
    h = cfg.n_heads
    specs += [ShardSpec((1, h - 1), (0, 5), (3, 9), (0, 1)), ShardSpec((0, 0), (0, 0), (0, 0), (0, cfg.n_layers)),
              ShardSpec((0, 1), (0, 1), (0, 0), (0, 2), embed=False, head=True)]
    for spec in specs:
        assert weight_bytes(cfg, spec) == shard_bytes(cfg, spec), spec


def test_one_device_predicts_the_profiled_block_times():
    cfg, S = preset("gpt2"), 32
    d = device("a", 1e9, 1e12, overhead=1e-3, head=2e9)
    cm = CostModel(cfg, S, cluster([d]))
    e = cm.estimate(Layout("local", (0,), (12,), (3072,), (cfg.vocab_size,), (S,)))
    layer = d.attention.seconds(attention_flops(cfg, 12, S)) + d.mlp.seconds(mlp_flops(cfg, 3072, S)) \
        + 2 * d.connective.seconds(connective_flops(cfg, S))
    # prefill computes the last token's logits only (what generation samples from)
    once = 2 * d.connective.seconds(connective_flops(cfg, S)) + d.head.seconds(head_flops(cfg, cfg.vocab_size, 1))
    assert e.latency_s == pytest.approx(cfg.n_layers * layer + once)
    assert e.layer_s == pytest.approx(layer)
    assert e.exposed_comm_s == 0


def test_co_tenants_compute_faster_when_fewer_of_them_are_busy():
    def on(tenancy):
        return replace(device("w", 1e9, 1e12), tenancy=tenancy)

    three = [on(Tenancy("boot-a", 1.0, 2))] * 3  # three one-thread workers on two cores: 2/3 core each
    assert co_tenant_speedup(three, [0, 1, 2]) == [1.0, 1.0, 1.0]
    assert co_tenant_speedup(three, [0, 2]) == pytest.approx([1.5, 1.5])  # a core each
    assert co_tenant_speedup(three, [1]) == pytest.approx([1.5])
    trio = [on(Tenancy("boot-a", c, 2)) for c in (0.9, 0.6, 0.45)]  # CPU quotas within the machine
    assert co_tenant_speedup(trio, [0]) == [1.0]
    apart = [on(Tenancy("boot-a", 1.0, 1)), on(Tenancy("boot-b", 1.0, 1)), on(None)]
    assert co_tenant_speedup(apart, [0]) == [1.0] and co_tenant_speedup(apart, [2]) == [1.0]


def test_a_layout_of_fewer_co_tenants_is_predicted_at_their_speed_alone():
    cfg, S = preset("gpt2"), 32
    shared = [replace(device(f"w{i}", 1e9, 1e12), tenancy=Tenancy("boot-a", 1.0, 2)) for i in range(3)]
    full = (12,), (3072,), (cfg.vocab_size,), (S,)
    alone = CostModel(cfg, S, cluster(shared)).estimate(Layout("local", (1,), *full)).latency_s
    profiled = CostModel(cfg, S, cluster([device("w", 1e9, 1e12)])).estimate(Layout("local", (0,), *full)).latency_s
    assert alone == pytest.approx(profiled / 1.5)
    assert ClusterProfile.from_json(cluster(shared).to_json()).devices[2].tenancy == Tenancy("boot-a", 1.0, 2)


def test_ring_with_even_chunks_is_n_minus_1_steps():
    links = [(8 / 1e8, 1e-3)] * 4  # 100 Mbit/s, 1 ms
    rows, row_bytes = [10, 10, 10, 10], 4000
    step = 10 * row_bytes * 8 / 1e8 + 1e-3
    for fn in (all_gather_time, reduce_scatter_time):
        t, wire, _ = fn(rows, row_bytes, [0.0] * 4, links)
        assert t == pytest.approx(3 * step) and wire == pytest.approx(3 * step)


def test_overlap_hides_communication_up_to_a_tile():
    links = [(8 / 1e8, 0.0)] * 3
    rows, row_bytes = [10, 10, 10], 4000
    step = 10 * row_bytes * 8 / 1e8
    for tile in (step / 2, step * 2):  # comm-bound, compute-bound
        per_row = [tile / 10] * 3
        t, wire, comp = all_gather_time(rows, row_bytes, per_row, links)
        assert t == pytest.approx(2 * max(step, tile) + tile)  # the last tile cannot overlap
        t2, _, _ = all_gather_time(rows, row_bytes, per_row, links, overlap=False)
        assert t2 == pytest.approx(3 * tile + 2 * step) and t <= t2
        t, _, _ = reduce_scatter_time(rows, row_bytes, per_row, links)
        assert t == pytest.approx(tile + 2 * max(step, tile))  # the first tile cannot overlap


def test_uneven_tokens_give_uneven_messages_and_empty_chunks_send_nothing():
    links = [(1e-6, 1e-3)] * 3
    t, _, _ = all_gather_time([5, 0, 1], 100, [0.0] * 3, links)
    # chunk 0 (500 B) crosses two links back to back; chunk 2 runs alongside; no message for chunk 1
    assert t == pytest.approx(2 * (500e-6 + 1e-3))
    t, _, _ = all_gather_time([0, 6, 0], 100, [0.0] * 3, links)
    assert t == pytest.approx(2 * (600e-6 + 1e-3))


def test_strategies_and_memory():
    cfg, S = preset("gpt2"), 16
    devs = [device("a", 1e10, 4e9), device("b", 5e9, 4e9), device("c", 5e9, 1e8)]
    cm = CostModel(cfg, S, cluster(devs, 1e8, 1e-3))
    p = weighted_partition(cfg, [2, 1, 1])
    g = cm.estimate(Layout("galaxy", (0, 1, 2), p.heads, p.cols, p.vocab, tuple(p.tokens(S))))
    g0 = cm.estimate(Layout("galaxy-no-overlap", (0, 1, 2), p.heads, p.cols, p.vocab, tuple(p.tokens(S))))
    assert g.latency_s < g0.latency_s
    assert len(g.phases) == 7 and g.repeat == cfg.n_layers
    assert not g.feasible and g.overfull() == [2]  # c's 100 MB cannot hold a quarter of GPT-2
    pipe = cm.estimate(Layout("pipeline", (0, 1), layers=(6, 6)))
    hand = S * cfg.hidden * 4 * 8 / 1e8 + 1e-3
    head = cm.head_model(1).seconds(head_flops(cfg, cfg.vocab_size, 1))  # the last token's logits
    want = 6 * cm.full_layer_s(0) + 6 * cm.full_layer_s(1) + cm.con_s(0, S) + cm.con_s(1, S) + head + hand
    assert pipe.latency_s == pytest.approx(want)
    assert pipe.memory[0].weights_bytes == weight_bytes(cfg, ShardSpec((0, 12), (0, 3072), (0, cfg.vocab_size), (0, 6),
                                                                       embed=True, head=False))
    meg = cm.estimate(Layout("megatron", (0, 1), (6, 6), (1536, 1536), (25129, 25128)))
    assert meg.exposed_comm_s > 0 and len(meg.phases) == 6
    sp = cm.estimate(Layout("seqpar", (0, 1), tokens=(8, 8)))
    assert sp.memory[0].weights_bytes == weight_bytes(cfg, full_spec(cfg))


def test_layout_errors_name_the_field():
    cfg = preset("tiny-gpt2")
    cm = CostModel(cfg, 8, cluster([device("a", 1e9, 1e9), device("b", 1e9, 1e9)]))
    with pytest.raises(PlanError, match="heads sum to 5, model has 6"):
        cm.estimate(Layout("galaxy", (0, 1), (3, 2), (50, 50), (50, 53), (4, 4)))
    with pytest.raises(PlanError, match="tokens: \\[9, -1\\] has a negative entry"):
        cm.estimate(Layout("galaxy", (0, 1), (3, 3), (50, 50), (50, 53), (9, -1)))
    with pytest.raises(PlanError, match="exceeds the model's max_positions"):
        CostModel(cfg, 1000, cluster([device("a", 1e9, 1e9)]))
    broken = cluster([device("a", 1e9, 1e9), device("b", 1e9, 1e9)])
    broken.links[1][0] = None
    with pytest.raises(PlanError, match="no link from b to a"):
        CostModel(cfg, 8, broken).estimate(Layout("galaxy", (0, 1), (3, 3), (50, 50), (50, 53), (4, 4)))
    assert Link(1e9, 0.0).bandwidth_bps == 1e9
