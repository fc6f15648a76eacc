"""The prefix cache's spill tier (engine/kv_spill.py): named KV blocks evicted from the devices' pool are kept
in a bounded host store and written back on a later hit instead of computed -- counted in prompt tokens run,
with the single-device reference's greedy tokens; the store never holds more than its budget; a failed read
loses only cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from galaxy.engine import kv_spill
from galaxy.engine.block_manager import ROOT, BlockManager, block_hash
from galaxy.engine.disagg import DisaggEngine
from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.kv_spill import KVSpill, SpillStore
from galaxy.engine.scheduler import SchedulerConfigError
from galaxy.engine.sequence import SamplingParams, Sequence
from galaxy.errors import CacheLost, GalaxyError, InvalidRequest, PeerUnreachable
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate
from tests.engine.test_prefix_index import CFG, SRC, split  # the same tiny model and splits

pytestmark = pytest.mark.usefixtures("one_thread")

OUT = GenerationConfig(4, stop_at_eos=False)


def docs(n: int, n_doc: int = 24, n_q: int = 3, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n_doc + n_q,), generator=g).tolist() for _ in range(n)]


def computed(gen) -> int:
    """Prompt tokens this request ran through the model (not taken from a cache or the store)."""
    return sum(s.tokens for s in gen.steps if s.phase == "prefill")


class Flaky(InprocCluster):
    """In-process ranks whose K/V reads can be made to fail, as a device that stopped answering them, and
    whose next K/V write can raise CacheLost, as a re-planning executor does when a device drops out then."""

    fail_exports = False
    replan_at_import = False

    def export_kv(self, *a, **kw):
        if self.fail_exports:
            raise PeerUnreachable("device 1 'thread1' is unreachable (dropped by the test)")
        return super().export_kv(*a, **kw)

    def import_kv(self, *a, **kw):
        if self.replan_at_import:
            self.replan_at_import = False
            raise CacheLost("device 1 'thread1' dropped out; re-planned (the test)")
        return super().import_kv(*a, **kw)


@pytest.fixture
def engine():
    made = []

    def make(config: EngineConfig, heads=(3, 3)) -> Engine:
        ex = Flaky(len(heads))
        ex.load(SRC, split(list(heads)))  # HMP over two ranks: each holds its own KV heads
        eng = Engine(ex, CFG, None, config)
        made.append((eng, ex))
        return eng

    yield make
    for eng, ex in made:
        eng.close()
        ex.close()


def seq(tokens) -> Sequence:
    return Sequence(0, list(tokens), len(tokens), SamplingParams(1), arrival=0.0)


def test_the_block_manager_lists_evicted_names_and_restores_a_chain_that_goes_on_into_the_store():
    bm = BlockManager(4, 2)
    bm.store = set()
    a = seq([1, 2, 3, 4, 5, 6, 7])  # 3 full blocks and one token
    bm.allocate(a)
    a.num_computed = 7
    bm.commit(a)
    names = list(a.block_hashes)
    bm.free(a)
    b = seq([9, 9, 9, 9, 9, 9, 9, 9])  # 4 blocks: evicts a's three named ones (tail first)
    bm.allocate(b)
    evicted, restores = bm.take_spill()
    assert [n for n, _ in evicted] == names[::-1] and restores == []
    bm.store.update(names[1:])  # the store kept all but the head: the chain stops at the first name it lacks
    bm.free(b)
    c = seq([1, 2, 3, 4, 5, 6, 0])
    assert bm.can_allocate(c) and bm.allocate(c) == [] and c.num_computed == 0 and bm.take_spill()[1] == []
    bm.free(c)
    bm.store.add(names[0])
    d = seq([1, 2, 3, 4, 5, 6, 0])
    assert bm.can_allocate(d)
    assert bm.allocate(d) == []
    _, restores = bm.take_spill()
    assert restores == list(zip(names, d.block_table[:3])) and d.num_computed == 6 and d.num_named == 0
    assert bm.stats.restored_tokens == 6 and bm.stats.hit_tokens == 6
    d.num_computed = 7
    bm.commit(d)  # after the step: named as computed blocks
    assert bm.cached_tokens([1, 2, 3, 4, 5, 6]) == 6
    bm.audit([d])


def test_a_full_hit_from_the_store_runs_only_its_last_token_in_its_own_block():
    bm = BlockManager(4, 2)
    bm.store = set()
    a = seq([1, 2, 3, 4])
    bm.allocate(a)
    a.num_computed = 4
    bm.commit(a)
    bm.store.update(a.block_hashes)
    bm.free(a)
    other = seq([7] * 8)
    bm.allocate(other)  # evicts both
    bm.take_spill()
    bm.free(other)
    b = seq([1, 2, 3, 4])
    assert bm.allocate(b) == []  # no copy: the restored block is b's own
    assert b.num_computed == 3 and len(bm.take_spill()[1]) == 2
    assert bm.stats.restored_tokens == bm.stats.hit_tokens == 3  # of the hit tokens: not the one run again


def test_the_store_never_holds_more_than_its_budget_and_keeps_what_a_restore_needs():
    store = SpillStore(100)
    box = (torch.zeros(10),)  # 40 bytes
    for name in (b"a", b"b"):
        assert store.make_room(40)
        store.put(name, box)
    assert not store.make_room(101) and len(store) == 2  # larger than the whole budget: nothing dropped
    assert not store.make_room(60, keep={b"a", b"b"})
    assert store.make_room(60, keep={b"a"}) and b"a" in store and b"b" not in store
    store.put(b"c", box)
    assert store.bytes == 80 <= store.max_bytes
    with pytest.raises(GalaxyError, match="max_bytes=100"):
        store.put(b"d", box)
    with pytest.raises(GalaxyError, match="max_bytes=0"):
        SpillStore(0)
    with pytest.raises(InvalidRequest, match=f"max_bytes={1 << 60} is more than the .* bytes of memory free"):
        SpillStore(1 << 60)
    with pytest.raises(SchedulerConfigError, match="spill_bytes=-1"):
        EngineConfig(spill_bytes=-1)


def test_an_evicted_document_comes_back_from_the_store_instead_of_being_prefilled_again(engine):
    # a pool of 16 blocks of 4 positions: each 27-token prompt and its 4 tokens take 8 (7 named once done), so
    # the third evicts 6 of the first document's blocks (tail first: its head block stays)
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]  # the last: the first document, another question
    want = [reference_generate(SRC, p, OUT.max_new_tokens, stop_at_eos=False) for p in ps]
    runs = {}
    for spill in (0, 1 << 20):
        eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=spill))
        runs[spill] = [eng.generate(p, OUT) for p in ps]
        assert [g.tokens for g in runs[spill]] == want
        with eng._lock:
            eng.sched.blocks.audit(eng.sched.live.values())
    assert computed(runs[0][-1]) == 23  # without the store: the document again, but for its head block
    assert computed(runs[1 << 20][-1]) == 3 and runs[1 << 20][-1].reused_prefix == 24  # with it: the question
    stats = eng.load["spill"]
    assert stats["restored_blocks"] == 5
    assert stats["spilled_blocks"] + stats["kept_blocks"] >= 6  # read when evicted, or found read already (idle)
    assert 0 < stats["bytes"] <= stats["max_bytes"]


def test_reads_and_writes_cut_into_calls_of_a_few_blocks_restore_the_same_tokens(engine, monkeypatch):
    monkeypatch.setattr(kv_spill, "MAX_CALL_BYTES", 1)  # one block a call
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20))
    calls = []
    real = eng.ex.import_kv
    eng.ex.import_kv = lambda rank, table, *a, **kw: calls.append(len(table)) or real(rank, table, *a, **kw)
    got = [eng.generate(p, OUT) for p in ps]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    assert computed(got[-1]) == 3 and calls == [1] * 5 * 2  # 5 blocks, each its own call on each of 2 devices


def test_while_idle_the_engine_reads_free_named_blocks_out_so_evicting_them_later_reads_nothing(engine):
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20))
    got = [eng.generate(ps[0], OUT)]
    deadline = time.monotonic() + 10
    while eng.load["spill"]["pre_read_blocks"] < 7 and time.monotonic() < deadline:  # its 7 named blocks
        time.sleep(0.01)
    assert eng.load["spill"]["pre_read_blocks"] == 7
    got += [eng.generate(p, OUT) for p in ps[1:]]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    stats = eng.load["spill"]
    assert stats["kept_blocks"] >= 6 and computed(got[-1]) == 3  # the document's evicted blocks: read already
    assert stats["bytes"] <= stats["max_bytes"]


def test_a_small_budget_keeps_the_most_recently_evicted_blocks_and_never_more_than_it(engine):
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    probe = engine(EngineConfig(block_size=4, kv_blocks=16, spill_bytes=1 << 20))
    per = probe.spill.block_bytes(probe.ex, probe.pool)  # 3 layers x 2 x 2 KV heads x 4 x 16 x 4 bytes per block
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=3 * per + per // 2))
    got = [eng.generate(p, OUT) for p in ps]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    stats = eng.load["spill"]
    assert stats["bytes"] <= 3 * per and stats["dropped_blocks"] + stats["refused_blocks"] > 0  # not all kept
    assert computed(got[-1]) in range(3, 28)  # whatever survived of the document's chain is not computed again


def test_a_failed_read_into_the_store_loses_only_cache(engine):
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20))
    eng.ex.fail_exports = True
    got = [eng.generate(p, OUT) for p in ps]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    assert computed(got[-1]) == 23 and eng.load["spill"]["refused_blocks"] > 0 and eng.load["spill"]["bytes"] == 0


def test_a_re_plan_while_blocks_are_written_back_runs_the_sequence_again_and_empties_the_store(engine):
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20))
    got = [eng.generate(p, OUT) for p in ps[:3]]
    assert eng.load["spill"]["bytes"] > 0
    eng.ex.replan_at_import = True
    got.append(eng.generate(ps[3], OUT))
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    assert eng.load["spill"]["restored_blocks"] == 0 and computed(got[-1]) == 27  # all of it again, after the re-plan
    with eng._lock:
        eng.sched.blocks.audit(eng.sched.live.values())


def test_on_disk_the_store_restores_the_same_tokens_and_a_lost_file_costs_only_a_recompute(engine, tmp_path):
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    for lose in (False, True):
        eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20,
                                  spill_dir=str(tmp_path)))
        got = [eng.generate(p, OUT) for p in ps[:3]]
        files = list(Path(eng.spill.store.directory).iterdir())
        assert len(files) == len(eng.spill.store) > 0 and Path(eng.spill.store.directory).stat().st_mode & 0o077 == 0
        assert eng.spill.store.bytes == sum(eng.spill.block_bytes(eng.ex, eng.pool) for _ in files)
        if lose:
            for f in files:
                f.unlink()
        got.append(eng.generate(ps[3], OUT))
        assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
        assert computed(got[-1]) == (27 if lose else 3)  # a lost file: every sequence runs again, as after a re-plan
        eng.close()
        assert not Path(eng.spill.store.directory).exists()
    with pytest.raises(SchedulerConfigError, match="spill_bytes > 0"):
        EngineConfig(spill_dir=str(tmp_path))
    with pytest.raises(InvalidRequest, match="bytes on .* free now"):
        SpillStore(1 << 60, str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the refused store left no directory behind


def test_the_prefill_group_of_a_disaggregated_placement_restores_and_the_decode_group_keeps_no_store():
    pe, de = InprocCluster(2), InprocCluster(1)
    pe.load(SRC, split([3, 3]))
    de.load(SRC, split([6]))
    ec = EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20)
    eng = DisaggEngine(pe, de, CFG, None, ec, EngineConfig(block_size=4, kv_blocks=8, spill_bytes=1 << 20))
    try:
        ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
        got = [eng.generate(p, OUT) for p in ps]
        assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
        # each prompt's 7 blocks leave the prefill pool with its first token, 6 of them named: the third prompt
        # evicts 3 of the first document's there (the decode pool of 8 blocks keeps none of it by then)
        assert computed(got[-1]) == 3 and eng.prefill.load["spill"]["restored_blocks"] == 3
        assert eng.load["routed"] == {"prefill": 4, "decode": 0}
        assert eng.decode.spill is None and eng.decode.sched.blocks.store is None
    finally:
        eng.close()
        pe.close()
        de.close()


def test_a_store_file_that_cannot_be_written_loses_only_its_block_and_leaves_no_file(engine, tmp_path, monkeypatch):
    """A full disk: torch.save's writer raises RuntimeError (not OSError) after writing part of the file. The
    engine goes on serving (the blocks are computed again when asked for), counts them refused, and the store's
    directory holds no partial file outside its budget."""
    def full_disk(obj, path):
        Path(path).write_bytes(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20,
                              spill_dir=str(tmp_path)))
    got = [eng.generate(p, OUT) for p in ps]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    stats = eng.load["spill"]
    assert computed(got[-1]) == 23 and stats["refused_blocks"] > 0 and stats["bytes"] == 0
    assert list(Path(eng.spill.store.directory).iterdir()) == []


def test_blocks_the_store_no_longer_holds_at_their_write_back_run_the_sequence_again(engine, monkeypatch):
    """The store emptied between a hit and its write-back (a re-plan clears it): the K/V are lost like a
    device's pool (CacheLost: every sequence runs its tokens again), not a plain error aborting every stream."""
    restore = KVSpill.restore

    def emptied_first(self, ex, pool, restores):
        if restores:
            self.store.clear()
        return restore(self, ex, pool, restores)

    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20))
    got = [eng.generate(p, OUT) for p in ps[:3]]
    monkeypatch.setattr(KVSpill, "restore", emptied_first)
    got.append(eng.generate(ps[3], OUT))
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    assert computed(got[-1]) == 27  # all of it again


def test_a_block_the_coordinator_has_no_memory_to_copy_is_refused_and_the_engine_goes_on(engine, monkeypatch):
    """The in-memory store: a MemoryError copying a block out loses that block, not the engine's loop."""
    def no_memory(self, name, boxes):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(SpillStore, "put", no_memory)
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    eng = engine(EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16, spill_bytes=1 << 20))
    got = [eng.generate(p, OUT) for p in ps]
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 4, stop_at_eos=False) for p in ps]
    assert eng.load["spill"]["refused_blocks"] > 0 and eng.load["spill"]["bytes"] == 0


def test_under_roles_the_store_offers_a_block_only_below_the_takers_kernel_from():
    """int8 / int4 (roles): a block named by a request whose prompt ran past it dense holds, for a request whose
    own rows ran there on the kernel (its generated tokens), K/V of another role -- the store must not hand it
    over, as the cache does not (block_manager.shared_until). fp32 (no roles) takes the whole chain."""
    for roles, restored in ((True, 1), (False, 3)):
        bm = BlockManager(8, 2, roles=roles)
        bm.store = set()
        a = seq([1, 2, 3, 4, 5, 6, 7, 8])  # kernel_from 7: positions 0-5 dense, so blocks 0-2 are named
        bm.allocate(a)
        a.num_computed = 8
        bm.commit(a)
        bm.store.update(a.block_hashes[:3])
        bm.free(a)
        other = seq([9] * 16)
        bm.allocate(other)  # evicts every named block: the chain is in the store only
        bm.take_spill()
        bm.free(other)
        # a resumed request: prompt [1 2 3 4] (kernel_from 3), then its generated 5 6 at positions 4-5 (kernel role)
        b = Sequence(1, [1, 2, 3, 4, 5, 6, 0], 4, SamplingParams(1), arrival=0.0)
        assert bm.allocate(b) == []
        assert [n for n, _ in bm.take_spill()[1]] == a.block_hashes[:restored] and b.num_computed == 2 * restored


def test_a_block_a_full_hit_copies_from_is_not_written_back_into_before_the_step_copies_it():
    """A full hit copies its last shared block (src -> its own) in the step, but the spill tier writes restored
    blocks before the step: a restore given that src (released by the copy, the last free block) would overwrite
    it first, and the copy would hand the first request the second's K/V. The src stays held until the step's
    work is taken (take_spill); the second request waits for a block."""
    bm = BlockManager(5, 2)
    bm.store = {block_hash(ROOT, [5, 6])}  # another document's block, evicted to the store
    a = seq([1, 2, 3, 4])
    bm.allocate(a)
    a.num_computed = 4
    bm.commit(a)
    bm.free(a)
    filler = seq([9, 9, 9, 9])
    bm.allocate(filler)  # the empty blocks: a's two named ones and one empty are left
    b = seq([1, 2, 3, 4])
    copies = bm.allocate(b)  # a full hit: its last block copied into the empty one
    assert len(copies) == 1
    c = seq([5, 6])
    if bm.can_allocate(c):
        bm.allocate(c)
    restores = bm.take_spill()[1]
    assert not {blk for _, blk in restores} & {src for src, _ in copies}
    assert bm.can_allocate(c)  # once the step's work is taken, the copied block is free again
    bm.audit([filler, b])
