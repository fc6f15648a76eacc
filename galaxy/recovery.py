"""Keeping a cluster working when devices drop out or slow down (`--recover`).

`ResilientCluster` wraps the gRPC `Cluster`. When a request fails because a device is gone, it
asks every device who is still alive, re-splits the model over the survivors (if their memory
allows), reloads the shards and retries the request once. A request that used a KV cache cannot
be retried as is -- the caches died with the old layout -- so it raises `CacheLost` and the
generator re-prefills the sequence so far.

Straggler detection (the Galaxy+ idea): after each plain forward with the HMP split, each
device's busy time (its forward time minus the time it waited for peers) is compared with the
fastest device's. Under a good split they are equal; a device that stays `straggler_ratio`
times slower for `straggler_patience` requests gets a share in proportion to its measured
speed, and the shards are reloaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .errors import DeviceOutOfMemory, GalaxyError, PeerUnreachable, WorkerError
from .run import DTYPES, busy_seconds
from .sharding import Partition, even_partition, shard_bytes, weighted_partition

log = logging.getLogger(__name__)


class CacheLost(GalaxyError):
    """The devices were re-planned mid-sequence; KV caches must be rebuilt by the caller."""


@dataclass
class Event:
    kind: str  # "recover" | "rebalance"
    detail: str
    seconds: float
    devices: list[str] = field(default_factory=list)  # the layout after the event


class ResilientCluster:
    """A Cluster that re-plans over the surviving devices; same interface as rpc.client.Cluster."""

    def __init__(self, addresses: list[str], token=None, tls=None, straggler_ratio: float = 1.6,
                 straggler_patience: int = 3):
        from .rpc.client import Cluster

        self._make = lambda addrs, timeout=10.0: Cluster(addrs, token=token, tls=tls, connect_timeout=timeout)
        self.addresses = list(addresses)
        self.cluster = self._make(self.addresses)
        self.straggler_ratio, self.straggler_patience = straggler_ratio, straggler_patience
        self.events: list[Event] = []
        self._loaded = None  # (source, partition, dtype, tiles) as last loaded
        self._stream = False
        self._slow_streak = 0

    # the Cluster interface ------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def partition(self) -> Partition | None:
        return self._loaded[1] if self._loaded else None

    def hello(self):
        try:
            return self.cluster.hello()
        except (PeerUnreachable, WorkerError) as e:  # start (or go on) with the devices that answer
            alive = self._alive()
            if not alive:
                raise
            log.warning("%s; going on with %d of %d devices", e, len(alive), len(self.addresses))
            self.cluster.close()
            self.cluster = self._make(alive)
            self.events.append(Event("recover", f"unreachable at start: {e}", 0.0, alive))
            return self.cluster.hello()

    def load_source(self, source, partition: Partition, dtype: str = "float32", tiles: int = 1,
                    stream: bool = False, wire=None, overlap: bool = True, backend: str = "torch"):
        out = self.cluster.load_source(source, partition, dtype=dtype, tiles=tiles, stream=stream, wire=wire,
                                       overlap=overlap, backend=backend)
        self._loaded = (source, partition, dtype, tiles)
        self._stream = stream
        return out

    def release(self) -> None:
        self.cluster.release()

    def close(self) -> None:
        self.cluster.close()

    def forward(self, req):
        try:
            res = self.cluster.forward(req)
        except (PeerUnreachable, WorkerError) as e:
            if self._loaded is None:
                raise
            log.warning("request failed (%s); re-planning over the surviving devices", e)
            self._recover(str(e))
            if req.cache:
                raise CacheLost(f"re-planned after a failure ({e}); the KV caches are gone") from e
            res = self.cluster.forward(req)
        if not req.cache:
            self._watch_stragglers(res)
        return res

    # recovery -----------------------------------------------------------------------------
    def _alive(self) -> list[str]:
        alive = []
        for a in self.addresses:
            try:
                with self._make([a], 2.0) as probe:
                    probe.hello()
                alive.append(a)
            except GalaxyError:
                pass
        return alive

    def _recover(self, why: str) -> None:
        t0 = time.perf_counter()
        source, old, dtype, tiles = self._loaded
        survivors = self._alive()
        if not survivors:
            raise PeerUnreachable(f"no device answers any more ({why}); nothing to recover with")
        keep = [self.cluster.addresses.index(a) for a in survivors if a in self.cluster.addresses]
        partition = _survivor_partition(source.config, old, keep, len(survivors))
        self._check_memory(source.config, partition, survivors, dtype)
        self.cluster.close()
        self.cluster = self._make(survivors)
        self.cluster.hello()
        self.cluster.load_source(source, partition, dtype=dtype, tiles=tiles, stream=self._stream)
        self._loaded = (source, partition, dtype, tiles)
        lost = [a for a in self.addresses if a not in survivors]
        self.events.append(Event("recover", f"lost {lost or 'none'}: {why}", time.perf_counter() - t0, survivors))

    def _check_memory(self, cfg, partition: Partition, addresses: list[str], dtype: str) -> None:
        with self._make(addresses, 2.0) as c:
            infos = c.hello()
        for r, info in enumerate(infos):
            need = shard_bytes(cfg, partition.spec(r, cfg), DTYPES[dtype])
            cap = min(info.available_memory, info.memory_budget) if info.memory_budget else info.available_memory
            if need > cap:
                raise DeviceOutOfMemory(f"cannot recover: {info.name} would need {need / 2**20:.0f} MiB for its "
                                        f"shard, it has {cap / 2**20:.0f} MiB; add a device")

    # stragglers ---------------------------------------------------------------------------
    def _watch_stragglers(self, res) -> None:
        part = self.partition
        if part is None or part.strategy != "galaxy" or part.world < 2:
            return
        busy = busy_seconds(res.devices)
        fastest = min(busy)
        ratios = [b / fastest if fastest > 0 else 1.0 for b in busy]  # 1.0 = as fast as the fastest
        if max(ratios) < self.straggler_ratio:
            self._slow_streak = 0
            return
        self._slow_streak += 1
        if self._slow_streak < self.straggler_patience:
            return
        self._slow_streak = 0
        t0 = time.perf_counter()
        source, old, dtype, tiles = self._loaded
        # a device 2x slower than its share says gets half the work
        weights = [w / r for w, r in zip(old.work_shares(source.config), ratios)]
        partition = weighted_partition(source.config, weights)
        self.cluster.load_source(source, partition, dtype=dtype, tiles=tiles, stream=self._stream)
        self._loaded = (source, partition, dtype, tiles)
        slow = [self.cluster.names[i] for i, r in enumerate(ratios) if r >= self.straggler_ratio]
        self.events.append(Event("rebalance", f"straggler(s) {slow}: busy-time ratios "
                                 f"{[round(r, 2) for r in ratios]}, new weights {[round(w, 3) for w in weights]}",
                                 time.perf_counter() - t0, list(self.cluster.addresses)))
        log.warning("re-balanced the split away from %s", slow)


def _survivor_partition(cfg, old: Partition, keep: list[int], n: int) -> Partition:
    """The old layout's kind over the surviving ranks: Galaxy keeps their relative weights."""
    if old.strategy == "galaxy" and len(keep) == n:
        shares = old.work_shares(cfg)
        weights = [shares[i] for i in keep]
        if sum(weights) > 0:
            return weighted_partition(cfg, weights)
    return even_partition(cfg, n, old.strategy)
