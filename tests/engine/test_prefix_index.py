"""Prefix K/V across placements (engine/prefix_index.py) on in-process ranks: a repeated prefix in a
disaggregated placement is prefilled once and moved once -- the repeats compute only their own
tokens on the prefill group and move only the blocks the decode group lacks (counted in tokens and
bytes, not time) -- with the single-device reference's greedy tokens; a prefix that survives only
on the decode group draws the request there; a leased block survives eviction; a dropped decode
pool loses only cache."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.engine.block_manager import BlockManager, OutOfBlocks
from galaxy.engine.disagg import DisaggConfig, DisaggEngine
from galaxy.engine.engine import EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.sequence import SamplingParams, Sequence
from galaxy.errors import PeerUnreachable
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import Partition, Strategy, weighted_partition
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = RandomWeights(preset("tiny-llama").replace(n_layers=3), seed=3, std=0.3)  # peaked logits: no near-ties
CFG = SRC.config
OUT = GenerationConfig(6, stop_at_eos=False)


def split(heads) -> Partition:
    p = weighted_partition(CFG, [1.0] * len(heads), Strategy.GALAXY)
    return Partition(p.strategy, tuple(heads), p.cols, p.vocab, p.layers, p.seq_weights).validate(CFG)


class Droppable(InprocCluster):
    """In-process ranks that can be made unreachable, as a worker that went away."""

    gone = False

    def step(self, step, pool):
        if self.gone:
            raise PeerUnreachable("device 0 'thread0' is unreachable (dropped by the test)")
        return super().step(step, pool)

    def import_kv(self, rank, block_table, box, layers, heads, pool, **kw):  # kw: a streamed box's start
        if self.gone:
            raise PeerUnreachable("device 0 'thread0' is unreachable (dropped by the test)")
        return super().import_kv(rank, block_table, box, layers, heads, pool, **kw)


@pytest.fixture
def disagg():
    made = []

    def make(pconf: EngineConfig, dconf: EngineConfig, config: DisaggConfig | None = None):
        pe, de = InprocCluster(3), Droppable(1)
        pe.load(SRC, split([3, 1, 2]))  # HMP over 3 ranks, uneven heads (a KV head on two of them)
        de.load(SRC, split([6]))
        engine = DisaggEngine(pe, de, CFG, None, pconf, dconf, config or DisaggConfig())
        made.append((engine, pe, de))
        return engine

    yield make
    for closable in made:  # each engine, then its two groups
        for x in closable:
            x.close()


def document(n_doc: int, questions: int, n_q: int = 5, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, CFG.vocab_size, (n_doc,), generator=g).tolist()
    return [doc + torch.randint(0, CFG.vocab_size, (n_q,), generator=g).tolist() for _ in range(questions)]


def computed(gen) -> int:
    """Prompt tokens this request ran through the model (not taken from a cache)."""
    return sum(s.tokens for s in gen.steps if s.phase == "prefill")


def ask_all(engine, ps) -> list:
    got: list = [None] * len(ps)

    def ask(i):
        got[i] = engine.generate(ps[i], OUT)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return got


def test_repeats_of_a_prefix_prefill_only_their_suffix_and_move_only_the_blocks_the_decode_group_lacks(disagg):
    # block sizes 4 (prefill) and 8 (decode): a lease covers whole blocks of both, 40 positions of the document
    engine = disagg(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=60),
                    EngineConfig(block_size=8, kv_blocks=40))
    ps = document(40, 4)
    want = [reference_generate(SRC, p, OUT.max_new_tokens, stop_at_eos=False) for p in ps]
    first = engine.generate(ps[0], OUT)
    rest = ask_all(engine, ps[1:])  # concurrent clients
    assert [g.tokens for g in [first, *rest]] == want
    assert computed(first) == 45 and first.handoff.nbytes == engine.mover.seq_bytes(45)
    for g in rest:
        assert computed(g) == 5 and g.reused_prefix == 40  # the question only, on the prefill group
        assert g.handoff.nbytes == engine.mover.seq_bytes(5)  # the question's K/V only reach the decode group
    load = engine.load
    assert load["decode_leased_tokens"] == 3 * 40 and load["routed"] == {"prefill": 4, "decode": 0}
    for e in (engine.prefill, engine.decode):
        with e._lock:
            e.sched.blocks.audit(e.sched.live.values())


def test_outputs_with_the_prefix_cache_equal_those_without_in_the_disaggregated_placement(disagg):
    ps = document(24, 3, seed=1)
    runs = []
    for caching in (True, False):
        ec = EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=60, prefix_caching=caching)
        engine = disagg(ec, EngineConfig(block_size=4, kv_blocks=60, prefix_caching=caching))
        runs.append([engine.generate(p, OUT) for p in ps])
    assert [g.tokens for g in runs[0]] == [g.tokens for g in runs[1]]
    assert sum(g.handoff.nbytes for g in runs[0]) < sum(g.handoff.nbytes for g in runs[1])


def test_a_prefix_that_survives_only_on_the_decode_group_draws_the_request_there(disagg):
    # a prefill pool of 20 blocks of 4: two other prompts evict the document there; the decode pool keeps it
    engine = disagg(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=20),
                    EngineConfig(block_size=4, kv_blocks=80))
    ps = document(40, 2, seed=2)
    others = document(60, 2, n_q=1, seed=3)
    assert engine.generate(ps[0], OUT).tokens == reference_generate(SRC, ps[0], 6, stop_at_eos=False)
    for p in others:
        engine.generate(p, OUT)
    held = engine.index.match(ps[1])
    assert held["decode"] == 40 and held["prefill"] < 40  # the prefill pool kept only the document's head
    again = engine.generate(ps[1], OUT)
    assert again.tokens == reference_generate(SRC, ps[1], 6, stop_at_eos=False)
    assert engine.index.routed["decode"] == 1 and again.handoff is None  # ran where its prefix lives: nothing moved
    assert computed(again) == 5


def test_a_leased_block_is_never_evicted_under_memory_pressure():
    bm = BlockManager(num_blocks=6, block_size=4)
    doc = list(range(8))
    a = Sequence(0, doc + [99], 9, SamplingParams(), 0.0)
    bm.allocate(a)
    a.num_computed = 8
    bm.commit(a)
    bm.free(a)  # the document's two blocks: named, unreferenced, evictable
    held = bm.lease(doc + [5, 6], 10)  # a handoff of the same document takes them
    assert len(held) == 2 and bm.stats.leased_tokens == 8
    b = Sequence(1, list(range(100, 116)), 16, SamplingParams(), 0.0)
    bm.allocate(b)  # the four other blocks
    c = Sequence(2, [7], 1, SamplingParams(), 0.0)
    assert not bm.can_allocate(c)  # only the leased blocks remain: they are not evicted for it
    with pytest.raises(OutOfBlocks):
        bm.allocate(c)
    bm.audit([b, Sequence(3, doc, 8, SamplingParams(), 0.0, block_table=list(held))])
    bm.release(held)
    bm.allocate(c)  # now the least recently released named block goes
    assert bm.stats.evicted_blocks == 1
    bm.audit([b, c])


def test_many_documents_through_a_small_decode_pool_evict_cached_blocks_and_keep_the_reference_tokens(disagg):
    # the decode pool holds 12 blocks of 8 (96 positions): three 40-token documents asked twice each do not fit
    engine = disagg(EngineConfig(block_size=8, max_batched_tokens=32, kv_blocks=60),
                    EngineConfig(block_size=8, kv_blocks=12, max_running=2, max_batched_tokens=16))
    ps = [p for seed in (4, 5, 6) for p in document(40, 2, seed=seed)]
    order = ps[0::2] + ps[1::2]  # every document once, then each again
    got = ask_all(engine, order)
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 6, stop_at_eos=False) for p in order]
    stats = engine.decode.sched.blocks.stats
    assert stats.evicted_blocks > 0 and stats.leased_tokens > 0  # reused what survived, evicted the rest
    for e in (engine.prefill, engine.decode):
        with e._lock:
            e.sched.blocks.audit(e.sched.live.values())


def test_a_dropped_decode_pool_loses_only_cache_never_a_result(disagg):
    engine = disagg(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=60),
                    EngineConfig(block_size=4, kv_blocks=60), DisaggConfig(recover=True))
    ps = document(32, 4, seed=7)
    want = [reference_generate(SRC, p, 6, stop_at_eos=False) for p in ps]
    assert engine.generate(ps[0], OUT).tokens == want[0]
    assert engine.index.match(ps[1])["decode"] == 32
    engine.decode.ex.gone = True  # the decode pool (and the prefix blocks it held) goes away
    got = ask_all(engine, ps[1:])
    assert [g.tokens for g in got] == want[1:]
    load = engine.load
    assert load["decode_down"] is not None and load["recovered"] >= 1  # ran again on the prefill group
    assert "decode" not in engine.index.match(ps[1])  # the index no longer offers the dropped pool
    assert engine.generate(ps[1], OUT).tokens == want[1]  # later requests: the prefill group, its own cache


def test_a_lease_from_a_pool_that_was_reset_is_neither_adopted_nor_released_into_the_new_one():
    from galaxy.engine.prefix_index import give_back, lease

    old = BlockManager(num_blocks=4, block_size=4)
    seq = Sequence(0, list(range(9)), 9, SamplingParams(), 0.0)
    old.allocate(seq)
    seq.num_computed = 8
    old.commit(seq)
    held = lease(old, list(range(9)), 8, src_block_size=2)  # blocks of 4 here, 2 there: whole blocks of both
    assert held.skip == 8 and held.valid_in(old)
    new = BlockManager(num_blocks=4, block_size=4)  # the devices lost their K/V: a fresh manager (lose_kv)
    assert not held.valid_in(new)
    give_back(new, held)  # nothing happens to the new pool's counts
    new.audit([])
    give_back(old, held)
    old.audit([seq])


def test_adopt_takes_a_streamed_reservation_or_a_lease_never_both():
    from galaxy.engine.scheduler import Scheduler, SchedulerConfig
    from galaxy.errors import GalaxyError

    s = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_batched_tokens=8, max_running=4, max_model_len=32))
    params = SamplingParams(max_new_tokens=4)
    doc = list(range(9))
    a = s.adopt(doc + [50], 9, params)  # imported K/V of 9 positions, then named as the decode loop does
    s.blocks.commit(a)
    held = s.reserve(10, params)  # a streamed sequence's reservation
    leased = s.blocks.lease(doc + [60], 8)
    assert len(leased) == 2
    with pytest.raises(GalaxyError, match="carries no lease"):
        s.adopt(doc + [60], 9, params, reserved=held, prefix=leased)
    b = s.adopt(doc + [60], 9, params, prefix=leased)  # the lease alone: leased blocks head its table
    assert b.block_table[:2] == leased and len(b.block_table) == 3
    c = s.adopt(list(range(100, 110)), 9, params, reserved=held)  # the reservation alone: its blocks taken over
    assert held.block_table == [] and len(c.block_table) == 3
    s.blocks.audit(s.live.values())


def test_a_streamed_first_request_leaves_named_blocks_that_the_repeats_lease(disagg):
    from galaxy.engine.kv_stream import StreamConfig

    # prompts of 45 run in chunks of 16 on the prefill group: the first streams (no lease); a repeat's
    # 5-token rest is one chunk, moves after its prefill, and leases the document the stream left named
    engine = disagg(EngineConfig(block_size=4, max_batched_tokens=16, kv_blocks=60),
                    EngineConfig(block_size=4, kv_blocks=60), DisaggConfig(stream=StreamConfig()))
    ps = document(40, 3, seed=8)
    got = [engine.generate(p, OUT) for p in ps]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 6, stop_at_eos=False) for p in ps]
    assert got[0].handoff.streamed and not any(g.handoff.streamed for g in got[1:])
    assert all(g.handoff.nbytes == engine.mover.seq_bytes(5) for g in got[1:])
    load = engine.load
    assert load["decode_leased_tokens"] == 2 * 40 and load["kv_transfer"]["streamed"] == 1
    for e in (engine.prefill, engine.decode):
        with e._lock:
            e.sched.blocks.audit(e.sched.live.values())
