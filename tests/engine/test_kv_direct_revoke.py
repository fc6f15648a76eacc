"""When a direct K/V move's reserved blocks go back (engine/kv_direct.py): only once the receiver's own word
says the move's ticket is spent -- never after a deadline, which only the sender sets. Fake executors, no
workers: the sender given up on with its receiver silent, whose revocations fail until it answers."""

from __future__ import annotations

import time
from types import SimpleNamespace

from galaxy.engine.kv_direct import DirectConfig, DirectMove, DirectSender
from galaxy.errors import KVDirectFailed, PeerUnreachable
from galaxy.parallel.kv_transfer import KVPiece
from galaxy.parallel.rank import KVPool


class _Sender:
    """A prefill executor whose send reads the box, then is given up on: its receiver missed its pings."""

    session_id = "prefill"

    def send_kv(self, rank, table, tokens, layers, heads, pool, dest, on_read=None):
        on_read()
        err = KVDirectFailed("w1: no heartbeat during a direct K/V move")
        err.receiver_silent = True
        raise err


class _Receiver:
    """A decode executor whose receiver does not answer a revocation until `answers` is set."""

    session_id = "decode"

    def __init__(self):
        self.answers, self.revoked = False, []

    def kv_destination(self, rank, table, tokens, layers, heads, pool, start, src_session, src_rank):
        return SimpleNamespace(ticket=SimpleNamespace(nonce=b"n" * 16, dst_session=self.session_id), name="w1")

    def revoke_kv(self, rank, nonces):
        if not self.answers:
            raise PeerUnreachable("w1: unreachable during a K/V ticket revocation")
        self.revoked += nonces


def _given_up(receiver: _Receiver, prefill=None) -> tuple[DirectSender, DirectMove]:
    """A one-box move into `receiver` whose send was given up on after its read (by `prefill`: _Sender's)."""
    sender = DirectSender(prefill or _Sender(), receiver, DirectConfig(revoke_every_s=0.05))
    move = DirectMove()
    sender.send(move, [(KVPiece(0, 0, (0, 2), (0, 2)), 64)], (0,), 4, KVPool(4, 4), (1,), KVPool(4, 4))
    return sender, move


def _wait(cond) -> None:
    deadline = time.monotonic() + 5
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def _held_until_the_receiver_answers(sender: DirectSender, move: DirectMove, receiver: _Receiver, asking_s: float):
    """The move fails over at once; its blocks stay held while the revocations go unanswered, however they fail,
    and go back once the receiver revokes the ticket."""
    _wait(lambda: move.error is not None)
    assert isinstance(move.error, KVDirectFailed)
    time.sleep(asking_s)  # rounds of asking: held all along (no deadline frees it), the revoke thread alive
    assert move.outstanding == 1 and receiver.revoked == [] and sender._revoker.is_alive()
    receiver.answers = True
    _wait(lambda: not move.outstanding)
    assert move.outstanding == 0 and receiver.revoked == [b"n" * 16]


def test_a_move_given_up_on_keeps_its_blocks_until_the_receiver_revokes_its_ticket_not_until_a_deadline():
    receiver = _Receiver()
    sender, move = _given_up(receiver)
    try:
        _held_until_the_receiver_answers(sender, move, receiver, 0.5)  # ten rounds of asking
    finally:
        sender.close()


def test_a_move_into_a_decode_group_loaded_again_gives_its_blocks_back_without_a_revocation():
    """A re-plan re-made the pool the blocks were in: nothing of the old one is handed out again."""
    receiver = _Receiver()
    sender, move = _given_up(receiver)
    try:
        time.sleep(0.2)
        assert move.outstanding == 1
        receiver.session_id = "decode, re-planned"
        _wait(lambda: not move.outstanding)
        assert move.outstanding == 0 and receiver.revoked == []
    finally:
        sender.close()


class _Refused(_Sender):
    """A send the receiver refused after the read (not silent): the sender asks for a revocation at once."""

    def send_kv(self, rank, table, tokens, layers, heads, pool, dest, on_read=None):
        on_read()
        raise KVDirectFailed("w0 -> w1: the receiver refused the box")


class _Raising(_Receiver):
    """A revocation that raises something other than a GalaxyError (a bug, an untranslated RPC error) until it
    answers."""

    def revoke_kv(self, rank, nonces):
        if not self.answers:
            raise RuntimeError("an untranslated error from the revocation's call")
        self.revoked += nonces


def test_a_revocation_that_raises_an_unexpected_error_is_asked_again_and_the_move_still_fails_over():
    receiver = _Raising()
    sender, move = _given_up(receiver, _Refused())  # asked at once (not silent), and raised
    try:
        _held_until_the_receiver_answers(sender, move, receiver, 0.2)
    finally:
        sender.close()
