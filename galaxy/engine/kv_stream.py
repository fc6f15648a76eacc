"""Streaming a prompt's K/V to the decode group chunk by chunk, while its later chunks are prefilled.

Phase-separated serving (engine/disagg.py) moves a sequence's K/V from the prefill group to the
decode group. Moved after the prefill, the whole move sits between the first token and the second.
The engine already cuts a long prompt into chunks (one per step, `EngineConfig.chunk_size`,
`max_batched_tokens`, the stall bound); once a chunk's step is done its K/V of every layer are
final, so they can travel while the next chunk computes (Splitwise ships them layer by layer; this
is the same idea at the granularity the engine already has -- docs/engine.md says why):

```
 prefill group   | chunk 0 | chunk 1 | chunk 2 (last) -> first token
 this module               [export 0 ][import 0]
                                     [export 1 ][import 1]
                                                [export 2][import 2] -> the decode group adopts it
                                                 \\__ exposed: what the decode group waits for __/
```

A `KVStreamer` runs two threads: the exporter pulls a chunk's boxes from the prefill devices
(`Executor.export_kv(..., start, while_stepping=True)`: finished positions, read while the next step
runs), the importer writes them into blocks the decode group reserved for the sequence when its
stream opened (`Scheduler.reserve`). Between them the boxes pulled and not yet pushed are bounded
(`StreamConfig.max_inflight_bytes`): the exporter waits for room, so a slow decode group slows the
stream rather than filling memory. Every box is checked before it is held (its shape, dtype and
size against the box the plan asks for: KVTransferError otherwise, and the stream fails), and the
receiving worker checks it again against its shard and pool. Every call goes over the executors'
authenticated channels (the cluster token or mutual TLS, and the session id). Every wait ends: a
stream in which no box moved for `stall_timeout_s` fails with KVStreamStalled.

Exactness: the K/V are copied bit for bit from positions whose step has finished, into blocks no
step touches until the sequence is adopted, so the decode group holds exactly what a move after
the prefill would give it. A sequence preempted on the prefill group (its blocks freed and maybe
reused under a read in flight) has its stream dropped: it moves the old way, after its first token.

Accounting, per sequence (`KVStream.timing`): the busy time of its exports and imports, the part
of it that ran before its first token (hidden behind the prefill) and the time from its first
token until its K/V were all on the decode group (exposed: what the decode group waited for).

Pure engine code over the Executor interface: the executors move the bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import GalaxyError, KVStreamStalled, KVTransferError, PlanMismatch
from ..model.config import ModelConfig
from ..parallel.executor import Executor
from ..parallel.kv_transfer import KVPiece, box_bytes
from ..parallel.rank import KVPool
from .disagg_faults import phase_error

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often an idle streamer thread looks for stalled streams and for close()


@dataclass(frozen=True)
class StreamConfig:
    """How prompts' K/V stream to the decode group while they are prefilled."""

    max_inflight_bytes: int = 32 << 20  # K/V pulled from the prefill group and not yet pushed, all sequences
    chunk_bytes: int = 4 << 20  # most bytes of one box on the wire (cut by layers; a layer alone may exceed it)
    stall_timeout_s: float = 30.0  # a stream in which no box moved for this long fails (KVStreamStalled)
    itemsize: int = 4  # bytes of one K/V element (the compute dtype of both groups)

    def __post_init__(self):
        for f in ("max_inflight_bytes", "chunk_bytes", "itemsize"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PlanMismatch(f"K/V stream config: {f}={v!r} must be an integer >= 1")
        t = self.stall_timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < float("inf"):
            raise PlanMismatch(f"K/V stream config: stall_timeout_s={t!r} must be a number of seconds > 0")
        if self.chunk_bytes > self.max_inflight_bytes:
            raise PlanMismatch(f"K/V stream config: chunk_bytes={self.chunk_bytes} exceeds max_inflight_bytes="
                               f"{self.max_inflight_bytes}: one box would not fit the in-flight bound")


@dataclass(frozen=True)
class StreamTiming:
    """One sequence's stream, as the bench and the request's record report it."""

    busy_s: float  # exports and imports of its boxes, summed
    hidden_s: float  # the part of busy_s that ran before its first token (behind the prefill)
    exposed_s: float  # from its first token until all its K/V were on the decode group
    nbytes: int  # K/V bytes pushed to the decode devices
    export_s: float
    import_s: float


@dataclass
class _Box:
    """One export (a sender's layers x heads of positions [start, end)) and the receivers it serves."""

    kvs: KVStream
    src: int
    layers: tuple[int, int]
    heads: tuple[int, int]
    dsts: tuple[int, ...]
    start: int
    end: int
    table: tuple[int, ...]  # the sequence's blocks on the prefill group
    nbytes: int


@dataclass(eq=False)
class KVStream:
    """One sequence's K/V on their way, chunk by chunk, into blocks reserved on the decode group."""

    seq_id: int  # on the prefill group
    dest_table: tuple[int, ...]  # its reserved blocks on the decode group
    preemptions: int  # its preemptions on the prefill group when the stream opened
    pools: tuple[KVPool, KVPool]  # the prefill group's pool, the decode group's
    wake: object = None  # called when the stream finishes or fails (the decode engine's loop)
    sent: int = 0  # positions queued so far
    closed_at: float | None = None  # perf_counter when its last chunk was queued (its first token)
    done_at: float | None = None  # perf_counter when the last box was pushed
    error: GalaxyError | None = None
    cancelled: bool = False
    queued: int = 0  # boxes queued
    exported: int = 0  # boxes exported (or dropped)
    outstanding: int = 0  # boxes queued and not yet pushed or dropped (the reservation is in use while > 0)
    nbytes: int = 0
    export_s: float = 0.0
    import_s: float = 0.0
    progress_at: float = field(default_factory=time.perf_counter)
    calls: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of every export and import

    @property
    def finished(self) -> bool:
        """All its K/V are on the decode group (after its last chunk was queued), or it failed."""
        return self.error is not None or (self.closed_at is not None and self.outstanding == 0)

    def timing(self) -> StreamTiming:
        end = self.closed_at if self.closed_at is not None else float("inf")
        hidden = sum(max(0.0, min(b, end) - a) for a, b in self.calls)
        exposed = max(0.0, (self.done_at or end) - end) if self.closed_at is not None else 0.0
        return StreamTiming(sum(b - a for a, b in self.calls), hidden, exposed, self.nbytes, self.export_s,
                            self.import_s)


class KVStreamer:
    """The two threads that move streamed boxes: prefill devices -> here (bounded) -> decode devices."""

    def __init__(self, prefill: Executor, decode: Executor, model: ModelConfig, plan, config: StreamConfig):
        self.prefill, self.decode, self.model, self.config = prefill, decode, model, config
        self.plan = plan  # () -> the KVPieces between the two splits (KVMover.plan: re-planned on a new split)
        self.inflight = 0  # bytes exported and not yet imported
        self.peak_inflight = 0
        self._cv = threading.Condition()
        self._exports: deque[_Box] = deque()
        self._imports: deque[tuple[_Box, torch.Tensor]] = deque()
        self._open: set[KVStream] = set()
        self._closed = False
        self._threads = [threading.Thread(target=f, name=f"galaxy-kv-{n}", daemon=True)
                         for n, f in (("export", self._export_loop), ("import", self._import_loop))]
        for t in self._threads:
            t.start()

    # -- the engines' side -----------------------------------------------------------------------
    def open(self, seq_id: int, dest_table, preemptions: int, pools: tuple[KVPool, KVPool], wake=None) -> KVStream:
        """A stream for prefill sequence `seq_id` into the decode group's blocks `dest_table`;
        `wake` is called when it finishes or fails."""
        kvs = KVStream(seq_id, tuple(dest_table), preemptions, pools, wake)
        with self._cv:
            self._open.add(kvs)
        return kvs

    def send(self, kvs: KVStream, end: int, table, last: bool = False) -> None:
        """Queue positions [kvs.sent, end) of the sequence (blocks `table` on the prefill group):
        their step has finished. `last`: the prompt is complete (its first token is out)."""
        boxes = self._boxes(kvs, kvs.sent, end, tuple(table)) if end > kvs.sent else []
        with self._cv:
            if kvs.error is None and not kvs.cancelled:
                self._exports.extend(boxes)
                kvs.queued += len(boxes)
                kvs.outstanding += len(boxes)
                kvs.progress_at = time.perf_counter()
            kvs.sent = max(kvs.sent, end)
            if last:
                kvs.closed_at = time.perf_counter()
                self._maybe_done(kvs)
            self._cv.notify_all()

    def wait_exported(self, kvs: KVStream) -> None:
        """Until every box queued for `kvs` was read from the prefill devices (their blocks there may
        then be freed); raises the stream's error, or KVStreamStalled when nothing moved for the
        stall timeout."""
        with self._cv:
            while kvs.error is None and kvs.exported < kvs.queued and not self._closed:
                left = kvs.progress_at + self.config.stall_timeout_s - time.perf_counter()
                if left <= 0:
                    self._fail(kvs, self._stalled(kvs))
                    break
                self._cv.wait(min(left, POLL_S))
            if kvs.error is not None:
                raise kvs.error
            if kvs.exported < kvs.queued:
                raise GalaxyError("the K/V streamer was closed")

    def cancel(self, kvs: KVStream) -> None:
        """Drop a stream (its sequence was preempted, cancelled or ended on the prefill group): boxes
        not yet moved are skipped; `kvs.outstanding` reaches 0 once none is in a call any more."""
        with self._cv:
            kvs.cancelled = True
            self._open.discard(kvs)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for kvs in self._open:
                if kvs.error is None:
                    kvs.error = GalaxyError("the engine was closed while this sequence's K/V streamed")
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    # -- planning ------------------------------------------------------------------------------
    def _boxes(self, kvs: KVStream, start: int, end: int, table) -> list[_Box]:
        """The chunk's boxes: each (sender, layers, heads) once, serving every receiver that needs
        it, cut by layers to at most chunk_bytes."""
        groups: dict[tuple, list[int]] = {}
        for p in self.plan():
            per_layer = box_bytes(self.model, (0, 1), p.heads, end - start, self.config.itemsize)
            step = max(1, self.config.chunk_bytes // max(1, per_layer))
            for lo in range(p.layers[0], p.layers[1], step):
                c = KVPiece(p.src, p.dst, (lo, min(lo + step, p.layers[1])), p.heads)
                groups.setdefault((c.src, c.layers, c.heads), []).append(c.dst)
        return [_Box(kvs, src, layers, heads, tuple(dsts), start, end, table,
                     box_bytes(self.model, layers, heads, end - start, self.config.itemsize))
                for (src, layers, heads), dsts in groups.items()]

    # -- the threads ---------------------------------------------------------------------------
    def _export_loop(self) -> None:
        while True:
            with self._cv:
                while not self._exports and not self._closed:
                    self._watch()
                    self._cv.wait(POLL_S)
                if self._closed:
                    return
                b = self._exports.popleft()
                kvs = b.kvs
                if not self._wait_room(b):
                    kvs.exported += 1
                    self._drop(kvs)
                    continue
                self.inflight += b.nbytes
                self.peak_inflight = max(self.peak_inflight, self.inflight)
            t0 = time.perf_counter()
            try:
                box = self.prefill.export_kv(b.src, b.table, b.end, b.layers, b.heads, kvs.pools[0], start=b.start,
                                             while_stepping=True)
                self._check(b, box)
            except GalaxyError as e:
                with self._cv:
                    self.inflight -= b.nbytes
                    kvs.exported += 1
                    self._fail(kvs, phase_error(e, "prefill"))
                    self._drop(kvs)
                continue
            t1 = time.perf_counter()
            with self._cv:
                kvs.calls.append((t0, t1))
                kvs.export_s += t1 - t0
                kvs.exported += 1
                kvs.progress_at = t1
                self._imports.append((b, box))
                self._cv.notify_all()

    def _import_loop(self) -> None:
        while True:
            with self._cv:
                while not self._imports and not self._closed:
                    self._cv.wait(POLL_S)
                if self._closed:
                    return
                b, box = self._imports.popleft()
                kvs = b.kvs
                if kvs.error is not None or kvs.cancelled:
                    self.inflight -= b.nbytes
                    self._drop(kvs)
                    continue
            t0 = time.perf_counter()
            error = None
            try:
                for dst in b.dsts:
                    self.decode.import_kv(dst, kvs.dest_table, box, b.layers, b.heads, kvs.pools[1], start=b.start)
            except GalaxyError as e:
                error = phase_error(e, "decode")  # a request it ends is told which group's device failed
            t1 = time.perf_counter()
            with self._cv:
                self.inflight -= b.nbytes
                if error is not None:
                    self._fail(kvs, error)
                else:
                    kvs.calls.append((t0, t1))
                    kvs.import_s += t1 - t0
                    kvs.nbytes += b.nbytes * len(b.dsts)
                    kvs.progress_at = t1
                self._drop(kvs)

    # -- under the lock ------------------------------------------------------------------------
    def _wait_room(self, b: _Box) -> bool:
        """Until the box fits under the in-flight bound (alone, it always does); False if its stream
        failed or was cancelled meanwhile, or stalled waiting."""
        kvs = b.kvs
        while kvs.error is None and not kvs.cancelled and not self._closed:
            if self.inflight == 0 or self.inflight + b.nbytes <= self.config.max_inflight_bytes:
                return True
            left = kvs.progress_at + self.config.stall_timeout_s - time.perf_counter()
            if left <= 0:
                self._fail(kvs, self._stalled(kvs, f"{self.inflight} bytes in flight, none pushed"))
                break
            self._cv.wait(min(left, POLL_S))
        return False

    def _check(self, b: _Box, box: torch.Tensor) -> None:
        """Refuse a box of another shape, dtype or size than the one asked for, before holding it."""
        want = (b.layers[1] - b.layers[0], 2, b.heads[1] - b.heads[0], b.end - b.start, self.model.head_dim)
        who = f"K/V box from prefill device {b.src}"
        if not isinstance(box, torch.Tensor) or tuple(box.shape) != want:
            shape = tuple(box.shape) if isinstance(box, torch.Tensor) else type(box).__name__
            raise KVTransferError(f"{who}: shape {shape}, expected {want} (layers {b.layers[0]}..{b.layers[1]}, "
                                  f"KV heads {b.heads[0]}..{b.heads[1]}, positions {b.start}..{b.end})")
        if not box.dtype.is_floating_point or box.element_size() != self.config.itemsize:
            raise KVTransferError(f"{who}: {box.dtype}, expected a floating dtype of {self.config.itemsize} bytes")
        if box.numel() * box.element_size() != b.nbytes:
            raise KVTransferError(f"{who}: {box.numel() * box.element_size()} bytes, expected {b.nbytes}")

    def _drop(self, kvs: KVStream) -> None:
        """A box of `kvs` left the pipeline (pushed, refused or skipped)."""
        kvs.outstanding -= 1
        self._maybe_done(kvs)
        if kvs.outstanding == 0 and (kvs.cancelled or kvs.error is not None) and kvs.wake is not None:
            kvs.wake()  # its reservation on the decode group can be given back now
        self._cv.notify_all()

    def _maybe_done(self, kvs: KVStream) -> None:
        if kvs.closed_at is not None and kvs.outstanding == 0 and kvs.done_at is None:
            kvs.done_at = time.perf_counter()
            self._open.discard(kvs)
            if kvs.wake is not None:
                kvs.wake()

    def _fail(self, kvs: KVStream, error: GalaxyError) -> None:
        if kvs.error is None:
            log.warning("streaming the K/V of sequence %d to the decode group failed: %s", kvs.seq_id, error)
            kvs.error = error
            self._open.discard(kvs)
            if kvs.wake is not None:
                kvs.wake()
        self._cv.notify_all()

    def _stalled(self, kvs: KVStream, why: str = "") -> KVStreamStalled:
        t = self.config.stall_timeout_s
        return KVStreamStalled(f"the K/V stream of sequence {kvs.seq_id} stalled: no box moved for {t:g} s "
                               f"({kvs.exported} of {kvs.queued} boxes pulled{', ' + why if why else ''})")

    def _watch(self) -> None:
        """Fail open streams with boxes in a call for longer than the stall timeout (a hung push)."""
        now = time.perf_counter()
        for kvs in list(self._open):
            if kvs.outstanding and kvs.error is None and now - kvs.progress_at > self.config.stall_timeout_s:
                self._fail(kvs, self._stalled(kvs, f"{kvs.outstanding} not pushed"))
