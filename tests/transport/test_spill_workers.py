"""The prefix cache's spill tier over real gRPC workers (in-process servers, uneven heads): evicted blocks read
out through ExportKV in calls of several blocks, written back through ImportKV (each worker checks every box),
and the document that comes back computes only its question, with the single-device reference's tokens."""

from __future__ import annotations

from galaxy.engine.engine import Engine, EngineConfig
from galaxy.runtime.sources import reference_generate
from galaxy.transport.client import Cluster, ModelRef
from tests.engine.test_kv_spill import OUT, computed, docs
from tests.engine.test_prefix_index import CFG, SRC, split


def test_an_evicted_document_is_written_back_into_the_workers_pools_instead_of_prefilled(servers):
    addrs = servers.start(2)
    ps = docs(3) + [docs(1, seed=0)[0][:24] + [5, 6, 7]]
    with Cluster(addrs) as c:
        c.load_ref(ModelRef(CFG, random_init=True, seed=SRC.seed, std=SRC.std), split([2, 4]))
        engine = Engine(c, CFG, None, EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=16,
                                                   spill_bytes=1 << 20))
        try:
            got = [engine.generate(p, OUT) for p in ps]
            stats = engine.load["spill"]
        finally:
            engine.close()
    assert [g.tokens for g in got] == [reference_generate(SRC, p, OUT.max_new_tokens, stop_at_eos=False) for p in ps]
    assert computed(got[-1]) == 3 and stats["restored_blocks"] == 5
    assert stats["spilled_blocks"] + stats["kept_blocks"] >= 6  # read when evicted, or found read already (idle)
