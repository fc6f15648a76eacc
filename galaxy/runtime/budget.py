"""What a loaded model may still spend on each device, and what a request will cost there.

After a load every budgeted device has reported its budget and what it held once the load's
transients were given back (`LoadedMemory`). `MemoryGuard` keeps that figure less the KV caches
the devices hold since, and prices a request with `galaxy.parallel.memory.request_need` -- the
function each worker checks the same request with before it computes. So the coordinator can:

- split a long prefill into chunks that fit (`prefill_chunk`), or refuse the prompt before any
  pass when even its KV cache cannot fit;
- stop generation cleanly at the device's KV budget (finish reason "kv_budget") instead of a
  worker refusing the next decode step.

A device that reports no budget never limits anything here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import DeviceOutOfMemory
from ..model.config import ModelConfig
from ..parallel import memory
from ..parallel.executor import ForwardResult
from ..parallel.forward import Request
from ..parallel.sharding import Partition, ShardSpec, weighted_partition
from ..transport.client import check_memory


@dataclass(frozen=True)
class Shortfall:
    """The device a request does not fit, and by how much."""

    rank: int
    name: str
    need: int
    room: int

    def message(self, what: str, advice: str) -> str:
        return (f"{self.name}: {what} needs {self.need / memory.MiB:.0f} MiB there and the device's memory "
                f"budget leaves {max(0, self.room) / memory.MiB:.0f} MiB beside its shard; {advice}")


class MemoryGuard:
    """A loaded executor's per-device memory, as requests spend it."""

    def __init__(self, executor, cfg: ModelConfig):
        self.ex, self.cfg = executor, cfg
        # the longest chunk to plan: halved each time a worker refuses one the estimate let through (it
        # holds a little more than its last report: heap pages since then), so the retry fits
        self.max_chunk: int | None = None
        self.last_chunk = 0
        self.reset()

    def reset(self) -> None:
        """Start again from what the devices reported at their (re)load."""
        self.loaded = list(getattr(self.ex, "loaded_memory", []) or [])
        self.kv_now = [0] * len(self.loaded)  # KV bytes each device holds (from the last pass's report)
        # the resident memory each device reported when its last pass began, plus the KV cache that pass
        # added: also what passes since the load left behind (buffers, threads, heap pages the allocator
        # cannot give back), which the worker counts in its own check of the next request
        self.rss_seen = [m.resident for m in self.loaded]

    @property
    def active(self) -> bool:
        return any(m.budget for m in self.loaded) and self.ex.partition is not None

    def refused(self) -> bool:
        """A worker refused a chunk this guard let through: plan half as long ones from now on.
        False when they were single tokens already (nothing shorter to try)."""
        if self.last_chunk <= 1:
            return False
        self.max_chunk = max(1, self.last_chunk // 2)
        return True

    def observe(self, result: ForwardResult) -> None:
        if len(getattr(self.ex, "loaded_memory", []) or []) != len(self.loaded):  # re-planned since
            self.reset()
        if len(result.devices) == len(self.kv_now):
            grown = [d.kv_cache_bytes - k for d, k in zip(result.devices, self.kv_now)]
            self.kv_now = [d.kv_cache_bytes for d in result.devices]
            self.rss_seen = [max(m.resident, d.rss_before_bytes + g) for m, d, g in zip(self.loaded, result.devices,
                                                                                        grown)]

    def room(self, rank: int, margin: int = 0) -> int:
        """What device `rank` may still spend: its budget beside what it holds now (KV caches included)
        and `margin`."""
        m = self.loaded[rank]
        return memory.room(m.budget, max(m.resident + self.kv_now[rank], self.rss_seen[rank]) + margin)

    def shortfall(self, req: Request, cached: int = 0, margin: int = 0) -> Shortfall | None:
        """The first device `req` does not fit with `margin` to spare (cached: positions its cache has
        allocated), or None."""
        if not self.active:
            return None
        part = self.ex.partition
        for r, m in enumerate(self.loaded):
            if not m.budget:
                continue
            need = memory.request_need(self.cfg, part, r, m.act_bytes, req, cached)
            if need > self.room(r, margin):
                return Shortfall(r, self.ex.names[r], need, self.room(r, margin))
        return None

    def prefill_chunk(self, ids: list[int], start: int, cache: str, last_only: bool = True) -> int:
        """The most tokens of ids[start:] one pass can take with the cache holding `start` positions
        (at most max_chunk); 0 when not even one fits."""
        def fits(n: int) -> bool:
            req = Request(torch.zeros(n, dtype=torch.long), start_pos=start, last_only=last_only, cache=cache)
            return self.shortfall(req, memory.kv_alloc_positions(start)) is None

        left = min(len(ids) - start, self.max_chunk or len(ids))
        if fits(left):
            self.last_chunk = left
            return left
        lo, hi = 0, left  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        self.last_chunk = lo
        return lo

    def forget(self, positions: int) -> None:
        """A cache of `positions` is dropped on every device (with the next request)."""
        part = self.ex.partition
        for r, m in enumerate(self.loaded):
            per = memory.spec_kv_bytes_per_position(self.cfg, part.spec(r, self.cfg), m.act_bytes)
            freed = per * memory.kv_alloc_positions(positions)
            self.kv_now[r] = max(0, self.kv_now[r] - freed)
            self.rss_seen[r] = max(m.resident, self.rss_seen[r] - freed)

    def prompt_shortfall(self, n: int, cache: str) -> Shortfall | None:
        """Whether a prompt of n tokens can be prefilled at all: its whole KV cache and a one-token pass."""
        req = Request(torch.zeros(1, dtype=torch.long), start_pos=n - 1, last_only=True, cache=cache)
        return self.shortfall(req, 0)  # nothing cached yet: the request allocates all n positions

    def check_prompt(self, n: int, cache: str) -> None:
        """Refuse, before any pass, a prompt whose KV cache alone cannot fit some device."""
        short = self.prompt_shortfall(n, cache)
        if short is not None:
            raise DeviceOutOfMemory(short.message(
                f"a prompt of {n} tokens (its KV cache, and one token's pass)",
                "shorten the prompt, load over more devices, or give this one a smaller share (`galaxy plan`)"))


# --- a split without a plan ------------------------------------------------------------------------

def _share_need(cfg: ModelConfig, share: float, params: memory.MemoryParams, seq: int, transient: int) -> int:
    """What a device holding `share` of every unit (heads, columns, vocabulary rows, tokens) needs,
    its heads starting where they touch the most KV heads."""
    heads, cols, vocab, tokens = (min(t, math.ceil(share * t - 1e-9)) for t in
                                  (cfg.n_heads, cfg.ffn, cfg.vocab_size, seq))
    h0 = min(cfg.group - 1, cfg.n_heads - heads)
    spec = ShardSpec((h0, h0 + heads), (0, cols), (0, vocab), (0, cfg.n_layers))
    return memory.shard_need(cfg, spec, params, seq, tokens, transient).total


def memory_caps(cfg: ModelConfig, infos, params: memory.MemoryParams, seq: int,
                transient: int = memory.PUSH_TRANSIENT) -> list[float]:
    """Per device, the largest share of every unit its memory budget holds (memory.shard_need within
    memory.room beside what it holds; 1 with no budget). Raises DeviceOutOfMemory, naming every
    device's budget and what the model needs, when the devices cannot hold the model together."""
    cap = []
    for info in infos:
        room = memory.room(info.memory_budget, info.rss - info.droppable)
        if not info.memory_budget or _share_need(cfg, 1.0, params, seq, transient) <= room:
            cap.append(1.0)
            continue
        lo, hi = 0.0, 1.0
        if _share_need(cfg, 0.0, params, seq, transient) > room:
            hi = 0.0
        for _ in range(30 if hi > 0 else 0):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _share_need(cfg, mid, params, seq, transient) <= room else (lo, mid)
        cap.append(lo)
    if sum(cap) < 1.0 - 1e-9:
        rows = ", ".join(f"{i.name} (budget {i.memory_budget / memory.MiB:.0f} MiB, {i.rss / memory.MiB:.0f} MiB "
                         f"in use) holds {c:.0%} of it" for i, c in zip(infos, cap))
        raise DeviceOutOfMemory(
            f"the devices cannot hold {cfg.name or cfg.family} with {seq} tokens reserved, nothing was pushed or "
            f"loaded: {rows}, {sum(cap):.0%} together. Add a device, use a smaller model or dtype, or reserve "
            "fewer tokens (--seq-len, --max-new-tokens)")
    return cap


def speed_shares(speed: list[float], cap: list[float]) -> list[float]:
    """Shares in proportion to speed, each at most its cap, summing to 1 (water-filling)."""
    lo, hi = 0.0, 1.0 / min(s for s, c in zip(speed, cap) if c > 0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(s * mid, c) for s, c in zip(speed, cap)) < 1.0 else (lo, mid)
    return [min(s * hi, c) for s, c in zip(speed, cap)]


def fit_partition(cfg: ModelConfig, infos, names: list[str], options, file_bytes: int | None = None) -> Partition:
    """A Galaxy split of `cfg` for devices without a plan: in proportion to each one's speed (the
    cores it may use), each within what its memory holds (memory_caps), checked with the exact
    admission the coordinator runs before a push (transport.client.check_memory). A device that
    integer rounding overfills gets a little less, until every one fits."""
    params = memory.MemoryParams.for_dtype(options.torch_dtype.itemsize)
    seq = options.seq_len or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
    transient = memory.PUSH_TRANSIENT if file_bytes is None else memory.file_transient_bytes(cfg, file_bytes)
    # sized with RESIDENT_DRIFT to spare: the workers count what they hold when the load comes
    infos = [dataclasses.replace(i, rss=i.rss + memory.RESIDENT_DRIFT) if i.memory_budget else i for i in infos]
    cap = memory_caps(cfg, infos, params, seq, transient)
    speed = [max(0.05, float(i.cpu_limit or i.threads or 1)) for i in infos]
    for _ in range(60):
        shares = speed_shares(speed, cap)
        part = weighted_partition(cfg, shares)
        try:
            check_memory(infos, names, cfg, part, options, file_bytes)
            return part
        except DeviceOutOfMemory as e:
            over = [r for r, n in enumerate(names) if f"{n}:" in str(e)]
            if not over or sum(cap) < 1.0:
                raise
            for r in over:
                cap[r] = shares[r] * 0.97
            if sum(cap) < 1.0:
                raise
    raise DeviceOutOfMemory(f"no split of {cfg.name or cfg.family} fits these devices' memory budgets "
                            "(nothing was pushed or loaded); plan one with `galaxy plan`, or add a device")
