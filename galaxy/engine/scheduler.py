"""Iteration-level scheduling: which tokens of which sequences every device runs in one step.

Continuous batching (Orca) with stall-free chunked prefill (Sarathi-Serve). Each step spends a
token budget: first one token for every running sequence that is decoding, then chunks of the
prompts already admitted, then chunks of newly admitted prompts, first come first served. A
long prompt is cut into chunks across steps, so it never stops the running streams for more
than one chunk's worth of compute.

Memory: a prompt is admitted only if blocks for all its tokens are free (after reusing its
cached prefix); a decode that needs a block nobody has preempts the youngest running sequence
(by arrival), which gives its blocks back and later runs all its tokens again: recompute
rather than swap, so no device moves K/V anywhere, and its full blocks stay in the prefix cache
until evicted, so resuming often reuses most of them. The oldest
sequence is never preempted for a younger one, and every request that was accepted fits the
pool alone, so every request finishes.

Requests are refused up front, before any state changes: `InvalidRequest` for input that
cannot be served, `QueueFull` when the waiting queue is at its bound. A deadline that passes
ends the sequence at the next step; `abort` (a client that went away) frees its blocks at once.

Contract for the engine loop, which is single-threaded around this object:

    plan = scheduler.schedule()        # same plan, same order, sent to every rank
    copy the blocks in plan.copies on every device, then run plan.items through the model
    scheduler.update(plan, {seq_id: sampled token for each item with logits})

`schedule` and `update` alternate strictly, for every plan, even one with no items (nothing
admissible yet: the loop waits for `add`). `add` and `abort` may be called between any two
calls; a sequence aborted while its plan runs is simply skipped by `update`. The blocks of an
aborted sequence may be written by the step in flight, which is harmless because no other
sequence gets them before the next `schedule`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import GalaxyError, KVBudgetExceeded
from .block_manager import BlockManager
from .sequence import FinishReason, InvalidRequest, SamplingParams, Sequence, SequenceStatus


class QueueFull(GalaxyError):
    """The waiting queue is at its bound; the request was not queued. Retry later (HTTP 503)."""


class SchedulerConfigError(GalaxyError, ValueError):
    """A scheduler setting out of range; the message names the field and both numbers."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV blocks on every device: the smallest count any device's KV budget allows
    block_size: int = 16  # positions per block (vLLM's default)
    max_batched_tokens: int = 512  # tokens run in one step, decodes and prefill chunks together
    chunk_size: int | None = None  # most prompt tokens one sequence runs in a step (None: the budget)
    max_running: int = 64  # sequences holding blocks at once
    max_waiting: int = 256  # queued sequences beyond which new requests are refused
    max_model_len: int = 2048  # prompt plus generated tokens of one sequence
    vocab_size: int | None = None  # token ids must be below this (the engine sets it from the model)
    prefix_caching: bool = True
    # max_model_len is what the KV pool holds (the devices' memory budgets), below the model's positions:
    # a prompt past it is refused with KVBudgetExceeded, a sequence reaching it ends with KV_BUDGET
    kv_limited: bool = False
    # the weights run a token by its role (int8 / int4: model/dense_rows.py): the prefix cache shares only
    # blocks every request computes alike (BlockManager's `roles`)
    roles: bool = False

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SchedulerConfigError(f"scheduler config: {msg}")

        for f in ("num_blocks", "block_size", "max_batched_tokens", "max_running", "max_waiting", "max_model_len"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{f}={v!r} must be an integer >= 1")
        c = self.chunk_size
        need(c is None or (isinstance(c, int) and 1 <= c <= self.max_batched_tokens),
             f"chunk_size={c!r} must be an integer in [1, max_batched_tokens={self.max_batched_tokens}]")
        # every running sequence decodes in every step, so their tokens must fit the budget
        need(self.max_batched_tokens >= self.max_running,
             f"max_batched_tokens={self.max_batched_tokens} is below max_running={self.max_running}: "
             "some decodes would not fit a step")
        # one sequence of the longest length must fit the pool alone, or it could never finish
        need(self.num_blocks * self.block_size >= self.max_model_len,
             f"num_blocks={self.num_blocks} x block_size={self.block_size} positions is below "
             f"max_model_len={self.max_model_len}")
        need(self.max_model_len >= 2, f"max_model_len={self.max_model_len} leaves no room to generate")
        need(self.vocab_size is None or self.vocab_size >= 1, f"vocab_size={self.vocab_size} must be >= 1")

    @property
    def chunk(self) -> int:
        return self.chunk_size or self.max_batched_tokens


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: tuple[int, ...]  # tokens to run, at positions [start, start + len(token_ids))
    start: int  # positions [0, start) already have K/V in the blocks
    block_table: tuple[int, ...]  # block ids; position p lives in block_table[p // block_size]
    logits: bool  # the chunk ends the sequence's tokens: sample from its last position
    kernel_from: int | None = None  # Sequence.kernel_from: where its rows start to run the compact kernel


@dataclass(frozen=True)
class BatchPlan:
    """What every device runs in one step, identical on every rank and in this order.

    Tokens are packed in item order (decodes first, then prefill chunks). The model runner
    takes `token_ids()` and `logit_rows()` from here, and per-token positions and cache slots
    from paged_kv.PagedBatch(block_size, query lengths, starts, block tables of the items)."""

    step: int
    block_size: int
    items: tuple[ScheduledSeq, ...]
    copies: tuple[tuple[int, int], ...]  # (src, dst) blocks to copy on every device before any write
    preempted: tuple[int, ...]  # sequences that lost their blocks this step (they run again later)
    finished: tuple[int, ...]  # sequences that ended in this schedule() (deadline): tell their clients

    @property
    def num_tokens(self) -> int:
        return sum(len(it.token_ids) for it in self.items)

    def token_ids(self) -> list[int]:
        return [t for it in self.items for t in it.token_ids]

    def logit_rows(self) -> list[int]:
        """Packed rows whose logits are sampled: the last token of each item with `logits`."""
        rows, end = [], 0
        for it in self.items:
            end += len(it.token_ids)
            if it.logits:
                rows.append(end - 1)
        return rows


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock = config, clock
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.prefix_caching, config.roles)
        self.waiting: list[Sequence] = []  # arrival order (preempted ones go back to their place)
        self.running: list[Sequence] = []  # arrival order: the last is the first to be preempted
        self.live: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self._ids = itertools.count()
        self._step = 0
        self._pending: BatchPlan | None = None

    # -- requests --------------------------------------------------------------------------
    def add(self, prompt, params: SamplingParams | None = None, timeout: float | None = None,
            admit: Callable[[Scheduler, list[int]], None] | None = None) -> Sequence:
        """Queue a request; raises InvalidRequest or QueueFull without changing anything. admit(self,
        prompt), if given, is asked last, before anything changes, and may refuse by raising (the
        engine's early rejection, admission.py)."""
        params = params or SamplingParams()
        prompt = list(prompt)
        self._check(prompt, params, timeout)
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting, the bound is max_waiting="
                            f"{self.cfg.max_waiting}")
        if admit is not None:
            admit(self, prompt)
        now = self.clock()
        seq = Sequence(next(self._ids), prompt, len(prompt), params, arrival=now,
                       deadline=None if timeout is None else now + timeout)
        self.live[seq.seq_id] = seq
        self.waiting.append(seq)
        return seq

    def adopt(self, token_ids, num_prompt: int, params: SamplingParams, deadline: float | None = None,
              reserved: Sequence | None = None, prefix: list[int] = ()) -> Sequence | None:
        """Admit, running, a sequence whose K/V of every token but the last were computed elsewhere
        (phase-separated serving: another device group prefilled it, engine/disagg.py); the caller
        writes them into its fresh blocks before the next step, which decodes its last token (or
        wrote them already into the blocks `reserved` for it). None while there is no room: blocks
        for its tokens and the next, or a place among max_running.
        `prefix`: blocks this pool already holds for its leading tokens, leased for it
        (BlockManager.lease, their references taken): they head its block table, only the rest
        are fresh, and only the rest's K/V are written. A streamed sequence (`reserved`) carries no
        lease: its K/V went into its reserved blocks, so the two are refused together."""
        tokens = list(token_ids)
        n = len(tokens) - 1
        if not 1 <= num_prompt <= n or len(tokens) >= self.cfg.max_model_len:
            raise InvalidRequest(f"cannot adopt a sequence of {len(tokens)} tokens ({num_prompt} of the prompt) "
                                 f"into max_model_len={self.cfg.max_model_len}")
        if reserved is not None and len(prefix):
            raise GalaxyError(f"a sequence adopted into blocks reserved for its streamed K/V carries no lease, "
                              f"but {len(prefix)} leased prefix blocks came with it")
        if len(prefix) * self.cfg.block_size > n:
            raise GalaxyError(f"a prefix of {len(prefix)} blocks is longer than the {n} tokens with K/V")
        have = len(reserved.block_table) if reserved is not None else len(prefix)
        if (len(self.running) >= self.cfg.max_running
                or self.blocks.num_free < max(0, self.blocks.blocks_for(n + 1) - have)):
            return None
        seq = Sequence(next(self._ids), tokens, num_prompt, params, arrival=self.clock(), deadline=deadline)
        if reserved is not None:  # its K/V were streamed into these while it was prefilled elsewhere
            seq.block_table, reserved.block_table = reserved.block_table, []
        else:  # leased blocks (if any) head its table; fresh blocks for the rest: its K/V arrive by import
            seq.block_table, seq.num_named = list(prefix), len(prefix)
        self.blocks.append(seq, n)
        seq.num_computed, seq.status = n, SequenceStatus.RUNNING
        self.live[seq.seq_id] = seq
        bisect.insort(self.running, seq, key=lambda s: s.seq_id)
        return seq

    def reserve(self, num_tokens: int, params: SamplingParams) -> Sequence | None:
        """Fresh blocks for the first `num_tokens` positions of a sequence still being prefilled on
        another group, so its K/V can be streamed into them chunk by chunk (engine/kv_stream.py);
        `adopt(..., reserved=)` takes them over, `unreserve` gives them back. The holder is neither
        live nor scheduled. None while the blocks are not free."""
        if not 1 <= num_tokens < self.cfg.max_model_len or self.blocks.num_free < self.blocks.blocks_for(num_tokens):
            return None
        held = Sequence(-1, [], 0, params, arrival=self.clock())
        self.blocks.append(held, num_tokens)
        return held

    def unreserve(self, held: Sequence) -> None:
        """Give back the blocks of a reservation that will not be adopted (nothing if it was)."""
        self.blocks.free(held)

    def abort(self, seq_id: int, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a sequence now (client gone, cancelled, or a stop string the engine saw in its text)
        and free its blocks; False if not live."""
        seq = self.live.get(seq_id)
        if seq is None:
            return False
        self._finish(seq, reason)
        return True

    def lose_kv(self, num_blocks: int) -> None:
        """The devices lost every K/V (a fail-over re-planned them): the step in flight did not run,
        every running sequence goes back to the queue to run all its tokens again, and the pool
        starts anew with `num_blocks` blocks (the survivors' budgets) and an empty prefix cache."""
        self._pending = None
        for seq in list(self.running):
            self._preempt(seq)
        max_len = min(self.cfg.max_model_len, num_blocks * self.cfg.block_size)
        limited = self.cfg.kv_limited or max_len < self.cfg.max_model_len
        self.cfg = dataclasses.replace(self.cfg, num_blocks=num_blocks, max_model_len=max_len, kv_limited=limited)
        self.blocks = BlockManager(num_blocks, self.cfg.block_size, self.cfg.prefix_caching, self.cfg.roles)
        for seq in [s for s in self.waiting if s.num_tokens >= max_len]:  # no longer fits the smaller pool
            self._finish(seq, FinishReason.KV_BUDGET if limited else FinishReason.LENGTH)

    def has_unfinished(self) -> bool:
        return bool(self.live)

    # -- one step --------------------------------------------------------------------------
    def schedule(self, prompt_budget: Callable[[int], int] | None = None) -> BatchPlan:
        """The next step's batch: decodes first, then prefill chunks, within the token budget.

        `prompt_budget(decodes)`, if given, caps the prompt tokens of a step that also runs
        `decodes` decodes (the engine's stall bound, step_cost.py); a step without decodes stalls
        no stream and keeps the whole budget."""
        if self._pending is not None:
            raise GalaxyError(f"schedule() called again before update() of step {self._pending.step}")
        finished = self._expire()
        budget, chunk = self.cfg.max_batched_tokens, self.cfg.chunk
        items: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted: list[int] = []

        for seq in list(self.running):  # 1. one token for every decoding sequence, oldest first
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1:
                continue
            while not self.blocks.can_append(seq, 1):
                victim = self.running[-1]  # the youngest; older ones scheduled this step come before seq
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq, 1)
                items.append(self._item(seq, 1))
                budget -= 1

        if prompt_budget is not None and items:  # 0: a decode-only step (the engine's probe of its step cost)
            budget = min(budget, max(0, prompt_budget(len(items))))
        scheduled = {it.seq_id for it in items}
        for seq in self.running:  # 2. chunks of admitted prompts (their blocks are reserved)
            if budget == 0:
                break
            if seq.seq_id not in scheduled and seq.num_uncomputed > 1:
                n = min(seq.num_uncomputed, budget, seq.params.chunk_size or chunk)
                items.append(self._item(seq, n))
                budget -= n

        # 3. admit new prompts in arrival order; not in a step that preempted, whose freed blocks
        # would otherwise go straight to a newcomer and thrash
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.cfg.max_running:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.pop(0)
            copies += self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            n = min(seq.num_uncomputed, budget, seq.params.chunk_size or chunk)
            items.append(self._item(seq, n))
            budget -= n

        self._pending = BatchPlan(self._step, self.cfg.block_size, tuple(items), tuple(copies),
                                  tuple(preempted), tuple(finished))
        self._step += 1
        return self._pending

    def update(self, plan: BatchPlan, sampled: Mapping[int, int]) -> list[Sequence]:
        """Advance every sequence of `plan` past its tokens and append the sampled ones.

        Returns the sequences that got a token this step (their status says if they finished).
        Samples for sequences aborted meanwhile are dropped."""
        if plan is not self._pending:
            raise GalaxyError(f"update() needs the plan of the last schedule(), once; got step {plan.step}")
        self._pending = None
        out = []
        for it in plan.items:
            seq = self.live.get(it.seq_id)
            if seq is None:
                continue
            if seq.num_computed != it.start:
                raise GalaxyError(f"sequence {seq.seq_id} has {seq.num_computed} tokens computed, "
                                  f"the plan ran it from {it.start}")
            seq.num_computed += len(it.token_ids)
            self.blocks.commit(seq)
            if not it.logits:
                continue
            if it.seq_id not in sampled:
                raise GalaxyError(f"no sampled token for sequence {it.seq_id} in step {plan.step}")
            seq.token_ids.append(int(sampled[it.seq_id]))
            reason = seq.stop_reason(self.cfg.max_model_len, self.cfg.kv_limited)
            if reason is not None:
                self._finish(seq, reason)
            out.append(seq)
        return out

    # -- internals -------------------------------------------------------------------------
    def _check(self, prompt: list, params: SamplingParams, timeout: float | None) -> None:
        cfg = self.cfg
        if not prompt:
            raise InvalidRequest("the prompt is empty; send at least one token")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or t < 0
               or (cfg.vocab_size is not None and t >= cfg.vocab_size)]
        if bad:
            raise InvalidRequest(f"prompt has token ids {bad[:5]} outside [0, vocab_size={cfg.vocab_size})")
        if len(prompt) >= cfg.max_model_len and cfg.kv_limited:
            raise KVBudgetExceeded(
                f"prompt has {len(prompt)} tokens and the KV pool holds {cfg.max_model_len} positions "
                f"({cfg.num_blocks} blocks of {cfg.block_size}, on every device: what the smallest device's KV budget "
                f"allows, or EngineConfig.kv_blocks); its K/V and one generated token need {len(prompt) + 1}. Send a "
                "shorter prompt, raise the devices' memory budgets, or add a device")
        if len(prompt) >= cfg.max_model_len:
            raise InvalidRequest(f"prompt has {len(prompt)} tokens, max_model_len={cfg.max_model_len} "
                                 "leaves no room to generate")
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params is a {type(params).__name__}, not SamplingParams")
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout={timeout!r} must be a positive number of seconds or None")

    def _item(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed
        return ScheduledSeq(seq.seq_id, tuple(seq.token_ids[start : start + n]), start,
                            tuple(seq.block_table), start + n == seq.num_tokens, seq.kernel_from)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.seq_id)

    def _expire(self) -> list[int]:
        now = self.clock()
        late = [s for s in self.live.values() if s.deadline is not None and now >= s.deadline]
        for seq in late:
            self._finish(seq, FinishReason.DEADLINE)
        return [s.seq_id for s in late]

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.blocks.free(seq)
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        del self.live[seq.seq_id]
