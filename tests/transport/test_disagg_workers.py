"""Phase-separated serving over real gRPC workers: prefill on three worker processes (HMP, uneven
heads), decode on two crossing them, the K/V moved through ExportKV/ImportKV (streamed chunk by chunk
while it runs, or after the prefill) or sent worker to worker (SendKV) -- greedy tokens equal the
single-device reference; a bad box or a wrong token is refused with a typed error; a decode device that
drops out ends the requests on it with an error that names it."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from galaxy.engine.disagg import DisaggConfig, DisaggEngine
from galaxy.engine.engine import EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.kv_direct import DirectConfig
from galaxy.engine.kv_stream import StreamConfig
from galaxy.errors import AuthError, GalaxyError, KVTransferError
from galaxy.parallel.rank import KVPool
from galaxy.runtime.sources import reference_generate
from galaxy.transport.client import Cluster, ModelRef
from galaxy.transport.protocol import kv_box_to_proto
from galaxy.transport.spawn import LocalWorkers
from tests.engine.test_disagg import CFG, SRC, prompts, split  # the in-process tests' model, splits, prompts

REF = ModelRef(CFG, random_init=True, seed=SRC.seed, std=SRC.std)  # SRC, built by each worker


def test_greedy_tokens_equal_the_reference_prefill_on_three_worker_processes_decode_on_two_crossing_them():
    """Prefill 3/1/2 query heads on w0..w2 (a KV head on two of them), decode 2/4 on w2, w3 (w2 in both
    groups): a streamed prompt, and the others sent directly worker to worker (engine/kv_direct.py), one
    of them leasing the document an earlier one left on the decode group."""
    doc = prompts((16,), seed=5)[0]
    ps = prompts((11, 5, 23)) + [doc + [7, 8, 9], doc + [10, 11]]
    want = [reference_generate(SRC, p, 8, stop_at_eos=False) for p in ps]
    with LocalWorkers(4, threads=1) as addrs, Cluster(addrs[:3]) as pre, Cluster(addrs[2:]) as dec:
        pre.load_ref(REF, split([3, 1, 2]))
        dec.load_ref(REF, split([2, 4]))
        engine = DisaggEngine(pre, dec, CFG, None, EngineConfig(block_size=4, kv_blocks=32),
                              EngineConfig(block_size=8, kv_blocks=24),
                              DisaggConfig(chunk_bytes=2048, stream=StreamConfig(), direct=DirectConfig()))
        try:
            got: list = [None] * len(ps)

            def ask(i):  # the 23-token prompt in chunks of 8: its K/V stream while its later chunks run
                got[i] = engine.generate(ps[i], GenerationConfig(8, stop_at_eos=False, prefill_chunk=8 * (i == 2)))

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            for i in (3, 4):  # one after the other: the repeat finds the document on the decode group
                ask(i)
            load = engine.load
        finally:
            engine.close()
    assert [g.tokens for g in got] == want
    assert all(g.handoff is not None and g.handoff.export_s > 0 and g.handoff.import_s > 0 for g in got)
    assert got[2].handoff.streamed and not got[1].handoff.streamed  # 5 tokens: one chunk, moved after
    assert [g.handoff.direct for g in got] == [True, True, False, True, True]
    assert load["kv_transfer"]["direct_fell_back"] == 0 and load["decode_leased_tokens"] == 16
    assert got[4].handoff.nbytes < got[3].handoff.nbytes  # the repeat sent only its question's positions


def test_a_bad_box_or_a_wrong_token_is_refused_by_the_worker_with_a_typed_error(servers):
    addrs = servers.start(1, token="s3cret")
    with Cluster(addrs, token="s3cret") as c:
        c.load_ref(REF, split([6]))
        pool = KVPool(4, 8)
        good = torch.zeros(CFG.n_layers, 2, CFG.n_kv_heads, 10, CFG.head_dim)
        c.import_kv(0, (1, 2), good, (0, CFG.n_layers), (0, 2), pool)
        assert torch.equal(c.export_kv(0, (1, 2), 10, (0, CFG.n_layers), (0, 2), pool), good)
        with pytest.raises(KVTransferError, match="w0.*expected"):
            c.import_kv(0, (1, 2), good[:, :, :, :, :-1], (0, CFG.n_layers), (0, 2), pool)
        with pytest.raises(KVTransferError, match="w0.*float16"):
            c.import_kv(0, (1, 2), good.half(), (0, CFG.n_layers), (0, 2), pool)
        with pytest.raises(KVTransferError, match="w0.*outside the pool"):
            c.import_kv(0, (1, 7), good, (0, CFG.n_layers), (0, 2), pool)
        with pytest.raises(KVTransferError, match="w0.*positions 10..10"):  # a streamed chunk of no positions
            c.export_kv(0, (1, 2), 10, (0, CFG.n_layers), (0, 2), pool, start=10, while_stepping=True)
        with pytest.raises(KVTransferError, match="w0.*positions 4..10"):  # a chunk [4, 10) of 5 positions
            c._kv_call(0, "ImportKV", kv_box_to_proto(c.session_id, (1, 2), 10, (0, CFG.n_layers), (0, 2), pool,
                                                      good[:, :, :, :5], start=4), "K/V import")
        chunk = c.export_kv(0, (1, 2), 10, (0, CFG.n_layers), (0, 2), pool, start=4, while_stepping=True)
        assert torch.equal(chunk, good[:, :, :, 4:])
        with Cluster(addrs, token="wrong") as intruder:
            intruder.session_id, intruder.partition, intruder.config = c.session_id, c.partition, c.config
            with pytest.raises(AuthError):
                intruder.import_kv(0, (1, 2), good + 1, (0, CFG.n_layers), (0, 2), pool)
            with pytest.raises(AuthError):  # a read while a step runs is authenticated as every call
                intruder.export_kv(0, (1, 2), 10, (0, CFG.n_layers), (0, 2), pool, start=4, while_stepping=True)
        assert torch.equal(c.export_kv(0, (1, 2), 10, (0, CFG.n_layers), (0, 2), pool), good)  # untouched


@contextlib.contextmanager
def two_to_one(servers, config: DisaggConfig | None = None):
    """Prefill on workers w0, w1 (uneven heads), decode on w2 (the one the fault tests stop)."""
    addrs = servers.start(3)
    with Cluster(addrs[:2]) as pre, Cluster(addrs[2:], connect_timeout=2.0) as dec:
        pre.load_ref(REF, split([2, 4]))
        dec.load_ref(REF, split([6]))
        dec.kv_timeout = 5.0
        engine = DisaggEngine(pre, dec, CFG, None, EngineConfig(block_size=4, kv_blocks=32),
                              EngineConfig(block_size=4, kv_blocks=32), config or DisaggConfig())
        try:
            yield engine
        finally:
            engine.close()


def test_a_decode_device_that_drops_out_ends_its_requests_with_an_error_naming_it(servers):
    with two_to_one(servers) as engine:
        p = prompts((9,))[0]
        want = reference_generate(SRC, p, 4, stop_at_eos=False)
        assert engine.generate(p, GenerationConfig(4, stop_at_eos=False)).tokens == want
        servers.stop(2)
        stream = engine.submit(p, GenerationConfig(4, stop_at_eos=False))
        with pytest.raises(GalaxyError, match="w2"):
            stream.result(60)
        assert stream.generation.tokens == want[:1]  # the first token came from the prefill group


def test_with_recovery_a_decode_device_that_drops_out_mid_request_costs_no_token(servers):
    with two_to_one(servers, DisaggConfig(recover=True)) as engine:
        p = prompts((9,), seed=2)[0]
        want = reference_generate(SRC, p, 24, stop_at_eos=False)
        stream = engine.submit(p, GenerationConfig(24, stop_at_eos=False))
        events = iter(stream)
        got = [next(events).token for _ in range(4)]  # the first from the prefill group, then the decode group's
        assert stream.generation.handoff is not None
        servers.stop(2)
        got += [ev.token for ev in events]
        assert got == want and stream.generation.finish == "length"
        assert engine.prefill.recovered == 1 and "w2" in str(engine.decode.down)
        assert engine.generate(p, GenerationConfig(6, stop_at_eos=False)).tokens == want[:6]  # decoded colocated
