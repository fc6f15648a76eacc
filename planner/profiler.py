"""Profile a cluster: time each device's blocks on the device, fit them, measure the links.

Compute profiles are cached per device and model shape (galaxy.paths: ~/.cache/galaxy/profiles, or
$GALAXY_CACHE/profiles), so planning again is instant; links are measured every time, because networks
change. `reprofile=True` ignores the cache. Workers on one machine (same host id: loopback workers,
emulated devices) are timed side by side and cached per set of such co-tenants: three workers
sharing two cores each run slower than two do, and a profile taken beside others is wrong alone.
A cache entry records the load of the machine it was timed on (HostLoad: its 1-minute load average
and CPUs); a worker of the planning machine whose entry was timed at a very different load is timed
again (`stale_load`): profiles cached under a load average of 8-15 put every prediction of a bench
run at 2-5 2-6x off (docs/planner.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from galaxy.backends.profiling import Sample
from galaxy.model.config import ModelConfig
from galaxy.model.transformer import DTYPES
from galaxy.parallel import memory
from galaxy.paths import cache_dir as _cache_dir

from .profile import (
    ClusterProfile,
    ComputeModel,
    DecodeTiming,
    DeviceProfile,
    Link,
    Tenancy,
    attention_flops,
    connective_flops,
    head_flops,
    kv_heads_touched,
    mlp_flops,
)

CACHE_VERSION = 9  # 9: a decode step of 2 sequences timed; 8: a collective's CPU (transport/collective_probe.py)
# 7: decode steps timed (DecodeTiming) and the host's load recorded; 6: flash attention
# A cached profile is timed again when the CPU share a runnable thread had then and has now differ by more than
# this factor (cpu_share): on 2 CPUs, load average 1.3 against 0.1 passes (0.87 vs 1), 3 against 1 does not.
LOAD_TOLERANCE = 1.5
COLLECTIVE = "collective"  # transport/collective_probe.py's sample kind (PROBE_KIND: the planner imports no transport)


@dataclass(frozen=True)
class HostLoad:
    """The load of the machine the planner runs on: its boot id (which workers share it: Tenancy.host),
    1-minute load average and CPUs. The caller reads it (the planner reads no host state itself)."""

    host: str
    load: float
    cpus: int

    @classmethod
    def now(cls, host: str) -> HostLoad:
        return cls(host, os.getloadavg()[0], os.cpu_count() or 1)


def cpu_share(load: float, cpus: int) -> float:
    """The share of a core one more runnable thread gets beside `load` others on `cpus` CPUs."""
    return min(1.0, max(1, cpus) / (max(0.0, load) + 1.0))


def stale_load(then: dict | None, now: HostLoad | None) -> str:
    """Why a cache entry timed under `then` ({"host", "load", "cpus"}) is not valid at `now` ("" if it
    is, or when either is unknown or they are different machines)."""
    if not then or now is None or not now.host or then.get("host") != now.host:
        return ""
    a, b = cpu_share(float(then["load"]), int(then["cpus"])), cpu_share(now.load, now.cpus)
    if max(a, b) / min(a, b) <= LOAD_TOLERANCE:
        return ""
    return (f"timed at load average {float(then['load']):.1f}, now {now.load:.1f} on {now.cpus} CPUs "
            f"(a thread's share of a core {a:.2f} then, {b:.2f} now)")


def cache_dir() -> Path:
    return _cache_dir("profiles")


def shape_key(cfg: ModelConfig, seq_lens: list[int], dtype: str) -> dict:
    """What a block's timing depends on (not the weights, not the vocabulary)."""
    return {"hidden": cfg.hidden, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "ffn": cfg.ffn, "gated": cfg.gated_mlp, "norm": cfg.norm, "activation": cfg.activation,
            "position": cfg.position, "causal": cfg.causal, "seq_lens": sorted(seq_lens), "dtype": dtype}


def co_tenants(infos) -> list[list[str]]:
    """Per worker, the names of the other workers of this cluster on the same machine (same host
    id). Their timings are taken together, so each depends on the others: workers that share cores
    and a memory bus run slower side by side than alone or beside fewer."""
    return [sorted(o.name for j, o in enumerate(infos) if j != i and info.host_id and o.host_id == info.host_id)
            for i, info in enumerate(infos)]


def _cache_file(info, key: dict, tenants: list[str] = ()) -> Path:
    # what the device may use is part of what it is: a new CPU quota or pinning, or other workers
    # sharing its machine, means new timings
    ident = {"device": info.name, "cpus": info.cpu_count, "cpu_limit": round(info.cpu_limit, 2),
             "threads": info.threads, "compute": info.compute_device, "shape": key, "v": CACHE_VERSION}
    if tenants:
        ident["co_tenants"] = list(tenants)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in info.name)
    return cache_dir() / f"{safe}-{digest}.json"


def fit(samples: list[tuple[float, float]]) -> ComputeModel:
    """Least squares of seconds = overhead + flops / rate; overhead clamped at zero."""
    flops = np.array([f for f, _ in samples], dtype=float)
    secs = np.array([t for _, t in samples], dtype=float)
    if len(samples) >= 2 and np.ptp(flops) > 0:
        slope, icpt = np.polyfit(flops, secs, 1)
        if slope > 0 and icpt >= 0:
            return ComputeModel(float(1.0 / slope), float(icpt))
    rate = float(flops.sum() / max(secs.sum(), 1e-12))  # through the origin
    return ComputeModel(rate, 0.0)


def fit_samples(cfg: ModelConfig, samples) -> dict[str, ComputeModel]:
    """Per block kind, (flops, seconds) points fitted to a ComputeModel."""
    pts: dict[str, list] = {"attention": [], "mlp": [], "connective": []}
    for s in samples:
        if s.kind == "attention":
            f = attention_flops(cfg, s.units, s.seq, kv_heads_touched(cfg, 0, s.units))
        elif s.kind in ("decode", COLLECTIVE):
            continue  # fit_decode, collective_cpu
        elif s.kind == "mlp":
            f = mlp_flops(cfg, s.units, s.seq)
        elif s.kind == "head":
            f = head_flops(cfg, s.units, s.seq)
        else:
            f = connective_flops(cfg, s.units)
        pts.setdefault(s.kind, []).append((f, s.seconds))
    return {k: fit(v) for k, v in pts.items() if v}


def fit_decode(samples) -> DecodeTiming | None:
    """A layer's decode step against the batch, from the "decode" samples (seconds over `seq` stacked
    layers at `units` sequences). One sequence's step is its own measurement (layer_s: the linears' one-row
    path); steps of several sequences are a line through the samples of two or more (multi_s at one
    sequence, per_seq_s per further one, clamped at zero; cache v9 times 2, 4 and 16): the one-row step is not on
    that line (the trio's xavier-nx, cache v8: 1.37 ms a layer alone, 1.92 at 4, 2.76 at 16, i.e. 1.78 at 2 on the
    line, where one line through all three put 1.58). With no multi-row pair, one line through every sample.
    None when the profile has no decode samples (an encoder)."""
    pts = [(s.units, s.seconds / max(1, s.seq)) for s in samples if s.kind == "decode"]
    if not pts:
        return None
    one = [t for b, t in pts if b == 1]
    multi = [(b, t) for b, t in pts if b >= 2]
    if one and len({b for b, _ in multi}) >= 2:
        slope = np.polyfit(np.array([b - 1 for b, _ in multi], dtype=float), np.array([t for _, t in multi]), 1)[0]
        slope = max(0.0, float(slope))
        # the line's value at one sequence, through the samples' mean (so a slope clamped at zero keeps their level)
        at_one = float(np.mean([t - slope * (b - 1) for b, t in multi]))
        return DecodeTiming(float(np.median(one)), slope, max(at_one, 1e-12))
    xs = np.array([b - 1 for b, _ in pts], dtype=float)
    ys = np.array([t for _, t in pts], dtype=float)
    if len(pts) >= 2 and np.ptp(xs) > 0:
        slope, icpt = np.polyfit(xs, ys, 1)
        if slope >= 0 and icpt > 0:
            return DecodeTiming(float(icpt), float(slope))
    one = [t for b, t in pts if b == min(b for b, _ in pts)]
    return DecodeTiming(float(np.median(one)), 0.0)


def collective_cpu(samples) -> float:
    """CPU seconds per ring step of a collective (DeviceProfile.collective_cpu_s): the median of the
    profile's "collective" samples; 0 when it has none (a worker before the probe, or the probe failed)."""
    xs = sorted(s.seconds for s in samples if s.kind == COLLECTIVE)
    return float(xs[len(xs) // 2]) if xs else 0.0


def _progress(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(1, total)
    print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what}   ", end="", file=sys.stderr,
          flush=True)
    if done == total:
        print(file=sys.stderr)


def tenancy(info) -> Tenancy | None:
    """How a CPU worker shares its machine (None for accelerators and workers that do not say)."""
    if not info.host_id or not info.host_cpus or info.compute_device != "cpu":
        return None
    cores = min(float(info.threads or info.cpu_count), info.cpu_limit or float(info.cpu_count))
    return Tenancy(info.host_id, cores, info.host_cpus)


def profile_cluster(cluster, cfg: ModelConfig, seq_lens: list[int], dtype: str = "float32",
                    memory_budget: int | None = None, budgets: dict[str, int] | None = None,
                    reprofile: bool = False, show_progress: bool = True,
                    transient: int = memory.PUSH_TRANSIENT, host_load: HostLoad | None = None) -> ClusterProfile:
    """Profiles of every worker of `cluster` (galaxy.transport.client.Cluster) for this model shape.

    memory_budget caps every device; budgets caps devices by name (cluster file entries).
    Each device's `memory_bytes` is what its budget leaves for a shard's weights, KV cache and
    activations beside the worker's resident memory, measured after profiling, less a load's
    `transient` (a push by default) -- galaxy.parallel.memory.planner_room, the workers' own sum.
    host_load: the planning machine's load now; its workers' cache entries timed at a very different
    load are timed again (stale_load), and new entries record it.
    """
    infos = cluster.hello()
    key = shape_key(cfg, seq_lens, dtype)
    tenants = co_tenants(infos)
    cached, todo = {}, []
    for r, info in enumerate(infos):
        f = _cache_file(info, key, tenants[r])
        entry = json.loads(f.read_text()) if f.exists() and not reprofile else None
        why = stale_load(entry.get("load"), host_load) if entry else ""
        if why and show_progress:
            print(f"galaxy: timing {info.name} again: its cached profile was {why}", file=sys.stderr)
        if entry and not why:
            cached[r] = entry
        else:
            todo.append(r)
    # timings of workers sharing a machine are only valid together: when one of them is timed, all are
    timed_hosts = {infos[r].host_id for r in todo if infos[r].host_id}
    todo = [r for r, info in enumerate(infos) if r in todo or info.host_id in timed_hosts]
    for r in todo:
        cached.pop(r, None)
    steps = (1 if todo else 0) + len(infos) * (len(infos) - 1) // 2
    done = 0
    if show_progress:
        print(f"galaxy: profiling {len(todo)} device(s), {len(cached)} cached; measuring links ...",
              file=sys.stderr)
    if todo:
        replies = cluster.profile(cfg, seq_lens, dtype, ranks=todo)
        for r, rep in replies.items():
            samples = [(s.kind, s.units, s.seq, s.seconds) for s in rep.samples]
            cached[r] = {"samples": samples, "codecs": dict(rep.codec_s_per_byte)}
            if host_load is not None and infos[r].host_id == host_load.host:
                cached[r]["load"] = asdict(host_load)
            path = _cache_file(infos[r], key, tenants[r])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"device": infos[r].name, "shape": key, **cached[r]}))
        done += 1
        if show_progress:
            _progress(done, steps, "block timings")
    n = len(infos)
    links: list[list[Link | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            rep = cluster.link_test(i, j)
            links[i][j] = links[j][i] = Link(rep.bandwidth_bps, rep.latency_s)  # assumed symmetric
            done += 1
            if show_progress:
                _progress(done, steps, f"link {infos[i].name} -> {infos[j].name}")
    infos = cluster.hello()  # memory as it is after timing and link tests, which may have grown a worker
    params = memory.MemoryParams.for_dtype(DTYPES[dtype].itemsize)
    seq = max(seq_lens)
    devices = []
    for r, info in enumerate(infos):
        samples = [Sample(*s) for s in cached[r]["samples"]]
        models = fit_samples(cfg, samples)
        resident = info.rss - info.droppable  # what it holds that a load would not give up
        # the budget caps the whole worker process: what it holds counts, and so do a load's transients,
        # the KV cache and the heap's growth -- memory.solver_room, the worker's own admission made linear
        budget = info.memory_budget or info.available_memory + info.rss
        mem = [memory.solver_room(budget, resident, cfg, seq, params, transient)]
        if memory_budget:
            mem.append(memory_budget)
        if budgets and info.name in budgets:
            mem.append(budgets[info.name])
        devices.append(DeviceProfile(info.name, info.address, models["attention"], models["mlp"],
                                     models["connective"], max(0, int(min(mem))), head=models.get("head"),
                                     codec_s_per_byte=cached[r].get("codecs", {}), tenancy=tenancy(info),
                                     budget_bytes=info.memory_budget, resident_bytes=resident,
                                     decode=fit_decode(samples), collective_cpu_s=collective_cpu(samples)))
    return ClusterProfile(devices, links)

