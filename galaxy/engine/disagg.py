"""Phase-separated serving: prompts prefilled on one group of devices, tokens decoded on another.

Prefill is compute-bound and splits well over devices (Galaxy's HMP); decode is memory- and
latency-bound, and split over devices it pays two collectives per layer per token. DistServe and
Splitwise give each phase its own devices and parallel layout and move the K/V in between. Here
two engines run side by side, each with its own executor, partition, KV pool, scheduler and loop:

```
 submit ──► prefill Engine (HMP over the prefill group) ── first token ──► the caller's stream
                 │ between its steps: pull the sequence's K/V from the prefill devices
                 │ (parallel/kv_transfer.py: re-sharded box by box to the decode split),
                 │ free its prefill blocks (they stay in the prefix cache)
                 ▼
            decode Engine (one device, or a small TP group) ── every later token ──► the same stream
              between its steps: adopt it (Scheduler.adopt: fresh blocks), push the K/V into them,
              then it decodes with continuous batching beside the others
```

Where both groups are workers, each prefill device sends its boxes straight to the decode devices with
the coordinator's ticket for each (one hop: engine/kv_direct.py; `DisaggConfig.direct`, the default,
`kv_path="direct"`). Otherwise -- in-process groups, `kv_path="coordinator"`, or a direct move that
failed on the receivers' side before the prefill blocks were freed -- the K/V go through the
coordinator: pulled from the prefill workers
(Executor.export_kv), held here, pushed to the decode workers (Executor.import_kv), each message a
box of at most `chunk_bytes` (cut by layers), every call with the executor's timeout, and the
workers check every box's shape, dtype, heads and blocks before touching their pool. The bytes
held here between pull and push are bounded (`max_pending_bytes`): while the decode group has no
room (blocks, a place among its running sequences, or that bound), a sequence keeps decoding on the
prefill group and moves at a later token -- backpressure, never an unbounded queue, and never a
wrong token: the K/V moved are those of every token computed so far, whenever it moves. A prompt
run in several chunks instead streams its K/V chunk by chunk while its later chunks are prefilled,
into blocks reserved on the decode group (engine/kv_stream.py; `DisaggConfig.stream`): only the
last chunk's move is left after the first token. A sequence whose prompt starts with blocks the
decode pool already holds (an earlier request with the same document) leases them there and moves
only the rest (engine/prefix_index.py; a streamed sequence carries no lease), and with
`DisaggConfig.route_by_prefix` a request whose prefix lives only on the decode group runs there.

Correctness: the decode devices end up holding exactly the K/V they would have computed
themselves, bit for bit, so greedy tokens equal the single-device reference (tests/engine/
test_disagg.py). Both groups must compute in the same dtype (a box of another is refused).

Faults (disagg_faults.py; docs/faults.md, "Phase-separated serving"): a device that drops out fails
the step, pull or push of its group, and the requests that needed it end with that error, which
names the device and the group; requests on the other group go on. With recovery each group is a
re-planning executor of its own (runtime.recovery): it re-plans over its survivors and raises
CacheLost, and its sequences run their tokens again there; a group left without a device hands its
sequences to the other group (all their tokens again), which then serves every request (colocated).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from planner.plan import KV_PATHS  # how K/V reach the decode group: kv_direct.py, or two hops through here

from ..errors import CacheLost, GalaxyError, InvalidRequest, KVDirectFailed, PeerUnreachable, PlanMismatch, WorkerError
from ..model.config import ModelConfig
from ..parallel.executor import Executor
from ..parallel.kv_transfer import KVPiece, box_bytes, plan_between
from ..parallel.rank import KVPool
from ..parallel.sharding import Partition
from .arguments import token_ids as checked_ids
from .disagg_faults import FailOver, phase_error, requeue, run_again
from .engine import Engine, EngineConfig, GenerationStream
from .generation import Generation, GenerationConfig, KVHandoff
from .kv_direct import DirectConfig, DirectMove, DirectSender, supported
from .kv_stream import KVStream, KVStreamer, StreamConfig
from .prefix_index import Lease, PoolView, PrefixIndex, give_back, lease, tail
from .scheduler import QueueFull
from .sequence import SamplingParams, Sequence, SequenceStatus

log = logging.getLogger(__name__)




@dataclass(frozen=True)
class DisaggConfig:
    """How K/V move between the groups: `direct` (default) one hop where both groups are workers, else
    through the coordinator; streamed or not; bounded; and what a failed group does."""

    chunk_bytes: int = 4 << 20  # most bytes of one box on the wire: pieces are cut by layers below it
    max_pending_bytes: int = 256 << 20  # K/V held at the coordinator between pull and push, all sequences
    itemsize: int = 4  # bytes of one K/V element (the compute dtype of both groups) for the bound
    # a group that failed for good (no device left: a re-planning group re-plans over its survivors first):
    # its sequences run their tokens again on the other group and finish there, and every later one runs
    # there too (False: they end with the error, which names the device and the group)
    recover: bool = False
    # a prompt of several chunks streams its K/V to the decode group chunk by chunk while it is prefilled
    # (engine/kv_stream.py), through here; None (default): every sequence's K/V move after its prefill.
    # Opt-in: on 2 shared cores it hid the move but not the second token's wait (docs/engine.md), and a
    # group that re-plans after a fault leaves its open streams to stall out before they fall back
    stream: StreamConfig | None = None
    # a request goes to the group whose KV pool holds more of its prompt (the decode group then runs its
    # prompt's rest itself, nothing moved); False: every request is prefilled on the prefill group
    route_by_prefix: bool = True
    # each sequence's K/V go in one hop, every prefill device sending its boxes straight to the decode devices
    # with the coordinator's tickets (engine/kv_direct.py), wherever both groups are workers (the default); a
    # move that fails on the receivers' side goes through here instead. None: always through here (two hops),
    # as in-process groups always do (there is no hop to save)
    direct: DirectConfig | None = DirectConfig()

    @classmethod
    def for_path(cls, kv_path: str, **kw) -> DisaggConfig:
        """The config of a K/V path by name (KV_PATHS, the planner's `--kv-path` routes): "direct" (one hop
        where both groups are workers) or "coordinator" (two hops, through here); other fields as `kw`."""
        if kv_path not in KV_PATHS:
            raise InvalidRequest(f"kv_path={kv_path!r} is not one of {KV_PATHS}")
        return cls(**kw, direct=DirectConfig() if kv_path == "direct" else None)

    def __post_init__(self):
        for f in ("recover", "route_by_prefix"):
            if not isinstance(getattr(self, f), bool):
                raise PlanMismatch(f"disaggregation config: {f}={getattr(self, f)!r} must be True or False")
        if self.direct is not None and not isinstance(self.direct, DirectConfig):
            raise PlanMismatch(f"disaggregation config: direct={self.direct!r} must be a DirectConfig or None")
        if self.stream is not None and not isinstance(self.stream, StreamConfig):
            raise PlanMismatch(f"disaggregation config: stream={self.stream!r} must be a StreamConfig or None")
        for f in ("chunk_bytes", "max_pending_bytes", "itemsize"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PlanMismatch(f"disaggregation config: {f}={v!r} must be an integer >= 1")


@dataclass
class _Handoff:
    """A sequence on its way from the prefill group to the decode group, K/V in hand."""

    stream: GenerationStream
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    deadline: float | None
    boxes: list[tuple[KVPiece, torch.Tensor]]  # each receiver's pieces (one tensor may serve two receivers)
    nbytes: int
    export_s: float
    pulled_at: float
    decode_split: Partition | None = None  # the decode group's split the boxes were cut for (read before the pull)
    kvs: KVStream | DirectMove | None = None  # streamed while prefilled, or sent directly: K/V in `held`'s blocks
    held: Sequence | None = None
    lease: Lease = Lease()  # blocks the decode group already held for the leading tokens (only the rest moved)


class KVMover:
    """Pulls a sequence's K/V box by box from the prefill executor and pushes them to the decode one."""

    def __init__(self, prefill: Executor, decode: Executor, model: ModelConfig, config: DisaggConfig):
        self.prefill, self.decode, self.model, self.config = prefill, decode, model, config
        self._planned: tuple[Partition, Partition, tuple[KVPiece, ...]] | None = None
        self.direct = (DirectSender(prefill, decode, config.direct)
                       if config.direct is not None and supported(prefill, decode) else None)

    def plan(self) -> tuple[KVPiece, ...]:
        """The pieces between the two splits, planned again whenever either executor's split is another
        object (a re-planning executor may have changed it; Partition is frozen): asked before every
        move and on every step a full decode group turns a sequence away, so not rebuilt each time."""
        pre, dec = self.prefill.partition, self.decode.partition
        if pre is None or dec is None:
            raise GalaxyError("phase-separated serving needs a model loaded on both groups")
        if self._planned is None or self._planned[0] is not pre or self._planned[1] is not dec:
            self._planned = (pre, dec, plan_between(pre, dec, self.model))
        return self._planned[2]

    def seq_bytes(self, tokens: int) -> int:
        """K/V bytes a move of `tokens` positions takes (what the decode devices receive)."""
        return sum(box_bytes(self.model, p.layers, p.heads, tokens, self.config.itemsize) for p in self.plan())

    def chunks(self, piece: KVPiece, tokens: int) -> list[KVPiece]:
        """A piece cut by layers into boxes of at most chunk_bytes (at least one layer each)."""
        per_layer = box_bytes(self.model, (0, 1), piece.heads, tokens, self.config.itemsize)
        step = max(1, self.config.chunk_bytes // max(1, per_layer))
        lo, hi = piece.layers
        return [KVPiece(piece.src, piece.dst, (a, min(a + step, hi)), piece.heads) for a in range(lo, hi, step)]

    def pull(self, block_table, tokens: int, pool: KVPool, skip: int = 0) -> list[tuple[KVPiece, torch.Tensor]]:
        """Every receiver's boxes from the prefill devices; a box two receivers need is pulled once.
        `skip`: leading positions the receivers hold already (a whole number of blocks on both
        sides, prefix_index.Lease): the boxes cover positions [skip, tokens) only."""
        got: dict[tuple, torch.Tensor] = {}
        out = []
        table = tail(block_table, skip, pool)
        if skip == tokens:  # the receivers hold all of it
            return out
        for piece in self.plan():
            for c in self.chunks(piece, tokens - skip):
                key = (c.src, c.layers, c.heads)
                if key not in got:
                    got[key] = self.prefill.export_kv(c.src, table, tokens - skip, c.layers, c.heads, pool)
                out.append((c, got[key]))
        return out

    def send(self, move: DirectMove, block_table, tokens: int, pool: KVPool, skip: int, dst_table,
             dst_pool: KVPool) -> None:
        """Every receiver's boxes sent straight from the prefill devices into `dst_table` (the blocks reserved
        on the decode group, past the `skip` positions they hold already): engine/kv_direct.py."""
        n = tokens - skip  # 0: the receivers hold all of it (a leased prefix), nothing moves
        boxes = [(c, c.nbytes(self.model, n, self.config.itemsize)) for p in self.plan() for c in self.chunks(p, n)
                 if n > 0]
        self.direct.send(move, boxes, tail(block_table, skip, pool), n, pool, tail(dst_table, skip, dst_pool),
                         dst_pool)

    def push(self, boxes, block_table, pool: KVPool, skip: int = 0) -> None:
        table = tail(block_table, skip, pool)
        for c, box in boxes:
            self.decode.import_kv(c.dst, table, box, c.layers, c.heads, pool)


class DecodeEngine(FailOver, Engine):
    """An Engine that also adopts sequences prefilled elsewhere, their K/V pushed into its pool
    between its steps."""

    phase = "decode"
    spills = False  # no spill tier: its blocks are also taken between its steps (leases, reservations, adoptions)

    def __init__(self, executor: Executor, model: ModelConfig, tokenizer, config: EngineConfig,
                 mover: KVMover, max_pending_bytes: int):
        self.mover, self.max_pending_bytes = mover, max_pending_bytes
        self._pending: deque[_Handoff] = deque()
        self.adopted = 0
        self._init_fail_over()
        self._failed: GalaxyError | None = None  # without recovery: a device failure that also ends what waits
        self.taken_over = 0  # sequences the prefill group lost (no device of it left) that run again here
        # sequences adopted with streamed K/V, and every adopted one's transfer time hidden behind its prefill
        # and exposed after its first token, summed (the per-request figures: Generation.handoff)
        self.transfer = {"streamed": 0, "direct": 0, "hidden_s": 0.0, "exposed_s": 0.0}
        self._held: dict[Sequence, object] = {}  # reservations for streamed K/V -> the block manager they are in
        self._releasing: deque[tuple[Sequence, KVStream]] = deque()  # reservations to give back once unused
        super().__init__(executor, model, tokenizer, config)

    @property
    def pending_bytes(self) -> int:
        """K/V bytes held at the coordinator for moves not pushed yet (the queue is bounded by them)."""
        return sum(h.nbytes for h in tuple(self._pending))  # a snapshot: the load report reads it unlocked

    def lease_for(self, token_ids, tokens: int, src_block_size: int, kernel_from: int | None = None) -> Lease | None:
        """The lease of a sequence whose K/V of `tokens` positions would move here, if it may move now:
        blocks and a running place beside those already on their way, and the bytes bound, once the
        blocks this pool already holds for its leading tokens are leased (prefix_index.lease: only the
        rest moves). None, nothing leased, while there is no room."""
        if self.down is not None:
            return None
        with self._lock:
            got = lease(self.sched.blocks, token_ids, tokens, src_block_size, kernel_from)
            if self._fits(len(token_ids), got, self.mover.seq_bytes(tokens - got.skip)):
                return got
            give_back(self.sched.blocks, got)
            return None

    def reserve_move(self, token_ids, tokens: int, src_block_size: int, params: SamplingParams,
                     kernel_from: int | None = None) -> tuple[Sequence, int] | None:
        """For a direct move (engine/kv_direct.py) of a sequence whose K/V of `tokens` positions would come
        here: the blocks this pool holds for its leading tokens leased (prefix_index.lease), fresh blocks behind
        them for the rest and its next token, all in one reservation (`adopt(reserved=)` takes it; giving it back
        releases the lease too), and the positions leased. None, nothing taken, while there is no room."""
        if self.down is not None:
            return None
        with self._lock:
            got = lease(self.sched.blocks, token_ids, tokens, src_block_size, kernel_from)
            if not self._fits(len(token_ids), got, 0):  # nothing is held at the coordinator: no bytes to bound
                give_back(self.sched.blocks, got)
                return None
            held = Sequence(-1, [], 0, params, arrival=self.sched.clock())
            held.block_table = list(got.blocks)
            self.sched.blocks.append(held, len(token_ids))
            self._held[held] = self.sched.blocks
            return held, got.skip

    def _waiting_blocks(self) -> tuple[list[_Handoff], int]:
        """Under the lock: the handoffs waiting here that hold no blocks yet (not streamed: a streamed one
        holds its reservation, counted in `_held`), and the fresh blocks they will take (past their leases)."""
        waiting = [h for h in self._pending if h.held is None]
        return waiting, sum(self.sched.blocks.blocks_for(len(h.token_ids)) - len(h.lease.blocks) for h in waiting)

    def _fits(self, num_tokens: int, got: Lease, nbytes: int) -> bool:
        """Under the lock: room for a sequence of `num_tokens` tokens holding the lease `got`, beside the
        handoffs on their way and the reservations of streamed ones, within the bytes bound."""
        s = self.sched
        waiting, blocks = self._waiting_blocks()
        need = s.blocks.blocks_for(num_tokens) - len(got.blocks) + blocks
        return (num_tokens < s.cfg.max_model_len and len(s.running) + len(waiting) + len(self._held)
                < s.cfg.max_running
                and need <= s.blocks.num_free and self.pending_bytes + nbytes <= self.max_pending_bytes)

    def unlease(self, held: Lease) -> None:
        """Give back the blocks of a lease whose handoff will not come (a failed pull, a cancel)."""
        with self._lock:
            give_back(self.sched.blocks, held)

    def _drop(self, h: _Handoff) -> None:
        """Under the lock: a handoff that will not be adopted gives back its lease now and its streamed
        reservation once no box of its stream is in a call."""
        give_back(self.sched.blocks, h.lease)
        if h.held is not None:
            self._releasing.append((h.held, h.kvs))

    def hand(self, h: _Handoff) -> None:
        with self._lock:
            h.stream.engine = self
            self._pending.append(h)
        self._wake.set()

    # -- streamed K/V (engine/kv_stream.py): blocks reserved while the prompt is prefilled elsewhere --------
    def reserve(self, num_prompt: int, params: SamplingParams) -> Sequence | None:
        """Blocks for a prompt of `num_prompt` positions and its first token, whose K/V will stream in
        while it is prefilled, and a place among max_running; None when there is no room."""
        if self.down is not None:
            return None
        with self._lock:
            s = self.sched
            waiting, blocks = self._waiting_blocks()
            if len(s.running) + len(waiting) + len(self._held) >= s.cfg.max_running:
                return None
            if s.blocks.num_free - blocks < s.blocks.blocks_for(num_prompt + 1):
                return None
            held = s.reserve(num_prompt + 1, params)
            if held is not None:
                self._held[held] = s.blocks
            return held

    def release(self, held: Sequence, kvs: KVStream | None) -> None:
        """Give a reservation back once no box of its stream is in a call any more (any thread, no lock)."""
        self._releasing.append((held, kvs))
        self._wake.set()

    def _give_back(self) -> None:
        """Under the lock: reservations released whose streams are quiet go back to the pool (at once once this
        group is down for good: nothing runs on its pool again, whatever lands in it late)."""
        for _ in range(len(self._releasing)):
            held, kvs = self._releasing.popleft()
            if kvs is not None and kvs.outstanding > 0 and self.down is None:  # a box may still be written into it
                self._releasing.append((held, kvs))
            elif self._held.pop(held, None) is self.sched.blocks:  # not if the pool was re-made since
                self.sched.unreserve(held)

    def _next_handoff(self) -> _Handoff | None:
        """Under the lock: the first waiting sequence whose K/V are here (pulled, or streamed in)."""
        return next((h for h in self._pending if h.kvs is None or h.kvs.finished), None)

    def _between_steps(self) -> None:
        with self._lock:
            if self.down is not None:  # recovery: what still waits to come here goes back at once
                self._lost += [(h.stream, self.down) for h in self._pending]
                for h in self._pending:
                    self._drop(h)
                self._pending.clear()
            self._give_back()
        self._hand_over()
        while True:
            with self._lock:
                if self._failed is not None:  # no recovery: what waits would be pushed to the same failed devices
                    while self._pending:
                        h = self._pending.popleft()
                        self._drop(h)
                        h.stream._end("abort", self._failed)
                    self._failed = None
                h = self._next_handoff()
                if h is None:
                    return
                if isinstance(h.kvs, DirectMove) and (h.kvs.error is not None
                                                      or self._held.get(h.held) is not self.sched.blocks):
                    # sent directly and failed after the reads (the prefill group's blocks are gone), or this group
                    # re-planned under it (its pool re-made: the blocks it went into are gone, as a two-hop box cut
                    # for the old split): its tokens run again here (a decode device gone fails that step, told as
                    # this group's failure; with recovery the group re-plans again)
                    if h.kvs.error is not None:
                        log.warning("a direct K/V move failed after its reads (%s): the sequence runs all its "
                                    "tokens again on the decode group", h.kvs.error)
                        self.mover.direct.fell_back += 1
                    self._pending.remove(h)
                    self._drop(h)
                    self._requeue(h)
                    continue
                if h.kvs is not None and (h.kvs.error is not None or self._held.get(h.held) is not self.sched.blocks):
                    self._pending.remove(h)  # its stream failed (or this pool was re-made under it)
                    self._drop(h)
                    self._lost_handoff(h, h.kvs.error or GalaxyError("the decode group's KV pool was re-made "
                                                                     "while K/V streamed in"))
                    continue
                if h.decode_split not in (None, self.mover.decode.partition) or not h.lease.valid_in(self.sched.blocks):
                    # re-planned since the pull (the boxes fit the old split), or since the lease (its pool was
                    # re-made, the leased prefix gone): run its tokens again here instead
                    self._pending.remove(h)
                    self._drop(h)
                    self._requeue(h)
                    continue
                try:
                    seq = self.sched.adopt(h.token_ids, h.num_prompt, h.params, h.deadline, reserved=h.held,
                                           prefix=h.lease.blocks)
                except InvalidRequest as e:  # longer than this group's pool holds (lease_for refuses it first)
                    self._pending.remove(h)
                    self._drop(h)
                    h.stream._end("abort", e)
                    continue
                if seq is None:  # no room until running sequences finish
                    return
                self._pending.remove(h)
                self.streams[seq.seq_id] = h.stream
                h.stream.seq = seq
                table = tuple(seq.block_table)
                if h.kvs is not None:  # streamed: its K/V are in the blocks it reserved, which it now holds
                    self._held.pop(h.held, None)
                    self.sched.blocks.commit(seq)  # named: a later handoff of its prefix finds them
                    t = h.kvs.timing()
                    gen = h.stream.generation
                    direct = isinstance(h.kvs, DirectMove)
                    self._adopted(gen, KVHandoff(len(gen.tokens), t.nbytes, t.export_s, 0.0, t.import_s,
                                                 time.perf_counter() - h.stream.submitted, t.hidden_s, t.exposed_s,
                                                 not direct, direct))
                    continue
            t0 = time.perf_counter()
            try:
                self.mover.push(h.boxes, table, self.pool, h.lease.skip)
            except CacheLost as e:  # a device dropped out and the group re-planned: every K/V here is gone,
                self._lose_kv(e)  # this sequence's too -- it runs all its tokens again, as the others do
                continue
            except GalaxyError as e:
                log.warning("pushing the K/V of a sequence to the decode group failed: %s", e)
                with self._lock:
                    self.sched.abort(seq.seq_id)
                    self._finish(seq.seq_id, "abort", e)
                continue
            with self._lock:
                if self.sched.live.get(seq.seq_id) is seq:  # its K/V are here now: a later handoff of its prefix
                    self.sched.blocks.commit(seq)  # finds them
            now = time.perf_counter()
            gen = h.stream.generation
            self._adopted(gen, KVHandoff(len(gen.tokens), h.nbytes, h.export_s, t0 - h.pulled_at, now - t0,
                                         now - h.stream.submitted, exposed_s=now - h.pulled_at + h.export_s))

    def _lost_handoff(self, h: _Handoff, error: GalaxyError) -> None:
        """Under the lock: a handoff that cannot be adopted: back to the prefill group with recovery,
        else ended with `error`."""
        if self.fallback is not None:
            self._lost.append((h.stream, error))  # handed over at the next call, outside this lock
            self._wake.set()
        else:
            h.stream._end("abort", error)

    def _adopted(self, gen: Generation, handoff: KVHandoff) -> None:
        gen.handoff = handoff
        self.adopted += 1
        self.transfer["streamed"] += handoff.streamed
        self.transfer["direct"] += handoff.direct
        self.transfer["hidden_s"] += handoff.hidden_s
        self.transfer["exposed_s"] += handoff.exposed_s

    def take_over(self, stream: GenerationStream, error: GalaxyError) -> None:
        """With recovery: a sequence the prefill group lost when no device of it survived runs all its
        tokens again here; this group then prefills and decodes every request (colocated)."""
        if run_again(self, stream, error):
            self.taken_over += 1

    def _requeue(self, h: _Handoff) -> None:
        """A handoff whose boxes were cut for a split this group no longer has, or whose leased prefix went
        with a re-made pool: all its tokens run again here (caller holds the lock)."""
        try:
            requeue(self, h.stream, h.token_ids, h.num_prompt, h.params, h.deadline)
        except GalaxyError as e:
            h.stream._end("abort", e)

    def _finish(self, seq_id: int, finish: str, error: BaseException | None = None) -> None:
        """A sequence ended by a device failure: with recovery it goes back to the prefill group; without,
        it ends with the error, which names the device and this group, and so does every sequence still
        waiting to come here (their K/V would go to the same devices)."""
        stream = self.streams.get(seq_id)
        error = phase_error(error, self.phase) if error is not None else None
        if (self.fallback is None or stream is None or not isinstance(error, GalaxyError)
                or isinstance(error, InvalidRequest)):
            if isinstance(error, GalaxyError) and not isinstance(error, InvalidRequest):
                self._failed = error
            super()._finish(seq_id, finish, error)
            return
        self._fail_over(seq_id, stream, error)

    def _cancel(self, stream: GenerationStream) -> None:
        with self._lock:
            h = next((x for x in self._pending if x.stream is stream), None)
            if h is not None:
                self._pending.remove(h)
                self._drop(h)
                stream._end("abort")
                return
        super()._cancel(stream)

    def close(self, error: GalaxyError | None = None) -> None:
        super().close(error)
        with self._lock:
            self._end_lost(error)
            error = error or GalaxyError("the engine was closed before this request finished")
            while self._pending:
                h = self._pending.popleft()
                self._drop(h)
                h.stream._end("abort", error)
            self._give_back()


class PrefillEngine(FailOver, Engine):
    """An Engine whose sequences, once they have a token and room waits on the decode group, move
    there between its steps (pulling their K/V, then freeing their blocks here)."""

    phase = "prefill"

    def __init__(self, executor: Executor, model: ModelConfig, tokenizer, config: EngineConfig,
                 decode: DecodeEngine, mover: KVMover, streamer: KVStreamer | None = None):
        self.decode, self.mover, self.streamer = decode, mover, streamer
        self._kvs: dict[int, tuple[KVStream, Sequence]] = {}  # streaming sequences: their stream, decode blocks
        self._unstreamed: set[int] = set()  # sequences whose stream was dropped (preempted): they move after
        self.dropped_streams = 0
        self._ready: list[int] = []  # sequences that got a token and may move (the loop's thread only)
        self.moved = 0
        self.kept_tokens = 0  # tokens decoded here while the decode group had no room (backpressure)
        self.recovered = 0  # sequences the decode group lost that run again here
        self._init_fail_over()
        super().__init__(executor, model, tokenizer, config)

    def take_back(self, stream: GenerationStream, error: GalaxyError) -> None:
        """A sequence the decode group lost (its K/V with it): queue all its tokens -- prompt and
        generated -- to run again here, as a preempted sequence does; its next token comes from the
        last one's logits, so its stream goes on as if nothing happened. If it cannot be queued, it
        ends with the decode group's error."""
        if run_again(self, stream, error):
            self.recovered += 1

    def _token(self, stream: GenerationStream, seq: Sequence) -> None:
        later = bool(stream.generation.tokens)  # not its first token: it could not move after the first
        super()._token(stream, seq)
        self.kept_tokens += later
        if not seq.is_finished and seq.seq_id in self.streams:
            self._ready.append(seq.seq_id)

    # -- streamed K/V (engine/kv_stream.py) --------------------------------------------------------
    def _stream_chunks(self) -> None:
        """After a step: queue each streaming prompt's chunks finished since, and open a stream (blocks
        reserved on the decode group) for each prompt with more chunks to run; drop the stream of a
        sequence preempted or gone here."""
        opening = []
        with self._lock:
            for sid, (kvs, _) in list(self._kvs.items()):
                seq = self.sched.live.get(sid)
                if seq is None or sid not in self.streams:  # cancelled
                    self._drop_stream(sid)
                elif seq.status is not SequenceStatus.RUNNING or seq.num_preemptions != kvs.preemptions:
                    self._drop_stream(sid, moved_after=True)  # preempted: its blocks here may have been reused
            for seq in self.sched.running:
                sid = seq.seq_id
                if not 0 < seq.num_computed < seq.num_prompt or sid not in self.streams or sid in self._unstreamed:
                    continue
                if sid in self._kvs:
                    self.streamer.send(self._kvs[sid][0], seq.num_computed, seq.block_table)
                else:
                    opening.append((sid, seq.num_prompt, seq.params))
        for sid, num_prompt, params in opening:  # the decode group's lock, never under this one
            held = self.decode.reserve(num_prompt, params)
            if held is None:
                continue  # no room there now: asks again after the next chunk (or moves after the prefill)
            with self._lock:
                seq = self.sched.live.get(sid)
                if seq is None or seq.status is not SequenceStatus.RUNNING or sid not in self.streams:
                    self.decode.release(held, None)
                    continue
                kvs = self.streamer.open(sid, held.block_table, seq.num_preemptions, (self.pool, self.decode.pool),
                                         wake=self.decode._wake.set)
                self._kvs[sid] = (kvs, held)
                self.streamer.send(kvs, seq.num_computed, seq.block_table)

    def _drop_stream(self, sid: int, moved_after: bool = False) -> None:
        """Under the lock: stop streaming `sid` and give its decode blocks back once no box is in a call
        (moved_after: the sequence goes on here and moves after its prefill, the first increment's way)."""
        entry = self._kvs.pop(sid, None)
        if entry is not None:
            self.streamer.cancel(entry[0])
            self.decode.release(entry[1], entry[0])
        if moved_after and entry is not None:
            self._unstreamed.add(sid)
            self.dropped_streams += 1
        elif not moved_after:
            self._unstreamed.discard(sid)

    def _hand_streamed(self, sid: int) -> bool:
        """A streaming sequence got its first token: queue its last chunk, wait until its boxes are
        read here (not pushed: the decode group adopts it when they are), free its blocks here and hand
        it over. A failed or stalled stream ends the request with that error -- or, with recovery on,
        it moves after its prefill instead (False: the caller does that), whose failure recovery covers."""
        kvs, held = self._kvs[sid]
        with self._lock:
            seq = self.sched.live[sid]
            self.streamer.send(kvs, seq.num_computed, seq.block_table, last=True)
        try:
            self.streamer.wait_exported(kvs)
        except GalaxyError as e:
            with self._lock:
                if self.decode.fallback is not None:
                    self._drop_stream(sid)
                    return False
                if self.sched.abort(sid):
                    self._finish(sid, "abort", e)
                self._drop_stream(sid)
            return True
        with self._lock:
            stream = self.streams.get(sid)
            if stream is None:  # cancelled meanwhile
                self._drop_stream(sid)
                return True
            self._kvs.pop(sid)
            self.sched.abort(sid)  # frees its blocks here (their prefix stays cached)
            self.streams.pop(sid)
            self.decode.hand(_Handoff(stream, list(seq.token_ids), seq.num_prompt, seq.params, seq.deadline, [], 0,
                                      0.0, time.perf_counter(), kvs=kvs, held=held))
            self.moved += 1
        return True

    def _between_steps(self) -> None:
        self._hand_over()
        if self.streamer is not None:
            self._stream_chunks()
        ready, self._ready = self._ready, []
        for sid in ready:
            with self._lock:
                stream, seq = self.streams.get(sid), self.sched.live.get(sid)
                if (stream is None or seq is None or seq.status is not SequenceStatus.RUNNING
                        or seq.num_uncomputed != 1):
                    continue
                table, tokens, token_ids = tuple(seq.block_table), seq.num_computed, list(seq.token_ids)
                streamed = sid in self._kvs
                self._unstreamed.discard(sid)
            if streamed and self._hand_streamed(sid):
                continue
            if self.mover.direct is not None:
                done = self._send_direct(sid, stream, seq, table, tokens, token_ids)
                if done is None:
                    return  # this group lost its K/V (CacheLost): every sequence runs again
                if done:
                    continue
            got = self.decode.lease_for(token_ids, tokens, self.pool.block_size, seq.kernel_from)
            if got is None:
                continue  # decodes here this step; tries again at its next token
            decode_split = self.mover.decode.partition  # before the pull: a re-plan during it shows at the push
            t0 = time.perf_counter()
            try:
                boxes = self.mover.pull(table, tokens, self.pool, got.skip)
            except CacheLost as e:  # a device dropped out and this group re-planned: every sequence runs again
                self.decode.unlease(got)
                self._lose_kv(e)
                return
            except GalaxyError as e:
                log.warning("pulling the K/V of a sequence from the prefill group failed: %s", e)
                self.decode.unlease(got)
                with self._lock:
                    if self.sched.abort(sid):
                        self._finish(sid, "abort", e)
                continue
            export_s = time.perf_counter() - t0
            with self._lock:
                if sid not in self.streams:  # cancelled meanwhile
                    self.decode.unlease(got)
                    continue
                self.sched.abort(sid)  # frees its blocks here (their prefix stays cached)
                self.streams.pop(sid)
                self.decode.hand(_Handoff(stream, token_ids, seq.num_prompt, seq.params, seq.deadline, boxes,
                                          sum(c.nbytes(self.model, tokens - got.skip, b.element_size())
                                              for c, b in boxes), export_s, time.perf_counter(), decode_split,
                                          lease=got))
                self.moved += 1

    def _send_direct(self, sid: int, stream: GenerationStream, seq: Sequence, table, tokens: int, token_ids
                     ) -> bool | None:
        """Move a sequence's K/V in one hop (engine/kv_direct.py) into blocks reserved on the decode group:
        once every box is read from the prefill devices, free its blocks here and hand it over (the decode group
        adopts it when every box is in). True: handed over, ended, or no room there now (it tries again at its
        next token);
        False: the direct move failed on the receivers' side, so the caller moves it through the coordinator;
        None: this group re-planned (CacheLost) and the caller must stop."""
        got = self.decode.reserve_move(token_ids, tokens, self.pool.block_size, seq.params, seq.kernel_from)
        if got is None:
            return True  # decodes here this step; tries again at its next token
        held, skip = got
        decode_split = self.mover.decode.partition  # before the move: a re-plan during it shows at adoption
        move = DirectMove(wake=self.decode._wake.set)
        try:
            self.mover.send(move, table, tokens, self.pool, skip, held.block_table, self.decode.pool)
        except CacheLost as e:  # a device dropped out and this group re-planned: every sequence runs again
            self.decode.release(held, move)
            self._lose_kv(e)
            return None
        except KVDirectFailed as e:  # the receivers' side: through the coordinator instead
            log.warning("a direct K/V move to the decode group failed, moving it through the coordinator: %s", e)
            self.decode.release(held, move)
            self.mover.direct.fell_back += 1
            return False
        except GalaxyError as e:  # the sender's side, as a failed pull
            log.warning("sending the K/V of a sequence from the prefill group failed: %s", e)
            self.decode.release(held, move)
            with self._lock:
                if self.sched.abort(sid):
                    self._finish(sid, "abort", e)
            return True
        with self._lock:
            if sid not in self.streams:  # cancelled meanwhile
                self.decode.release(held, move)
                return True
            self.sched.abort(sid)  # frees its blocks here (their prefix stays cached)
            self.streams.pop(sid)
            self.decode.hand(_Handoff(stream, token_ids, seq.num_prompt, seq.params, seq.deadline, [], 0, 0.0,
                                      time.perf_counter(), decode_split, kvs=move, held=held))
            self.moved += 1
        return True

    def _finish(self, seq_id: int, finish: str, error: BaseException | None = None) -> None:
        """A request that ends here with a device's error is told it was the prefill group's. With
        recovery, such an error means no device of this group survived (a re-planning executor re-plans
        over the survivors and raises CacheLost instead): the sequence goes to the decode group. A stream
        of its K/V stops either way."""
        if seq_id in self._kvs or seq_id in self._unstreamed:
            self._drop_stream(seq_id)
        error = None if error is None else phase_error(error, self.phase)
        stream = self.streams.get(seq_id)
        if self.fallback is None or stream is None or not isinstance(error, (PeerUnreachable, WorkerError)):
            super()._finish(seq_id, finish, error)
            return
        self._fail_over(seq_id, stream, error)

    def close(self, error: GalaxyError | None = None) -> None:
        super().close(error)
        with self._lock:
            self._end_lost(error)

    def _cancel(self, stream: GenerationStream) -> None:
        with self._lock:
            moved = stream.engine is not self
        (stream.engine._cancel if moved else super()._cancel)(stream)


class DisaggEngine:
    """Prefill on one executor, decode on another, each sequence's K/V moved in between. Offers the
    Engine's request API (submit, generate, close, load)."""

    def __init__(self, prefill: Executor, decode: Executor, model: ModelConfig, tokenizer=None,
                 prefill_config: EngineConfig = EngineConfig(), decode_config: EngineConfig = EngineConfig(),
                 config: DisaggConfig = DisaggConfig()):
        self.model, self.config = model, config
        self.mover = KVMover(prefill, decode, model, config)
        self.mover.plan()  # both loaded, same model: refused here, not at the first request
        self.decode = DecodeEngine(decode, model, tokenizer, decode_config, self.mover, config.max_pending_bytes)
        self.streamer = None if config.stream is None else KVStreamer(prefill, decode, model, self.mover.plan,
                                                                      config.stream)
        try:
            self.prefill = PrefillEngine(prefill, model, tokenizer, prefill_config, self.decode, self.mover,
                                         self.streamer)
        except BaseException:
            self.decode.close()
            if self.streamer is not None:
                self.streamer.close()
            raise
        if config.recover:
            self.decode.fallback = self.prefill.take_back
            self.prefill.fallback = self.decode.take_over
        self.index = PrefixIndex([PoolView("prefill", self.prefill, lambda: self.prefill.down is None),
                                  PoolView("decode", self.decode, lambda: self.decode.down is None)])

    @property
    def tok(self):
        return self.prefill.tok

    @property
    def kv_path(self) -> str:
        """The path each sequence's K/V take after its prefill: "direct" when asked for and both groups are
        workers, else "coordinator" (a direct move that fails on the receivers' side still goes that way)."""
        return "coordinator" if self.mover.direct is None else "direct"

    def submit(self, prompt_ids: list[int], gc: GenerationConfig | None = None,
               timeout: float | None = None) -> GenerationStream:
        """Queue a generation on the prefill group -- or, with `route_by_prefix`, on the decode group
        when its pool holds more of the prompt (it then runs the rest of the prompt itself, nothing
        moves), and on the decode group once the prefill group is gone (with recovery); raises
        InvalidRequest or QueueFull at once."""
        if self.prefill.down is not None:
            stream = self.decode.submit(prompt_ids, gc, timeout)
            self.index.routed["decode"] += 1
            return stream
        if self.config.route_by_prefix and not self.prefill._closed:
            where = self.index.route(checked_ids("prompt", prompt_ids, self.model.vocab_size))
            if where.engine is not self.prefill:
                try:
                    stream = where.engine.submit(prompt_ids, gc, timeout)
                    self.index.routed[where.name] += 1
                    return stream
                except (InvalidRequest, QueueFull):  # its pool is smaller, or its queue full: the prefill group's way
                    pass
        stream = self.prefill.submit(prompt_ids, gc, timeout)
        self.index.routed["prefill"] += 1
        return stream

    def generate(self, prompt_ids: list[int], gc: GenerationConfig | None = None,
                 timeout: float | None = None) -> Generation:
        return self.submit(prompt_ids, gc, timeout).result()

    @property
    def load(self) -> dict:
        """The Engine's figures over both groups (requests running and waiting in either, the decode
        group's KV pool, each device's KV bytes named by group), and each group's own under
        "prefill" / "decode" with the moves: sequences moved, tokens decoded on the prefill group
        for want of room, K/V bytes held at the coordinator now, and the transfer time hidden behind
        the prefill and exposed after the first token, summed over the sequences adopted; the requests
        sent to each group ("routed") and the tokens of K/V the decode group found leased instead of
        moved ("decode_leased_tokens")."""
        pre, dec = self.prefill.load, self.decode.load
        with self.decode._lock:
            pending = len(self.decode._pending)
            dec_leased = self.decode.sched.blocks.stats.leased_tokens
        kv = {f"prefill {k}": v for k, v in pre["kv_bytes"].items()}
        kv.update({f"decode {k}": v for k, v in dec["kv_bytes"].items()})
        return {"running": pre["running"] + dec["running"], "waiting": pre["waiting"] + pending + dec["waiting"],
                "kv_blocks": dec["kv_blocks"], "kv_blocks_used": dec["kv_blocks_used"],
                "prefix_hit_rate": pre["prefix_hit_rate"], "preemptions": pre["preemptions"] + dec["preemptions"],
                "steps": pre["steps"] + dec["steps"], "generated_tokens": pre["generated_tokens"] +
                dec["generated_tokens"], "kv_bytes": kv, "prefill": pre, "decode": dec, "moved": self.prefill.moved,
                "kept_tokens": self.prefill.kept_tokens, "pending_bytes": self.decode.pending_bytes,
                "recovered": self.prefill.recovered, "routed": dict(self.index.routed),
                "decode_leased_tokens": dec_leased, "decode_down": None if self.decode.down is None else
                str(self.decode.down), "taken_over": self.decode.taken_over,
                "prefill_down": None if self.prefill.down is None else str(self.prefill.down),
                "kv_transfer": dict(self.decode.transfer, path=self.kv_path, adopted=self.decode.adopted,
                                    direct_fell_back=self.mover.direct.fell_back if self.mover.direct else 0,
                                    inflight_bytes=self.streamer.inflight if self.streamer else 0)}

    @property
    def step_log(self) -> dict:
        """Each group's steps, named: {"prefill": ..., "decode": ...}, each an Engine.step_log of (decodes,
        prompt tokens, seconds) -- a prefill step may carry decodes too (a sequence waiting for room on the
        decode group decodes there)."""
        return {"prefill": self.prefill.step_log, "decode": self.decode.step_log}

    @property
    def last_step(self):
        """The decode group's last step (the prefill group's before any decode ran)."""
        return self.decode.last_step or self.prefill.last_step

    def close(self, error: GalaxyError | None = None) -> None:
        self.prefill.close(error)
        if self.streamer is not None:
            self.streamer.close()
        if self.mover.direct is not None:
            self.mover.direct.close()
        self.decode.close(error)

