"""Direct K/V moves (engine/kv_direct.py, transport/kv_ticket.py): each prefill worker sends its boxes
straight to the decode workers with the coordinator's ticket (greedy tokens against the reference over
worker processes, crossing splits and a leased prefix: tests/transport/test_disagg_workers.py). A forged,
altered, replayed or mismatched ticket and a box of the wrong size are refused with KVTransferError, the
pool untouched; a receiver the sender cannot reach (after the prefill group freed the blocks) makes the
sequence run again on the decode group, with the same tokens and without waiting for a timeout; a
sender or receiver gone ends the request naming it and its group."""

from __future__ import annotations

import time
from contextlib import contextmanager

import grpc
import pytest
import torch

import galaxy
from galaxy.engine.disagg import DisaggConfig, DisaggEngine
from galaxy.engine.engine import EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.kv_direct import DirectConfig
from galaxy.errors import GalaxyError, InvalidRequest, KVDirectFailed, KVTransferError
from galaxy.parallel.rank import KVPool
from galaxy.runtime.sources import reference_generate
from galaxy.transport import kv_ticket
from galaxy.transport.channels import open_channel
from galaxy.transport.client import Cluster, KVDestination, ModelRef
from galaxy.transport.protocol import kv_box_to_proto, metadata
from galaxy.transport.security import COORDINATOR, TlsFiles, init_keys
from galaxy.transport.worker import WorkerService
from galaxy.v1 import worker_pb2 as pb
from galaxy.v1 import worker_pb2_grpc as pb_grpc
from tests.engine.test_disagg import CFG, SRC, prompts, split

REF = ModelRef(CFG, random_init=True, seed=SRC.seed, std=SRC.std)
LAYERS = (0, CFG.n_layers)


def _ticketed(dec: Cluster, pre: Cluster, table=(1, 2), tokens=10, start=0) -> tuple[KVDestination, torch.Tensor]:
    dest = dec.kv_destination(0, table, tokens, LAYERS, (0, 2), KVPool(4, 8), start, pre.session_id, 0)
    return dest, torch.randn(CFG.n_layers, 2, CFG.n_kv_heads, tokens - start, CFG.head_dim)


def _import(dec: Cluster, dest: KVDestination, box: torch.Tensor, table=(1, 2), tokens=10, ticket=None):
    msg = kv_box_to_proto(dec.session_id, table, tokens, LAYERS, (0, 2), KVPool(4, 8), box)
    msg.ticket.CopyFrom(ticket or dest.ticket)
    return dec._kv_call(0, "ImportKV", msg, "K/V import")


@contextmanager
def _two_groups(servers):
    """A prefill and a decode session of one worker each, under the cluster token: (pre, dec, their addresses)."""
    addrs = servers.start(2, token="s3cret")
    with Cluster(addrs[:1], token="s3cret") as pre, Cluster(addrs[1:], token="s3cret") as dec:
        pre.load_ref(REF, split([6]))
        dec.load_ref(REF, split([6]))
        yield pre, dec, addrs


def test_a_forged_altered_replayed_or_mismatched_ticket_and_a_wrong_size_box_are_refused(servers):
    with _two_groups(servers) as (pre, dec, _):
        pool = KVPool(4, 8)
        zero = torch.zeros(CFG.n_layers, 2, CFG.n_kv_heads, 10, CFG.head_dim)
        dec.import_kv(0, (1, 2), zero, LAYERS, (0, 2), pool)  # the coordinator's own import: no ticket needed

        dest, box = _ticketed(dec, pre)
        forged = pb.KVTicket()
        forged.CopyFrom(dest.ticket)
        forged.mac = bytes(32)
        with pytest.raises(KVTransferError, match="w1.*did not sign"):
            _import(dec, dest, box, ticket=forged)
        altered = pb.KVTicket()
        altered.CopyFrom(dest.ticket)
        altered.block_table[:] = [2, 3]  # signed for blocks 1, 2
        with pytest.raises(KVTransferError, match="w1.*did not sign"):
            _import(dec, dest, box, table=(2, 3), ticket=altered)
        with pytest.raises(KVTransferError, match="w1.*block_table is \\[2, 3\\], the ticket says \\[1, 2\\]"):
            _import(dec, dest, box, table=(2, 3))  # a valid ticket for other blocks
        with pytest.raises(KVTransferError, match="w1.*nbytes"):  # a box a position short of its ticket's
            _import(dec, dest, box[:, :, :, 1:], tokens=10)
        with pytest.raises(KVTransferError, match="w1.*dtype"):
            _import(dec, dest, box.half())
        other, _ = _ticketed(dec, pre)
        stale = pb.KVTicket()  # signed with the token but another load's key (a worker of another session)
        stale.CopyFrom(other.ticket)
        stale.mac = kv_ticket._mac("s3cret", kv_ticket.new_key(), stale)
        with pytest.raises(KVTransferError, match="w1.*did not sign"):
            _import(dec, other, box, ticket=stale)
        assert torch.equal(dec.export_kv(0, (1, 2), 10, LAYERS, (0, 2), pool), zero)  # nothing written

        _import(dec, other, box)  # a good one lands once
        assert torch.equal(dec.export_kv(0, (1, 2), 10, LAYERS, (0, 2), pool), box)
        with pytest.raises(KVTransferError, match="w1.*used before"):
            _import(dec, other, box + 1)
        assert torch.equal(dec.export_kv(0, (1, 2), 10, LAYERS, (0, 2), pool), box)

        # through the sender: w0 reads its box and sends it; a ticket for another shape is refused by the sender
        pre.import_kv(0, (0, 3), box, LAYERS, (0, 2), pool)
        dest, _ = _ticketed(dec, pre, table=(3, 1))
        assert pre.send_kv(0, (0, 3), 10, LAYERS, (0, 2), pool, dest)[0] == box.numel() * 4
        assert torch.equal(dec.export_kv(0, (3, 1), 10, LAYERS, (0, 2), pool), box)
        short, _ = _ticketed(dec, pre, tokens=9)
        with pytest.raises(KVTransferError, match="w0.*does not match its ticket"):
            pre.send_kv(0, (0, 3), 10, LAYERS, (0, 2), pool, short)

        # a move the coordinator gave up on (its sender lost mid-send): once its ticket is revoked at the receiver,
        # nothing of it lands there any more, so its blocks may be reused at once
        late, _ = _ticketed(dec, pre, table=(3, 1))
        # a revocation that could flush the receiver's nonce log (too many, or not nonces) revokes nothing
        with pytest.raises(KVTransferError, match="w1.*revocation refused: 1025 nonces"):
            dec.revoke_kv(0, [bytes(16)] * 1025)
        with pytest.raises(KVTransferError, match="w1.*revocation refused: 2 nonces .* 1 not 16 bytes"):
            dec.revoke_kv(0, [late.ticket.nonce, b"short"])
        dec.revoke_kv(0, [late.ticket.nonce])
        with pytest.raises(KVTransferError, match="w1.*used before"):
            _import(dec, late, box + 2, table=(3, 1))
        assert torch.equal(dec.export_kv(0, (3, 1), 10, LAYERS, (0, 2), pool), box)


def test_a_receiver_the_sender_cannot_reach_runs_the_sequence_again_on_the_decode_group(servers, monkeypatch):
    addrs = servers.start(3)
    with Cluster(addrs[:2]) as pre, Cluster(addrs[2:]) as dec:
        pre.load_ref(REF, split([2, 4]))
        dec.load_ref(REF, split([6]))
        real = dec.kv_destination

        def unreachable(*args, **kwargs):  # the address the coordinator knows is one the prefill workers cannot reach
            d = real(*args, **kwargs)
            return KVDestination("127.0.0.1:9", d.ticket, d.name, d.gone, d.receipt_ok)

        monkeypatch.setattr(dec, "kv_destination", unreachable)
        engine = DisaggEngine(pre, dec, CFG, None, EngineConfig(block_size=4, kv_blocks=32),
                              EngineConfig(block_size=4, kv_blocks=32), DisaggConfig(direct=DirectConfig()))
        try:
            p = prompts((9,), seed=3)[0]
            t0 = time.perf_counter()
            g = engine.generate(p, GenerationConfig(5, stop_at_eos=False))
            took = time.perf_counter() - t0
            load = engine.load
            held = len(engine.decode._held)
        finally:
            engine.close()
    assert g.tokens == reference_generate(SRC, p, 5, stop_at_eos=False)
    assert g.handoff is None and load["kv_transfer"]["direct_fell_back"] == 1  # not moved: computed there
    assert took < 30  # refused at once, not after the 60 s K/V timeout
    assert held == 0  # the blocks reserved for the failed move went back


@pytest.mark.parametrize("stopped,group", [(0, "prefill"), (2, "decode")])
def test_a_sender_or_receiver_gone_during_a_direct_move_ends_the_request_naming_it_and_its_group(
        servers, stopped, group):
    """The sender (a prefill worker) gone before it read its box: the move fails as a pull would, naming it
    in the prefill group. The receiver gone: the sender cannot reach it, the sequence runs again on the
    decode group, whose step fails naming it in the decode group. Both at once, not after a timeout; no
    block held on either group but the receiver's reservation, which goes back only once the receiver
    revokes the move's ticket (the sender's word that it could not deliver is not proof)."""
    addrs = servers.start(3)
    with Cluster(addrs[:2]) as pre, Cluster(addrs[2:]) as dec:
        pre.load_ref(REF, split([2, 4]))
        dec.load_ref(REF, split([6]))
        engine = DisaggEngine(pre, dec, CFG, None, EngineConfig(block_size=4, kv_blocks=32),
                              EngineConfig(block_size=4, kv_blocks=32), DisaggConfig(direct=DirectConfig()))
        try:
            real = pre.send_kv

            def stop_then_send(*args, **kwargs):
                servers.stop(stopped)
                return real(*args, **kwargs)

            pre.send_kv = stop_then_send
            p = prompts((9,), seed=4)[0]
            t0 = time.perf_counter()
            stream = engine.submit(p, GenerationConfig(4, stop_at_eos=False))
            with pytest.raises(GalaxyError, match=rf"in the {group} group: .*'w{stopped}'"):
                stream.result(30)
            took = time.perf_counter() - t0
            assert stream.generation.tokens == reference_generate(SRC, p, 1, stop_at_eos=False)
            kept = {held for held, _ in engine.decode._releasing} if stopped == 2 else set()
            deadline = time.monotonic() + 10
            while (engine.prefill.sched.live or engine.decode.sched.live or set(engine.decode._held) != kept) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert set(engine.decode._held) == kept and len(kept) == (stopped == 2)
            assert not engine.prefill.sched.live and not engine.decode.sched.live
        finally:
            engine.close()
    assert took < 20


def test_over_mutual_tls_a_direct_move_lands_and_a_device_without_a_ticket_is_refused(servers, tmp_path):
    """With mutual TLS the receiver knows who calls: the coordinator's own import needs no ticket, a device's
    does (its certificate names it), and only the coordinator may revoke a ticket; the direct move, worker to
    worker over TLS, lands."""
    init_keys(tmp_path, ["w0", "w1"])
    addrs = [servers.start(1, tls=TlsFiles.load(tmp_path, f"w{i}"))[0] for i in range(2)]
    coord = TlsFiles.load(tmp_path, COORDINATOR)
    with Cluster(addrs[:1], tls=coord) as pre, Cluster(addrs[1:], tls=coord) as dec:
        pre.load_ref(REF, split([6]))
        dec.load_ref(REF, split([6]))
        pool = KVPool(4, 8)
        box = torch.randn(CFG.n_layers, 2, CFG.n_kv_heads, 10, CFG.head_dim)
        pre.import_kv(0, (0, 3), box, LAYERS, (0, 2), pool)
        dest, _ = _ticketed(dec, pre, table=(3, 1))
        pre.send_kv(0, (0, 3), 10, LAYERS, (0, 2), pool, dest)
        assert torch.equal(dec.export_kv(0, (3, 1), 10, LAYERS, (0, 2), pool), box)
        device = Cluster(addrs[1:], tls=TlsFiles.load(tmp_path, "w0"))  # a prefill device's identity; not closed
        device.session_id, device.partition, device.config = dec.session_id, dec.partition, dec.config  # (a close
        try:  # would release the decode session)
            with pytest.raises(KVTransferError, match="not the coordinator, without the coordinator's ticket"):
                device.import_kv(0, (3, 1), box + 1, LAYERS, (0, 2), pool)
            spare, _ = _ticketed(dec, pre, table=(3, 1))  # nor may a device spend the coordinator's tickets
            with pytest.raises(KVTransferError, match="revoked by a device, not the coordinator"):
                device.revoke_kv(0, [spare.ticket.nonce])
            pre.send_kv(0, (0, 3), 10, LAYERS, (0, 2), pool, spare)  # still good: the refused revocation spent nothing
        finally:
            for ch in device.channels:
                ch.close()
        assert torch.equal(dec.export_kv(0, (3, 1), 10, LAYERS, (0, 2), pool), box)


def test_the_kv_path_is_direct_between_workers_by_default_and_one_switch_picks_either(servers):
    """`load(kv_path=...)` (`galaxy serve --kv-path`): direct by default where both groups are workers, the
    coordinator's two hops when asked; in-process groups have no hop to save and go through the coordinator.
    The same greedy tokens either way."""
    p = prompts((9,), seed=5)[0]
    want = reference_generate(SRC, p, 4, stop_at_eos=False)
    placement = {"prefill": [0], "decode": [1]}
    with galaxy.connect(servers.start(2)) as s:
        for asked, taken in ((None, "direct"), ("coordinator", "coordinator"), ("direct", "direct")):
            lm = s.load(SRC, placement=placement, kv_path=asked, engine=EngineConfig(block_size=4, kv_blocks=32))
            assert lm.generate(p, 4, details=True).tokens == want
            assert lm.engine.kv_path == taken and lm.engine.load["kv_transfer"]["path"] == taken
            assert lm.engine.load["kv_transfer"]["direct"] == (taken == "direct")
        with pytest.raises(InvalidRequest, match="kv_path"):
            s.load(SRC, placement=placement, kv_path="pigeon")
    with galaxy.connect(local=2, transport="inproc") as s:
        lm = s.load(SRC, placement=placement, kv_path="direct")
        assert lm.engine.kv_path == "coordinator" and lm.generate(p, 4, details=True).tokens == want


def test_a_sender_that_claims_an_import_it_did_not_do_is_caught_and_its_late_box_refused_once_revoked(
        servers, monkeypatch):
    """A prefill worker (holding the cluster token, so authenticated) that answers SendKV as if the box were in
    without importing it, meaning to deliver it later -- with no gRPC deadline, which grpcio reports as years
    left, into blocks the coordinator reused meanwhile. The coordinator takes an import as done only with the
    receiver's receipt, which the sender cannot make: without it the move fails, and the revocation that must
    come before its blocks go back spends the ticket, so the late box is refused and the pool keeps its bytes."""
    held, honest_send = [], WorkerService.SendKV

    def liar(self, request, context):  # once told to: keeps the box instead of sending it, says it is in
        if not held:
            yield from honest_send(self, request, context)
            return
        held.append(request.ticket)
        yield pb.KVReply(seconds=0.0, bytes=request.ticket.nbytes)
        yield pb.KVReply(seconds=0.0, bytes=request.ticket.nbytes, send_s=0.0)

    monkeypatch.setattr(WorkerService, "SendKV", liar)  # (before the servers start: they bind their handlers)
    with _two_groups(servers) as (pre, dec, addrs):
        pool = KVPool(4, 8)
        box = torch.randn(CFG.n_layers, 2, CFG.n_kv_heads, 10, CFG.head_dim)
        pre.import_kv(0, (0, 3), box, LAYERS, (0, 2), pool)
        honest, _ = _ticketed(dec, pre, table=(3, 1))
        assert pre.send_kv(0, (0, 3), 10, LAYERS, (0, 2), pool, honest)[0] == box.numel() * 4  # receipt checked
        held.append("lie from now on")
        late, _ = _ticketed(dec, pre, table=(3, 1))
        with pytest.raises(KVDirectFailed, match="'w0'.* -> .*'w1'.*without the receiver's receipt"):
            pre.send_kv(0, (0, 3), 10, LAYERS, (0, 2), pool, late)
        dec.revoke_kv(0, [late.ticket.nonce])  # what kv_direct does before the blocks go back
        msg = kv_box_to_proto(dec.session_id, (3, 1), 10, LAYERS, (0, 2), pool, box + 1)
        msg.ticket.CopyFrom(held[1])
        with pytest.raises(grpc.RpcError, match="used before"):  # no deadline: only the spent nonce stops it
            pb_grpc.WorkerStub(open_channel(addrs[1], None)).ImportKV(msg, metadata=metadata("s3cret",
                                                                                               dec.session_id))
        assert torch.equal(dec.export_kv(0, (3, 1), 10, LAYERS, (0, 2), pool), box)
