"""The device-local KV pool: prefix blocks evicted from the paged pool kept in every device's spare memory.

Every device holds only its own layers' and KV heads' K/V of a block (the tensor-parallel split), so the pool
that costs no wire is device-local: when the block manager evicts a named block (block_manager.py), each device
copies its own part of it into a bounded store in its own memory (parallel/kv_stash.py, the worker's StashKV
call), and when a later prompt's hash chain goes on into that name, each copies it back into a fresh pool block
before the step -- only names and block ids cross the network, where the coordinator spill tier (kv_spill.py)
reads every evicted block out over it and writes it back over it.

The coordinator keeps the index: the names *every* device holding K/V stored (a device's reply lists what it
kept; a name some device refused -- its budget, no memory to copy -- counts for none, and the others are told to
drop it with the next call). The index is the one LRU: devices never drop on their own, so it is exact while the
sessions live, and it is bounded by the blocks the tightest device's budget holds (`capacity`): room is made by
dropping its least recently used names (never one a pending restore needs) in the same call that keeps the new
ones. With a coordinator spill tier too (`behind`), the device pool is in front: once full it drops nothing (a
name dropped here is lost, one sent behind is kept), what it cannot take goes behind, and a name either holds is
restored from where it is.

When: as the spill tier, before the step that follows the schedule that evicted or restored (nothing writes a
block until then): one call per device does drop, keep (the evicted blocks' K/V are still in place), restore --
keep before restore, as a restored block may be one just evicted. While the engine idles it keeps the free named
blocks next to be evicted (`pre_read`), so a later eviction finds them kept and costs nothing.

Budget: the user's per-device bytes (`EngineConfig.device_pool_bytes`, `--kv-pool-mib`), opened on every device
when the engine starts and refused there (DeviceOutOfMemory, before anything is allocated) when it does not fit
beside the device's plan -- its shard, a pass of the reserved length and the engine's pool (memory.stash_room);
each device also refuses a block over its budget before allocating it.

Only cache: a device that drops out loses its store with its session -- under a re-planning executor the engine
is told (CacheLost), every sequence runs again, the index is emptied and the stores opened again on the new
sessions (or the tier turned off, logged, if they no longer fit); under a plain executor the call fails as the
step would, and the step's error ends the requests in flight as today. A name a device no longer holds when a
restore asks for it (it forgot: nothing is written on that device) is a miss: CacheLost, every sequence runs its
tokens again, never a wrong K/V. Greedy tokens are unchanged: a restored block is a bit copy of the computed one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from itertools import islice

from ..errors import CacheLost, GalaxyError, InvalidRequest
from ..model.config import ModelConfig
from ..parallel.executor import Executor
from ..parallel.kv_stash import MAX_NAMES, StashCall, StashResult
from ..parallel.rank import KVPool
from .kv_spill import KVSpill, blocks_per_call, each_device, kv_dtype, kv_layout

log = logging.getLogger(__name__)


@dataclass
class DevicePoolStats:
    stashed_blocks: int = 0  # evicted blocks every device copied into its store (nothing on the wire)
    kept_blocks: int = 0  # evicted blocks every device held already (kept while idle, or before)
    restored_blocks: int = 0  # blocks every device copied back into the pool instead of computing them
    refused_blocks: int = 0  # evicted blocks not kept on every device: a device's refusal or a failed call
    dropped_blocks: int = 0  # names dropped to make room, least recently used first
    pre_read_blocks: int = 0  # free named blocks kept while the engine idled (not yet evicted)
    missed_restores: int = 0  # restores some device no longer held: every sequence ran again
    call_s: float = 0.0  # wall time of the calls before steps, summed
    pre_read_s: float = 0.0  # of the calls while idle, summed (no request waited for them)


class DevicePool:
    """An engine's device-local K/V tier: the index of names every device keeps, the calls that keep, drop and
    restore them. Driven by the engine's loop between schedule and step only (as KVSpill)."""

    def __init__(self, max_bytes: int, model: ModelConfig, behind: KVSpill | None = None):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise GalaxyError(f"device K/V pool: max_bytes={max_bytes!r} must be an integer >= 1")
        self.max_bytes, self.model, self.behind = max_bytes, model, behind
        self._names: OrderedDict[bytes, None] = OrderedDict()  # kept on every device, least recently used first
        self._drop: set[bytes] = set()  # names some device may keep that the index does not count: dropped next call
        self._open_for: tuple | None = None  # (partition, pool, dtype) the devices' stores were opened for
        self._held: list = []  # (rank, KVHolding) of the devices holding K/V, as opened
        self.capacity = 0  # blocks the tightest device's budget holds
        self.enabled = True  # False once a re-opened store did not fit (the tier then passes through to `behind`)
        self.stats = DevicePoolStats()

    # -- what the block manager asks ------------------------------------------------------------
    @property
    def store(self) -> DevicePool:
        """What the block manager looks names up in (`name in store`): this tier and the one behind it."""
        return self

    def __contains__(self, name: bytes) -> bool:
        return name in self._names or (self.behind is not None and name in self.behind.store)

    def __len__(self) -> int:
        return len(self._names)

    # -- opening -----------------------------------------------------------------------------------
    def open(self, ex: Executor, pool: KVPool) -> None:
        """Open a store of max_bytes on every device holding K/V, emptied; raises what a device refused with
        (DeviceOutOfMemory: the budget does not fit beside its plan), the stores already opened closed again."""
        self._names.clear()
        self._drop.clear()
        self._open_for = None
        held, per = kv_layout(ex, self.model, pool)
        capacity = min(self.max_bytes // p for p in per)
        if capacity < 1:
            raise InvalidRequest(f"device K/V pool: max_bytes={self.max_bytes} holds no block of {max(per)} bytes "
                                 f"(block_size {pool.block_size} on the device with the most K/V heads)")
        try:
            each_device([partial(ex.kv_stash, r, StashCall(open_bytes=self.max_bytes), pool) for r, _ in held])
        except GalaxyError:
            self._close_on(ex, pool, held)
            raise
        self._held, self.capacity, self._open_for = held, capacity, (ex.partition, pool, kv_dtype(ex))

    def _ready(self, ex: Executor, pool: KVPool) -> bool:
        """Whether the devices' stores are open for this split and pool; if not (a re-plan, a re-sized pool, a
        miss), open them again, emptied. A store that no longer fits turns the tier off (logged): only cache."""
        if not self.enabled:
            return False
        if self._open_for is not None and (self._open_for[0] is ex.partition and self._open_for[1] == pool
                                           and self._open_for[2] == kv_dtype(ex)):
            return True
        try:
            self.open(ex, pool)
        except CacheLost:
            raise
        except GalaxyError as e:
            log.warning("the device-local K/V pool could not be opened again (%s): it is off, evicted prefix blocks "
                        "are %s", e, "kept on the coordinator" if self.behind else "computed again when asked for")
            self.enabled = False
            return False
        return True

    # -- before a step -----------------------------------------------------------------------------
    def before_step(self, ex: Executor, pool: KVPool, evicted: list[tuple[bytes, int]],
                    restores: list[tuple[bytes, int]]) -> None:
        """Keep the evicted blocks (name, block) every device can, then restore `restores` (name, block) from
        the devices' stores (or the tier behind); raises CacheLost on a miss, and what a restore's call raised."""
        if not self._ready(ex, pool):
            if self.behind is not None:
                self.behind.before_step(ex, pool, evicted, restores)
            elif restores:
                raise CacheLost("the device-local K/V pool is off: blocks to restore are no longer held")
            return
        keep = {n for n, _ in restores}
        mine = [(n, b) for n, b in restores if n in self._names]
        theirs = [(n, b) for n, b in restores if n not in self._names]
        todo, overflow = self._choose(evicted, keep)
        if self.behind is not None and overflow:  # read out before any restore below may write their blocks
            self.behind.save(ex, pool, overflow, keep)
        t0 = time.perf_counter()
        try:
            self._call(ex, pool, todo, mine, "stashed_blocks")
        finally:
            self.stats.call_s += time.perf_counter() - t0
        if theirs:
            if self.behind is None:
                raise CacheLost(f"device K/V pool: {len(theirs)} blocks to restore are no longer held; every "
                                "sequence runs its tokens again")
            self.behind.restore(ex, pool, theirs)

    def _choose(self, evicted, keep) -> tuple[list, list]:
        """Of the evicted (name, block), least recent first: those to keep on the devices, and those that found no
        room there. Alone, room is made by dropping the least recently used names (never one in `keep`); with a tier
        behind, nothing is dropped -- a name dropped here is lost, while one sent behind is kept there -- so the
        devices keep what they took first and the coordinator what came after."""
        todo, overflow, seen = [], [], set()
        for name, b in reversed(evicted):  # the most recently evicted first: a prefix's head, evicted last
            if name in self._names:
                self._names.move_to_end(name)
                self.stats.kept_blocks += 1
            elif name in seen:
                continue
            elif len(self._names) + len(todo) < self.capacity or (self.behind is None and
                                                                  self._make_room(len(todo) + 1, keep)):
                todo.append((name, b))
            else:
                overflow.append((name, b))
            seen.add(name)
        return todo[::-1], overflow[::-1]

    def _make_room(self, n: int, keep) -> bool:
        """Drop least recently used names (never those in `keep`) until n more fit; False, nothing dropped, if
        they cannot."""
        over = len(self._names) + n - self.capacity
        if over <= 0:
            return True
        droppable = [k for k in self._names if k not in keep]
        if len(droppable) < over:
            return False
        for name in droppable[:over]:
            del self._names[name]
            self._drop.add(name)
            self.stats.dropped_blocks += 1
        return True

    def _call(self, ex: Executor, pool: KVPool, put: list, restore: list, counter: str) -> None:
        """One call per device: drop what is pending, keep `put`, restore `restore`. A name counts once every
        device kept it; a restore some device missed is CacheLost; a failed call loses only cache, unless it had
        restores to write (then it is the step's failure, raised)."""
        if not (put or restore or self._drop):
            return
        # at most MAX_NAMES drops a call (a device refuses more): the rest stay pending for the next one
        call = StashCall(drop=tuple(islice(self._drop, MAX_NAMES)), put=tuple(put), restore=tuple(restore))
        try:
            results: list[StashResult] = each_device([partial(ex.kv_stash, r, call, pool) for r, _ in self._held])
        except CacheLost:
            raise
        except GalaxyError as e:
            self._drop.update(n for n, _ in put)  # a device may have kept some: none counts, all are dropped next
            self.stats.refused_blocks += len(put)
            if restore:
                raise
            log.warning("keeping %d evicted KV blocks on the devices failed (%s): they are computed again when "
                        "asked for", len(put), e)
            return
        self._drop.difference_update(call.drop)
        missing = {n for res in results for n in res.missing}
        everywhere = set.intersection(*(set(res.stored) for res in results)) if results else set()
        for name, _ in put:
            if name in everywhere:
                self._names[name] = None
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            else:  # some device refused it (its budget, no memory to copy): a miss, and the others forget it
                self._drop.add(name)
                self.stats.refused_blocks += 1
        if missing:
            self.stats.missed_restores += len(missing)
            self._open_for = None  # the stores are opened again, emptied, before the next use
            raise CacheLost(f"device K/V pool: {len(missing)} blocks to restore are no longer held on some device "
                            f"(first {next(iter(missing)).hex()}); every sequence runs its tokens again")
        for name, _ in restore:  # just used: the least recently used names are the others
            if name in self._names:
                self._names.move_to_end(name)
        self.stats.restored_blocks += len(restore)

    # -- while idle --------------------------------------------------------------------------------
    def calls_of(self, ex: Executor, pool: KVPool) -> int:
        """Blocks in one call while idle: a device copies at most MAX_CALL_BYTES at once (the time the next
        request may wait for it)."""
        return blocks_per_call(kv_layout(ex, self.model, pool)[1])

    def pre_read(self, ex: Executor, pool: KVPool, blocks: list[tuple[bytes, int]]) -> int:
        """While the engine idles: keep free named blocks (the next to be evicted first) on every device, within
        the free room (never dropping a name for them); what finds no room goes to the tier behind. Returns the
        blocks kept. Raises CacheLost; other failures lose nothing but the attempt."""
        if not blocks:
            return 0
        if not self._ready(ex, pool) or len(self._names) >= self.capacity:
            return 0 if self.behind is None else self.behind.pre_read(ex, pool, blocks)
        part = blocks[:self.capacity - len(self._names)]
        before, t0 = len(self._names), time.perf_counter()
        try:
            self._call(ex, pool, part[::-1], [], "pre_read_blocks")  # the next to be evicted ends up freshest
        finally:
            self.stats.pre_read_s += time.perf_counter() - t0
        return len(self._names) - before

    # -- re-plans and the end ------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every name (a re-plan: the stores went with the old sessions); they are opened again, emptied,
        at the next use. The tier behind is emptied too."""
        self._names.clear()
        self._drop.clear()
        self._open_for = None
        if self.behind is not None:
            self.behind.clear()

    def close(self, ex: Executor | None = None) -> None:
        """Give the devices' memory back (best effort: a device gone has nothing left to give) and close the tier
        behind."""
        if ex is not None and self._open_for is not None:
            self._close_on(ex, self._open_for[1], self._held)
        self._names.clear()
        self._open_for = None
        if self.behind is not None:
            self.behind.close(ex)

    def _close_on(self, ex: Executor, pool: KVPool, held) -> None:
        for r, _ in held:
            try:
                ex.kv_stash(r, StashCall(close=True), pool)
            except Exception as e:  # noqa: BLE001 - best effort: a device gone gave its memory back with its process
                log.info("closing the K/V store of device %d failed: %s", r, e)

    def report(self) -> dict:
        """Its counts (DevicePoolStats), names kept and capacity: the engine's `load["device_pool"]`."""
        return dict(vars(self.stats), blocks=len(self._names), capacity=self.capacity,
                    max_bytes=self.max_bytes, enabled=self.enabled)
