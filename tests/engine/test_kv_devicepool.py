"""The device-local KV pool's index on the coordinator (engine/kv_devicepool.py), on in-process ranks: a name
counts only once every device kept it, the tightest device bounds it, and in front of the coordinator spill tier
the evicted blocks it cannot take go behind, and come back from either with the reference's tokens."""

from __future__ import annotations

import psutil
import pytest

from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.kv_devicepool import DevicePool
from galaxy.engine.scheduler import SchedulerConfigError
from galaxy.errors import DeviceOutOfMemory, GalaxyError
from galaxy.parallel import kv_stash
from galaxy.parallel.kv_stash import StashCall, StashResult
from galaxy.parallel.kv_transfer import box_bytes, holdings
from galaxy.parallel.rank import KVPool
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate
from tests.engine.test_kv_spill import OUT, computed, docs
from tests.engine.test_prefix_index import CFG, SRC, split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ranks():
    ex = InprocCluster(2)
    ex.load(SRC, split([2, 4]))  # uneven: one KV head on rank 0, two on rank 1
    yield ex
    ex.close()


def test_the_device_pool_in_front_of_the_spill_tier_sends_what_it_cannot_keep_behind_and_restores_from_both(ranks):
    a, b = docs(2)
    per = max(box_bytes(CFG, h.layers, h.heads, 4, 4) for h in holdings(ranks.partition, CFG))
    # a pool of 9 blocks of 4: the second document evicts 5 of the first's 6 named blocks, the devices keep 3
    engine = Engine(ranks, CFG, None, EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=9,
                                                   device_pool_bytes=3 * per, spill_bytes=1 << 20))
    try:
        engine.kv_tier.pre_read = lambda *args: 0  # no idle keeping: every block goes where its eviction sends it
        engine.generate(a, OUT)
        engine.generate(b, OUT)
        again = engine.generate(a[:24] + [5, 6, 7], OUT)
        device, spill = engine.load["device_pool"], engine.load["spill"]
    finally:
        engine.close()
    assert again.tokens == reference_generate(SRC, a[:24] + [5, 6, 7], OUT.max_new_tokens, stop_at_eos=False)
    assert computed(again) == 3  # every evicted block of the document came back from one tier or the other
    assert device["capacity"] == 3 and (device["restored_blocks"], spill["restored_blocks"]) == (3, 2)
    assert device["blocks"] == 3 and device["dropped_blocks"] == 0  # full, it dropped nothing: the rest went behind


def test_a_name_counts_only_once_every_device_kept_it_and_the_others_drop_it_next_call(ranks):
    engine = Engine(ranks, CFG, None, EngineConfig(block_size=4, kv_blocks=12))
    try:
        engine.generate(docs(1)[0], OUT)  # the pool is allocated and filled
        named = list(engine.sched.blocks._cached.items())[:2]
        pool = engine.pool
    finally:
        engine.close()
    dp = DevicePool(1 << 20, CFG)
    dp.open(ranks, pool)
    real, calls = ranks.kv_stash, []

    def rank1_refuses(rank, call, pool):  # rank 1 keeps nothing (its budget, say), rank 0 keeps all
        calls.append((rank, call))
        res = real(rank, call, pool)
        return StashResult((), res.missing, res.held_bytes, res.max_bytes) if rank == 1 else res

    ranks.kv_stash = rank1_refuses
    dp.before_step(ranks, pool, named, [])
    assert len(dp) == 0 and all(n not in dp for n, _ in named) and dp.stats.refused_blocks == 2
    assert len(ranks.runtimes[0].stash) == 2  # kept there, counted nowhere: told to drop them with the next call
    ranks.kv_stash = real
    dp.before_step(ranks, pool, named, [])
    assert len(dp) == 2 and dp.stats.stashed_blocks == 2 and len(ranks.runtimes[1].stash) == 2
    dp.close(ranks)
    assert [rt.stash for rt in ranks.runtimes] == [None, None]


def test_a_negative_device_pool_budget_is_refused_naming_the_field():
    with pytest.raises(SchedulerConfigError, match="device_pool_bytes=-1"):
        EngineConfig(device_pool_bytes=-1)


def test_kv_pool_mib_gives_each_device_its_budget_in_serve_and_bench_serve():
    from galaxy.cli import build_parser
    from galaxy.cli.serve import engine_config

    for argv in (["serve", "--kv-pool-mib", "64"], ["bench", "serve", "--kv-pool-mib", "64"]):
        assert engine_config(build_parser().parse_args(argv)).device_pool_bytes == 64 << 20
    assert engine_config(build_parser().parse_args(["serve"])).device_pool_bytes == 0  # off unless asked


def _evicting_engine(ranks):
    """An engine whose second document evicts the first's blocks through before_step into the device pool."""
    engine = Engine(ranks, CFG, None, EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=9,
                                                   device_pool_bytes=1 << 20))
    engine.kv_tier.pre_read = lambda *args: 0
    return engine


def test_torchs_allocator_runtime_error_copying_refuses_those_blocks_and_the_request_finishes(ranks, monkeypatch):
    a, b = docs(2)
    engine = _evicting_engine(ranks)
    try:
        engine.generate(a, OUT)

        def no_memory(*args, **kw):  # what torch 2.13's CPU allocator raises: a RuntimeError, not MemoryError
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

        monkeypatch.setattr(kv_stash, "read_box", no_memory)
        got = engine.submit(b, OUT).result(30)  # a dead loop thread would leave it unfinished
        assert engine._thread.is_alive() and engine.kv_tier.stats.stashed_blocks == 0
    finally:
        engine.close()
    assert got.tokens == reference_generate(SRC, b, OUT.max_new_tokens, stop_at_eos=False)


def test_another_error_in_the_tier_fails_the_requests_with_a_typed_error_and_the_loop_keeps_serving(ranks,
                                                                                                      monkeypatch):
    a, b = docs(2)
    engine = _evicting_engine(ranks)
    try:
        engine.generate(a, OUT)

        def bug(*args, **kw):
            raise RuntimeError("a bug in the copy")

        monkeypatch.setattr(kv_stash, "read_box", bug)
        with pytest.raises(GalaxyError, match="K/V tier failed .*a bug in the copy"):
            engine.submit(b, OUT).result(30)
        monkeypatch.undo()
        assert engine.generate(a[:8], OUT).tokens == reference_generate(SRC, a[:8], OUT.max_new_tokens,
                                                                          stop_at_eos=False)
    finally:
        engine.close()


def test_in_process_ranks_share_one_memory_so_a_second_store_cannot_be_promised_what_the_first_was(ranks):
    pool = KVPool(16, 4)
    ask = int(psutil.virtual_memory().available * 0.6)  # fits once (nothing is allocated until blocks come in)
    ranks.kv_stash(0, StashCall(open_bytes=ask), pool)
    with pytest.raises(DeviceOutOfMemory, match="does not fit"):
        ranks.kv_stash(1, StashCall(open_bytes=ask), pool)
    assert ranks.runtimes[0].stash.max_bytes == ask and ranks.runtimes[1].stash is None


def _named_blocks(ranks, n: int):
    engine = Engine(ranks, CFG, None, EngineConfig(block_size=4, kv_blocks=12))
    try:
        engine.generate(docs(1)[0], OUT)  # the pool is allocated and filled
        return list(engine.sched.blocks._cached.items())[:n], engine.pool
    finally:
        engine.close()


def test_a_restored_name_becomes_the_most_recent_so_room_is_made_by_dropping_another(ranks):
    (a, b, c), pool = _named_blocks(ranks, 3)
    per = max(box_bytes(CFG, h.layers, h.heads, 4, 4) for h in holdings(ranks.partition, CFG))
    dp = DevicePool(2 * per, CFG)  # two blocks on the device with the most K/V heads
    dp.open(ranks, pool)
    dp.before_step(ranks, pool, [a, b], [])  # a kept first: the least recently used
    dp.before_step(ranks, pool, [], [a])  # a used again
    dp.before_step(ranks, pool, [c], [])  # room for c: the least recently used goes
    assert dp.capacity == 2 and a[0] in dp and c[0] in dp and b[0] not in dp
    dp.close(ranks)


def test_pending_drops_beyond_one_calls_limit_wait_for_the_next_call(ranks):
    (a, b), pool = _named_blocks(ranks, 2)
    dp = DevicePool(1 << 20, CFG)
    dp.open(ranks, pool)
    dp._drop.update(i.to_bytes(kv_stash.NAME_BYTES, "big") for i in range(kv_stash.MAX_NAMES + 5))
    dp.before_step(ranks, pool, [a], [])
    dp.before_step(ranks, pool, [b], [])
    assert a[0] in dp and b[0] in dp and not dp._drop  # both calls went through; the drops all sent
    dp.close(ranks)
