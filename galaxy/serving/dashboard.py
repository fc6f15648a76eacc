"""What the dashboard shows, as JSON-ready dicts assembled from plain data: no threads, no sockets.

The page (galaxy/serving/static/) draws four things, each from one function here:

- `devices_view`: per device its name, address, CPU share and use, memory used of its budget, KV
  memory, the measured link to its ring neighbour, and whether it answers (up/down);
- `plan_view`: who holds which heads, MLP columns, vocabulary rows, layers and tokens, the strategy
  and the planner's reason;
- `timeline_view`: the engine's last step per device and layer -- compute, communication, the part
  of it overlap hid, time spent waiting (galaxy.runtime.report.layer_overlap);
- `History`: a ring buffer of the engine's numbers over the last minutes (running, waiting, TTFT,
  TPOT, tokens/s, KV blocks used, prefix-cache hit rate), taken from the same sources as /metrics.

The live inputs (device polls, link tests, the sampling clock) are monitor.py's; the HTTP side is
server.py's. Keeping this pure lets the JSON be tested without a browser, a server or a cluster.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from planner.plan import Plan

from ..engine.engine import LastStep
from ..model.config import ModelConfig
from ..parallel.executor import DeviceInfo
from ..parallel.sharding import Partition, Strategy
from ..runtime.report import layer_overlap


@dataclass(frozen=True)
class DeviceStatus:
    """One device as the last poll found it. `info` is its last answered hello, kept while it is down
    so the page still says what it was."""

    rank: int
    up: bool
    info: DeviceInfo | None = None
    error: str = ""  # why the last poll failed ("" when it answered)
    checked_at: float = 0.0  # time.time() of the last poll
    last_seen: float = 0.0  # time.time() it last answered (0: never)


@dataclass(frozen=True)
class RingLink:
    """A link measured with real transfers (Cluster.link_test) from rank `src` to `dst`."""

    src: int
    dst: int
    bandwidth_bps: float
    latency_s: float


def _num(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def devices_view(names: list[str], statuses: list[DeviceStatus], *, last: LastStep | None = None,
                 engine: dict | None = None, links: list[RingLink] = (), weight_bytes: list[int] = (),
                 now: float = 0.0) -> list[dict]:
    """One dict per rank, in ring order.

    With no statuses (an in-process executor: its ranks are threads of this process, nothing to
    poll), every rank is shown "local". CPU use is the last step's: the worker's CPU time over its
    forward's wall time, in cores (DeviceStats.cpu_s / forward_s). KV used is the device's pool
    scaled by the blocks in use: block ids mean the same positions on every device, so the pool
    fills at the same rate everywhere, in bytes of each device's own KV heads."""
    by_rank = {s.rank: s for s in statuses}
    stats = {d.rank: d for d in last.devices} if last is not None else {}
    link_from = {lk.src: lk for lk in links}
    used_frac = None
    kv_bytes: dict[str, int] = {}
    if engine is not None:
        kv_bytes = engine.get("kv_bytes", {})
        used_frac = engine["kv_blocks_used"] / engine["kv_blocks"] if engine.get("kv_blocks") else 0.0
    out = []
    for r, name in enumerate(names):
        st = by_rank.get(r)
        info = st.info if st is not None else None
        if not statuses:
            state = "local"
        else:
            state = "up" if st is not None and st.up else "down"
        row: dict = {"rank": r, "id": name, "name": info.name if info else name,
                     "address": info.address if info else "", "state": state,
                     "error": st.error if st is not None else "",
                     "last_seen_s": _num(now - st.last_seen) if st is not None and st.last_seen else None}
        if info is not None:
            row["cpu"] = {"limit": _num(info.cpu_limit) or float(info.cpu_count), "count": info.cpu_count,
                          "host_cpus": info.host_cpus or info.cpu_count, "threads": info.threads,
                          "host_id": info.host_id}
            row["memory"] = {"rss": info.rss, "budget": info.memory_budget, "total": info.total_memory,
                             "available": info.available_memory,
                             "limit": info.memory_budget or info.total_memory}
            row["compute_device"], row["worker_state"] = info.compute_device, info.state
        dev = stats.get(r)
        if dev is not None and dev.forward_s > 0:
            cores = dev.cpu_s / dev.forward_s if dev.cpu_s else None
            row["cpu_use"] = {"cores": _num(cores), "step": last.step, "forward_s": dev.forward_s,
                              "busy_s": dev.busy_s, "sent_bytes": sum(op.bytes for op in dev.ops)}
        kv = kv_bytes.get(name)
        if kv is not None:
            row["kv"] = {"pool_bytes": kv, "used_bytes": int(kv * used_frac)}
        if r < len(weight_bytes):
            row["weight_bytes"] = weight_bytes[r]
        lk = link_from.get(r)
        if lk is not None:
            row["link"] = {"to": lk.dst, "bandwidth_bps": _num(lk.bandwidth_bps), "latency_s": _num(lk.latency_s)}
        out.append(row)
    return out


def _share(lo: int, hi: int, total: int) -> list[float]:
    return [lo / total, hi / total] if total else [0.0, 0.0]


def plan_view(partition: Partition | None, cfg: ModelConfig | None, plan: Plan | None = None,
              names: list[str] = ()) -> dict:
    """The split as ranges per device, each also as a fraction [start, end) of its whole so the page
    can draw every dimension on one scale: heads, MLP columns, vocabulary rows, layers, and the
    share of each prompt's tokens a device computes in the connective blocks (strategies that split
    the sequence; every device sees every token otherwise)."""
    if partition is None or cfg is None:
        return {"loaded": False, "strategy": None, "reason": "no model is loaded", "devices": []}
    n = partition.world
    weights = list(partition.seq_weights) if partition.strategy.splits_tokens else []
    wsum = sum(weights)
    token_edges = [0.0]
    for w in weights:
        token_edges.append(token_edges[-1] + (w / wsum if wsum else 0.0))
    devices = []
    for r in range(n):
        spec = partition.spec(r, cfg)
        row = {"rank": r, "id": names[r] if r < len(names) else f"device {r}",
               "heads": list(spec.heads), "cols": list(spec.cols), "vocab": list(spec.vocab),
               "layers": list(spec.layers), "embed": spec.embed, "head": spec.head,
               "share": {"heads": _share(*spec.heads, cfg.n_heads), "cols": _share(*spec.cols, cfg.ffn),
                         "vocab": _share(*spec.vocab, cfg.vocab_size), "layers": _share(*spec.layers, cfg.n_layers),
                         "tokens": token_edges[r:r + 2] if weights else [0.0, 1.0]}}
        if plan is not None and r < len(plan.devices):
            d = plan.devices[r]
            row["planned"] = {"name": d.name, "tokens": d.tokens, "memory_bytes": d.memory.used_bytes,
                              "budget_bytes": d.memory.budget_bytes, "compute_s": _num(d.predicted.compute_s),
                              "comm_s": _num(d.predicted.comm_s)}
        devices.append(row)
    if plan is not None:
        reason = plan.reason or "the plan gives no reason"
        strategies = [{"strategy": s.strategy, "latency_s": _num(s.latency_s), "reason": s.reason,
                       "chosen": s.strategy == plan.strategy} for s in plan.strategies]
    else:
        reason = (f"no plan file: the session's {partition.strategy.value} split"
                  + (" (even)" if _even(partition) else " (uneven, by device weights)")
                  + "; `galaxy plan` profiles the devices and explains its choice")
        strategies = []
    return {"loaded": True, "strategy": partition.strategy.value, "reason": reason,
            "splits_tokens": partition.strategy.splits_tokens,
            "model": {"name": cfg.name, "family": cfg.family, "layers": cfg.n_layers, "heads": cfg.n_heads,
                      "kv_heads": cfg.n_kv_heads, "hidden": cfg.hidden, "ffn": cfg.ffn, "vocab": cfg.vocab_size},
            "planned_latency_s": _num(plan.latency_s) if plan is not None and plan.latency_s is not None else None,
            "planned_seq_len": plan.seq_len if plan is not None else None,
            "strategies": strategies, "devices": devices}


def plan_file_view(plan: Plan, names: list[str] = ()) -> dict:
    """The split a plan file describes, without a model loaded (`galaxy dashboard --plan`): the same
    shape as plan_view, built from the plan's own counts per device (heads, MLP columns, vocabulary
    rows, layers, tokens), the model's totals from the plan's model reference (else their sums)."""
    ds = plan.devices
    pipeline = plan.strategy == "pipeline"
    ref = plan.model
    totals = {"heads": ref.n_heads if ref else sum(d.heads for d in ds),
              "cols": ref.ffn if ref else sum(d.mlp_cols for d in ds),
              "vocab": ref.vocab_size if ref else sum(d.vocab_rows for d in ds),
              "layers": ref.n_layers if ref else (sum(d.layers for d in ds) if pipeline else max(d.layers for d in ds))}
    # what the strategy divides (Plan.to_partition): pipeline the layers, seqpar only the tokens
    split = {"pipeline": {"layers"}, "seqpar": set()}.get(plan.strategy, {"heads", "cols", "vocab"})
    splits_tokens = plan.strategy in ("galaxy", "local", "seqpar")
    tok_total = sum(d.tokens for d in ds)
    edges = {k: 0 for k in ("heads", "cols", "vocab", "layers", "tokens")}
    devices = []
    for r, d in enumerate(ds):
        counts = {"heads": d.heads, "cols": d.mlp_cols, "vocab": d.vocab_rows, "tokens": d.tokens,
                  "layers": d.layers if pipeline else totals["layers"]}
        row: dict = {"rank": r, "id": names[r] if r < len(names) else d.name, "share": {}}
        for k in ("heads", "cols", "vocab", "layers"):
            if k in split:  # consecutive ranges in ring order, as Plan.to_partition lays them out
                lo, hi = edges[k], edges[k] + counts[k]
                edges[k] = hi
            else:  # every device holds all of it
                lo, hi = 0, totals[k]
            row[k] = [lo, hi]
            row["share"][k] = _share(lo, hi, totals[k])
        if splits_tokens and tok_total:
            lo = edges["tokens"]
            edges["tokens"] = lo + d.tokens
            row["share"]["tokens"] = [lo / tok_total, (lo + d.tokens) / tok_total]
        else:
            row["share"]["tokens"] = [0.0, 1.0]
        row["planned"] = {"name": d.name, "tokens": d.tokens, "memory_bytes": d.memory.used_bytes,
                          "budget_bytes": d.memory.budget_bytes, "compute_s": _num(d.predicted.compute_s),
                          "comm_s": _num(d.predicted.comm_s)}
        devices.append(row)
    model = {"name": ref.name if ref else "", "family": ref.family if ref else "", "layers": totals["layers"],
             "heads": totals["heads"], "ffn": totals["cols"], "vocab": totals["vocab"]}
    return {"loaded": True, "strategy": plan.strategy, "reason": plan.reason or "the plan gives no reason",
            "splits_tokens": splits_tokens and bool(tok_total), "model": model, "from_file": True,
            "planned_latency_s": _num(plan.latency_s) if plan.latency_s is not None else None,
            "planned_seq_len": plan.seq_len,
            "strategies": [{"strategy": s.strategy, "latency_s": _num(s.latency_s), "reason": s.reason,
                            "chosen": s.strategy == plan.strategy} for s in plan.strategies],
            "devices": devices}


def _even(p: Partition) -> bool:
    if p.strategy == Strategy.PIPELINE:
        return max(p.layers) - min(p.layers) <= 1
    dims = [p.heads, p.cols, p.vocab] + ([p.seq_weights] if p.strategy.splits_tokens else [])
    return all(max(d) - min(d) <= 1 for d in dims)


def timeline_view(last: LastStep | None, names: list[str], links: list[RingLink] = (),
                  now: float = 0.0) -> dict:
    """The last engine step, per device and layer (galaxy.runtime.report.layer_overlap on each device
    alone): wall time in its collectives, compute inside them, communication (the wire time at the
    measured rate of the device's outgoing ring link when there is one), the part of it overlap hid,
    and time spent waiting for a peer. `outside_s` is the forward's time outside every collective
    (embedding, norms, the attention core, the LM head)."""
    if last is None:
        return {"step": None}
    spb = {lk.src: 8.0 / lk.bandwidth_bps for lk in links if lk.bandwidth_bps > 0}
    devices = []
    for dev in last.devices:
        rows = layer_overlap([dev], [spb.get(dev.rank, 0.0)])
        in_ops = sum(op.wall_s for op in dev.ops)
        devices.append({"rank": dev.rank, "id": names[dev.rank] if dev.rank < len(names) else f"device {dev.rank}",
                        "forward_s": dev.forward_s, "busy_s": dev.busy_s,
                        "waiting_s": sum(op.wait_s for op in dev.ops), "outside_s": max(0.0, dev.forward_s - in_ops),
                        "layers": [{k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}
                                   for row in rows]})
    return {"step": last.step, "tokens": last.tokens, "sequences": last.sequences, "seconds": last.seconds,
            "collective": last.collective, "age_s": _num(now - last.finished_at) if now else None,
            "measured_links": bool(spb), "devices": devices}


class History:
    """The engine's numbers sampled every few seconds, the last `size` samples.

    Counters become rates between two samples: tokens/s from the engine's sampled tokens, TTFT and
    TPOT as the mean over the requests that finished between them (the sums and counts of /metrics'
    histograms: a request's TTFT is known when it ends). Gauges are read as they are."""

    def __init__(self, size: int):
        if size < 2:
            raise ValueError(f"History: size={size} must be at least 2 (rates need two samples)")
        self.samples: deque[dict] = deque(maxlen=size)
        self._prev: tuple[float, dict] | None = None

    def add(self, t: float, engine: dict | None, totals: dict[str, float], rss: list[int | None] = ()) -> dict:
        """One sample at time `t` (seconds) from the engine's load (None: no engine) and the running
        totals of /metrics (ttft_sum, ttft_count, tpot_sum, tpot_count)."""
        cur = dict(totals)
        if engine is not None:
            cur["tokens"], cur["steps"] = engine["generated_tokens"], engine["steps"]
        s: dict = {"t": t, "rss": list(rss)}
        if engine is not None:
            s.update(running=engine["running"], waiting=engine["waiting"], kv_blocks_used=engine["kv_blocks_used"],
                     kv_blocks=engine["kv_blocks"], prefix_hit_rate=_num(engine["prefix_hit_rate"]),
                     preemptions=engine["preemptions"])
        s.update(tokens_per_s=None, steps_per_s=None, ttft_s=None, tpot_s=None)
        if self._prev is not None:
            t0, prev = self._prev
            dt = t - t0
            if dt > 0:
                for key, out in (("tokens", "tokens_per_s"), ("steps", "steps_per_s")):
                    if key in cur and key in prev:
                        s[out] = max(0.0, cur[key] - prev[key]) / dt
            for name in ("ttft", "tpot"):
                dn = cur.get(f"{name}_count", 0.0) - prev.get(f"{name}_count", 0.0)
                if dn > 0:
                    s[f"{name}_s"] = _num((cur[f"{name}_sum"] - prev.get(f"{name}_sum", 0.0)) / dn)
        self._prev = (t, cur)
        self.samples.append(s)
        return s

    def view(self, interval_s: float) -> dict:
        return {"interval_s": interval_s, "size": self.samples.maxlen, "samples": list(self.samples)}


def engine_view(load: dict | None, names: list[str]) -> dict | None:
    """The engine's state now, as /metrics reports it (None: no engine, e.g. an encoder or a
    dashboard without a model)."""
    if load is None:
        return None
    out = {k: load[k] for k in ("running", "waiting", "kv_blocks", "kv_blocks_used", "preemptions", "steps",
                                "generated_tokens")}
    out["prefix_hit_rate"] = _num(load["prefix_hit_rate"])
    out["kv_bytes"] = [load["kv_bytes"].get(n) for n in names]
    return out
