"""Re-sharding one sequence's K/V from a prefill partition to a decode partition: every receiver
gets exactly the slice of the whole K/V its holding names, whatever the two splits (uneven, GQA
groups cut in two, pipeline stages); boxes round-trip through paged pools of different block sizes;
a box that does not fit is refused before the pool is touched."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import KVTransferError
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedKVCache
from galaxy.parallel.kv_transfer import (
    KVHolding,
    holdings,
    plan_between,
    read_box,
    reshard,
    transfer_plan,
    write_box,
)
from galaxy.parallel.sharding import Partition, Strategy, even_partition, weighted_partition

CFG = preset("smollm2-135m").replace(n_layers=4)  # 9 query heads in 3 KV groups of 3


def whole_kv(cfg, tokens: int, seed: int = 0) -> torch.Tensor:
    """A sequence's whole K/V as one device would hold it: (layers, 2, KV heads, tokens, head_dim)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.n_layers, 2, cfg.n_kv_heads, tokens, cfg.head_dim, generator=g)


def slice_of(kv: torch.Tensor, h: KVHolding) -> torch.Tensor | None:
    return None if h.empty else kv[h.layers[0]: h.layers[1], :, h.heads[0]: h.heads[1]].clone()


def heads_partition(cfg, heads, strategy=Strategy.GALAXY) -> Partition:
    n = len(heads)
    p = weighted_partition(cfg, [1.0] * n, strategy)
    return Partition(p.strategy, tuple(heads), p.cols, p.vocab, p.layers, p.seq_weights).validate(cfg)


SPLITS = [
    ([5, 2, 2], [4, 5]),  # uneven on both sides; groups cut in two on both
    ([2, 3, 4], [9]),  # three senders to one receiver
    ([9], [1, 3, 5]),  # one sender to three receivers
    ([4, 0, 5], [3, 6]),  # a sender with no heads at all
    ([1, 1, 7], [2, 2, 2, 3]),  # four receivers, each cutting groups
]


@pytest.mark.parametrize("prefill,decode", SPLITS)
def test_every_receiver_gets_exactly_its_heads_of_the_whole_kv(prefill, decode):
    src_p, dst_p = heads_partition(CFG, prefill), heads_partition(CFG, decode, Strategy.MEGATRON)
    src, dst = holdings(src_p, CFG), holdings(dst_p, CFG)
    kv = whole_kv(CFG, 21)
    plan = plan_between(src_p, dst_p, CFG)
    got = reshard(plan, src, dst, [slice_of(kv, h) for h in src])
    for d, h in enumerate(dst):
        assert torch.equal(got[d], slice_of(kv, h))


def test_a_kv_head_two_senders_hold_is_sent_once_and_a_sender_feeds_several_receivers():
    # prefill 5/2/2 query heads: KV heads 0..2, 1..3 (head 1 replicated), 2..3 (head 2 replicated)
    src = holdings(heads_partition(CFG, [5, 2, 2]), CFG)
    assert [h.heads for h in src] == [(0, 2), (1, 3), (2, 3)]
    dst = holdings(heads_partition(CFG, [4, 5]), CFG)  # KV heads 0..2 and 1..3
    plan = transfer_plan(src, dst)
    for d, want in enumerate(dst):  # every (layer, head) cell of each receiver exactly once
        cells = [(layer, h) for p in plan if p.dst == d for layer in range(*p.layers) for h in range(*p.heads)]
        assert sorted(cells) == [(layer, h) for layer in range(*want.layers) for h in range(*want.heads)]
    assert {p.dst for p in plan if p.src == 0} == {0, 1}  # sender 0 gives parts of its heads to both
    assert all(p.src == 0 for p in plan if p.heads[0] <= 1 < p.heads[1])  # head 1 from the lowest rank


def test_pipeline_stages_reshard_to_a_head_split_and_back():
    kv = whole_kv(CFG, 7, seed=3)
    pipe = even_partition(CFG, 3, Strategy.PIPELINE)  # layers 2/1/1, every head
    hmp = heads_partition(CFG, [2, 7])
    for a, b in ((pipe, hmp), (hmp, pipe)):
        src, dst = holdings(a, CFG), holdings(b, CFG)
        got = reshard(plan_between(a, b, CFG), src, dst, [slice_of(kv, h) for h in src])
        assert all(torch.equal(g, slice_of(kv, h)) for g, h in zip(got, dst))


def test_a_receiver_nobody_can_feed_is_refused():
    with pytest.raises(KVTransferError, match="no sender holds"):
        transfer_plan([KVHolding((0, 4), (0, 2))], [KVHolding((0, 4), (0, 3))])


def fill_pool(cache: PagedKVCache, holding: KVHolding, table, kv: torch.Tensor) -> None:
    write_box(cache, holding, table, slice_of(kv, holding), holding.layers, holding.heads)


def test_boxes_round_trip_between_pools_of_different_block_sizes_and_scattered_blocks():
    tokens = 37
    kv = whole_kv(CFG, tokens, seed=5)
    full = KVHolding((0, CFG.n_layers), (0, CFG.n_kv_heads))
    a = PagedKVCache(range(CFG.n_layers), CFG.n_kv_heads, CFG.head_dim, num_blocks=12, block_size=4)
    b = PagedKVCache(range(CFG.n_layers), CFG.n_kv_heads, CFG.head_dim, num_blocks=5, block_size=16)
    table_a, table_b = [11, 0, 7, 3, 9, 1, 5, 2, 10, 4], [4, 0, 2]
    fill_pool(a, full, table_a, kv)
    box = read_box(a, full, table_a, tokens, (1, 3), (1, 3))
    assert torch.equal(box, kv[1:3, :, 1:3])
    write_box(b, full, table_b, read_box(a, full, table_a, tokens, full.layers, full.heads), full.layers, full.heads)
    assert torch.equal(read_box(b, full, table_b, tokens, full.layers, full.heads), kv)


def test_a_box_of_the_wrong_shape_dtype_or_heads_is_refused_with_the_pool_untouched():
    h = KVHolding((0, CFG.n_layers), (1, 3))
    cache = PagedKVCache(range(CFG.n_layers), 2, CFG.head_dim, num_blocks=4, block_size=8)
    for t in (*cache.k.values(), *cache.v.values()):  # the pool is not zero-filled when allocated
        t.zero_()
    good = torch.randn(CFG.n_layers, 2, 2, 10, CFG.head_dim)
    bad = {
        "shape": (good[:, :, :1], h.heads),
        "float64, this device keeps": (good.to(torch.float64), h.heads),
        "not within its KV heads": (torch.randn(CFG.n_layers, 2, 3, 10, CFG.head_dim), (0, 3)),
        "5 dimensions": (good[0], h.heads),
    }
    for what, (box, heads) in bad.items():
        with pytest.raises(KVTransferError, match=what):
            write_box(cache, h, [0, 1], box, h.layers, heads)
    with pytest.raises(KVTransferError, match="outside the pool"):
        write_box(cache, h, [0, 9], good, h.layers, h.heads)
    with pytest.raises(KVTransferError, match="positions in 1 blocks"):
        write_box(cache, h, [0], good, h.layers, h.heads)
    assert all(not t.any() for t in (*cache.k.values(), *cache.v.values()))
