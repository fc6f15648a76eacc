"""A device that drops out of a phase-separated placement mid-request: without recovery every request
that needed it ends with a typed error naming the device and the group it served, every block is
freed and nothing waits out a long timeout; with recovery (`connect(recover=True)`) each group
re-plans over its own survivors, or the decode group's sequences go back to the prefill group, and
every request finishes with the single-device reference's greedy tokens.

The K/V move on its default path, direct (each prefill worker sends its boxes to the decode workers:
engine/kv_direct.py), unless a test says `kv_path`: a failure met in the move itself is tried on
both paths -- the direct move's `send_kv` / `kv_destination` and the two-hop `export_kv` / `import_kv`
(`load(kv_path="coordinator")`), the fallback a direct move takes; failures met at a step are the
same on both.

One test kills a `galaxy worker` process (`connect(local=3)`, SIGKILL); the others stop gRPC workers
served from this process (the `servers` fixture: w0, w1, ...), which the coordinator sees the same
way -- the connection refused from then on -- without the seconds each spawned worker takes to
import torch."""

from __future__ import annotations

import threading
import time

import pytest

import galaxy
from galaxy.engine.disagg_faults import phase_error
from galaxy.engine.engine import EngineConfig
from galaxy.errors import CacheLost, InvalidRequest, PeerUnreachable
from galaxy.runtime.sources import reference_generate
from galaxy.transport.worker import WorkerService
from tests.engine.test_disagg import SRC, prompts  # tiny Llama, 3 layers, peaked logits: no near-ties

PS = prompts((5, 13, 8, 19), seed=6)
SMALL_STEPS = EngineConfig(block_size=4, max_batched_tokens=16, kv_blocks=48)  # prompts take several steps
BOUND_S = 30  # every failure is seen within this: a killed worker refuses at once, nothing waits out a timeout


pytestmark = pytest.mark.usefixtures("one_thread")


def awaiting_revocation(engine) -> int:
    """Reservations of direct moves given up on whose receiver has not revoked their tickets (it is gone):
    each still has a call that may write into it."""
    kept = [kvs for _, kvs in engine.decode._releasing]
    assert all(kvs.outstanding > 0 for kvs in kept)
    return len(kept)


def kill_before(kill, executor, method: str, call: int) -> None:
    """Call `kill()` right before the `call`-th `executor.method` from now (deterministic whatever the
    timing: the failure meets that call)."""
    real, calls = getattr(executor, method), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            kill()
        return real(*args, **kwargs)

    setattr(executor, method, wrapped)


def kill_process(session, device: int):
    def kill():
        proc = session._owned.procs[device]
        proc.kill()
        proc.wait(10)

    return kill


def wait_for(cond, what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def no_blocks_held(engine, given_up: int = 0) -> bool:
    """Neither group holds a sequence or a block (prefix-cached blocks count as free), and no K/V wait
    at the coordinator; but `given_up` reservations for direct moves given up on after the reads: they go
    back once the receiver revokes the move's tickets (until then a late box could still land in them)."""
    groups = (engine.prefill, engine.decode)
    kept = [held for held, _ in engine.decode._releasing]
    if len(kept) != given_up:
        return False
    return (all(not g.sched.live and g.sched.blocks.num_free + sum(len(h.block_table) for h in kept) *
                (g is engine.decode) == g.sched.blocks.num_blocks for g in groups)
            and engine.decode.pending_bytes == 0 and not engine.prefill.streams and not engine.decode.streams)


def reference(n: int) -> list[list[int]]:
    return [reference_generate(SRC, p, n, stop_at_eos=False) for p in PS]


# -- without recovery ------------------------------------------------------------------------------


def test_a_decode_worker_process_killed_mid_request_ends_every_request_naming_it_and_its_group():
    with galaxy.connect(local=3) as s:
        lm = s.load(SRC, placement={"prefill": [0, 1], "decode": [2]}, engine=SMALL_STEPS)
        engine = lm.engine
        kill_before(kill_process(s, 2), lm.groups[1], "step", call=3)  # some decoding there, others on their way
        t0 = time.monotonic()
        streams = [lm.submit(p, 12) for p in PS]
        for st in streams:
            with pytest.raises(PeerUnreachable, match=r"in the decode group: device 0 'local2' \(127\.0\.0\.1:"):
                st.result(timeout=BOUND_S)
        assert time.monotonic() - t0 < BOUND_S
        wait_for(lambda: no_blocks_held(engine, awaiting_revocation(engine)), "every other block freed")
        # the placement is fixed without recovery: a later request is prefilled, then fails the same way (its
        # direct move cannot reach the receiver after the reads, so it runs again on the decode group, whose step
        # fails)
        later = lm.submit(PS[0], 6)
        with pytest.raises(PeerUnreachable, match=r"in the decode group: .*'local2'.*during step"):
            later.result(timeout=BOUND_S)
        assert later.generation.tokens == reference(6)[0][:1]  # its first token came from the prefill group
        wait_for(lambda: no_blocks_held(engine, awaiting_revocation(engine)), "every other block freed after the "
                 "later request")


def test_a_prefill_device_killed_mid_request_ends_the_requests_there_and_the_decoding_ones_finish(servers):
    want = reference(24)
    with galaxy.connect(servers.start(3)) as s:
        lm = s.load(SRC, placement={"prefill": [0, 1], "decode": [2]}, engine=SMALL_STEPS)
        engine = lm.engine
        first = lm.submit(PS[0], 24)
        wait_for(lambda: engine.prefill.moved == 1, "the first request to move to the decode group")
        kill_before(lambda: servers.stop(1), lm.groups[0], "step", call=1)  # the next prefill step meets it
        others = [lm.submit(p, 8) for p in PS[1:]]
        t0 = time.monotonic()
        for st in others:
            with pytest.raises(PeerUnreachable, match=r"in the prefill group: device 1 'w1' \(127\.0\.0\.1:"):
                st.result(timeout=BOUND_S)
        assert time.monotonic() - t0 < BOUND_S
        assert first.result(timeout=BOUND_S).tokens == want[0]  # its K/V were on the decode device already
        wait_for(lambda: no_blocks_held(engine), "every block freed")
        with pytest.raises(PeerUnreachable, match=r"in the prefill group: .*'w1'"):
            lm.generate(PS[1], 4)


@pytest.mark.parametrize("kv_path,hook,during", [("direct", "kv_destination", "a request"),
                                                 ("coordinator", "import_kv", "a K/V import")])
def test_a_decode_device_that_freezes_during_a_kv_move_is_declared_gone_by_its_heartbeat(servers, monkeypatch,
                                                                                        kv_path, hook, during):
    """A device whose connection stays open and silent (SIGSTOP, a hung process): the K/V move to it
    is watched by the heartbeat, as a step is, and fails in seconds naming it -- not after the move's
    60 s timeout -- and so does every request that waits for the decode group. Direct: the sender's
    import into it hangs after the reads, the coordinator pings the receiver, gives the move up, and the
    sequence runs again on the decode group, whose step meets the silent device; two hops: the push."""
    frozen, thaw = threading.Event(), threading.Event()
    for rpc in ("ImportKV", "Ping", "Step"):  # w2 stops answering anything, its connection open
        real = getattr(WorkerService, rpc)

        def silent(self, request, context, real=real):
            if self.s.name == "w2" and frozen.is_set():
                thaw.wait(BOUND_S)
            return real(self, request, context)

        monkeypatch.setattr(WorkerService, rpc, silent)
    try:
        with galaxy.connect(servers.start(3)) as s:
            lm = s.load(SRC, placement={"prefill": [0, 1], "decode": [2]}, engine=SMALL_STEPS, kv_path=kv_path)
            engine = lm.engine
            assert lm.groups[1].kv_timeout == 60.0 and engine.kv_path == kv_path
            # a silent device is declared gone after 3 missed pings: 0.75 s on the decode group (w2 alone), 1.5 s on
            # the prefill group, whose pings wait on a direct move's receiver between its own
            lm.groups[0].heartbeat_s, lm.groups[1].heartbeat_s = 0.5, 0.25
            kill_before(frozen.set, lm.groups[1], hook, call=1)
            t0 = time.monotonic()
            streams = [lm.submit(p, 12) for p in PS]
            for st in streams:
                with pytest.raises(PeerUnreachable, match=r"in the decode group: device 0 'w2' .*no heartbeat "
                                                          rf"for 1 s during {during}"):
                    st.result(timeout=BOUND_S)
            assert time.monotonic() - t0 < 15  # the heartbeat's misses, not kv_timeout's 60 s
            # direct: the move given up on keeps its reservation until the receiver revokes its tickets (the silent
            # receiver could still take a late box into it)
            given_up = len(engine.decode._releasing) if kv_path == "direct" else 0
            assert given_up <= len(PS)
            wait_for(lambda: no_blocks_held(engine, given_up), "every other block freed")
            thaw.set()  # before the close: the frozen calls hold w2's server threads, which its release needs
    finally:
        thaw.set()


# -- with recovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_path,group,method,call", [("direct", 1, "step", 3), ("direct", 0, "send_kv", 2),
                                                      ("coordinator", 1, "import_kv", 2)])
def test_with_recovery_a_decode_device_killed_mid_request_replans_the_decode_group_and_costs_no_token(
        servers, kv_path, group, method, call):
    """Decode on two devices, tensor-parallel; one killed before a decode step, or in the middle of
    moving a sequence's K/V (a prefill device sending it one hop, or the coordinator pushing it): the
    decode group re-plans over the other, its sequences and those on their way are prefilled again there
    (prompt and tokens so far), and every request gets the reference's tokens."""
    want = reference(12)
    with galaxy.connect(servers.start(4), recover=True) as s:
        lm = s.load(SRC, placement={"prefill": [0, 1], "decode": [2, 3]}, engine=SMALL_STEPS, kv_path=kv_path)
        engine, dec = lm.engine, lm.groups[1]
        kill_before(lambda: servers.stop(3), lm.groups[group], method, call=call)
        streams = [lm.submit(p, 12) for p in PS]
        assert [st.result(timeout=BOUND_S).tokens for st in streams] == want
        assert dec.events[-1].kind == "recover" and "w3" in dec.events[-1].detail
        assert dec.partition.world == 1 and engine.decode.down is None  # it decodes on, on w2 alone
        assert engine.prefill.recovered == 0  # none went back to the prefill group
        adopted = engine.decode.adopted
        assert lm.generate(PS[1], 12, details=True).tokens == want[1]
        assert engine.decode.adopted == adopted + 1  # later requests: still disaggregated
        wait_for(lambda: no_blocks_held(engine), "every block freed")


@pytest.mark.parametrize("kv_path,method,call", [("direct", "step", 2), ("direct", "send_kv", 2),
                                                 ("coordinator", "export_kv", 2)])
def test_with_recovery_a_prefill_device_killed_mid_request_replans_the_prefill_group(servers, kv_path, method, call):
    """Prefill on two devices; one killed before a prefill step, or while a sequence's K/V are sent (one
    hop) or pulled (two): the prefill group re-plans over the other and runs its sequences again there;
    what moved already decodes on untouched; every request gets the reference's tokens."""
    want = reference(12)
    with galaxy.connect(servers.start(3), recover=True) as s:
        lm = s.load(SRC, placement={"prefill": [0, 1], "decode": [2]}, engine=SMALL_STEPS, kv_path=kv_path)
        engine, pre = lm.engine, lm.groups[0]
        kill_before(lambda: servers.stop(0), pre, method, call=call)
        streams = [lm.submit(p, 12) for p in PS]
        assert [st.result(timeout=BOUND_S).tokens for st in streams] == want
        assert pre.events[-1].kind == "recover" and "w0" in pre.events[-1].detail
        assert pre.partition.world == 1 and engine.prefill.moved == len(PS)  # all decoded on the decode group
        assert lm.generate(PS[2], 12, details=True).tokens == want[2]
        wait_for(lambda: no_blocks_held(engine), "every block freed")


def test_with_recovery_a_prefill_group_left_without_a_device_hands_its_sequences_to_the_decode_group(servers):
    """Prefill on one device, which dies mid-prompt: no survivor to re-plan over, so the sequences it
    held run all their tokens again on the decode group, which from then on prefills and decodes every
    request (colocated); those that had moved decode on. All get the reference's tokens."""
    want = reference(12)
    with galaxy.connect(servers.start(2), recover=True) as s:
        lm = s.load(SRC, placement={"prefill": [0], "decode": [1]}, engine=SMALL_STEPS)
        engine = lm.engine
        kill_before(lambda: servers.stop(0), lm.groups[0], "step", call=2)
        streams = [lm.submit(p, 12) for p in PS]
        assert [st.result(timeout=BOUND_S).tokens for st in streams] == want
        assert "in the prefill group" in str(engine.prefill.down) and "w0" in str(engine.prefill.down)
        assert engine.decode.taken_over >= 1 and engine.decode.down is None
        assert lm.generate(PS[1], 12, details=True).tokens == want[1]
        assert engine.load["taken_over"] == engine.decode.taken_over and engine.load["prefill_down"]
        wait_for(lambda: no_blocks_held(engine), "every block freed")


def test_with_recovery_a_device_in_both_groups_killed_leaves_the_prefill_survivors_serving_colocated(servers):
    """A mixed placement: w1 prefills and decodes. When it dies, the decode group has no survivor,
    so its sequences go back to the prefill group, which re-plans over w0 and from then on prefills
    and decodes every request (colocated) -- with the reference's tokens."""
    want = reference(12)
    with galaxy.connect(servers.start(2), recover=True) as s:
        lm = s.load(SRC, placement={"prefill": [0, 1], "decode": [1]}, engine=SMALL_STEPS)
        engine, pre = lm.engine, lm.groups[0]
        kill_before(lambda: servers.stop(1), lm.groups[1], "step", call=3)
        streams = [lm.submit(p, 12) for p in PS]
        assert [st.result(timeout=BOUND_S).tokens for st in streams] == want
        assert "in the decode group" in str(engine.decode.down) and "w1" in str(engine.decode.down)
        assert engine.prefill.recovered >= 1 and pre.partition.world == 1 and pre.events[-1].kind == "recover"
        moved = engine.prefill.moved
        assert lm.generate(PS[3], 12, details=True).tokens == want[3] and engine.prefill.moved == moved
        wait_for(lambda: no_blocks_held(engine), "every block freed")


def test_phase_error_keeps_the_type_and_cause_and_tells_the_group_once():
    e = PeerUnreachable("device 0 'w2' (10.0.0.2:5000): unreachable during step")
    told = phase_error(e, "decode")
    assert type(told) is PeerUnreachable and told.__cause__ is e
    assert str(told) == "in the decode group: device 0 'w2' (10.0.0.2:5000): unreachable during step"
    assert phase_error(told, "prefill") is told  # told once, by the group it hit
    bad = InvalidRequest("prompt is empty")
    assert phase_error(bad, "prefill") is bad  # the request's own fault: no device to name
    assert isinstance(phase_error(CacheLost("re-planned"), "prefill"), CacheLost)
    with pytest.raises(ValueError, match="phase='both'"):
        phase_error(e, "both")
