"""Tickets for direct K/V moves: the coordinator's authorization of one box going from a worker of one
session (the prefill group) straight into a worker of another (the decode group).

Phase-separated serving moves a sequence's K/V from the prefill workers to the decode workers
(engine/disagg.py). Through the coordinator the bytes cross the links twice; moved directly, once.
But the two workers belong to different sessions -- two `Cluster`s, each loaded by the coordinator --
so neither knows the other, and the data plane's handshake (datalink.py: a connection bound to one
session and one sender rank of it) does not apply. What the receiver must know before it writes a
byte into its KV pool: that the coordinator, which owns both sessions' block managers, asked for
exactly this box, into exactly these blocks, once.

Why a ticket and not a standing credential:
- The cluster token alone would let any worker write into any other session's pool (every worker
  holds the token). A ticket is keyed by the token *and* a per-load secret that the coordinator
  gave only the receiving session's workers (`LoadRequest.kv_ticket_key`, over the authenticated
  control channel): the sender carries it but cannot make one, so a prefill worker can deliver only
  the boxes the coordinator asked for.
- It names everything the receiver would otherwise have to trust the sender about: both sessions and
  ranks, the layers, KV heads and positions of the box, the receiver's block table and pool, the dtype
  and byte size. The receiver checks the box it gets against the ticket (shape, dtype, bytes), the
  ticket's MAC, then the box against its shard and pool as any import (parallel/kv_transfer.py).
- A fresh 16-byte nonce makes it single-use: the receiver remembers the nonces of its session
  (`NonceLog`, bounded) and refuses one seen before.
- The blocks a ticket names go back to the coordinator's pool only once the nonce is known spent at the
  receiver: by a `receipt` (an HMAC of the nonce only the receiving session and the coordinator can make,
  returned by the receiver's import and forwarded by the sender), or by a revocation the receiver
  answered (ImportKV.revoke_nonces, under its K/V lock). Not by a deadline: the only deadline the
  receiver sees is the one its caller -- the sender -- set (grpcio gives a call without one a time left
  of years), so a misbehaving sender could deliver late into blocks reused since; nor by a sender's word
  that the import happened. No clock is compared between devices.

HMAC-SHA256 over a canonical JSON of the fields; compared in constant time. Against an attacker who
can read the LAN, use TLS as for every other call (a ticket authorizes; it does not encrypt).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict

from ..errors import KVTransferError
from ..v1 import worker_pb2 as pb

NONCE_BYTES = 16
# nonces one revocation may carry: a given-up move revokes one ticket per box it sent (a handful); a request
# of more would push the log's older nonces out of its window (NonceLog.capacity) and let their tickets replay
MAX_REVOKE = 1024
KEY_BYTES = 32
_FIELDS = ("src_session", "src_rank", "dst_session", "dst_rank", "block_table", "num_blocks", "block_size", "start",
           "num_tokens", "layer_lo", "layer_hi", "head_lo", "head_hi", "dtype", "nbytes", "nonce")


def new_key() -> bytes:
    """A per-load secret for one session's workers (LoadRequest.kv_ticket_key)."""
    return secrets.token_bytes(KEY_BYTES)


def _signing_key(token: str | None, key: bytes) -> bytes:
    # the cluster token and the session's secret, both: neither a token holder nor a key holder alone signs
    return hmac.new((token or "").encode(), b"galaxy-kv-ticket|" + key, hashlib.sha256).digest()


def _mac(token: str | None, key: bytes, t: pb.KVTicket) -> bytes:
    fields = [list(getattr(t, f)) if f == "block_table" else getattr(t, f) for f in _FIELDS]
    fields[_FIELDS.index("nonce")] = t.nonce.hex()
    msg = json.dumps(fields, separators=(",", ":")).encode()
    return hmac.new(_signing_key(token, key), msg, hashlib.sha256).digest()


def receipt(token: str | None, key: bytes, nonce: bytes) -> bytes:
    """The receiver's proof that it imported the box of the ticket with `nonce` (spent it): what lets the
    coordinator give the ticket's blocks back without a revocation. The sender forwards it but cannot make one
    (it lacks the key), so it cannot claim an import it did not do and deliver the box later."""
    return hmac.new(_signing_key(token, key), b"galaxy-kv-receipt|" + nonce, hashlib.sha256).digest()


def receipt_ok(token: str | None, key: bytes, ticket: pb.KVTicket, got: bytes) -> bool:
    """Whether `got` is the receiver's receipt for `ticket` (compared in constant time)."""
    return len(got) == 32 and hmac.compare_digest(got, receipt(token, key, ticket.nonce))


def issue(token: str | None, key: bytes, **fields) -> pb.KVTicket:
    """A signed ticket of `fields` (KVTicket's, but nonce and mac: drawn and computed here)."""
    if len(key) != KEY_BYTES:
        raise KVTransferError(f"a ticket key of {len(key)} bytes (expected {KEY_BYTES}): the receiving session "
                              "was loaded without one")
    t = pb.KVTicket(**fields, nonce=secrets.token_bytes(NONCE_BYTES))
    t.mac = _mac(token, key, t)
    return t


class NonceLog:
    """The nonces of tickets a session has accepted, the latest `capacity` of them: a replayed ticket
    is refused. A ticket is spent at the import that accepts it, which the coordinator sends once."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def spend(self, nonce: bytes, who: str) -> None:
        if nonce in self._seen:
            raise KVTransferError(f"{who}: a K/V ticket used before (replayed nonce {nonce.hex()[:8]}…)")
        self.revoke(nonce)

    def revoke(self, nonce: bytes) -> None:
        """Count `nonce` as spent, whether or not its ticket came: a move the coordinator gave up on (its
        sender lost mid-send) can then no longer land in blocks it gives back (ImportKV.revoke_nonces)."""
        self._seen[nonce] = None
        self._seen.move_to_end(nonce)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


def verify(token: str | None, key: bytes, session_id: str, rank: int, box: pb.KVBox, dtype: int, nbytes: int,
           nonces: NonceLog, who: str = "device") -> None:
    """Refuse (KVTransferError) an ImportKV whose ticket is not the coordinator's for exactly this box
    into exactly this session, rank, blocks and pool, of this dtype and size, or was used before."""
    t = box.ticket
    if not key:
        raise KVTransferError(f"{who}: a direct K/V move into a session loaded without a ticket key")
    if len(t.mac) != 32 or not hmac.compare_digest(t.mac, _mac(token, key, t)):
        raise KVTransferError(f"{who}: a K/V ticket that the coordinator did not sign (forged, altered, or for "
                              "another load of this session)")
    if len(t.nonce) != NONCE_BYTES:
        raise KVTransferError(f"{who}: a K/V ticket with a {len(t.nonce)}-byte nonce")
    want = {"dst_session": session_id, "dst_rank": rank, "block_table": list(box.block_table),
            "num_blocks": box.num_blocks, "block_size": box.block_size, "start": box.start,
            "num_tokens": box.num_tokens, "layer_lo": box.layer_lo, "layer_hi": box.layer_hi, "head_lo": box.head_lo,
            "head_hi": box.head_hi, "dtype": dtype, "nbytes": nbytes}
    for f, v in want.items():
        got = list(getattr(t, f)) if f == "block_table" else getattr(t, f)
        if got != v:
            raise KVTransferError(f"{who}: the K/V box does not match its ticket: {f} is {v!r}, the ticket says "
                                  f"{got!r}")
    nonces.spend(t.nonce, who)
