"""The device-local KV pool over real gRPC workers (in-process servers): prefix blocks evicted from the paged pool
are kept in each worker's own memory (its own KV heads) and copied back there for a later prompt, nothing but
names on the wire -- bit for bit the K/V the devices computed, the tokens (int4 with roles: the logits, bit for
bit) of a cold cache; a budget that does not fit is refused before anything is allocated; a worker that forgot a
name, or dropped out, costs a recompute, never a wrong token; aborts, preemptions and the engine's close leave
nothing held."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest
import torch

from galaxy.engine.block_manager import chain
from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.errors import DeviceOutOfMemory, KVTransferError, ProtocolMismatch
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.int4_expand import expander
from galaxy.parallel import kv_stash
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.kv_stash import StashCall
from galaxy.parallel.kv_transfer import holdings
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.recovery import ResilientCluster
from galaxy.runtime.sources import reference_generate
from galaxy.transport.client import Cluster, ModelRef
from galaxy.transport.worker import WorkerService
from tests.engine.test_kernel_roles import _logits as logits_of
from tests.engine.test_kv_spill import computed

pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 16, ffn 128: int4's groups of 32 fall on every cut of an even split over two devices (one KV head each)
CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128,
                  max_positions=128, rope_theta=10000.0, tie_embeddings=True, name="pool-llama")
SRC = RandomWeights(CFG, seed=5, std=0.3)
OUT = GenerationConfig(4, stop_at_eos=False)
INT4 = pytest.param("int4", marks=pytest.mark.skipif(expander() is None, reason="no C compiler"))
# a pool of 12 blocks of 4: a 27-token document takes 7, so the second document evicts most of the first
SMALL = EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=12, top1_on_device=False,
                     device_pool_bytes=1 << 20)


def docs(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (27,), generator=g).tolist() for _ in range(n)]


def back(doc: list[int]) -> list[int]:
    return doc[:24] + [5, 6, 7]  # the first document's 6 full blocks, another question


def reference(prompts) -> list[list[int]]:
    return [reference_generate(SRC, p, OUT.max_new_tokens, stop_at_eos=False) for p in prompts]


def load(c, fmt: str = "fp32", world: int = 2):
    c.load_ref(ModelRef(CFG, random_init=True, seed=SRC.seed, std=SRC.std), even_partition(CFG, world, "galaxy"),
               LoadOptions(weights_format=fmt))


def boxes(c, engine: Engine, names) -> list[torch.Tensor]:
    """Each worker's K/V of the blocks that carry `names` in the engine's pool now."""
    table = tuple(engine.sched.blocks._cached[n] for n in names)
    return [c.export_kv(r, table, len(table) * engine.pool.block_size, h.layers, h.heads, engine.pool)
            for r, h in enumerate(holdings(c.partition, CFG))]


def stashes(servers) -> list:
    return [next(iter(service.sessions.values())).runtime.stash for _, service in servers.running]


@pytest.mark.parametrize("fmt", ["fp32", INT4])
def test_an_evicted_document_is_copied_back_on_every_worker_bit_for_bit_instead_of_prefilled(servers, fmt):
    a, b = docs(2)
    with Cluster(servers.start(2)) as c:
        load(c, fmt)
        cold = Engine(c, CFG, None, EngineConfig(block_size=4, prefix_caching=False, top1_on_device=False))
        try:  # first, on its own pool: two engines never share the workers' pool at once
            want_logits = logits_of(cold)
            want = cold.generate(back(a), OUT)
        finally:
            cold.close()
        engine = Engine(c, CFG, None, SMALL)
        try:
            got_logits = logits_of(engine)
            first = engine.generate(a, OUT)
            names = [n for n in chain(a, 6, 4) if n in engine.sched.blocks._cached]
            computed_kv = boxes(c, engine, names)
            engine.generate(b, OUT)  # evicts the first document's blocks: the workers keep them
            assert not all(n in engine.sched.blocks._cached for n in names)
            again = engine.generate(back(a), OUT)
            restored_kv = boxes(c, engine, names)
            stats = engine.load["device_pool"]
        finally:
            engine.close()
    assert len(names) == 6  # int4 with roles names them too: every position of the 6 blocks is below kernel_from
    assert again.tokens == want.tokens
    if fmt == "fp32":
        assert [first.tokens, again.tokens] == reference([a, back(a)])
    else:  # int4 with roles: the logits are a cold cache's, bit for bit
        key = (tuple(back(a)), 0)
        assert torch.equal(got_logits[key], want_logits[key])
    assert all(torch.equal(x, y) for x, y in zip(computed_kv, restored_kv))  # the bits the workers computed
    assert computed(again) == 3 and stats["restored_blocks"] >= 1  # only the question; the rest copied back
    assert stats["missed_restores"] == 0 and stats["refused_blocks"] == 0


def test_a_budget_that_does_not_fit_and_blocks_over_the_budget_are_refused_before_anything_is_allocated(
        servers, monkeypatch):
    with Cluster(servers.start(2)) as c:
        load(c)
        with pytest.raises(DeviceOutOfMemory, match="device-local K/V pool of .* does not fit"):
            Engine(c, CFG, None, EngineConfig(block_size=4, kv_blocks=12, device_pool_bytes=1 << 50))
        assert stashes(servers) == [None, None]  # refused on the workers: nothing opened, nothing left open
        engine = Engine(c, CFG, None, EngineConfig(block_size=4, kv_blocks=12))  # fills the workers' pool
        try:
            engine.generate(docs(1)[0], OUT)
            pool, named = engine.pool, list(engine.sched.blocks._cached.items())[:4]
        finally:
            engine.close()
        per = [kv_stash.KVStash(0).block_bytes(s.runtime, pool)
               for s in (next(iter(svc.sessions.values())) for _, svc in servers.running)]
        reads = []
        real = kv_stash.read_box
        monkeypatch.setattr(kv_stash, "read_box", lambda *a, **kw: reads.append(len(a[2])) or real(*a, **kw))
        got = [c.kv_stash(r, StashCall(open_bytes=2 * per[r] + per[r] // 2), pool) for r in range(2)]
        got = [c.kv_stash(r, StashCall(put=tuple(named)), pool) for r in range(2)]
        assert [len(g.stored) for g in got] == [2, 2] and [g.held_bytes for g in got] == [2 * p for p in per]
        assert sum(reads) == 4  # two blocks read on each worker: the other two refused before their copy
        with pytest.raises(KVTransferError, match="outside the pool"):
            c.kv_stash(0, StashCall(put=((b"x" * 16, pool.num_blocks),)), pool)
        with pytest.raises(KVTransferError, match="16-byte digests"):
            c.kv_stash(0, StashCall(drop=(b"short",)), pool)
        assert c.kv_stash(0, StashCall(), pool).held_bytes == 2 * per[0]  # untouched by the refused calls


def test_a_worker_that_forgot_a_name_costs_a_recompute_and_the_same_tokens(servers):
    a, b = docs(2)
    with Cluster(servers.start(2)) as c:
        load(c)
        engine = Engine(c, CFG, None, SMALL)
        try:
            engine.generate(a, OUT)
            engine.generate(b, OUT)
            service = servers.running[1][1]
            with service.lock:  # between the engine's calls: as a worker that lost its store
                stashes(servers)[1].clear()
            again = engine.generate(back(a), OUT)
            later = engine.generate(back(a), OUT)
            stats = engine.load["device_pool"]
        finally:
            engine.close()
    assert [again.tokens, later.tokens] == reference([back(a)] * 2)
    assert stats["missed_restores"] >= 1 and computed(again) == 27  # a miss: every token computed again
    assert stats["enabled"]  # the stores were opened again, emptied, and serve on


def test_aborts_preemptions_and_the_engines_close_leave_nothing_held(servers):
    prompts = [d[:10] for d in docs(4, seed=1)]  # 3 blocks each: all four admitted, their decodes then preempt
    with Cluster(servers.start(2)) as c:
        load(c)
        engine = Engine(c, CFG, None, EngineConfig(block_size=4, max_batched_tokens=16, max_running=4, kv_blocks=12,
                                                   device_pool_bytes=1 << 20))
        try:
            streams = [engine.submit(p, GenerationConfig(12, stop_at_eos=False)) for p in prompts]
            streams[1].cancel()
            done = [streams[i].result().tokens for i in (0, 2, 3)]
            follow = prompts[0] + [5, 6, 7]
            assert engine.generate(follow, OUT).tokens == reference([follow])[0]
            deadline = time.monotonic() + 10
            while engine._pre_reading and time.monotonic() < deadline:  # the idle loop keeps free blocks: let it end
                time.sleep(0.01)
            with engine._lock:
                blocks = engine.sched.blocks
                blocks.audit([])
                assert blocks.num_free == blocks.num_blocks  # every block back in the pool
                pool, held = engine.pool, len(engine.device_pool)
                preempted = engine.sched.num_preemptions
                for (_, svc), st in zip(servers.running, stashes(servers)):
                    rt = next(iter(svc.sessions.values())).runtime
                    assert len(st) == held and st.bytes == held * st.block_bytes(rt, pool)  # no orphan on a device
        finally:
            engine.close()
        assert stashes(servers) == [None, None]  # the close gave the workers' memory back
    assert done == [reference_generate(SRC, prompts[i], 12, stop_at_eos=False) for i in (0, 2, 3)]
    assert preempted > 0 and held > 0


def test_with_recovery_a_pool_worker_that_drops_out_loses_only_cache(servers):
    a, b = docs(2)
    rc = ResilientCluster(servers.start(3))
    try:
        rc.load(SRC, even_partition(CFG, 3, "galaxy"))
        engine = Engine(rc, CFG, None, SMALL)
        try:
            first = engine.generate(a, OUT)
            engine.generate(b, OUT)
            real, calls = rc.kv_stash, []

            def dies(*args, **kwargs):  # the next call to the device pool meets worker 2 gone
                if not calls:
                    calls.append(1)
                    servers.stop(2)
                return real(*args, **kwargs)

            rc.kv_stash = dies
            again = engine.generate(back(a), OUT)
            engine.generate(b, OUT)
            later = engine.generate(back(a), OUT)
            stats = engine.load["device_pool"]
        finally:
            engine.close()
    finally:
        rc.close()
    assert [first.tokens, again.tokens, later.tokens] == reference([a, back(a), back(a)])
    assert rc.events and rc.events[-1].kind == "recover" and rc.partition.world == 2
    assert stats["enabled"] and computed(later) == 3  # opened again on the survivors, and restoring there


def test_under_a_memory_budget_a_store_fits_beside_the_plan_or_is_refused_naming_the_room(servers):
    import gc

    import psutil

    from galaxy.transport.worker import _trim_heap

    gc.collect()
    _trim_heap()  # as the worker measures it: so the room (budget - 32 MiB of margins - a pass) is at most ~224 MiB
    rss = psutil.Process().memory_info().rss  # in-process workers: the test process is each worker's process
    with Cluster(servers.start(1, memory_budget=rss + (256 << 20))) as c:  # one: each admission collects garbage
        load(c, world=1)
        with pytest.raises(DeviceOutOfMemory, match=r"K/V pool of 240\.0 MiB does not fit: the device has"):
            Engine(c, CFG, None, EngineConfig(block_size=4, kv_blocks=12, device_pool_bytes=240 << 20))
        engine = Engine(c, CFG, None, replace(SMALL, device_pool_bytes=64 << 20))  # ~220 MiB beside the plan here
        try:
            got = engine.generate(docs(1)[0], OUT)
        finally:
            engine.close()
    assert got.tokens == reference(docs(1))[0]


def test_a_worker_without_the_pool_call_is_named_as_too_old_and_never_re_planned_around(servers, monkeypatch):
    def older_galaxy(self, request, context):  # what a worker built before StashKV answers
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    monkeypatch.setattr(WorkerService, "StashKV", older_galaxy)
    rc = ResilientCluster(servers.start(2))
    try:
        rc.load(SRC, even_partition(CFG, 2, "galaxy"))
        with pytest.raises(ProtocolMismatch, match="no device-local K/V pool .*older galaxy.*--kv-pool-mib"):
            Engine(rc, CFG, None, SMALL)
        events = [ev.kind for ev in rc.events]
    finally:
        rc.close()
    assert "recover" not in events  # the device works: nothing to re-plan around


def test_the_engines_close_with_a_pool_worker_gone_neither_re_plans_nor_holds_the_lock(servers):
    rc = ResilientCluster(servers.start(2))
    try:
        rc.load(SRC, even_partition(CFG, 2, "galaxy"))
        engine = Engine(rc, CFG, None, SMALL)
        engine.kv_tier.pre_read = lambda *args: 0  # an idle loop touches no device: only the close meets it gone
        engine.generate(docs(1)[0], OUT)
        servers.stop(1)
        real, locked = engine.kv_tier.close, []

        def close(ex):
            locked.append(engine._lock.acquire(blocking=False))
            if locked[-1]:
                engine._lock.release()
            real(ex)

        engine.kv_tier.close = close
        engine.close()
        events = [ev.kind for ev in rc.events]
    finally:
        rc.close()
    assert locked == [True] and "recover" not in events  # the lock was free; the closes went to the inner cluster


def test_under_a_memory_budget_an_open_store_holds_its_whole_budget_against_later_admissions(servers):
    import gc

    import psutil

    from galaxy.transport.worker import _trim_heap

    gc.collect()
    _trim_heap()  # as the worker measures it: the room beside one tiny session is at most ~224 MiB
    rss = psutil.Process().memory_info().rss
    (addr,) = servers.start(1, memory_budget=rss + (256 << 20))
    pool = KVPool(12, 4)
    with Cluster([addr]) as first, Cluster([addr]) as second:
        load(first, world=1)
        first.kv_stash(0, StashCall(open_bytes=150 << 20), pool)  # admitted, empty: it fills without asking again
        load(second, world=1)  # a tiny session: fits beside the first's 150 MiB without dropping it
        with pytest.raises(DeviceOutOfMemory, match=r"K/V pool of 150\.0 MiB does not fit"):
            second.kv_stash(0, StashCall(open_bytes=150 << 20), pool)
        assert len(servers.running[0][1].sessions) == 2
