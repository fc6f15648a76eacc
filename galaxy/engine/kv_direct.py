"""A sequence's K/V moved in one hop: each prefill device sends its boxes straight to the decode devices.

Moved through the coordinator (engine/disagg.py's first increment), a sequence's K/V cross the links
twice -- pulled from the prefill workers, then pushed to the decode workers -- store and forward: the
push starts when the pull has ended. Here the coordinator only authorizes: for every box of the
transfer plan (KVMover.plan: re-sharded by layer and KV-head ranges from the prefill split to the
decode split) it asks the decode executor for a ticket naming that box and the blocks it goes into
(transport/kv_ticket.py) and asks the prefill device holding it to send it there (`Executor.send_kv`:
the sender reads the box from its pool and imports it into the receiver with the ticket). The bytes go
once, sender to receiver.

Why push by the sender, not pull by the receiver: the sender is the one whose blocks must stay put
while they are read, and the prefill engine already owns that moment (between its steps, before it
frees the sequence's blocks), exactly as for a pull today; the receiver's blocks are reserved up front
(DecodeEngine.reserve_move) and no step touches them until the sequence is adopted, so the receiver
need not be in any particular state when the box lands. A pull by the receiver would have the decode
loop reach back into the prefill group's pool at a time the prefill loop does not control, which
needs the prefill blocks pinned across both loops.

Overlapped: `send_kv` answers once the sender has read its box (a copy, under its lock) and again once
the receiver has imported it. `DirectSender.send` returns when every box is read, so the prefill engine
frees the sequence's blocks and steps on while the boxes travel; the decode engine adopts the sequence
when every box is in (`DirectMove.finished`).

Bounded: at most `DirectConfig.max_inflight_bytes` of boxes are read and not yet imported, over every
move (each box at most `chunk_bytes`, cut by layers); past that the prefill engine waits. Every call has
the executor's timeout and both ends are watched by heartbeat.

What a failure does:
- the *sender* gone before its read (PeerUnreachable, or CacheLost from a re-planning prefill group) is
  the prefill group's failure, exactly as a failed pull: the caller handles it as one;
- after the reads the prefill blocks are freed, so a move that fails then (KVDirectFailed: the receiver
  unreachable from the sender, a refused ticket or box, no answer before the deadline, the sender lost
  mid-send) runs the sequence's tokens again on the decode group, as a sequence whose split was
  re-planned does; a decode device really gone fails that step and is told as the decode group's
  failure. (KVDirectFailed before the reads, not expected, moves it through the coordinator.)
- The reserved blocks go back only once no call of the move may still write into them (`outstanding`):
  a call counts until the receiver's own word says its ticket is spent -- its receipt of the import
  (forwarded by the sender, which cannot make one), or a revocation it answered (`revoke_kv`). Not a
  deadline: the receiver sees only the one its caller, the sender, set, and a sender is trusted to
  deliver a box, not to say when it stops trying. A revocation that fails (the receiver silent or
  unreachable) is asked again every `revoke_every_s` until it is answered, or the decode group re-loaded
  (its pool re-made: the old blocks are not handed out again), or went down for good.

Streamed K/V (engine/kv_stream.py) keep going through the coordinator: a stream's chunks are read
while later chunks run, into blocks reserved before the first token; doing that directly needs the
same tickets per chunk, which is the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import GalaxyError, KVDirectFailed, PlanMismatch, lost_session
from ..parallel.executor import Executor
from ..parallel.kv_transfer import KVPiece
from ..parallel.rank import KVPool
from .kv_stream import StreamTiming

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectConfig:
    """How K/V move in one hop from the prefill devices to the decode devices."""

    max_inflight_bytes: int = 32 << 20  # bytes of boxes in calls at once (each box at most chunk_bytes)
    revoke_every_s: float = 1.0  # a given-up call's ticket the receiver did not revoke yet: asked again this often

    def __post_init__(self):
        v = self.max_inflight_bytes
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanMismatch(f"direct K/V config: max_inflight_bytes={v!r} must be an integer >= 1")
        v = self.revoke_every_s
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
            raise PlanMismatch(f"direct K/V config: revoke_every_s={v!r} must be a number of seconds > 0")


def supported(prefill: Executor, decode: Executor) -> bool:
    """Both executors reach workers that can send to each other (transport.client.Cluster, or a
    re-planning one): an in-process executor has no second hop to save."""
    return callable(getattr(prefill, "send_kv", None)) and all(callable(getattr(decode, m, None))
                                                              for m in ("kv_destination", "revoke_kv"))


@dataclass(eq=False)
class DirectMove:
    """One sequence's K/V on their way from the prefill devices into blocks reserved on the decode group.
    The decode engine adopts it as it adopts a finished stream (KVStream's `finished`, `error`,
    `outstanding`, `timing`); `wake()` tells it the move finished or failed."""

    wake: Callable[[], None] = lambda: None
    started_at: float = field(default_factory=time.perf_counter)
    read_at: float | None = None  # every box read from the prefill devices: the prefill engine went on here
    done_at: float | None = None  # every box imported on the decode devices
    nbytes: int = 0
    busy_s: float = 0.0  # every call's time, summed (calls overlap: more than the wall time)
    import_s: float = 0.0  # of it, the receivers' imports as the senders timed them
    error: GalaxyError | None = None
    # calls that may still write into the reserved blocks: each stays until its receiver's receipt, or a
    # revocation the receiver answered, or no ticket was issued for it
    _open: set = field(default_factory=set)
    _running: int = 0
    _sealed: bool = False  # every call of it started
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished(self) -> bool:
        return self.done_at is not None or self.error is not None

    @property
    def outstanding(self) -> int:
        """Calls that may still write into the reserved blocks (running, or given up on and not yet revoked)."""
        with self._lock:
            return len(self._open)

    def timing(self) -> StreamTiming:
        """Busy time, nothing hidden behind the prefill, exposed: from the reads (the prefill engine handing it
        over) until every box was in; export: the reads' wall time, import: the receivers' imports."""
        read = self.read_at or self.started_at
        return StreamTiming(self.busy_s, 0.0, max(0.0, (self.done_at or time.perf_counter()) - read), self.nbytes,
                            read - self.started_at, self.import_s)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            first = self.error is None and self.done_at is None
            if first:
                self.error = error if isinstance(error, GalaxyError) else GalaxyError(f"a direct K/V move: {error}")
        if first:
            self.wake()

    def _call_done(self) -> None:
        """A call returned. The last one wakes the decode engine whatever the outcome: the move is in, or a
        reservation it held may be given back now."""
        with self._lock:
            self._running -= 1
            last = self._sealed and self._running == 0
            if last and self.error is None and self.done_at is None:
                self.done_at = time.perf_counter()
        if last:
            self.wake()


class DirectSender:
    """Starts every box of a move at once, at most `max_inflight_bytes` read and not yet imported over all
    moves, and returns once they are read: the sends finish in the background."""

    def __init__(self, prefill: Executor, decode: Executor, config: DirectConfig):
        self.prefill, self.decode, self.config = prefill, decode, config
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="galaxy-kv-direct")
        self._cv = threading.Condition()
        self.inflight = 0  # bytes of boxes in calls now, every move
        self.peak_inflight = 0
        self.sent = 0  # moves whose boxes were all read
        self.fell_back = 0  # moves that failed on the receivers' side (the sequence then ran again, or went two-hop)
        self._revoking: list = []  # (move, call, receiver rank, KVDestination): tickets still to revoke
        self._revoker: threading.Thread | None = None
        self._closed = threading.Event()

    def send(self, move: DirectMove, boxes: list[tuple[KVPiece, int]], src_table, tokens: int, src_pool: KVPool,
             dst_table, dst_pool: KVPool) -> None:
        """Every (piece, bytes) of positions [0, tokens) of the tables (the sequence's blocks past what the
        receivers hold already). Returns once every box is read from the prefill devices; raises the first
        failure before that (the sender's side: as a failed pull). A failure after it fails the move
        (`move.error`, in the background)."""
        session = self.prefill.session_id
        cv = threading.Condition()
        local = {"unread": 0, "error": None}

        def read():
            with cv:
                local["unread"] -= 1
                cv.notify_all()

        def one(c: KVPiece, nbytes: int) -> None:
            t0 = time.perf_counter()
            key = object()
            with move._lock:
                move._open.add(key)
            state = {"read": False}

            def on_read():
                state["read"] = True
                read()

            dest = None
            try:
                try:
                    dest = self.decode.kv_destination(c.dst, dst_table, tokens, c.layers, c.heads, dst_pool, 0,
                                                      session, c.src)
                except GalaxyError as e:  # the receivers' side (a decode group re-planning has nothing loaded yet):
                    raise KVDirectFailed(f"no ticket from the decode group: {e}") from e  # not the sender's failure
                sent, import_s = self.prefill.send_kv(c.src, src_table, tokens, c.layers, c.heads, src_pool, dest,
                                                      on_read=on_read)
                with move._lock:
                    move._open.discard(key)  # the receiver's receipt: in, its ticket spent
                    move.nbytes += sent
                    move.import_s += import_s
                    move.busy_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, or to the move
                # whatever the sender said, its box may still land until the receiver spends the ticket: ask now
                # (not a receiver that just missed its pings: that call would wait them out again), else later
                if dest is None or (not getattr(e, "receiver_silent", False) and self._revoked(c.dst, dest)):
                    with move._lock:
                        move._open.discard(key)
                else:
                    self._revoke_later(move, key, c.dst, dest)
                if state["read"]:
                    move._fail(e)
                else:
                    with cv:
                        local["error"] = local["error"] or e
                    read()
            finally:
                with self._cv:
                    self.inflight -= nbytes
                    self._cv.notify_all()
                move._call_done()

        for c, nbytes in boxes:
            with self._cv:
                while self.inflight and self.inflight + nbytes > self.config.max_inflight_bytes \
                        and local["error"] is None:
                    self._cv.wait(1.0)
                if local["error"] is not None:
                    break
                self.inflight += nbytes
                self.peak_inflight = max(self.peak_inflight, self.inflight)
            with cv:
                local["unread"] += 1
            with move._lock:
                move._running += 1
            self.pool.submit(one, c, nbytes)
        with move._lock:
            move._sealed = True
        with cv:
            while local["unread"] > 0:
                cv.wait(1.0)
        if local["error"] is not None:
            move._fail(local["error"])
            raise local["error"]
        move.read_at = time.perf_counter()
        with move._lock:
            done = move._running == 0 and move.error is None and move.done_at is None
            if done:
                move.done_at = time.perf_counter()
        self.sent += 1

    def _revoked(self, rank: int, dest) -> bool:
        """A call without the receiver's receipt (failed, given up on, or a sender that claimed an import it cannot
        prove): ask the receiver to spend its ticket, so the box can no longer land and its blocks may go back.
        False when the receiver did not answer (gone, silent): the blocks stay reserved, asked again later."""
        try:
            self.decode.revoke_kv(rank, [dest.ticket.nonce])
        except Exception as e:  # noqa: BLE001 - anything else unanswered too: raised here it would end the revoke
            # thread (every ticket it holds never revoked) or skip the failed call's hand-off to the move
            if lost_session(e):  # the receiver lost the session (restarted, released): and its pool
                return True
            log.info("could not revoke a direct K/V move's ticket at %s (%s): its blocks stay reserved, asked again "
                     "in %g s", dest.name, e, self.config.revoke_every_s)
            return False
        return True

    def _revoke_later(self, move: DirectMove, key, rank: int, dest) -> None:
        with self._cv:
            self._revoking.append((move, key, rank, dest))
            if self._revoker is None:
                self._revoker = threading.Thread(target=self._revoke_loop, name="galaxy-kv-revoke", daemon=True)
                self._revoker.start()

    def _revoke_loop(self) -> None:
        """Ask again, every `revoke_every_s`, for the tickets no receiver has revoked yet. One ends when it is
        revoked or the decode group was loaded again (a re-plan: a new session, the pool its blocks were in is
        gone from the coordinator's books); the decode engine gives back at once what a group down for good held."""
        while not self._closed.wait(self.config.revoke_every_s):
            with self._cv:
                pending, self._revoking = self._revoking, []
            for move, key, rank, dest in pending:
                if self.decode.session_id == dest.ticket.dst_session and not self._revoked(rank, dest):
                    with self._cv:
                        self._revoking.append((move, key, rank, dest))
                    continue
                with move._lock:
                    move._open.discard(key)
                move.wake()

    def close(self) -> None:
        self._closed.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
