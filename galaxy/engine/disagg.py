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

The K/V go through the coordinator in this first increment: pulled from the prefill workers
(Executor.export_kv), held here, pushed to the decode workers (Executor.import_kv), each message a
box of at most `chunk_bytes` (cut by layers), every call with the executor's timeout, and the
workers check every box's shape, dtype, heads and blocks before touching their pool. The bytes
held here between pull and push are bounded (`max_pending_bytes`): while the decode group has no
room (blocks, a place among its running sequences, or that bound), a sequence keeps decoding on the
prefill group and moves at a later token -- backpressure, never an unbounded queue, and never a
wrong token: the K/V moved are those of every token computed so far, whenever it moves. Streaming
each layer's K/V worker to worker while the rest of the prefill runs (Splitwise) is the next step.

Correctness: the decode devices end up holding exactly the K/V they would have computed
themselves, bit for bit, so greedy tokens equal the single-device reference (tests/engine/
test_disagg.py). Faults: a decode device that drops out fails the push or the step, and the
requests on the decode group end with that error, which names the device; the next requests are
served if it comes back. With `recover`, they run their tokens again on the prefill group instead
(its prefix cache often still holds their prompt) and finish there with the tokens they would have
got, and the prefill group decodes every later sequence too (colocated). Both groups must compute
in the same dtype (a box of another is refused).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import GalaxyError, InvalidRequest, PlanMismatch
from ..model.config import ModelConfig
from ..parallel.executor import Executor
from ..parallel.kv_transfer import KVPiece, box_bytes, plan_between
from ..parallel.rank import KVPool
from ..parallel.sharding import Partition
from .arguments import token_ids as checked_ids
from .engine import Engine, EngineConfig, GenerationStream
from .generation import Generation, GenerationConfig, KVHandoff
from .prefix_index import Lease, PoolView, PrefixIndex, give_back, lease, tail
from .scheduler import QueueFull
from .sequence import SamplingParams, Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DisaggConfig:
    """How K/V move between the groups (through the coordinator, this increment)."""

    chunk_bytes: int = 4 << 20  # most bytes of one box on the wire: pieces are cut by layers below it
    max_pending_bytes: int = 256 << 20  # K/V held at the coordinator between pull and push, all sequences
    itemsize: int = 4  # bytes of one K/V element (the compute dtype of both groups) for the bound
    # a failed decode group: its sequences run their tokens again on the prefill group and finish there,
    # and every later one decodes there too (False: they end with the error, which names the device)
    recover: bool = False
    # a request goes to the group whose KV pool holds more of its prompt (the decode group then runs its
    # prompt's rest itself, nothing moved); False: every request is prefilled on the prefill group
    route_by_prefix: bool = True

    def __post_init__(self):
        for f in ("recover", "route_by_prefix"):
            if not isinstance(getattr(self, f), bool):
                raise PlanMismatch(f"disaggregation config: {f}={getattr(self, f)!r} must be True or False")
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
    lease: Lease = Lease()  # blocks the decode group already held for the leading tokens (only the rest moved)


class KVMover:
    """Pulls a sequence's K/V box by box from the prefill executor and pushes them to the decode one."""

    def __init__(self, prefill: Executor, decode: Executor, model: ModelConfig, config: DisaggConfig):
        self.prefill, self.decode, self.model, self.config = prefill, decode, model, config
        self._planned: tuple[Partition, Partition, tuple[KVPiece, ...]] | None = None

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

    def push(self, boxes, block_table, pool: KVPool, skip: int = 0) -> None:
        table = tail(block_table, skip, pool)
        for c, box in boxes:
            self.decode.import_kv(c.dst, table, box, c.layers, c.heads, pool)


class DecodeEngine(Engine):
    """An Engine that also adopts sequences prefilled elsewhere, their K/V pushed into its pool
    between its steps."""

    def __init__(self, executor: Executor, model: ModelConfig, tokenizer, config: EngineConfig,
                 mover: KVMover, max_pending_bytes: int):
        self.mover, self.max_pending_bytes = mover, max_pending_bytes
        self._pending: deque[_Handoff] = deque()
        self.adopted = 0
        self.down: GalaxyError | None = None  # the failure that took this group out (with recovery on)
        self.fallback = None  # with recovery: fallback(stream, error) takes a sequence this group lost
        self._lost: list[tuple[GenerationStream, GalaxyError]] = []  # for the fallback, outside this lock
        super().__init__(executor, model, tokenizer, config)

    @property
    def pending_bytes(self) -> int:
        """K/V bytes held at the coordinator for moves not pushed yet (the queue is bounded by them)."""
        return sum(h.nbytes for h in tuple(self._pending))  # a snapshot: the load report reads it unlocked

    def can_take(self, num_tokens: int, nbytes: int) -> bool:
        """Whether a sequence of `num_tokens` tokens (K/V of all but the last) may move here now:
        blocks and a running place beside those already on their way, and the bytes bound."""
        if self.down is not None:
            return False
        with self._lock:
            return self._fits(num_tokens, Lease(), nbytes)

    def reserve(self, token_ids, tokens: int, src_block_size: int) -> Lease | None:
        """can_take for a sequence whose K/V of `tokens` positions would move here, once the blocks
        this pool already holds for its leading tokens are leased (prefix_index.lease: only the rest
        moves). None, nothing leased, while there is no room."""
        if self.down is not None:
            return None
        with self._lock:
            got = lease(self.sched.blocks, token_ids, tokens, src_block_size)
            if self._fits(len(token_ids), got, self.mover.seq_bytes(tokens - got.skip)):
                return got
            give_back(self.sched.blocks, got)
            return None

    def _fits(self, num_tokens: int, got: Lease, nbytes: int) -> bool:
        s, waiting = self.sched, list(self._pending)
        need = s.blocks.blocks_for(num_tokens) - len(got.blocks)
        need += sum(s.blocks.blocks_for(len(h.token_ids)) - len(h.lease.blocks) for h in waiting)
        return (num_tokens < s.cfg.max_model_len and len(s.running) + len(waiting) < s.cfg.max_running
                and need <= s.blocks.num_free and self.pending_bytes + nbytes <= self.max_pending_bytes)

    def unlease(self, lease: Lease) -> None:
        """Give back the blocks of a lease whose handoff will not come (a failed pull, a cancel)."""
        with self._lock:
            give_back(self.sched.blocks, lease)

    def hand(self, h: _Handoff) -> None:
        with self._lock:
            h.stream.engine = self
            self._pending.append(h)
        self._wake.set()

    def _between_steps(self) -> None:
        with self._lock:
            if self.down is not None:  # recovery: what still waits to come here goes back at once
                self._lost += [(h.stream, self.down) for h in self._pending]
                for h in self._pending:
                    give_back(self.sched.blocks, h.lease)
                self._pending.clear()
            lost, self._lost = self._lost, []
        for stream, error in lost:
            self.fallback(stream, error)
        while True:
            with self._lock:
                if not self._pending:
                    return
                h = self._pending[0]
                if not h.lease.valid_in(self.sched.blocks):  # the pool was reset (CacheLost): its prefix is gone
                    self._pending.popleft()
                    self._lost_handoff(h, GalaxyError("the decode group's K/V pool was reset while a sequence "
                                                      "was on its way"))
                    continue
                try:
                    seq = self.sched.adopt(h.token_ids, h.num_prompt, h.params, h.deadline, h.lease.blocks)
                except InvalidRequest as e:  # longer than this group's pool holds (can_take refuses it first)
                    self._pending.popleft()
                    give_back(self.sched.blocks, h.lease)
                    h.stream._end("abort", e)
                    continue
                if seq is None:  # no room until running sequences finish
                    return
                self._pending.popleft()
                self.streams[seq.seq_id] = h.stream
                h.stream.seq = seq
                table = tuple(seq.block_table)
            t0 = time.perf_counter()
            try:
                self.mover.push(h.boxes, table, self.pool, h.lease.skip)
            except GalaxyError as e:
                log.warning("pushing the K/V of a sequence to the decode group failed: %s", e)
                with self._lock:
                    self.sched.abort(seq.seq_id)
                    self._finish(seq.seq_id, "abort", e)
                continue
            with self._lock:
                if seq.seq_id in self.sched.live:  # its K/V are here now: a later handoff of its prefix finds them
                    self.sched.blocks.commit(seq)
            now = time.perf_counter()
            gen = h.stream.generation
            gen.handoff = KVHandoff(len(gen.tokens), h.nbytes, h.export_s, t0 - h.pulled_at, now - t0,
                                    now - h.stream.submitted)
            self.adopted += 1

    def _lost_handoff(self, h: _Handoff, error: GalaxyError) -> None:
        """A handoff that cannot be adopted: back to the prefill group with recovery, else ended."""
        if self.fallback is not None:
            self._lost.append((h.stream, error))  # handed over at the next call, outside this lock
            self._wake.set()
        else:
            h.stream._end("abort", error)

    def _finish(self, seq_id: int, finish: str, error: BaseException | None = None) -> None:
        """With recovery, a sequence ended by a device failure goes back to the prefill group."""
        stream = self.streams.get(seq_id)
        if (self.fallback is None or stream is None or not isinstance(error, GalaxyError)
                or isinstance(error, InvalidRequest)):
            super()._finish(seq_id, finish, error)
            return
        if self.down is None:
            log.warning("the decode group failed (%s): its sequences run again on the prefill group, which "
                        "decodes every sequence from now on", error)
            self.down = error
        del self.streams[seq_id]
        self._lost.append((stream, error))  # handed over between steps: never under this lock (lock order)
        self._wake.set()

    def _cancel(self, stream: GenerationStream) -> None:
        with self._lock:
            h = next((x for x in self._pending if x.stream is stream), None)
            if h is not None:
                self._pending.remove(h)
                give_back(self.sched.blocks, h.lease)
                stream._end("abort")
                return
        super()._cancel(stream)

    def close(self, error: GalaxyError | None = None) -> None:
        super().close(error)
        with self._lock:
            error = error or GalaxyError("the engine was closed before this request finished")
            for stream, _ in self._lost:
                stream._end("abort", error)
            self._lost = []
            while self._pending:
                h = self._pending.popleft()
                give_back(self.sched.blocks, h.lease)
                h.stream._end("abort", error)


class PrefillEngine(Engine):
    """An Engine whose sequences, once they have a token and room waits on the decode group, move
    there between its steps (pulling their K/V, then freeing their blocks here)."""

    def __init__(self, executor: Executor, model: ModelConfig, tokenizer, config: EngineConfig,
                 decode: DecodeEngine, mover: KVMover):
        self.decode, self.mover = decode, mover
        self._ready: list[int] = []  # sequences that got a token and may move (the loop's thread only)
        self.moved = 0
        self.kept_tokens = 0  # tokens decoded here while the decode group had no room (backpressure)
        self.recovered = 0  # sequences the decode group lost that run again here
        super().__init__(executor, model, tokenizer, config)

    def take_back(self, stream: GenerationStream, error: GalaxyError) -> None:
        """A sequence the decode group lost (its K/V with it): queue all its tokens -- prompt and
        generated -- to run again here, as a preempted sequence does; its next token comes from the
        last one's logits, so its stream goes on as if nothing happened. If it cannot be queued, it
        ends with the decode group's error."""
        gen = stream.generation
        seq = stream.seq
        try:
            with self._lock:
                again = self.sched.add(list(gen.prompt_tokens) + list(gen.tokens), seq.params)
                again.num_prompt, again.deadline = len(gen.prompt_tokens), seq.deadline  # its own budget and deadline
                stream.seq, stream.engine = again, self
                self.streams[again.seq_id] = stream
                self.recovered += 1
        except GalaxyError as e:
            stream._end("abort", GalaxyError(f"{error} (and it could not run again on the prefill group: {e})"))
            return
        self._wake.set()

    def _token(self, stream: GenerationStream, seq: Sequence) -> None:
        later = bool(stream.generation.tokens)  # not its first token: it could not move after the first
        super()._token(stream, seq)
        self.kept_tokens += later
        if not seq.is_finished and seq.seq_id in self.streams:
            self._ready.append(seq.seq_id)

    def _between_steps(self) -> None:
        ready, self._ready = self._ready, []
        for sid in ready:
            with self._lock:
                stream, seq = self.streams.get(sid), self.sched.live.get(sid)
                if (stream is None or seq is None or seq.status is not SequenceStatus.RUNNING
                        or seq.num_uncomputed != 1):
                    continue
                table, tokens, token_ids = tuple(seq.block_table), seq.num_computed, list(seq.token_ids)
            got = self.decode.reserve(token_ids, tokens, self.pool.block_size)
            if got is None:
                continue  # decodes here this step; tries again at its next token
            t0 = time.perf_counter()
            try:
                boxes = self.mover.pull(table, tokens, self.pool, got.skip)
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
                                              for c, b in boxes), export_s, time.perf_counter(), got))
                self.moved += 1

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
        try:
            self.prefill = PrefillEngine(prefill, model, tokenizer, prefill_config, self.decode, self.mover)
        except BaseException:
            self.decode.close()
            raise
        if config.recover:
            self.decode.fallback = self.prefill.take_back
        self.index = PrefixIndex([PoolView("prefill", self.prefill),
                                  PoolView("decode", self.decode, lambda: self.decode.down is None)])

    @property
    def tok(self):
        return self.prefill.tok

    def submit(self, prompt_ids: list[int], gc: GenerationConfig | None = None,
               timeout: float | None = None) -> GenerationStream:
        """Queue a generation on the prefill group -- or, with `route_by_prefix`, on the decode group
        when its pool holds more of the prompt (it then runs the rest of the prompt itself, nothing
        moves); raises InvalidRequest or QueueFull at once."""
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
        for want of room, K/V bytes held at the coordinator now."""
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
                str(self.decode.down)}

    @property
    def last_step(self):
        """The decode group's last step (the prefill group's before any decode ran)."""
        return self.decode.last_step or self.prefill.last_step

    def close(self, error: GalaxyError | None = None) -> None:
        self.prefill.close(error)
        self.decode.close(error)

