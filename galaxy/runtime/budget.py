"""What a model may take of each device's memory, decided on the coordinator before anything moves.

- `fit_partition`: with no plan, a Galaxy split by each device's speed within what its memory
  budget holds (galaxy.parallel.memory.shard_need beside what it holds), checked with the exact
  admission the coordinator runs before a push -- or DeviceOutOfMemory naming every device, before
  any weight moves.
- `check_pass`: a forward pass (a prompt's logits, an encoder's hidden states) too large for a
  device's budget is refused before any device computes, with the figure each worker admits it by
  (memory.request_need); generation runs engine steps instead, whose KV pool each worker sized
  from the same model at its load (memory.kv_pool_budget).

A device that reports no budget never limits anything here.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import DeviceOutOfMemory
from ..model.config import ModelConfig
from ..parallel import memory
from ..parallel.executor import pool_blocks
from ..parallel.forward import Request
from ..parallel.sharding import Partition, ShardSpec, weighted_partition
from ..transport.client import check_memory


def check_pass(executor, cfg: ModelConfig, req: Request, pool: bool = True) -> None:
    """Refuse `req` before any device computes when its activations and reply do not fit some
    device's memory budget beside what it held after its load and, with `pool`, the KV pool the
    serving engine allocates there (its first step does). Without an engine there is no pool: the
    worker admits a pass beside the pool it holds (none), and a pool allocated later is admitted
    against what the worker holds then (its heap trimmed), so a one-shot forward may use the room
    the pool would take -- its reply of every token's logits is larger than the pass the pool
    leaves room for (memory.pass_reserve keeps RESERVED_ROWS rows)."""
    part = getattr(executor, "partition", None)
    loaded = getattr(executor, "loaded_memory", []) or []
    if part is None:
        return
    for r, m in enumerate(loaded):
        if not m.budget:
            continue
        need = memory.request_need(cfg, part, r, m.act_bytes, req)
        held = m.resident + (m.kv_budget if pool else 0)
        if need > memory.room(m.budget, held):
            beside = "its shard and KV pool" if pool and m.kv_budget else "its shard"
            raise DeviceOutOfMemory(
                f"{executor.names[r]}: a pass of {req.ids.shape[0]} tokens needs {need / memory.MiB:.0f} MiB there "
                f"(activations and reply) and the device's memory budget of {m.budget / memory.MiB:.0f} MiB leaves "
                f"{max(0, memory.room(m.budget, held)) / memory.MiB:.0f} MiB beside {beside}; send "
                "fewer tokens at once, load with a larger seq_len reserve, or give this device a smaller share")


def kv_blocks_now(executor, cfg: ModelConfig, seq_len: int, block_size: int) -> int | None:
    """The KV blocks each budgeted device's pool may take given what it holds now (one Hello), for
    an engine started after one-shot passes that ran beside no pool (check_pass with pool=False):
    a long pass leaves the worker larger than after its load -- allocator pools it cannot give
    back, measured +29-31 MiB after a 4,096-token pass of a small Llama -- so the pool its load
    reported would no longer fit beside it and the engine's first step would be refused. The
    smallest count over the devices holding KV heads; None when no device has a budget."""
    part = executor.partition
    per_rank = []
    for r, (m, info) in enumerate(zip(executor.loaded_memory, executor.hello())):
        per_token = memory.spec_kv_bytes_per_position(cfg, part.spec(r, cfg), m.act_bytes)
        if not m.budget or not per_token:
            continue
        reserve = memory.pass_reserve(cfg, part, r, m.act_bytes, seq_len)
        per_rank.append((per_token, memory.kv_pool_budget(m.budget, info.rss, reserve)))
    return pool_blocks(per_rank, block_size) if per_rank else None


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
    params = options.memory_params  # a compact weights format: its linears at their compact size
    seq = options.seq_len or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
    transient = memory.PUSH_TRANSIENT if file_bytes is None else memory.file_transient_bytes(cfg, file_bytes)
    if params.compact is not None:  # converting one linear; a file read's float32 linears: check_memory's
        transient += memory.quantize_transient_bytes(cfg, params.compact)
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
