"""One device's side of the device-local KV pool: named prefix blocks kept in its spare memory, in its own heads.

The serving engine's paged pool holds a block's K/V split over the devices, each device the layers and KV
heads its shard computes (kv_transfer.KVHolding). When the coordinator's block manager evicts a named prefix
block (engine/block_manager.py), the coordinator spill tier (engine/kv_spill.py) reads it out over the network;
here instead each device copies its own part of the block into a bounded store in its own memory, under the
block's name, and copies it back into a pool block when a later prompt needs that prefix -- no K/V crosses the
wire, only names and block ids (engine/kv_devicepool.py keeps the coordinator's index of what every device
holds).

A call (`StashCall`) does, in this order: open (a budget, the store emptied) or close; drop names; put (copy
pool blocks out under names); restore (copy named K/V into pool blocks). Put before restore: the engine reads
an evicted block out before the same block is given to a restore in the same step.

Bounded and checked before touching anything: the store holds at most `max_bytes`; a put whose block would
exceed it is refused before anything is allocated for it (a block's size is known: layers x 2 x KV heads x
block_size x head_dim); an allocation failure copying (MemoryError, or the RuntimeError torch's CPU allocator
raises: errors.allocation_failed) refuses those blocks only (copied GATHER_BLOCKS at a time). A
restore writes all its names or none: every name is looked up, and every block id checked against the pool,
before the first write; a name not held comes back as `missing`, the pool untouched. Names are block-hash
digests (NAME_BYTES), block ids must lie in the pool the engine sized, and the pool must be the one allocated here
(its blocks hold what the coordinator thinks they hold). The stored K/V are bit copies of the pool's, so a
restored block is the block computed.

Pure torch: the executors (runtime.inproc, transport.worker) own a store per loaded session.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import DeviceOutOfMemory, KVTransferError, allocation_failed
from .kv_transfer import box_bytes, rank_holding, read_box, write_box
from .rank import KVPool, RankRuntime

NAME_BYTES = 16  # engine/block_manager.block_hash: a 128-bit BLAKE2b digest
MAX_NAMES = 1 << 16  # names of one kind in one call
# blocks gathered out of (or scattered into) the pool at once: a block a gather is ~2x slower on SmolLM2's 30
# layers (105 blocks kept and copied back: ~90 ms one by one, ~25 ms in 16s, one thread), and a gather holds at
# most this many blocks beyond the store while it is cut
GATHER_BLOCKS = 16


@dataclass(frozen=True)
class StashCall:
    """What the coordinator asks of one device's store in one call (see the module docstring for the order)."""

    open_bytes: int = 0  # > 0: (re)open with this budget, emptied
    close: bool = False
    drop: tuple[bytes, ...] = ()
    put: tuple[tuple[bytes, int], ...] = ()  # (name, pool block)
    restore: tuple[tuple[bytes, int], ...] = ()  # (name, pool block)

    def check(self, who: str = "device") -> None:
        """Refuse a malformed call (KVTransferError) before anything is touched."""
        if not isinstance(self.open_bytes, int) or self.open_bytes < 0:
            raise KVTransferError(f"{who}: K/V store budget open_bytes={self.open_bytes!r} must be >= 0")
        if self.open_bytes and self.close:
            raise KVTransferError(f"{who}: a K/V store call may open or close the store, not both")
        names = list(self.drop) + [n for n, _ in self.put] + [n for n, _ in self.restore]
        bad = [n for n in names if not isinstance(n, bytes) or len(n) != NAME_BYTES]
        if bad:
            raise KVTransferError(f"{who}: {len(bad)} K/V block names are not {NAME_BYTES}-byte digests")
        for what, items in (("drop", self.drop), ("put", self.put), ("restore", self.restore)):
            if len(items) > MAX_NAMES:
                raise KVTransferError(f"{who}: {len(items)} names to {what} in one call, at most {MAX_NAMES}")
        targets = [b for _, b in self.restore]
        if len(set(targets)) != len(targets):
            raise KVTransferError(f"{who}: a K/V restore writes one block twice")


@dataclass(frozen=True)
class StashResult:
    stored: tuple[bytes, ...] = ()  # of the call's put names: held now
    missing: tuple[bytes, ...] = ()  # of its restore names: not held (then nothing was written)
    held_bytes: int = 0
    max_bytes: int = 0  # 0: no store open
    seconds: float = 0.0


class KVStash:
    """One device's store: name -> its holding's K/V of one block, (layers, 2, KV heads, block_size, head_dim),
    in insertion order. It never drops an entry on its own: the coordinator's index is the one LRU, and a
    device holds exactly what the coordinator was told it stored, less what it told it to drop."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cut_for: tuple[int, torch.dtype] | None = None  # (block_size, dtype) of what it holds

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, name: bytes) -> bool:
        return name in self._blocks

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def block_bytes(self, rt: RankRuntime, pool: KVPool) -> int:
        """One block's K/V on this device (its layers x KV heads), known before anything is read."""
        h = rank_holding(rt)
        return 0 if h.empty else box_bytes(rt.model.cfg, h.layers, h.heads, pool.block_size, rt.model.dtype.itemsize)

    def apply(self, rt: RankRuntime, pool: KVPool, call: StashCall, who: str = "device") -> StashResult:
        """Drop, put and restore (the call's open / close are the executor's, which owns the store)."""
        t0 = time.perf_counter()
        call.check(who)
        for name in call.drop:
            old = self._blocks.pop(name, None)
            if old is not None:
                self.bytes -= _nbytes(old)
        if not (call.put or call.restore):
            return self._result((), (), t0)
        if not rt.holds_pool(pool):
            raise KVTransferError(f"{who}: no KV pool of {pool.num_blocks} blocks x {pool.block_size} here (no step "
                                  "ran on it yet, or it was re-sized): nothing to keep or restore")
        used = [b for _, b in call.put] + [b for _, b in call.restore]
        if used and not 0 <= min(used) <= max(used) < pool.num_blocks:
            raise KVTransferError(f"{who}: block ids {min(used)}..{max(used)} outside the pool of {pool.num_blocks}")
        cut = (pool.block_size, rt.model.dtype)
        if self._cut_for != cut:  # what it holds was cut for another block size or dtype: none of it fits
            self.clear()
            self._cut_for = cut
        h, per, bs = rank_holding(rt), self.block_bytes(rt, pool), pool.block_size
        stored, take = [], {}
        for name, b in call.put:
            if name in self._blocks:  # the same name is the same prefix: the same K/V
                self._blocks.move_to_end(name)
                stored.append(name)
            elif name not in take and not h.empty and self.bytes + per * (len(take) + 1) <= self.max_bytes:
                take[name] = b  # the others are refused here, before anything is allocated for them
        take_list = list(take.items())
        for at in range(0, len(take_list), GATHER_BLOCKS):
            part = take_list[at:at + GATHER_BLOCKS]
            try:  # one gather of the part (L, 2, H, n * bs, D), cut into each block's own tensor
                box = read_box(rt.paged, h, tuple(b for _, b in part), len(part) * bs, h.layers, h.heads, who)
                got = [box[:, :, :, j * bs:(j + 1) * bs].clone() for j in range(len(part))]
            except (MemoryError, RuntimeError) as e:  # no memory for the copies: these blocks are refused, the store
                if not allocation_failed(e):  # unchanged (torch's CPU allocator raises a RuntimeError)
                    raise
                continue
            del box
            for (name, _), block in zip(part, got):
                self._blocks[name] = block
                self.bytes += _nbytes(block)  # == per: the pool's dtype is the model's
                stored.append(name)
        missing = tuple(n for n, _ in call.restore if n not in self._blocks)
        if not missing and not h.empty:  # every name held, every block in the pool: now write
            for at in range(0, len(call.restore), GATHER_BLOCKS):
                part = call.restore[at:at + GATHER_BLOCKS]
                try:
                    box = torch.cat([self._blocks[n] for n, _ in part], dim=3)
                except (MemoryError, RuntimeError) as e:  # the blocks written so far are fresh ones the engine now
                    if not allocation_failed(e):  # computes again
                        raise
                    missing = tuple(n for n, _ in call.restore)
                    break
                write_box(rt.paged, h, tuple(b for _, b in part), box, h.layers, h.heads, who)
        return self._result(tuple(stored), missing, t0)

    def _result(self, stored, missing, t0: float) -> StashResult:
        return StashResult(stored, missing, self.bytes, self.max_bytes, time.perf_counter() - t0)


def open_stash(rt: RankRuntime, pool: KVPool, max_bytes: int, room: int, who: str = "device") -> KVStash:
    """A new store of `max_bytes` on this device, refused (DeviceOutOfMemory, before anything is allocated) when
    it is more than `room`: the memory the device has beside its plan -- its loaded shard, a pass of the reserved
    length and the engine's pool (the executor measures it, parallel/memory.stash_room)."""
    if max_bytes > room:
        raise DeviceOutOfMemory(f"{who}: a device-local K/V pool of {max_bytes / 2**20:.1f} MiB does not fit: the "
                                f"device has {max(0, room) / 2**20:.1f} MiB beside its shard, a pass and the engine's "
                                f"KV pool of {pool.num_blocks} blocks x {pool.block_size}; ask for less "
                                "(--kv-pool-mib) or fewer KV blocks")
    return KVStash(max_bytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
