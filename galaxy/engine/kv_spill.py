"""A spill tier for the prefix cache: named KV blocks evicted from the devices' pool kept on the coordinator.

The block manager (block_manager.py) names every full, computed block by the hash chain of its prefix
and, when the pool runs short, evicts the least recently released named block: its name is dropped and
the next request with that prefix computes it again -- for a 2,000-token document, seconds of prefill on
small devices. Here an evicted block's K/V are first read from every device (`Executor.export_kv`, the
same boxes as a K/V move) into a bounded store on the coordinator under the block's name; a later
request whose hash chain goes on into names the store holds gets fresh blocks for them and their K/V
written back (`Executor.import_kv`, which each device checks for shape, dtype and blocks before
touching its pool) before the step that reads them, instead of being prefilled.

When: every change to the pool happens in `Scheduler.schedule` on the engine's loop, and nothing writes a
block until the step that follows. So the block manager only lists what it evicted and what it will
restore (`BlockManager.take_spill`), and the engine, before that step, first reads the evicted blocks out
(their K/V are still in place: no step has run since), then writes the restored ones in (a restored
block may be one just evicted), then runs the step. While the engine idles it reads the free named
blocks next to be evicted into the store's free room (`pre_read`), so that an eviction later finds them
stored and reads nothing on a request's path. Every read and write goes per device at once, in calls of
whole blocks of at most MAX_CALL_BYTES per device.

Bounded: the store holds at most `max_bytes` of K/V (in memory, or with `directory` in files of a private
directory), least recently used dropped first; the size of a block's boxes is known before they are read
(layers x KV heads x block_size x head_dim per device), so room is made -- or the block refused -- before
anything is allocated, and a block larger than the whole budget is never read. Names a pending restore
needs are never dropped to make room; a budget larger than the free memory (or disk) is refused at once.

Only cache: a read that fails (a device gone) loses that block's copy, logged, and the step that follows
reports the device; a write that fails is the step's failure (a device gone: its sequences end with that
error, as the step's would, or run again after a re-plan); a store file lost or unreadable, or a
re-planned executor (CacheLost: K/V cut another way, the store emptied with the pool), runs every sequence
again. Greedy tokens are unchanged: the K/V written back are the bytes read out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import psutil
import torch

from ..errors import CacheLost, GalaxyError, InvalidRequest
from ..model.config import ModelConfig
from ..parallel.executor import Executor
from ..parallel.kv_transfer import box_bytes, holdings
from ..parallel.rank import KVPool

log = logging.getLogger(__name__)

MAX_CALL_BYTES = 16 << 20  # most bytes of one device's box in one read or write (whole blocks, at least one)


@dataclass
class SpillStats:
    spilled_blocks: int = 0  # evicted blocks whose K/V were read into the store
    restored_blocks: int = 0  # blocks written back from the store instead of computed
    kept_blocks: int = 0  # evicted blocks the store already held (nothing read)
    refused_blocks: int = 0  # evicted blocks not kept: larger than the whole budget, or a read that failed
    dropped_blocks: int = 0  # entries dropped to make room (least recently used first)
    read_s: float = 0.0  # wall time of the reads from the devices, summed (before the steps that followed)
    pre_read_blocks: int = 0  # free named blocks read into the store while the engine idled (not yet evicted)
    pre_read_s: float = 0.0  # their reads' wall time, summed (no request waited for it)
    write_s: float = 0.0  # wall time of the writes back, summed (before the steps that read them)


class SpillStore:
    """Named K/V blocks, at most `max_bytes`, least recently used dropped first: in host memory, or with
    `directory` in files of a private directory made inside it (one file a block, removed when dropped and
    by `close`; read back with torch.load(weights_only=True), and the devices check every box they are given,
    as for any K/V import). On disk the budget counts the files' tensor bytes; in memory, the tensors'."""

    def __init__(self, max_bytes: int, directory: str | None = None):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise GalaxyError(f"spill store: max_bytes={max_bytes!r} must be an integer >= 1")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # name -> bytes, least recently used first
        self._boxes: dict[bytes, tuple[torch.Tensor, ...]] = {}  # in memory: name -> per-device boxes
        try:  # private (0700): the K/V of users' prompts
            self.directory = None if directory is None else tempfile.mkdtemp(prefix="galaxy-kv-spill-", dir=directory)
        except OSError as e:
            raise InvalidRequest(f"spill store: directory={directory!r} cannot hold a store: {e}") from e
        # a budget the coordinator cannot hold now is refused, not discovered when the store fills
        free = psutil.virtual_memory().available if directory is None else shutil.disk_usage(self.directory).free
        if max_bytes > free:
            self.close()
            raise InvalidRequest(f"spill store: max_bytes={max_bytes} is more than the {free} bytes "
                                 f"{'of memory' if directory is None else 'on ' + repr(directory)} free now")
        self.stats = SpillStats()

    def __contains__(self, name: bytes) -> bool:
        return name in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def make_room(self, nbytes: int, keep=frozenset()) -> bool:
        """Drop least recently used entries (never those named in `keep`) until `nbytes` more fit; False,
        nothing dropped, if they cannot."""
        free = self.max_bytes - self.bytes
        if free >= nbytes:
            return True
        droppable = sum(n for k, n in self._sizes.items() if k not in keep)
        if free + droppable < nbytes:
            return False
        for name in [k for k in self._sizes if k not in keep]:
            if self.max_bytes - self.bytes >= nbytes:
                break
            self._drop(name)
            self.stats.dropped_blocks += 1
        return True

    def put(self, name: bytes, boxes: tuple[torch.Tensor, ...]) -> None:
        """Keep a block's boxes; the caller made room (make_room) for them first. A file that cannot be
        written raises OSError (whatever torch.save raised), the block not kept and no file left."""
        n = _nbytes(boxes)
        if name in self._sizes:
            self._drop(name)
        if self.bytes + n > self.max_bytes:
            raise GalaxyError(f"spill store: {n} bytes more would exceed max_bytes={self.max_bytes} "
                              f"({self.bytes} held): make_room first")
        if self.directory is None:
            self._boxes[name] = boxes
        else:
            try:
                torch.save(tuple(b.contiguous() for b in boxes), self._path(name))
            except (OSError, RuntimeError) as e:  # a full or gone disk: torch.save's writer raises RuntimeError
                with contextlib.suppress(OSError):  # no partial file left behind, outside the budget's count
                    os.remove(self._path(name))
                raise OSError(f"spill store: writing a block to {self.directory!r} failed: {e}") from e
        self._sizes[name] = n
        self.bytes += n

    def get(self, name: bytes) -> tuple[torch.Tensor, ...]:
        """A block's boxes, now the most recently used."""
        self._sizes.move_to_end(name)
        if self.directory is None:
            return self._boxes[name]
        return tuple(torch.load(self._path(name), weights_only=True))

    def touch(self, name: bytes) -> None:
        self._sizes.move_to_end(name)

    def clear(self) -> None:
        for name in list(self._sizes):
            self._drop(name)

    def close(self) -> None:
        """Empty the store and remove its directory."""
        self.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _drop(self, name: bytes) -> None:
        self.bytes -= self._sizes.pop(name)
        if self.directory is None:
            del self._boxes[name]
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(name))

    def _path(self, name: bytes) -> str:
        return os.path.join(self.directory, name.hex())


def each_device(calls: list) -> list:
    """Every device's call at once (each has its own link and pool), all of them ended before this returns (no
    write lands after a failure is raised); their results in order, or the first failure in that order."""
    if len(calls) == 1:
        return [calls[0]()]
    with ThreadPoolExecutor(len(calls), thread_name_prefix="galaxy-kv-spill") as pool:
        futures = [pool.submit(c) for c in calls]
    return [f.result() for f in futures]


def _nbytes(boxes) -> int:
    return sum(b.numel() * b.element_size() for b in boxes)


def kv_dtype(ex: Executor) -> torch.dtype:
    """The K/V's dtype in the executor's pools (float32 when it does not say)."""
    return getattr(ex, "kv_dtype", None) or torch.float32


def kv_layout(ex: Executor, model: ModelConfig, pool: KVPool) -> tuple[list[tuple[int, object]], list[int]]:
    """The devices holding K/V (rank, KVHolding) and one block's K/V bytes on each, known before anything is
    read: what the spill tier reads and the device-local pool keeps (kv_devicepool.py)."""
    held = [(r, h) for r, h in enumerate(holdings(ex.partition, model)) if not h.empty]
    itemsize = kv_dtype(ex).itemsize
    return held, [box_bytes(model, h.layers, h.heads, pool.block_size, itemsize) for _, h in held]


def blocks_per_call(block_bytes: list[int]) -> int:
    """Blocks in one read or write per device (`block_bytes`: kv_layout's): its box at most MAX_CALL_BYTES (at
    least one block), which bounds what a device and the coordinator hold at once beyond the pool and the store."""
    return max(1, MAX_CALL_BYTES // max(block_bytes))


def _block(boxes: list[torch.Tensor], j: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """Block j of each device's box (L, 2, H, n * bs, D), as its own tensors: a view would keep the whole
    box alive in the store."""
    return tuple(box[:, :, :, j * block_size:(j + 1) * block_size].clone() for box in boxes)


class KVSpill:
    """An engine's spill tier: reads evicted blocks out of every device into a SpillStore, writes restored
    ones back. Called by the engine's loop between schedule and step only."""

    def __init__(self, max_bytes: int, model: ModelConfig, directory: str | None = None):
        self.store, self.model = SpillStore(max_bytes, directory), model
        self._cut_for: tuple | None = None  # (partition, block_size, dtype) the stored boxes belong to

    def _layout(self, ex: Executor, pool: KVPool) -> tuple[list[tuple[int, object]], list[int]]:
        """kv_layout (the devices holding K/V and one block's bytes on each); the store is emptied when the
        split, the block size or the dtype changed since its boxes were cut."""
        key = (ex.partition, pool.block_size, kv_dtype(ex))
        if self._cut_for is None or self._cut_for[0] is not key[0] or self._cut_for[1:] != key[1:]:
            self.store.clear()
            self._cut_for = key
        return kv_layout(ex, self.model, pool)

    def block_bytes(self, ex: Executor, pool: KVPool) -> int:
        return sum(self._layout(ex, pool)[1])

    def save(self, ex: Executor, pool: KVPool, evicted: list[tuple[bytes, int]], keep=frozenset()) -> None:
        """Read the K/V of `evicted` (name, block) from every device into the store, as many as fit (the most
        recently evicted first: a prefix's head, released last, is evicted last). Failures lose only cache."""
        if not evicted:
            return
        held, sizes = self._layout(ex, pool)
        per = sum(sizes)
        todo = []
        for name, b in reversed(evicted):  # most recently evicted first
            if name in self.store:
                self.store.touch(name)
                self.store.stats.kept_blocks += 1
            elif any(name == n for n, _ in todo):
                continue
            elif self.store.make_room(per * (len(todo) + 1), keep):
                todo.append((name, b))
            else:
                self.store.stats.refused_blocks += 1
        if not todo:
            return
        bs, per_call = pool.block_size, blocks_per_call(sizes)
        order = todo[::-1]  # least recent first: the most recent end up freshest in the store
        for at in range(0, len(order), per_call):
            part = order[at:at + per_call]
            t0 = time.perf_counter()
            try:
                boxes = self._export(ex, pool, held, part)
            except CacheLost:  # the executor re-planned: every K/V is gone, the engine runs its sequences again
                raise
            except GalaxyError as e:
                log.warning("reading %d evicted KV blocks into the spill store failed (%s): they are recomputed "
                            "when asked for again", len(order) - at, e)
                self.store.stats.refused_blocks += len(order) - at
                return
            finally:
                self.store.stats.read_s += time.perf_counter() - t0
            for j, (name, _) in enumerate(part):
                try:
                    self.store.put(name, _block(boxes, j, bs))
                except (OSError, MemoryError) as e:  # the store's disk full or gone, or no memory for the copy
                    log.warning("writing an evicted KV block to the spill store failed (%s): it is recomputed when "
                                "asked for again", e)
                    self.store.stats.refused_blocks += 1
                    continue
                self.store.stats.spilled_blocks += 1

    def pre_read(self, ex: Executor, pool: KVPool, blocks: list[tuple[bytes, int]]) -> int:
        """While the engine idles: read free named blocks (the next to be evicted first) into the store's free
        room, at most one call's worth, never dropping an entry for them; an eviction of one later finds it
        stored and reads nothing. Returns the blocks read (0: nothing to do, or no room). Raises CacheLost;
        other failures lose nothing but the attempt (logged, 0)."""
        if not blocks:
            return 0
        held, sizes = self._layout(ex, pool)
        per = sum(sizes)
        part = blocks[:min(blocks_per_call(sizes), (self.store.max_bytes - self.store.bytes) // per)]
        if not part:
            return 0
        t0 = time.perf_counter()
        try:
            boxes = self._export(ex, pool, held, part)
        except CacheLost:
            raise
        except GalaxyError as e:
            log.info("reading %d free KV blocks into the spill store while idle failed (%s)", len(part), e)
            return 0
        finally:
            self.store.stats.pre_read_s += time.perf_counter() - t0
        for j in reversed(range(len(part))):  # the next to be evicted ends up freshest
            try:
                self.store.put(part[j][0], _block(boxes, j, pool.block_size))
            except (OSError, MemoryError) as e:
                log.warning("writing a KV block to the spill store failed (%s)", e)
                return 0
            self.store.stats.pre_read_blocks += 1
        return len(part)

    @staticmethod
    def _export(ex: Executor, pool: KVPool, held, part: list[tuple[bytes, int]]) -> list[torch.Tensor]:
        """One box per device holding K/V (`held`: _layout's): the K/V of `part`'s (name, block) blocks, in order."""
        table = tuple(b for _, b in part)
        return each_device([partial(ex.export_kv, r, table, len(table) * pool.block_size, h.layers, h.heads, pool)
                      for r, h in held])

    def calls_of(self, ex: Executor, pool: KVPool) -> int:
        """Blocks in one call per device (the most a pre-read takes at once)."""
        return blocks_per_call(self._layout(ex, pool)[1])

    def before_step(self, ex: Executor, pool: KVPool, evicted: list[tuple[bytes, int]],
                    restores: list[tuple[bytes, int]]) -> None:
        """What the engine does before a step (BlockManager.take_spill's lists): read the evicted blocks out, never
        dropping a name a restore needs to make room, then write the restored ones in."""
        self.save(ex, pool, evicted, keep={n for n, _ in restores})
        self.restore(ex, pool, restores)

    def clear(self) -> None:
        """Forget every stored block (a re-plan: they were cut for the old split)."""
        self.store.clear()

    def close(self, ex: Executor | None = None) -> None:
        """Empty the store and remove its directory (the engine closed)."""
        self.store.close()

    def report(self) -> dict:
        """Its counts (SpillStats), bytes held and budget: the engine's `load["spill"]`."""
        return dict(vars(self.store.stats), bytes=self.store.bytes, max_bytes=self.store.max_bytes)

    def restore(self, ex: Executor, pool: KVPool, restores: list[tuple[bytes, int]]) -> None:
        """Write the stored K/V of `restores` (name, block) into those blocks on every device; raises what the
        devices raise (the caller treats it as the step's failure)."""
        if not restores:
            return
        (held, sizes), dtype = self._layout(ex, pool), kv_dtype(ex)
        missing = [n.hex() for n, _ in restores if n not in self.store]
        if missing:  # make_room never drops a name a restore needs; a re-plan that emptied the store does
            raise CacheLost(f"spill store: {len(missing)} blocks to restore are no longer held (first {missing[0]}); "
                            "every sequence runs its tokens again")
        want = [(h.layers[1] - h.layers[0], 2, h.heads[1] - h.heads[0], pool.block_size, self.model.head_dim)
                for _, h in held]
        per_call = blocks_per_call(sizes)
        for at in range(0, len(restores), per_call):
            part = restores[at:at + per_call]
            try:
                entries = [self.store.get(n) for n, _ in part]
            except Exception as e:  # noqa: BLE001 - a file gone or unreadable: the store lost it, as a device its pool
                raise CacheLost(f"the spill store could not read back {len(part)} KV blocks ({e}); every sequence "
                                "runs its tokens again") from e
            if any(len(e) != len(want) or any(tuple(b.shape) != w or b.dtype != dtype for b, w in zip(e, want))
                   for e in entries):
                raise CacheLost("the spill store read back KV blocks of another shape or dtype than stored; every "
                                "sequence runs its tokens again")
            table = tuple(b for _, b in part)
            t0 = time.perf_counter()
            each_device([partial(ex.import_kv, r, table, torch.cat([e[i] for e in entries], dim=3), h.layers, h.heads,
                                 pool) for i, (r, h) in enumerate(held)])
            self.store.stats.restored_blocks += len(part)
            self.store.stats.write_s += time.perf_counter() - t0
