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

Bounded: at most `DirectConfig.max_inflight_bytes` of boxes are in calls at once (each box at most
`chunk_bytes`, cut by layers), so a sender or a receiver holds at most that in flight for this
coordinator. Every call has the executor's timeout and both ends are watched by heartbeat.

What a failure does (`DirectMove.failed`):
- the *sender* gone (PeerUnreachable, or CacheLost from a re-planning prefill group) is the prefill
  group's failure, exactly as a failed pull: the caller handles it as one;
- anything on the *receiver's* side (KVDirectFailed: unreachable from the sender, a refused ticket or
  box, no answer before the deadline) makes the caller move the sequence through the coordinator
  instead (the two-hop path), where a decode device that is really gone fails the push and is told
  as the decode group's failure. The reserved blocks are given back only once no call of this move may
  still write into them (`outstanding`: a call given up on counts until its deadline, which the
  receiver enforces).

Streamed K/V (engine/kv_stream.py) keep going through the coordinator: a stream's chunks are read
while later chunks run, into blocks reserved before the first token; doing that directly needs the
same tickets per chunk, which is the next step.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import GalaxyError, PlanMismatch
from ..parallel.executor import Executor
from ..parallel.kv_transfer import KVPiece
from ..parallel.rank import KVPool
from .kv_stream import StreamTiming


@dataclass(frozen=True)
class DirectConfig:
    """How K/V move in one hop from the prefill devices to the decode devices."""

    max_inflight_bytes: int = 32 << 20  # bytes of boxes in calls at once (each box at most chunk_bytes)
    slack_s: float = 1.0  # after a call's deadline: when a call given up on can no longer write anywhere

    def __post_init__(self):
        v = self.max_inflight_bytes
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanMismatch(f"direct K/V config: max_inflight_bytes={v!r} must be an integer >= 1")
        if not isinstance(self.slack_s, (int, float)) or not 0 <= self.slack_s < float("inf"):
            raise PlanMismatch(f"direct K/V config: slack_s={self.slack_s!r} must be a number of seconds >= 0")


def supported(prefill: Executor, decode: Executor) -> bool:
    """Both executors reach workers that can send to each other (transport.client.Cluster, or a
    re-planning one): an in-process executor has no second hop to save."""
    return callable(getattr(prefill, "send_kv", None)) and callable(getattr(decode, "kv_destination", None))


@dataclass(eq=False)
class DirectMove:
    """One sequence's K/V on their way from the prefill devices into blocks reserved on the decode group.
    The decode engine adopts it as it adopts a finished stream (KVStream's `finished`, `error`,
    `outstanding`, `timing`)."""

    started_at: float = field(default_factory=time.perf_counter)
    done_at: float | None = None
    nbytes: int = 0
    busy_s: float = 0.0  # every call's time, summed (calls overlap: more than the wall time)
    import_s: float = 0.0  # of it, the receivers' imports as the senders timed them
    error: GalaxyError | None = None
    # calls that may still write -> monotonic time after which they cannot: a call that returned is over; one the
    # coordinator gave up on (no heartbeat, or its receiver's deadline hit) stays until its deadline has passed
    _open: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished(self) -> bool:
        return self.done_at is not None or self.error is not None

    @property
    def outstanding(self) -> int:
        """Calls that may still write into the reserved blocks (given up on, deadline not yet past)."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for t in self._open.values() if t > now)

    def timing(self) -> StreamTiming:
        wall = (self.done_at or time.perf_counter()) - self.started_at
        return StreamTiming(self.busy_s, 0.0, wall, self.nbytes, self.busy_s - self.import_s, self.import_s)


class DirectSender:
    """Sends every box of a move at once, at most `max_inflight_bytes` of them in calls."""

    def __init__(self, prefill: Executor, decode: Executor, config: DirectConfig, timeout_s: float):
        self.prefill, self.decode, self.config = prefill, decode, config
        self.timeout_s = timeout_s  # the longest one call may take (the executor's K/V timeout)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="galaxy-kv-direct")
        self.sent = 0  # moves done directly
        self.fell_back = 0  # moves that went through the coordinator after a direct one failed

    def send(self, move: DirectMove, boxes: list[tuple[KVPiece, int]], src_table, tokens: int, src_pool: KVPool,
             dst_table, dst_pool: KVPool) -> None:
        """Every (piece, bytes) of positions [0, tokens) of the tables (the sequence's blocks past what the
        receivers hold already); raises the first failure once no call of it is still running here."""
        session = self.prefill.session_id
        cv = threading.Condition()
        state = {"inflight": 0, "running": 0, "error": None}

        def one(c: KVPiece, nbytes: int) -> None:
            t0 = time.perf_counter()
            key = object()
            with move._lock:
                move._open[key] = time.monotonic() + self.timeout_s + self.config.slack_s
            try:
                dest = self.decode.kv_destination(c.dst, dst_table, tokens, c.layers, c.heads, dst_pool, 0, session,
                                                  c.src)
                sent, import_s = self.prefill.send_kv(c.src, src_table, tokens, c.layers, c.heads, src_pool, dest)
                with move._lock:
                    move._open.pop(key)  # returned: it wrote all it ever will
                    move.nbytes += sent
                    move.import_s += import_s
                    move.busy_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                if not getattr(e, "gave_up", False):  # the call ended (refused, unreachable): nothing more lands
                    with move._lock:
                        move._open.pop(key)
                with cv:
                    state["error"] = state["error"] or e
            finally:
                with cv:
                    state["inflight"] -= nbytes
                    state["running"] -= 1
                    cv.notify_all()

        for c, nbytes in boxes:
            with cv:
                while state["error"] is None and state["inflight"] and (
                        state["inflight"] + nbytes > self.config.max_inflight_bytes):
                    cv.wait(1.0)
                if state["error"] is not None:
                    break
                state["inflight"] += nbytes
                state["running"] += 1
            self.pool.submit(one, c, nbytes)
        with cv:
            while state["running"]:
                cv.wait(1.0)
        if state["error"] is not None:
            move.error = state["error"]
            raise state["error"]
        move.done_at = time.perf_counter()
        self.sent += 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
