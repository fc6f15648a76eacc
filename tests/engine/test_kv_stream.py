"""A prompt's K/V streamed to the decode group chunk by chunk while its later chunks are prefilled
(engine/kv_stream.py), on in-process ranks: greedy tokens identical to the single-device reference
across head splits (uneven ones, a KV head on two senders, a receiver fed by several senders); the
bytes pulled and not yet pushed never exceed the bound; a box of the wrong shape or dtype ends the
request with a typed error; a push that hangs fails the stream with KVStreamStalled; every block
reserved on the decode group is given back."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.engine.disagg import DisaggConfig, DisaggEngine
from galaxy.engine.engine import EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.kv_stream import StreamConfig
from galaxy.errors import KVStreamStalled, KVTransferError, PlanMismatch
from galaxy.parallel.kv_transfer import box_bytes
from galaxy.parallel.sharding import Strategy
from galaxy.runtime.sources import reference_generate
from tests.engine.test_disagg import CFG, SRC, loaded, prompts, split

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 8  # prompt tokens per prefill step: a prompt of 20 runs in 3 chunks, the first two streamed early
PREFILL = EngineConfig(block_size=4, max_batched_tokens=64, chunk_size=CHUNK, kv_blocks=48)
DECODE = EngineConfig(block_size=8, kv_blocks=24)


@pytest.fixture
def disagg():
    """make(prefill split, decode split, prefill config, decode config, DisaggConfig) -> a DisaggEngine
    on in-process ranks, closed with its executors at the end."""
    made = []

    def make(prefill, decode, pconf, dconf, config=None):
        pe, de = loaded(prefill), loaded(decode)
        made.append((pe, de))
        made.append(DisaggEngine(pe, de, CFG, None, pconf, dconf, config or DisaggConfig(stream=StreamConfig())))
        return made[-1]

    yield make
    for x in reversed(made):
        for c in x if isinstance(x, tuple) else (x,):
            c.close()


def generate_all(engine, ps, n):
    got: list = [None] * len(ps)
    errors: list = [None] * len(ps)

    def ask(i):
        try:
            got[i] = engine.generate(ps[i], GenerationConfig(n, stop_at_eos=False), timeout=120)
        except Exception as e:  # noqa: BLE001 -- the test looks at it
            errors[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return got, errors


def assert_all_given_back(engine):
    """Both groups' pools whole again: the prefill blocks freed after each move, the decode blocks
    of finished sequences and of every reservation."""
    engine.decode._between_steps()  # reservations released since the loop last ran
    for group in (engine.prefill, engine.decode):
        blocks = group.sched.blocks
        assert blocks.num_free == blocks.num_blocks and not group.sched.live
    assert not engine.decode._held and not engine.prefill._kvs


@pytest.mark.parametrize("prefill,decode", [
    ([3, 1, 2], [6]),  # uneven heads over 3 ranks (KV head 1 on two of them) -> one device
    ([1, 2, 3], [4, 2]),  # -> 2 ranks with another split: a sender's heads go to both receivers
    ([5, 1], [2, 2, 2]),  # 2 ranks -> 3: a receiver gathers from two senders
])
def test_streamed_kv_give_the_single_device_reference_tokens_across_head_splits(disagg, prefill, decode):
    ps = prompts((20, 7, 29, 13), seed=6)
    want = [reference_generate(SRC, p, 6, stop_at_eos=False) for p in ps]
    dstrat = Strategy.MEGATRON if len(decode) > 1 else Strategy.GALAXY
    engine = disagg(split(prefill), split(decode, dstrat), PREFILL, DECODE,
                    DisaggConfig(stream=StreamConfig(chunk_bytes=2048, max_inflight_bytes=8192)))
    got, errors = generate_all(engine, ps, 6)
    assert errors == [None] * len(ps)
    assert [g.tokens for g in got] == want
    by_len = {len(p): g.handoff for p, g in zip(ps, got)}
    assert by_len[20].streamed and by_len[29].streamed and not by_len[7].streamed  # 7 tokens: one chunk
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
    if len(decode) == 1:  # every position's K/V reached the one decode device exactly once
        assert [g.handoff.nbytes for g in got] == [len(p) * per_token for p in ps]
    assert all(g.handoff.hidden_s >= 0 and g.handoff.exposed_s >= 0 for g in got)
    moves = engine.load["kv_transfer"]  # the engine's stats: the per-request figures summed
    assert moves["adopted"] == len(ps) and moves["streamed"] == sum(g.handoff.streamed for g in got)
    assert moves["hidden_s"] == pytest.approx(sum(g.handoff.hidden_s for g in got))
    assert moves["inflight_bytes"] == 0
    assert_all_given_back(engine)


class SlowPush:
    """A decode executor whose pushes wait on `gate` (and count what the streamer held meanwhile)."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate = inner, gate
        self.pushes = 0

    def import_kv(self, *args, **kw):
        self.gate.wait(30)
        self.pushes += 1
        return self.inner.import_kv(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_bytes_pulled_and_not_yet_pushed_never_exceed_the_bound(disagg):
    layer = box_bytes(CFG, (0, 1), (0, CFG.n_kv_heads), CHUNK)  # one layer, every KV head, one chunk
    bound = 2 * layer
    engine = disagg(split([2, 4]), split([6]), PREFILL, DECODE,
                    DisaggConfig(stream=StreamConfig(chunk_bytes=layer, max_inflight_bytes=bound)))
    gate = threading.Event()
    streamer = engine.streamer
    streamer.decode = SlowPush(streamer.decode, gate)
    exported = []
    real_export = streamer.prefill.export_kv

    def counting_export(*args, **kw):
        exported.append(streamer.inflight)
        return real_export(*args, **kw)

    streamer.prefill = type("P", (), {"export_kv": staticmethod(counting_export)})()
    p = prompts((40,), seed=7)[0]
    stream = engine.submit(p, GenerationConfig(4, stop_at_eos=False))
    try:  # while no push can finish the exporter stops at the bound: never more than `bound` bytes pulled
        stream.done.wait(1.0)  # time for the exporter to overrun the bound, were it to
        assert 0 < streamer.inflight <= bound and all(held <= bound for held in exported)  # each with its own box
        assert len(exported) <= bound // box_bytes(CFG, (0, 1), (0, 1), 1)  # stopped: not every box of 40 tokens
    finally:
        gate.set()
    assert stream.result(120).tokens == reference_generate(SRC, p, 4, stop_at_eos=False)
    assert 0 < streamer.peak_inflight <= bound and stream.generation.handoff.streamed
    assert_all_given_back(engine)


class Tampering:
    """A prefill executor whose streamed boxes (start > 0) come back changed by `how`."""

    def __init__(self, inner, how):
        self.inner, self.how = inner, how

    def export_kv(self, *args, **kw):
        box = self.inner.export_kv(*args, **kw)
        return self.how(box) if kw.get("start", 0) > 0 else box


@pytest.mark.parametrize("how,match", [
    (lambda box: box[:, :, :, :-1], "shape"),  # a position short
    (lambda box: box.half(), "float16"),  # another dtype
    (lambda box: torch.cat([box, box], dim=0), "shape"),  # layers nobody asked for
])
def test_a_tampered_streamed_box_ends_the_request_with_a_typed_error(disagg, how, match):
    engine = disagg(split([3, 3]), split([6]), PREFILL, DECODE)
    engine.streamer.prefill = Tampering(engine.streamer.prefill, how)
    p = prompts((30,), seed=8)[0]
    with pytest.raises(KVTransferError, match=match):
        engine.generate(p, GenerationConfig(4, stop_at_eos=False), timeout=60)
    assert_all_given_back(engine)
    engine.streamer.prefill = engine.streamer.prefill.inner  # and the next request is served
    q = prompts((21,), seed=9)[0]
    assert engine.generate(q, GenerationConfig(3, stop_at_eos=False)).tokens == reference_generate(SRC, q, 3,
                                                                                                  stop_at_eos=False)


def test_a_push_that_hangs_fails_the_stream_with_a_stall_error_naming_it(disagg):
    engine = disagg(split([4, 2]), split([6]), PREFILL, DECODE,
                    DisaggConfig(stream=StreamConfig(stall_timeout_s=0.5)))
    gate = threading.Event()
    engine.streamer.decode = SlowPush(engine.streamer.decode, gate)
    p = prompts((26,), seed=10)[0]
    try:
        with pytest.raises(KVStreamStalled, match=r"stalled: no box moved for 0\.5 s"):
            engine.generate(p, GenerationConfig(4, stop_at_eos=False), timeout=60)
    finally:
        gate.set()  # the hung push returns; its reservation is given back once it has
    engine.streamer.decode = engine.streamer.decode.inner
    q = prompts((18,), seed=11)[0]
    assert engine.generate(q, GenerationConfig(3, stop_at_eos=False)).tokens == reference_generate(SRC, q, 3,
                                                                                                  stop_at_eos=False)


def test_a_stream_config_is_checked_field_by_field():
    with pytest.raises(PlanMismatch, match="max_inflight_bytes=0"):
        StreamConfig(max_inflight_bytes=0)
    with pytest.raises(PlanMismatch, match="chunk_bytes=4096 exceeds max_inflight_bytes=1024"):
        StreamConfig(chunk_bytes=4096, max_inflight_bytes=1024)
    with pytest.raises(PlanMismatch, match="stall_timeout_s"):
        StreamConfig(stall_timeout_s=0)
    with pytest.raises(PlanMismatch, match="stream="):
        DisaggConfig(stream=True)


def test_with_recovery_a_failed_stream_moves_the_sequence_after_its_prefill_with_the_same_tokens(disagg):
    engine = disagg(split([3, 3]), split([6]), PREFILL, DECODE, DisaggConfig(recover=True, stream=StreamConfig()))
    engine.streamer.prefill = Tampering(engine.streamer.prefill, lambda box: box.half())
    p = prompts((30,), seed=12)[0]
    out = engine.generate(p, GenerationConfig(5, stop_at_eos=False), timeout=60)
    assert out.tokens == reference_generate(SRC, p, 5, stop_at_eos=False)
    assert out.handoff is not None and not out.handoff.streamed  # pulled after the prefill instead
    assert_all_given_back(engine)


def test_a_prompt_preempted_mid_stream_drops_its_stream_and_moves_after_its_prefill(disagg):
    """A (21 tokens) cannot move (the decode pool is too short for it) and decodes on the prefill
    group; at its 25th position it needs a block the prefill pool has not, and the youngest running
    sequence -- B, mid-prompt, streaming in chunks of 2 -- is preempted: its stream is dropped, its
    decode blocks given back, and it runs again later and moves after its prefill."""
    engine = disagg(split([4, 2]), split([6]), EngineConfig(block_size=4, kv_blocks=10),
                    EngineConfig(block_size=4, kv_blocks=5))
    a, b = prompts((21, 16), seed=13)
    sa = engine.submit(a, GenerationConfig(6, stop_at_eos=False))
    sb = engine.submit(b, GenerationConfig(3, stop_at_eos=False, prefill_chunk=2))
    ga, gb = sa.result(120), sb.result(120)
    assert ga.tokens == reference_generate(SRC, a, 6, stop_at_eos=False) and ga.handoff is None
    assert gb.tokens == reference_generate(SRC, b, 3, stop_at_eos=False)
    assert engine.prefill.sched.num_preemptions >= 1 and engine.prefill.dropped_streams == 1
    assert not gb.handoff.streamed
    assert not engine.prefill._unstreamed
    assert_all_given_back(engine)
