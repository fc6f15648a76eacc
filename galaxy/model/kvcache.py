"""KV caches on one device: its own KV heads only, per layer, for generation and prefix reuse.

A device never holds the whole cache: under tensor parallelism it keeps K and V of the KV heads
its query heads read; a pipeline stage keeps those of its layers. A `KVStore` holds the caches
of live sequences and of reusable prefixes (a repeated system prompt), named by the
coordinator, within a byte bound.
"""

from __future__ import annotations

import math
import mmap

import torch

from ..errors import DeviceOutOfMemory, GalaxyError

# A cache grows in blocks of this many positions -- never by doubling, which could hold twice what
# it uses and pass a device's memory budget on one decode step (galaxy.parallel.memory counts it).
KV_BLOCK = 128


MAPPED_BYTES = 1 << 20  # CPU buffers from this size up get pages of their own (see _buffer)


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An empty KV buffer. On the CPU a large one is an anonymous mapping of its own: freed, its pages
    go back to the system at once. From the heap (the workers' allocator never trims it), each
    buffer a growing cache leaves behind was a hole the next, larger one could not use: over 1,000
    decode steps a worker's resident memory grew by 34 MiB for 16 MiB of KV cache."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or n < MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8).view(dtype).view(shape)


class LayerKV:
    """K and V of one layer, positions [0, length): (nkv, capacity, hd) buffers that grow by KV_BLOCK."""

    def __init__(self, nkv: int, hd: int, dtype: torch.dtype, device, capacity: int = KV_BLOCK):
        self.k = _buffer((nkv, capacity, hd), dtype, device)
        self.v = _buffer((nkv, capacity, hd), dtype, device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Store positions [start_pos, start_pos + S); returns K, V over [0, start_pos + S)."""
        if start_pos != self.length:
            raise GalaxyError(f"KV cache holds {self.length} positions, the request starts at {start_pos}")
        end = start_pos + k.shape[1]
        if end > self.k.shape[1]:
            cap = -(-end // KV_BLOCK) * KV_BLOCK
            for name in ("k", "v"):
                old = getattr(self, name)
                new = _buffer((old.shape[0], cap, old.shape[2]), old.dtype, old.device)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def fork(self, n: int) -> LayerKV:
        out = LayerKV.__new__(LayerKV)
        out.k = _buffer((self.k.shape[0], n, self.k.shape[2]), self.k.dtype, self.k.device)
        out.v = _buffer((self.v.shape[0], n, self.v.shape[2]), self.v.dtype, self.v.device)
        out.k.copy_(self.k[:, :n])
        out.v.copy_(self.v[:, :n])
        out.length = n
        return out

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """One sequence's cache on this device: a LayerKV per layer it holds."""

    def __init__(self, layers: dict[str, LayerKV]):
        self.layers = layers

    @classmethod
    def for_model(cls, model) -> KVCache:
        layers = {idx: LayerKV(blk.attn.nkv, model.cfg.head_dim, model.dtype, blk.attn.qkv.weight.device)
                  for idx, blk in model.layers.items()}
        return cls(layers)

    @property
    def length(self) -> int:
        return next(iter(self.layers.values())).length if self.layers else 0

    def fork(self, n: int) -> KVCache:
        if n > self.length:
            raise GalaxyError(f"cannot fork {n} positions from a cache of {self.length}")
        return KVCache({i: lk.fork(n) for i, lk in self.layers.items()})

    @property
    def nbytes(self) -> int:
        return sum(lk.nbytes for lk in self.layers.values())


class KVStore:
    """Named caches on a device (live sequences and kept prefixes), at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.caches: dict[str, KVCache] = {}

    def prepare(self, model, name: str, fork_from: str = "", fork_len: int = 0, drop=()) -> KVCache | None:
        """The cache a request uses: dropped ones removed, then found, forked or created."""
        for d in drop:
            self.caches.pop(d, None)
        if not name:
            return None
        if fork_from:
            src = self.caches.get(fork_from)
            if src is None:
                raise GalaxyError(f"no KV cache {fork_from!r} to fork from (evicted or never made)")
            self.caches[name] = src.fork(fork_len)
        elif name not in self.caches:
            self.caches[name] = KVCache.for_model(model)
        return self.caches[name]

    def check_bound(self) -> None:
        used = self.nbytes
        if used > self.max_bytes:
            raise DeviceOutOfMemory(f"KV caches use {used / 2**20:.0f} MiB, over this device's bound of "
                                    f"{self.max_bytes / 2**20:.0f} MiB; drop cached prefixes or shorten the request")

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    def clear(self) -> None:
        self.caches.clear()
