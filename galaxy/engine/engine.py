"""The serving engine: one loop on the coordinator that runs the scheduler's steps on the devices.

Requests come from any thread (`submit`); the loop, in a thread of its own, asks the scheduler for
the next step's batch -- decodes of every running sequence first, then prompt chunks within the
token budget -- sends that one plan to every rank through the executor (`Executor.step`: one
collective per layer carries the whole batch), samples each sequence's next token from the logit
rows that come back, and hands the tokens to the requests' streams. Iterations are scheduled,
not requests (Orca); a long prompt is cut into chunks so it never freezes the running streams
(Sarathi-Serve); the K/V of every sequence lives in a paged pool whose block ids are the same on
every device, shared between requests with a common prefix (scheduler.py, block_manager.py).

Failures: a device that drops out under a re-planning executor (runtime.recovery) loses every
K/V; the engine is told (CacheLost), every running sequence goes back to the queue and runs its
tokens again on the survivors, so each still gets the tokens it would have got. Under a plain
executor the step's error ends every request in flight with that error (naming the device), their
blocks freed, and the engine serves the next requests.

Threads: the scheduler is touched only under `_lock`, which the loop does not hold while the
devices compute, so `submit` and `cancel` answer at once and refuse a bad request synchronously.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from queue import Empty, SimpleQueue

import torch

from ..errors import CacheLost, DeviceOutOfMemory, GalaxyError
from ..model.config import ModelConfig
from ..model.paged_kv import PagedBatch
from ..model.quant import QuantLinear
from ..parallel.executor import DeviceStats, Executor, ForwardResult
from ..parallel.forward import Step
from ..parallel.rank import KVPool
from .admission import Admission, AdmissionConfig
from .arguments import token_ids
from .generation import Generation, GenerationConfig, StepTiming, TokenEvent, collective_of, pending_stop
from .kv_devicepool import DevicePool
from .kv_spill import KVSpill
from .sampling import Sampler
from .scheduler import BatchPlan, Scheduler, SchedulerConfig, SchedulerConfigError
from .sequence import FinishReason, SamplingParams, Sequence
from .step_cost import StepCost

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # how often an idle loop with waiting requests looks again (deadlines, freed blocks)
_NOTHING = object()  # events_while: no event came before it was time to ask whether the client is there


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches. max_batched_tokens is the per-step token budget (Sarathi-Serve's):
    larger steps amortise the per-layer collectives over more tokens, smaller ones keep the time
    between a running stream's tokens short while prompts arrive."""

    block_size: int = 16  # positions per KV block
    max_batched_tokens: int = 256  # tokens in one step: decodes first, then prompt chunks
    chunk_size: int | None = None  # most prompt tokens one request runs in a step (None: the budget)
    max_running: int = 32  # sequences holding KV blocks at once
    max_waiting: int = 256  # queued requests beyond which new ones are refused (QueueFull)
    kv_blocks: int | None = None  # the pool (None: as many as the smallest device's KV budget holds)
    prefix_caching: bool = True
    # stall-free prefill (step_cost.py): a step that carries prompt chunks beside running decodes takes
    # at most max_stall x the decode-only step (its prompt tokens derived from the measured step cost);
    # None: only max_batched_tokens bounds it. min_chunk: prompt tokens such a step may always carry.
    max_stall: float | None = 1.5
    min_chunk: int = 16
    # an objective instead (or as well; the smaller bound wins): such a step takes at most itl_target x the
    # unloaded TPOT (the one-stream decode step the engine measured; step_cost.py), whatever the streams' number
    itl_target: float | None = None
    # a mean objective instead of a per-gap one: every running stream's TPOT stays within tpot_target x the unloaded
    # TPOT, so a step may take what the streams' slack allows -- a burst of prompt tokens (HMP-sized, cheaper a token
    # than a small chunk) after a run of quick decode steps; with max_stall / itl_target too, the larger chunk
    tpot_target: float | None = None
    # early rejection (admission.py): refuse a request whose TTFT is predicted above slo_ttft x slo_headroom
    # seconds with Overloaded, at once; None: admit every request the queue bound allows (as before)
    slo_ttft: float | None = None
    slo_headroom: float = 0.9
    # greedy sequences' next token picked on the devices (Step.top1_rows, parallel/top1.py): a few numbers per
    # row come back instead of the vocabulary's logits; the same tokens. False: every row's logits come back
    top1_on_device: bool = True
    # bytes of host memory on the coordinator for the K/V of named blocks evicted from the devices' pool
    # (kv_spill.py): a later request with that prefix gets them written back instead of computed; 0: off.
    # A phase-separated placement's decode group keeps none (its blocks are also taken outside its loop)
    spill_bytes: int = 0
    spill_dir: str | None = None  # the spill store in files of a private directory made in this one, not in memory
    # bytes of each device's spare memory for its own heads' K/V of named blocks evicted from the pool
    # (kv_devicepool.py): copied back on a later hit with nothing on the wire; in front of the spill tier when both
    # are set. Refused when the engine starts if a device lacks them beside its plan. 0: off
    device_pool_bytes: int = 0
    # the loaded weights run a token by its role (int8 / int4 route prompt rows dense: model/dense_rows.py),
    # so the prefix cache shares only blocks of dense-role K/V (block_manager.py). None: the executor's
    # loaded format says (`token_roles`), so every engine, the API's or a bench's, shares only what is exact
    roles: bool | None = None

    def __post_init__(self):
        for name, why in (("max_stall", "a step with prompt chunks takes longer than one without"),
                          ("itl_target", "x the unloaded TPOT: a lone stream's decode step already takes 1x"),
                          ("tpot_target", "x the unloaded TPOT")):
            x = getattr(self, name)  # finite: a chunk is this factor times a step's seconds, made a whole count
            if x is not None and not (isinstance(x, (int, float)) and 1.0 < x < math.inf):
                raise SchedulerConfigError(f"engine config: {name}={x!r} must be a finite number > 1 ({why}) or None")
        if not (isinstance(self.min_chunk, int) and self.min_chunk >= 1):
            raise SchedulerConfigError(f"engine config: min_chunk={self.min_chunk!r} must be an integer >= 1 "
                                       "(a step's token budget still bounds it)")
        if not isinstance(self.spill_bytes, int) or isinstance(self.spill_bytes, bool) or self.spill_bytes < 0:
            raise SchedulerConfigError(f"engine config: spill_bytes={self.spill_bytes!r} must be an integer >= 0 "
                                       "(bytes of host memory for evicted KV blocks; 0: off)")
        if (not isinstance(self.device_pool_bytes, int) or isinstance(self.device_pool_bytes, bool)
                or self.device_pool_bytes < 0):
            raise SchedulerConfigError(f"engine config: device_pool_bytes={self.device_pool_bytes!r} must be an "
                                       "integer >= 0 (bytes of each device's memory for evicted KV blocks; 0: off)")
        if self.spill_dir is not None and not (isinstance(self.spill_dir, str) and self.spill_bytes):
            raise SchedulerConfigError(f"engine config: spill_dir={self.spill_dir!r} needs to be a directory's path, "
                                       f"with spill_bytes > 0 (its budget; got {self.spill_bytes})")
        if self.slo_ttft is not None:
            AdmissionConfig(self.slo_ttft, self.slo_headroom)  # validates both, naming the field

    def scheduler_config(self, num_blocks: int, model: ModelConfig) -> SchedulerConfig:
        return SchedulerConfig(num_blocks=num_blocks, block_size=self.block_size,
                               max_batched_tokens=self.max_batched_tokens, chunk_size=self.chunk_size,
                               max_running=min(self.max_running, self.max_batched_tokens),
                               max_waiting=self.max_waiting,
                               max_model_len=min(model.max_positions, num_blocks * self.block_size),
                               vocab_size=model.vocab_size, prefix_caching=self.prefix_caching,
                               kv_limited=num_blocks * self.block_size < model.max_positions, roles=self.roles)


@dataclass(frozen=True)
class LastStep:
    """The last step that ran on the devices, as they reported it: for views of where a step's
    time went per layer and device (the dashboard), read-only."""

    step: int  # its number (Engine.steps after it ran)
    tokens: int  # tokens in the batch (decodes and prompt chunks)
    sequences: int  # sequences in the batch
    seconds: float  # wall time at the coordinator
    collective: str  # how the layers were joined (generation.collective_of)
    devices: tuple[DeviceStats, ...]  # per rank, each with an OpStat per collective
    finished_at: float  # time.time() when it came back


class ClientGone(GalaxyError):
    """The client of a request disconnected; the request was cancelled and its blocks freed."""


class GenerationStream:
    """One request in the engine: iterate it for TokenEvents as they come; `generation` is filled in
    as it goes. Breaking off the iteration (or `cancel`) frees its blocks at once."""

    def __init__(self, engine: Engine, gc: GenerationConfig, gen: Generation):
        self.engine, self.gc, self.generation = engine, gc, gen
        self.seq: Sequence | None = None
        self.sampler = Sampler(gc.sampling)
        self.events: SimpleQueue = SimpleQueue()  # TokenEvent, then None when done
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.shown = ""  # text already yielded (what may start a stop string is held back)
        self.predicted_ttft_s: float | None = None  # early rejection's prediction when it was admitted

    def __iter__(self) -> Iterator[TokenEvent]:
        return self.events_while(None)

    def events_while(self, alive: Callable[[], bool] | None, poll_s: float = 0.25) -> Iterator[TokenEvent]:
        """The TokenEvents as they come; with `alive`, every `poll_s` asks it -- is the client still
        there? -- and cancels the request at once if not (then raises ClientGone). The clock, not a
        quiet spell, sets when to ask: tokens arriving faster than `poll_s` must not keep a deserted
        request going. Breaking off the iteration cancels the request too."""
        try:
            next_check = time.monotonic() + poll_s
            while True:
                try:
                    wait = max(0.0, next_check - time.monotonic()) if alive is not None else None
                    ev = self.events.get(timeout=wait)
                except Empty:
                    ev = _NOTHING
                if alive is not None and time.monotonic() >= next_check:
                    if not alive():
                        self.cancel()
                        raise ClientGone("the client went away; its request was cancelled") from None
                    next_check = time.monotonic() + poll_s
                if ev is _NOTHING:
                    continue
                if ev is None:
                    break
                yield ev
            if self.error is not None:
                raise self.error
        finally:
            if not self.done.is_set():
                self.cancel()

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end; the Generation, or the error that ended it."""
        if not self.done.wait(timeout):
            raise GalaxyError(f"the generation did not finish within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self.generation

    def cancel(self) -> None:
        """Stop generating for this request now (its client went away)."""
        self.engine._cancel(self)

    # -- called by the engine loop ---------------------------------------------------------
    def _end(self, finish: str, error: BaseException | None = None) -> None:
        gen = self.generation
        if error is None and gen.finish != "stop" and len(gen.text) > len(self.shown):
            self.events.put(TokenEvent(gen.tokens[-1] if gen.tokens else -1, gen.text[len(self.shown):]))
        gen.finish = gen.finish or finish
        self.error = error
        self.done.set()
        self.events.put(None)


def token_roles(executor: Executor) -> bool:
    """Whether the executor's loaded weights run a token by its role (int8 / int4: model/dense_rows.py), read
    from the options it loaded with; an executor that does not say is taken to (the rule that is exact
    for every format: fp32 then only shares a little less)."""
    options = getattr(executor, "options", None)
    return True if options is None else QuantLinear.dense_capable(options.weight_format)


class Engine:
    """Continuous batching of a causal LM's requests on a loaded executor."""

    spills = True  # keeps a spill tier when EngineConfig.spill_bytes asks (its pool changes only in its loop)

    def __init__(self, executor: Executor, model: ModelConfig, tokenizer=None,
                 config: EngineConfig = EngineConfig()):
        if not model.causal:
            raise GalaxyError(f"{model.name or model.family} is an encoder: it embeds text (encode()), "
                              "it does not generate")
        if config.roles is None:
            config = replace(config, roles=token_roles(executor))
        self.ex, self.model, self.tok, self.config = executor, model, tokenizer, config
        self.pool = self._pool()
        self.sched = Scheduler(config.scheduler_config(self.pool.num_blocks, model))
        self.spill = (KVSpill(config.spill_bytes, model, config.spill_dir) if config.spill_bytes and self.spills
                      else None)
        self.device_pool = None
        if config.device_pool_bytes and self.spills and config.prefix_caching:
            self.device_pool = DevicePool(config.device_pool_bytes, model, self.spill)
            try:  # refused now, not when the first block is evicted, if a device lacks the memory
                self.device_pool.open(executor, self.pool)
            except BaseException:
                if self.spill is not None:
                    self.spill.close()
                raise
        self.kv_tier = self.device_pool if self.device_pool is not None else self.spill  # the loop drives it
        self._attach_spill()
        self._pre_reading = True  # the idle loop reads free named blocks out (KVSpill.pre_read) until none are left
        self.cost = StepCost()  # seconds against tokens of the steps run: the stall bound's prompt budget
        # (decodes, prompt tokens, seconds) of the recent steps: what the bench reports of the steps' shapes
        self.step_log: deque[tuple[int, int, float]] = deque(maxlen=4096)
        self.admission = (None if config.slo_ttft is None else
                          Admission(AdmissionConfig(config.slo_ttft, config.slo_headroom)))
        self.streams: dict[int, GenerationStream] = {}
        self.steps = 0
        self.generated = 0  # tokens sampled so far, every request (tokens/s is its rate)
        self._last: LastStep | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="galaxy-engine", daemon=True)
        self._thread.start()

    def _pool(self) -> KVPool:
        bs = self.config.block_size
        n = self.config.kv_blocks or self.ex.kv_blocks(bs)
        if n < 1:
            raise DeviceOutOfMemory(f"no device has room for one KV block of {bs} positions beside its weights; "
                                    "free memory, raise the devices' memory budgets, or add a device")
        return KVPool(n, bs)

    # -- requests ----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], gc: GenerationConfig | None = None,
               timeout: float | None = None) -> GenerationStream:
        """Queue a generation; raises InvalidRequest, QueueFull or (with an objective, EngineConfig.slo_ttft)
        Overloaded at once, touching nothing else."""
        gc = gc or GenerationConfig()
        if self._closed:
            raise GalaxyError("the engine is closed: load the model again")
        prompt_ids = token_ids("prompt", prompt_ids, self.model.vocab_size)
        gen = Generation(list(prompt_ids))
        stream = GenerationStream(self, gc, gen)
        if gc.max_new_tokens == 0:  # nothing to generate: no step needed
            stream._end("length")
            return stream
        eos = self.model.eos_token_id
        params = SamplingParams(gc.max_new_tokens, (eos,) if gc.stop_at_eos and eos is not None else (),
                                gc.sampling, gc.prefill_chunk or None)
        admit = None if self.admission is None else (
            lambda sched, prompt: self.admission.check(sched, len(prompt), self._prompt_budget))
        with self._lock:
            stream.seq = self.sched.add(list(prompt_ids), params, timeout, admit)
            if self.admission is not None:  # what early rejection predicted for it (None: no prediction yet)
                stream.predicted_ttft_s = self.admission.last_prediction_s
            self.streams[stream.seq.seq_id] = stream
        self._wake.set()
        return stream

    def generate(self, prompt_ids: list[int], gc: GenerationConfig | None = None,
                 timeout: float | None = None) -> Generation:
        return self.submit(prompt_ids, gc, timeout).result()

    def _cancel(self, stream: GenerationStream) -> None:
        with self._lock:
            if stream.seq is not None and self.sched.abort(stream.seq.seq_id):
                self.streams.pop(stream.seq.seq_id, None)
                stream._end("abort")
        self._wake.set()

    @property
    def load(self) -> dict:
        """What the engine holds now: requests running and waiting, KV blocks in use, the prefix
        cache's hit rate, preemptions and steps so far, each device's KV memory at the last step, the spill
        tier's counts and bytes (kv_spill.SpillStats) and the device-local pool's (kv_devicepool.DevicePoolStats);
        None without them."""
        with self._lock:
            blocks = self.sched.blocks
            return {"running": len(self.sched.running), "waiting": len(self.sched.waiting),
                    "kv_blocks": self.pool.num_blocks, "kv_blocks_used": blocks.num_blocks - blocks.num_free,
                    "prefix_hit_rate": blocks.stats.hit_rate, "preemptions": self.sched.num_preemptions,
                    "steps": self.steps, "generated_tokens": self.generated,
                    "rejected": 0 if self.admission is None else self.admission.rejected,
                    "spill": None if self.spill is None else self.spill.report(),
                    "device_pool": None if self.device_pool is None else self.device_pool.report(),
                    "kv_bytes": {} if self._last is None else
                    dict(zip(self.ex.names, (d.kv_cache_bytes for d in self._last.devices)))}

    def _attach_spill(self) -> None:
        """The block manager (a new one after a re-plan) lists evictions and restores for the spill tiers."""
        if self.kv_tier is not None and self.config.prefix_caching:
            self.sched.blocks.store = self.kv_tier.store

    def cached_prefix(self, token_ids) -> int:
        """Leading tokens of `token_ids` whose K/V this engine's pool holds (prefix cache), for the
        coordinator's prefix index (prefix_index.py)."""
        with self._lock:
            return self.sched.blocks.cached_tokens(token_ids)

    @property
    def last_step(self) -> LastStep | None:
        """The last step that ran on the devices (None before the first): read-only."""
        return self._last

    def close(self, error: GalaxyError | None = None) -> None:
        """Stop the loop; requests still in it end with `error` (by default: the engine was closed)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=60)
        with self._lock:
            for sid, stream in list(self.streams.items()):
                self.sched.abort(sid)
                stream._end("abort", error or GalaxyError("the engine was closed (another model was loaded, or "
                                                          "the session ended) before this request finished"))
            self.streams.clear()
        if self.kv_tier is not None:  # outside the lock, best effort, and never a re-plan: a ResilientCluster's
            self.kv_tier.close(getattr(self.ex, "cluster", self.ex))  # inner cluster (a device gone has no store)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            self._between_steps()
            with self._lock:
                busy = self.sched.has_unfinished()
                plan = self.sched.schedule(self._step_budget) if busy else None
                spill = self.sched.blocks.take_spill() if plan is not None else ([], [])
                if plan is not None:
                    for sid in plan.finished:  # deadlines that passed
                        self._finish(sid, "deadline")
                    if not plan.items:
                        self.sched.update(plan, {})
            if plan is None and self._pre_read():  # idle: the spill tier read blocks out; look for work again
                continue
            if plan is None or not plan.items:  # idle, or nothing admissible until blocks free up
                self._wake.wait(None if plan is None else IDLE_POLL_S)
                self._wake.clear()
                continue
            self._run(plan, spill)

    def _pre_read(self) -> bool:
        """Idle, with a spill tier: read one call's worth of the free named blocks next to be evicted into the
        store (KVSpill.pre_read), so the request whose admission evicts them waits for no read. Only this loop
        changes the pool, so they stay as they are until its next schedule. True if any were read."""
        if self.kv_tier is None or not self._pre_reading or self.ex.partition is None:
            return False
        try:
            with self._lock:
                blocks = self.sched.blocks.unstored(self.kv_tier.calls_of(self.ex, self.pool))
            got = self.kv_tier.pre_read(self.ex, self.pool, blocks)
        except CacheLost as e:
            self._lose_kv(e)
            return True
        except Exception as e:  # noqa: BLE001 - only cache is at stake: never let it end the loop
            log.warning("reading free KV blocks into the spill store while idle failed: %s", e)
            got = 0
        self._pre_reading = got > 0  # until the next step: no room, nothing left, or a device not answering
        return got > 0

    def _step_budget(self, decodes: int) -> int:
        """The scheduler's prompt budget for the next step: now and then, until the step cost prices a prompt
        token apart from a decode, a probe that carries none (StepCost.probe); else _prompt_budget.
        Early rejection's replay of the backlog asks _prompt_budget itself: a probe is not its steady state."""
        c = self.config
        bounded = c.max_stall is not None or c.itl_target is not None or c.tpot_target is not None
        return 0 if bounded and self.cost.probe() else self._prompt_budget(decodes)

    def _prompt_budget(self, decodes: int) -> int:
        """Prompt tokens a step with `decodes` running decodes may carry (Scheduler.schedule): the smaller of
        the per-gap bounds (max_stall, itl_target), or more where the streams' TPOT slack allows (tpot_target),
        at least min_chunk."""
        c = self.config
        if c.max_stall is None and c.itl_target is None and c.tpot_target is None:
            return c.max_batched_tokens
        per_gap = [n for n in (None if c.max_stall is None else self.cost.prompt_tokens(decodes, c.max_stall),
                               None if c.itl_target is None else self.cost.objective_tokens(decodes, c.itl_target))
                   if n is not None]  # none until steps of two sizes ran beside streams
        n = min(per_gap, default=None)
        if c.tpot_target is not None:
            m = self.cost.slack_tokens(decodes, self._step_slack(c.tpot_target))
            n = m if n is None else n if m is None else max(n, m)
        return max(c.min_chunk, n or 0)  # min_chunk meanwhile, whose step is the second size the fit needs

    def _step_slack(self, tpot_target: float) -> float | None:
        """The longest next step that keeps every running stream's TPOT (first token to the token this step
        gives it) within tpot_target x the unloaded TPOT: min over streams of target x tokens - time since the
        first. None before the unloaded TPOT is known or while no stream has a token."""
        t1 = self.cost.unloaded_step()
        if t1 is None:
            return None
        now, tau, slack = time.perf_counter(), tpot_target * t1, None
        for stream in self.streams.values():
            times = stream.generation.token_times
            if times:
                s = tau * len(times) - (now - stream.submitted - times[0])
                slack = s if slack is None else min(slack, s)
        return slack

    def _between_steps(self) -> None:
        """Called by the loop before each schedule, while no step runs on the devices and the lock is
        not held: phase-separated serving (engine/disagg.py) moves K/V in and out here."""

    def _run(self, plan: BatchPlan, spill=([], [])) -> None:
        """One step: the spill tier's reads and writes first (`spill`: BlockManager.take_spill's), then the plan
        on every device."""
        rows, logit_rows = [it for it in plan.items if it.logits], tuple(plan.logit_rows())
        on_device = [self.config.top1_on_device and self._greedy(it.seq_id) for it in rows]
        step = Step(torch.tensor(plan.token_ids(), dtype=torch.long),
                    PagedBatch(plan.block_size, tuple(len(it.token_ids) for it in plan.items),
                               tuple(it.start for it in plan.items), tuple(it.block_table for it in plan.items)),
                    logit_rows, plan.copies, tuple(r for r, d in zip(logit_rows, on_device) if d),
                    tuple(it.kernel_from for it in plan.items))
        try:
            if self.kv_tier is not None and (spill[0] or spill[1]):
                try:
                    self.kv_tier.before_step(self.ex, self.pool, spill[0], spill[1])
                except GalaxyError:
                    raise
                except Exception as e:  # a bug or a device fault in the tier: these requests fail, the loop lives
                    raise GalaxyError(f"the K/V tier failed moving blocks before step {plan.step}: "
                                      f"{type(e).__name__}: {e}") from e
            res = self.ex.step(step, self.pool)
        except CacheLost as e:  # a fail-over: the K/V are gone, every sequence runs its tokens again
            self._lose_kv(e)
            return
        except GalaxyError as e:
            log.warning("step %d failed: %s", plan.step, e)
            with self._lock:
                for sid in list(self.streams):
                    self.sched.abort(sid)
                    self._finish(sid, "abort", e)
                self.sched.update(plan, {})
            return
        self.steps += 1
        self._pre_reading = True  # the step may have freed named blocks: the idle loop may read them out
        decodes = sum(1 for it in plan.items if len(it.token_ids) == 1)
        self.step_log.append((decodes, plan.num_tokens - decodes, res.seconds))
        if decodes:  # the cost of steps beside running streams (recorded once: the line and the split)
            self.cost.observe_shape(decodes, plan.num_tokens - decodes, res.seconds)
        if decodes == 1 == plan.num_tokens:  # one stream alone: its unloaded TPOT
            self.cost.observe_lone(res.seconds)
        if self.admission is not None:  # every step: the TTFT prediction's step cost
            self.admission.observe(plan.num_tokens, res.seconds)
        collective, kv_bytes = collective_of(res.devices), [d.kv_cache_bytes for d in res.devices]
        self._last = LastStep(self.steps, plan.num_tokens, len(plan.items), res.seconds, collective,
                              tuple(res.devices), time.time())
        with self._lock:
            sampled = self._sample(rows, res, on_device)
            self.generated += len(sampled)
            for it in plan.items:
                stream = self.streams.get(it.seq_id)
                if stream is None:
                    continue
                gen = stream.generation
                decode = len(it.token_ids) == 1 and it.start >= len(gen.prompt_tokens)
                if not gen.steps:
                    gen.queued_s = time.perf_counter() - stream.submitted - res.seconds
                    gen.reused_prefix = it.start
                gen.steps.append(StepTiming("decode" if decode else "prefill", len(it.token_ids), res.seconds,
                                            collective, plan.num_tokens))
                gen.kv_cache_bytes = kv_bytes
            for seq in self.sched.update(plan, sampled):
                self._token(self.streams[seq.seq_id], seq)

    def _lose_kv(self, error: CacheLost) -> None:
        """The executor re-planned over the surviving devices: a pool sized by their budgets, and
        every sequence runs all its tokens again (a step's, or a K/V move's, CacheLost)."""
        log.warning("%s; running every sequence's tokens again on the surviving devices", error)
        with self._lock:
            self.pool = self._pool()
            self.sched.lose_kv(self.pool.num_blocks)
            if self.kv_tier is not None:  # cut for the old split (the device stores went with its sessions)
                self.kv_tier.clear()
            self._attach_spill()

    def _greedy(self, seq_id: int) -> bool:
        """Whether a sequence's next token is its logit row's argmax (a request cancelled meanwhile needs
        no row at all: the cheapest answer is asked for)."""
        stream = self.streams.get(seq_id)
        return stream is None or stream.sampler.greedy

    def _sample(self, rows, res: ForwardResult, on_device: list[bool]) -> dict[int, int]:
        """Each live sequence's next token: a greedy one's as the devices picked it (rows `on_device`:
        Step.top1_rows, res.top1, the argmax over the whole row), the others' from their logit rows
        (res.output: the rows not picked on the devices, in order) -- a greedy one's by one argmax over
        such rows (the same first maximum as one row's argmax), the others' by their own sampler. An
        executor that left res.top1 unset returned every row's logits. Sequences cancelled while the
        step ran get none."""
        picks = None if res.top1 is None else iter(res.top1.tolist())
        sampled, greedy, at = {}, [], 0
        for it, device in zip(rows, on_device):
            stream = self.streams.get(it.seq_id)
            if device and picks is not None:
                tok = next(picks)
                if stream is not None:
                    sampled[it.seq_id] = tok
                continue
            i, at = at, at + 1
            if stream is None:
                continue
            if stream.sampler.greedy:
                greedy.append((i, it.seq_id))
            else:
                sampled[it.seq_id] = stream.sampler(res.output[i])
        if greedy:
            picked = res.output[[i for i, _ in greedy]].argmax(dim=-1).tolist()  # (G,)
            sampled.update((sid, tok) for (_, sid), tok in zip(greedy, picked))
        return sampled

    def _token(self, stream: GenerationStream, seq: Sequence) -> None:
        """A token came out for `seq`: its text, stop strings, and whether it ended the request."""
        gen, gc = stream.generation, stream.gc
        now = time.perf_counter() - stream.submitted
        if gen.first_token_s is None:
            gen.first_token_s = now
        tok = seq.token_ids[-1]
        if seq.finish_reason is FinishReason.STOP:  # the end-of-sequence token: not part of the text
            self._finish(seq.seq_id, "eos")
            return
        gen.tokens.append(tok)
        gen.token_times.append(now)
        full = self.tok.decode(gen.tokens) if self.tok else ""
        cut = min((full.find(s) for s in gc.stop if s in full), default=-1)
        if cut >= 0:  # a stop string completed: the text ends before it
            gen.text, gen.finish = full[:cut], "stop"
            if len(gen.text) > len(stream.shown):
                stream.events.put(TokenEvent(tok, gen.text[len(stream.shown):]))
                stream.shown = gen.text
            self.sched.abort(seq.seq_id, FinishReason.STOP)
            self._finish(seq.seq_id, "stop")
            return
        gen.text = full
        safe = len(full) - pending_stop(full, gc.stop)  # hold back what may start a stop string
        delta = full[len(stream.shown):safe] if not full[:safe].endswith("\ufffd") else ""  # whole characters
        stream.shown += delta
        stream.events.put(TokenEvent(tok, delta))
        if seq.is_finished:
            self._finish(seq.seq_id, {FinishReason.LENGTH: "length", FinishReason.DEADLINE: "deadline",
                                      FinishReason.KV_BUDGET: "kv_budget"}.get(seq.finish_reason, "abort"))

    def _finish(self, seq_id: int, finish: str, error: BaseException | None = None) -> None:
        stream = self.streams.pop(seq_id, None)
        if stream is not None:
            stream._end(finish, error)

