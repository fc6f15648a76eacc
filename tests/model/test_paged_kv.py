"""Paged attention against plain contiguous attention (model.attention_core), in fp32."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import GalaxyError
from galaxy.model.paged_kv import METHODS, PagedBatch, PagedKVCache, block_attention, group_size, padded_rows
from galaxy.model.transformer import attention_core

# paged-attention kernels on small blocks: a second intra-op thread only spins (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

BS, HD = 4, 16


def scattered_tables(lengths, shared_prefix_blocks, num_blocks, seed):
    """Block tables in a shuffled pool; sequences 0 and 1 share their first blocks."""
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for i, n in enumerate(lengths):
        need = -(-n // BS)
        if i == 1:
            shared = tables[0][:shared_prefix_blocks]
            tables.append(shared + [ids.pop() for _ in range(need - len(shared))])
        else:
            tables.append([ids.pop() for _ in range(need)])
    return tables


def consecutive_tables(lengths, shared_prefix_blocks):
    """Block tables of consecutive ids, as a fresh pool hands them out; sequence 1 shares sequence 0's
    first blocks and then continues elsewhere (so its table is not one run)."""
    tables, nxt = [], 1
    for i, n in enumerate(lengths):
        shared = tables[0][:shared_prefix_blocks] if i == 1 else []
        fresh = -(-n // BS) - len(shared)
        tables.append(shared + list(range(nxt, nxt + fresh)))
        nxt += fresh
    return tables


def run_step(kv_map, nkv, method, seed=0, plan=None, consecutive=False, garbage=None):
    """A mixed step: two decodes (one sharing a prefix with a prefill chunk), chunks at
    arbitrary starts and a prompt from position 0. Returns paged and reference outputs."""
    gen = torch.Generator().manual_seed(seed)
    nq = len(kv_map) if kv_map is not None else nkv
    # (context length, tokens run this step): decode, chunk over a shared prefix, fresh prompt,
    # chunk from a block boundary, decode on a one-position context
    plan = plan or [(23, 1), (19, 6), (9, 9), (16, 8), (1, 1)]
    lengths = [c for c, _ in plan]
    shared_blocks = 3 if len(plan) > 1 else 0  # sequences 0 and 1 share positions [0, 12)
    tables = (consecutive_tables if consecutive else
              lambda n, s: scattered_tables(n, s, 40, seed))(lengths, shared_blocks)
    # ground truth per sequence: K/V at every position; the shared prefix is the same tensor
    ks = [torch.randn(nkv, n, HD, generator=gen) for n in lengths]
    vs = [torch.randn(nkv, n, HD, generator=gen) for n in lengths]
    shared = shared_blocks * BS
    if shared:
        ks[1][:, :shared], vs[1][:, :shared] = ks[0][:, :shared], vs[0][:, :shared]
    batch = PagedBatch(BS, tuple(n for _, n in plan), tuple(c - n for c, n in plan), tuple(map(tuple, tables)))
    cache = PagedKVCache(["3"], nkv, HD, 40, BS)
    if garbage is not None:  # what an allocation that is not zero-filled may hold
        cache.k["3"].fill_(garbage)
        cache.v["3"].fill_(garbage)
    for i, (c, n) in enumerate(plan):  # earlier steps wrote the cached positions
        if c - n:
            old = PagedBatch(BS, (c - n,), (0,), (tuple(tables[i]),))
            cache.write("3", ks[i][:, : c - n], vs[i][:, : c - n], old.slot_mapping)
    new_k = torch.cat([ks[i][:, c - n : c] for i, (c, n) in enumerate(plan)], dim=1)  # (nkv, T, hd)
    new_v = torch.cat([vs[i][:, c - n : c] for i, (c, n) in enumerate(plan)], dim=1)
    cache.write("3", new_k, new_v, batch.slot_mapping)
    q = torch.randn(nq, batch.num_tokens, HD, generator=gen)
    out = cache.paged_attention(q, "3", batch, kv_map, method)
    ref, a = [], 0
    idx = torch.tensor(kv_map) if kv_map is not None else torch.arange(nkv)
    for i, (c, n) in enumerate(plan):
        ref.append(attention_core(q[:, a : a + n], ks[i][idx], vs[i][idx], causal=True, q_start=c - n))
        a += n
    return out, torch.cat(ref, dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kv_map,nkv", [
    (None, 3),  # multi-head attention
    ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3),  # SmolLM2's whole-model grouping
    ([0, 1, 1, 1], 2),  # a shard holding the tail of one KV group and a whole other one
])
def test_mixed_batch_matches_contiguous_attention(method, kv_map, nkv):
    out, ref = run_step(kv_map, nkv, method)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("plan", [None, [(23, 1)], [(9, 9)], [(16, 8)]],
                         ids=["mixed", "one-decode", "one-prompt", "one-chunk"])
@pytest.mark.parametrize("kv_map,nkv", [(None, 3), ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3), ([0, 1, 1, 1], 2)])
def test_contexts_on_consecutive_blocks_read_as_views_match_contiguous_attention(plan, kv_map, nkv):
    """Consecutive block ids take the view path (no gather); a sequence alone returns its attention as is."""
    out, ref = run_step(kv_map, nkv, "gather", plan=plan, consecutive=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


DECODE_PLANS = {
    # sequences 0 and 1 share their first 3 blocks; contexts on and beside block boundaries (16, 17, 12, 13)
    "decodes beside a chunk": [(23, 1), (20, 1), (16, 1), (17, 1), (9, 9), (12, 1), (24, 1), (13, 1)],
    "decodes only, one length": [(17, 1)] * 5,
    "decodes only, mixed lengths": [(23, 1), (14, 1), (31, 1), (16, 1), (8, 1), (3, 1), (4, 1), (1, 1)],
}


@pytest.mark.parametrize("plan", DECODE_PLANS.values(), ids=DECODE_PLANS.keys())
@pytest.mark.parametrize("kv_map,nkv", [(None, 3), ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3), ([0, 1, 1, 1], 2)])
@pytest.mark.parametrize("garbage", [None, float("nan")])
def test_several_decodes_in_one_step_each_match_contiguous_attention(plan, kv_map, nkv, garbage):
    """Several decodes in one step, each attending on its own (the call it makes alone), see exactly
    their own contexts, whatever the pool's other slots hold."""
    out, ref = run_step(kv_map, nkv, "gather", plan=plan, garbage=garbage)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_context_runs_name_the_first_slot_of_consecutive_tables_only():
    batch = PagedBatch(BS, (1, 2, 1), (8, 0, 4), ((3, 4, 5), (7, 9), (2, 6)))
    # 9 positions on blocks 3, 4, 5: one run from slot 12; 2 positions fit in block 7 alone; 5 span 2 and 6
    assert batch.context_runs == [3 * BS, 7 * BS, None]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
@pytest.mark.parametrize("consecutive", [False, True], ids=["scattered", "consecutive"])
def test_slots_never_written_are_never_read_so_the_pool_needs_no_zero_fill(method, garbage, consecutive):
    out, ref = run_step([0, 0, 0, 1, 1, 1, 2, 2, 2], 3, method, garbage=garbage, consecutive=consecutive)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gather_and_padded_agree_on_random_batches():
    for seed in range(5):
        g, _ = run_step([0, 0, 1, 1], 2, "gather", seed)
        p, _ = run_step([0, 0, 1, 1], 2, "padded", seed)
        torch.testing.assert_close(g, p, rtol=0, atol=1e-5)


def test_write_lands_in_the_slots_of_the_block_table():
    cache = PagedKVCache([0], 1, 2, num_blocks=3, block_size=2)
    batch = PagedBatch(2, (3,), (0,), ((2, 0),))  # positions 0,1 in block 2; position 2 in block 0
    k = torch.arange(6.0).view(1, 3, 2)
    cache.write("0", k, -k, batch.slot_mapping)
    assert batch.slot_mapping.tolist() == [4, 5, 0]
    assert cache.k["0"][0, 4:6].tolist() == [[0, 1], [2, 3]] and cache.k["0"][0, 0].tolist() == [4, 5]
    assert cache.v["0"][0, 0].tolist() == [-4, -5]


def test_copy_blocks_copies_every_layer_and_leaves_the_source():
    cache = PagedKVCache(["0", "1"], 2, 3, num_blocks=4, block_size=2)
    for t in (*cache.k.values(), *cache.v.values()):
        t.copy_(torch.randn_like(t))
    before = {n: t.clone() for n, t in cache.k.items()}
    cache.copy_blocks([(1, 3)])
    for n, t in cache.k.items():
        assert torch.equal(t[:, 6:8], before[n][:, 2:4]) and torch.equal(t[:, 2:4], before[n][:, 2:4])
        assert torch.equal(t[:, :6], before[n][:, :6])
    assert torch.equal(cache.v["1"][:, 6:8], cache.v["1"][:, 2:4])


def test_a_block_table_too_short_for_the_positions_is_refused():
    with pytest.raises(GalaxyError, match="needs 9 positions"):
        PagedBatch(4, (2,), (7,), ((0, 1),))
    with pytest.raises(GalaxyError, match="no sequences"):
        PagedBatch(4, (), (), ())


def test_budget_gives_whole_blocks_of_every_layer():
    per_block = PagedKVCache.bytes_per_block(n_layers=30, n_kv_heads=1, head_dim=64, block_size=16)
    assert per_block == 2 * 30 * 16 * 64 * 4
    assert PagedKVCache.blocks_for_budget(10 * per_block + per_block - 1, 30, 1, 64, 16) == 10
    cache = PagedKVCache(range(30), 1, 64, 10, 16)
    assert cache.nbytes == 10 * per_block


def test_unknown_method_is_refused():
    cache = PagedKVCache(["0"], 1, 2, 2, 2)
    with pytest.raises(GalaxyError, match="method"):
        cache.paged_attention(torch.zeros(1, 1, 2), "0", PagedBatch(2, (1,), (0,), ((0,),)), method="flash")


def test_whole_kv_groups_are_folded_into_query_rows_and_partial_ones_are_not():
    assert group_size(None, 4, 4) == 1
    assert group_size([0, 0, 0, 1, 1, 1, 2, 2, 2], 9, 3) == 3
    assert group_size([0, 1, 1, 1], 4, 2) is None  # the tail of one group, then a whole one
    assert group_size([0, 1, 0, 1], 4, 2) is None  # heads not in group order


def test_batch_indices_built_at_once_equal_each_sequence_walked_alone():
    """slot_mapping, positions and context slots come from one index over the padded block tables;
    they equal the slots of each sequence's positions looked up one by one in its own table."""
    rnd = torch.Generator().manual_seed(4)
    for _ in range(20):
        b = int(torch.randint(1, 7, (1,), generator=rnd))
        ctx = torch.randint(1, 40, (b,), generator=rnd).tolist()
        qlen = [int(torch.randint(1, c + 1, (1,), generator=rnd)) for c in ctx]
        tables = scattered_tables(ctx, 0, 80, int(torch.randint(0, 1000, (1,), generator=rnd)))
        batch = PagedBatch(BS, tuple(qlen), tuple(c - q for c, q in zip(ctx, qlen)), tuple(map(tuple, tables)))
        slot = lambda i, p, tables=tables: tables[i][p // BS] * BS + p % BS  # noqa: E731
        assert batch.positions.tolist() == [p for c, q in zip(ctx, qlen) for p in range(c - q, c)]
        assert batch.slot_mapping.tolist() == [slot(i, p) for i, (c, q) in enumerate(zip(ctx, qlen))
                                               for p in range(c - q, c)]
        assert [s.tolist() for s in batch.context_slots] == [[slot(i, p) for p in range(c)] for i, c in enumerate(ctx)]


def test_a_compact_shards_pool_is_made_without_rebuilding_its_float_weights(monkeypatch):
    """The pool asks a block where its tensors live; a compact linear's `.weight` rebuilds the float32
    weight (0.3 s for SmolLM2 in int4, on the first request's TTFT), so the pool must not ask it."""
    from galaxy.model.checkpoints.random import RandomWeights
    from galaxy.model.config import make_config
    from galaxy.model.quant import QuantLinear
    from galaxy.parallel.executor import LoadOptions
    from galaxy.parallel.sharding import even_partition
    from galaxy.runtime.inproc import InprocCluster

    cfg = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128,
                      max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="pool-llama")
    with InprocCluster(1) as ex:
        ex.load(RandomWeights(cfg, seed=1), even_partition(cfg, 1), LoadOptions(weights_format="int4"))
        model = ex.runtimes[0].model

        def rebuilt(self):
            raise AssertionError("the pool rebuilt a compact weight")

        monkeypatch.setattr(QuantLinear, "dequantized", rebuilt)
        pool = PagedKVCache.for_model(model, 4, 16)
    assert pool.k["0"].device.type == "cpu" and pool.k["0"].shape[1] == 4 * 16  # (heads, slots, head_dim)


def test_sdpa_gives_a_query_row_its_bits_whatever_rows_share_its_call_once_padded_to_whole_blocks():
    """block_attention's premise (torch 2.13's CPU kernel): a query row's bits depend on its SDPA block of
    rows only when that block holds 1-3 rows, so `padded_rows` calls give every row the bits of one call
    over all rows -- measured here for every row count up to 200 against one call of 256."""
    gen = torch.Generator().manual_seed(0)
    h, hd, e = 3, 64, 48
    q = torch.randn(h, 256, hd, generator=gen)
    k, v = torch.randn(h, e, hd, generator=gen), torch.randn(h, e, hd, generator=gen)
    pos = torch.arange(256) % e
    mask = torch.zeros(256, e).masked_fill_(torch.arange(e)[None, :] > pos[:, None], float("-inf"))
    whole = block_attention(q, k, v, mask)
    for rows in range(1, 201):
        n = padded_rows(rows)
        assert n >= 4 and not 0 < n % (256 if n >= 768 else 64 if n >= 192 else 32) < 4
        padded = torch.cat((mask[:rows], mask[rows - 1: rows].expand(n - rows, e)))
        assert torch.equal(block_attention(q[:, :rows], k, v, padded), whole[:, :rows]), rows
