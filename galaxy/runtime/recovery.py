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

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from ..errors import CacheLost, DeviceOutOfMemory, GalaxyError, PeerUnreachable, WorkerError
from ..model.checkpoints import WeightSource
from ..parallel.compact import align_partition
from ..parallel.executor import LoadOptions
from ..parallel.sharding import Partition, Strategy, even_partition, weighted_partition
from ..transport.client import Cluster, check_memory

log = logging.getLogger(__name__)


@dataclass
class RecoveryEvent:
    kind: str  # "recover" | "rebalance"
    detail: str
    seconds: float
    devices: list[str] = field(default_factory=list)  # the layout after the event


@dataclass(frozen=True)
class _Loaded:
    """What was loaded, all of it: a reload after a fail-over or re-balance keeps every option."""

    source: WeightSource
    partition: Partition
    options: LoadOptions


class ResilientCluster:
    """A Cluster that re-plans over the surviving devices: an Executor like the Cluster it wraps."""

    def __init__(self, addresses: list[str], token=None, tls=None, straggler_ratio: float = 1.6,
                 straggler_patience: int = 3):
        self._make = lambda addrs, timeout=10.0: Cluster(addrs, token=token, tls=tls, connect_timeout=timeout)
        self.addresses = list(addresses)
        self.cluster = self._make(self.addresses)
        self.straggler_ratio, self.straggler_patience = straggler_ratio, straggler_patience
        self.events: list[RecoveryEvent] = []
        self._loaded: _Loaded | None = None
        self._slow_streak = 0

    # the Executor interface -------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def partition(self) -> Partition | None:
        return self._loaded.partition if self._loaded else None

    @property
    def names(self) -> list[str]:
        return self.cluster.names

    @property
    def kv_dtype(self):
        return self.cluster.kv_dtype

    @property
    def backends(self) -> list[str]:
        return self.cluster.backends

    @property
    def loaded_memory(self):
        return self.cluster.loaded_memory

    @property
    def options(self) -> LoadOptions | None:
        """The options the model is loaded with now (kept across fail-overs and re-balances)."""
        return self._loaded.options if self._loaded else None

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
            self.events.append(RecoveryEvent("recover", f"unreachable at start: {e}", 0.0, alive))
            return self.cluster.hello()

    def hello_each(self, timeout: float = 1.0):
        """The devices in use now (after a fail-over: the survivors), each polled (Cluster.hello_each)."""
        return self.cluster.hello_each(timeout)

    def load(self, source, partition: Partition, options: LoadOptions = LoadOptions()) -> list[int]:
        out = self.cluster.load(source, partition, options)
        self._loaded = _Loaded(source, partition, options)
        return out

    def release(self) -> None:
        self.cluster.release()

    def close(self) -> None:
        self.cluster.close()

    def forward(self, req, *, overlap: bool = True, measure_memory: bool = False, wire=None):
        try:
            res = self.cluster.forward(req, overlap=overlap, measure_memory=measure_memory, wire=wire)
        except (PeerUnreachable, WorkerError) as e:
            if self._loaded is None:
                raise
            log.warning("request failed (%s); re-planning over the surviving devices", e)
            self._recover(str(e))
            if wire is not None:  # a per-pass matrix was for the old ring: the survivors run with the loaded one
                wire = None
            res = self.cluster.forward(req, overlap=overlap, measure_memory=measure_memory, wire=wire)
        self._watch_stragglers(res)
        return res

    def kv_blocks(self, block_size: int) -> int:
        return self.cluster.kv_blocks(block_size)

    def step(self, step, pool):
        """An engine step; after a fail-over the KV pool died with the old layout, so the engine
        is told (CacheLost) to run its sequences' tokens again on the survivors."""
        return self._on_the_pool("step", lambda: self.cluster.step(step, pool))

    def export_kv(self, rank: int, block_table, tokens: int, layers, heads, pool):
        """A box of one sequence's K/V (phase-separated serving). A device gone mid-export re-plans the
        group as a step does, and the caller is told (CacheLost): every K/V here is gone, this box's too."""
        return self._on_the_pool("K/V export", lambda: self.cluster.export_kv(rank, block_table, tokens, layers,
                                                                               heads, pool))

    def import_kv(self, rank: int, block_table, box, layers, heads, pool) -> None:
        """Write a box into a device's pool; a device gone mid-import re-plans the group (CacheLost).
        `rank` is of the split the caller planned the box for: after a re-plan it must plan again."""
        self._on_the_pool("K/V import", lambda: self.cluster.import_kv(rank, block_table, box, layers, heads, pool))

    def kv_stash(self, rank: int, call, pool):
        """The device-local K/V pool on `rank` (Cluster.kv_stash); a device gone re-plans the group (CacheLost):
        every store was the old sessions', so the coordinator's index of them goes with the pool."""
        return self._on_the_pool("K/V store call", lambda: self.cluster.kv_stash(rank, call, pool))

    @property
    def session_id(self) -> str:
        return self.cluster.session_id

    def kv_destination(self, rank: int, *args, **kwargs):
        """Where a direct K/V move into `rank` goes, signed for the cluster loaded now (Cluster.kv_destination)."""
        return self.cluster.kv_destination(rank, *args, **kwargs)

    def revoke_kv(self, rank: int, nonces) -> None:
        """Spend a given-up direct move's tickets on `rank` of the cluster loaded now (Cluster.revoke_kv); no
        re-plan here: a device gone keeps the move's blocks reserved until it answers, and the next step finds it."""
        self.cluster.revoke_kv(rank, nonces)

    def send_kv(self, rank: int, block_table, tokens: int, layers, heads, pool, dest, start: int = 0, on_read=None):
        """A direct K/V move from `rank` (Cluster.send_kv); this device gone before the box was read re-plans
        the group (CacheLost), as an export does. After the read, or on the receiver's side: KVDirectFailed."""
        return self._on_the_pool("direct K/V move", lambda: self.cluster.send_kv(rank, block_table, tokens, layers,
                                                                                  heads, pool, dest, start,
                                                                                  on_read=on_read))

    def _on_the_pool(self, what: str, call):
        """Run a call that reads or writes the devices' KV pool; if a device dropped out, re-plan over
        the survivors and raise CacheLost (the pool died with the old layout), never retry."""
        try:
            return call()
        except (PeerUnreachable, WorkerError) as e:
            if self._loaded is None:
                raise
            log.warning("%s failed (%s); re-planning over the surviving devices", what, e)
            self._recover(str(e))
            raise CacheLost(f"re-planned after a failure ({e}); the KV cache is gone") from e

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
        loaded = self._loaded
        survivors = self._alive()
        if not survivors:
            raise PeerUnreachable(f"no device answers any more ({why}); nothing to recover with")
        keep = [self.cluster.addresses.index(a) for a in survivors if a in self.cluster.addresses]
        options = loaded.options
        partition = align_partition(loaded.source.config, _survivor_partition(
            loaded.source.config, loaded.partition, keep, len(survivors)), options.weight_format)
        if options.wire is not None:  # the formats between the devices that are left, as they were;
            # a device that was not in the ring before has none: exact fp32 until re-planned
            wire = tuple(tuple(options.wire[i][j] for j in keep) for i in keep) if len(keep) == len(survivors) else None
            options = dataclasses.replace(options, wire=wire)
        self._check_memory(loaded.source.config, partition, survivors, options)
        self.cluster.close()
        self.cluster = self._make(survivors)
        self.cluster.hello()
        self.cluster.load(loaded.source, partition, options)
        self._loaded = _Loaded(loaded.source, partition, options)
        lost = [a for a in self.addresses if a not in survivors]
        self.events.append(RecoveryEvent("recover", f"lost {lost or 'none'}: {why}", time.perf_counter() - t0,
                                         survivors))

    def _check_memory(self, cfg, partition: Partition, addresses: list[str], options: LoadOptions) -> None:
        """The survivors' memory, checked as the coordinator checks any load (client.check_memory)."""
        with self._make(addresses, 2.0) as c:
            infos = c.hello()
            try:
                check_memory(infos, c.names, cfg, partition, options)
            except DeviceOutOfMemory as e:
                raise DeviceOutOfMemory(f"cannot recover: {e}; add a device") from None

    # stragglers ---------------------------------------------------------------------------
    def _watch_stragglers(self, res) -> None:
        part = self.partition
        if part is None or part.strategy != Strategy.GALAXY or part.world < 2:
            return
        busy = [d.busy_s for d in res.devices]
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
        loaded = self._loaded
        # a device 2x slower than its share says gets half the work
        weights = [w / r for w, r in zip(part.work_shares(loaded.source.config), ratios)]
        partition = align_partition(loaded.source.config, weighted_partition(loaded.source.config, weights),
                                    loaded.options.weight_format)  # on a compact format's granules
        self.cluster.load(loaded.source, partition, loaded.options)
        self._loaded = _Loaded(loaded.source, partition, loaded.options)
        slow = [self.cluster.names[i] for i, r in enumerate(ratios) if r >= self.straggler_ratio]
        self.events.append(RecoveryEvent("rebalance", f"straggler(s) {slow}: busy-time ratios "
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
