"""Block manager: reservation, prefix sharing by hash chain, copy on write, LRU eviction, hit accounting."""

from __future__ import annotations

import itertools

import pytest

from galaxy.engine.block_manager import BlockManager, OutOfBlocks
from galaxy.engine.sequence import SamplingParams, Sequence
from galaxy.errors import GalaxyError

_ids = itertools.count()


def seq(tokens, preemptions=0) -> Sequence:
    s = Sequence(next(_ids), list(tokens), len(tokens), SamplingParams(), arrival=0.0)
    s.num_preemptions = preemptions
    return s


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """As if a step had run every token of s."""
    s.num_computed = s.num_tokens
    bm.commit(s)
    return s


def test_allocate_reserves_blocks_for_every_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    assert bm.allocate(a) == []
    assert len(a.block_table) == 3 and a.num_computed == 0 and bm.num_free == 5
    bm.audit([a])


def test_a_shared_prefix_reuses_the_same_physical_blocks():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    bm.allocate(a)
    computed(bm, a)
    b = seq([*range(8), 99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed == 8
    assert [bm.ref[x] for x in a.block_table] == [2, 2, 1]
    bm.audit([a, b])


def test_a_partial_block_is_never_shared_so_divergence_inside_it_needs_no_copy():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    bm.allocate(a)
    computed(bm, a)
    b = seq([*range(9), 50])  # agrees with a on 9 tokens: 2 full blocks and one position of the third
    copies = bm.allocate(b)
    assert copies == [] and b.num_computed == 8 and b.block_table[2] != a.block_table[2]


def test_blocks_are_named_only_once_their_kv_is_computed():
    bm = BlockManager(8, 4)
    a = seq(range(8))
    bm.allocate(a)  # reserved, not yet computed
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_computed == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_a_fully_cached_prompt_copies_its_last_block_and_recomputes_only_the_last_token():
    bm = BlockManager(8, 4)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(8))
    copies = bm.allocate(b)
    assert b.block_table[0] == a.block_table[0]
    assert copies == [(a.block_table[1], b.block_table[1])] and b.block_table[1] != a.block_table[1]
    assert b.num_computed == 7  # the last token runs again, for its logits
    assert bm.stats.hit_tokens == 7 and bm.stats.queried_tokens == 16 and bm.stats.copied_blocks == 1
    assert bm.ref[a.block_table[1]] == 1 and bm.ref[b.block_table[1]] == 1
    bm.audit([a, b])


def test_hit_accounting_counts_reused_tokens_only_not_resumed_ones():
    bm = BlockManager(8, 4)
    a = seq(range(12))
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    resumed = seq([*range(12), 7], preemptions=1)  # a preempted sequence coming back
    bm.allocate(resumed)
    assert resumed.num_computed == 12
    assert bm.stats.resumed_tokens == 12
    assert (bm.stats.hit_tokens, bm.stats.queried_tokens) == (0, 12)
    assert bm.stats.hit_rate == 0.0


def test_freed_named_blocks_stay_reusable_while_empty_blocks_remain():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = seq(range(4))
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    other = seq([9, 9, 9, 9])  # needs 2 of the 3 empty blocks, which go before the named ones
    bm.allocate(other)
    again = seq(range(4))
    bm.allocate(again)
    assert again.num_computed == 3 and bm.stats.evicted_blocks == 0
    bm.audit([other, again])


def test_eviction_takes_the_least_recently_released_block_first_and_a_prefix_tail_before_its_head():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq([1, 1, 2, 2]), seq([3, 3, 4, 4])
    for s in (a, b):
        bm.allocate(s)
        computed(bm, s)
    a_head, a_tail = a.block_table
    bm.free(a)
    bm.free(b)
    c = seq([5, 5])
    bm.allocate(c)
    assert c.block_table == [a_tail] and bm.stats.evicted_blocks == 1
    d = seq([1, 1, 9])  # a's head is still cached
    bm.allocate(d)
    assert d.block_table[0] == a_head and d.num_computed == 2


def test_the_same_prefix_computed_twice_at_once_is_cached_once():
    bm = BlockManager(8, 2)
    a, b = seq(range(4)), seq(range(4))
    bm.allocate(a)
    bm.allocate(b)
    computed(bm, a)
    computed(bm, b)
    assert all(bm.name[x] is not None for x in a.block_table)
    assert all(bm.name[x] is None for x in b.block_table)
    bm.free(b)
    bm.free(a)
    bm.audit([])
    assert bm.num_free == 8


def test_can_allocate_counts_reused_free_blocks_as_leaving_the_pool():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)  # 2 named evictable blocks + 1 empty
    b = seq([1, 2, 3, 4, 6, 7, 8])  # reuses both named blocks, needs 2 more: only 1 left
    assert not bm.can_allocate(b)
    with pytest.raises(OutOfBlocks):
        bm.allocate(b)
    bm.audit([])
    assert bm.can_allocate(seq([1, 2, 3, 4, 6]))


def test_decode_growth_asks_for_a_block_only_at_a_block_boundary():
    bm = BlockManager(4, 4)
    a = seq(range(4))
    bm.allocate(a)
    a.num_computed = 3
    assert len(a.block_table) == 1
    bm.append(a, 1)
    assert len(a.block_table) == 1
    a.num_computed = 4
    a.token_ids.append(7)
    bm.append(a, 1)
    assert len(a.block_table) == 2 and bm.can_append(a, 1)


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(8, 2, prefix_caching=False)
    a = seq(range(4))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(4))
    bm.allocate(b)
    assert b.num_computed == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_audit_catches_a_leaked_block():
    bm = BlockManager(4, 2)
    bm.allocate(seq([1, 2, 3]))
    with pytest.raises(GalaxyError, match="reference counts"):
        bm.audit([])  # the holder is forgotten: its blocks leaked
