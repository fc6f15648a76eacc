"""`galaxy bench`: Galaxy against its baselines and the roofline, side by side, in one run.

Every strategy runs on the same devices, model and input (a prefill: a causal LM returns the last
token's logits, an encoder its hidden states). Repetitions are interleaved
(A B C A B C ...) so that drift on a shared machine hits all strategies alike, and each
strategy's first output is checked against the single-device one. Reported per strategy:
median latency and spread, speed-up over the fastest device alone ("local"), the fraction of
the roofline achieved, per-device memory (weights held + peak activations of a pass) and CPU
seconds (every thread of each worker: the work a layout really costs, beside what it saves).

The roofline is a lower bound from the profiled compute rates and the measured links: the whole
pass's floating point work spread perfectly over all devices, or the communication Galaxy's
layout cannot avoid, whichever is larger -- or the fastest device alone (profiled, or measured
in this run if lower), whichever is lower.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from planner import wire as wires
from planner.cost import CostModel
from planner.profile import attention_flops, co_tenant_speedup, connective_flops, head_flops, mlp_flops
from planner.solver import solve

from ..engine.engine import Engine
from ..engine.generation import GenerationConfig
from ..errors import WorkerError, lost_session
from ..parallel.codec import LOSSY_REL_BOUND
from ..parallel.executor import DeviceStats, LoadOptions
from ..parallel.forward import Request
from ..parallel.sharding import Partition, even_partition, seqpar_partition, shard_bytes, weighted_partition
from ..runtime.report import layer_overlap
from ..transport.client import Cluster

log = logging.getLogger(__name__)

STRATEGIES = ("local", "megatron", "seqpar", "pipeline", "galaxy", "galaxy-no-overlap", "galaxy-grpc", "galaxy-fp16",
              "galaxy-int8")
RIDERS = {"galaxy-no-overlap": {"overlap": False}, "galaxy-fp16": {"wire": "fp16"},
          "galaxy-int8": {"wire": "int8"}}  # run on galaxy's shards, differing per request
# Galaxy with tiles sent over gRPC streams instead of the workers' TCP data ports: what the raw data
# plane buys. A session of its own (the data plane is chosen at load).
DATA_PLANES = {"galaxy-grpc": "grpc"}
EXACT_TOL = 1e-4  # fp32 max abs error of every strategy's output against local's
LOAD_MARGIN = 1.25  # a shard's weights plus transient copies while loading and activations
WORKER_BYTES = 400 << 20  # a worker's own memory: interpreter, torch, gRPC


@dataclass
class Placement:
    """One strategy's placement: which devices (ring order) and how the model is split."""

    strategy: str
    ranks: list[int]  # indices into the cluster's devices
    partition: Partition | None  # None: infeasible
    why: str = ""


@dataclass
class Result:
    strategy: str
    seconds: list[float] = field(default_factory=list)
    max_abs_err: float | None = None
    weights_bytes: list[int] = field(default_factory=list)  # per device used
    peak_activation_bytes: list[int] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    note: str = ""
    devices_ops: list = field(default_factory=list)  # per-device op timings of the last run (galaxy only)
    cpu_s: list[list[float]] = field(default_factory=list)  # per repetition, each device's worker CPU time

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def spread(self) -> float | None:
        return (max(self.seconds) - min(self.seconds)) if len(self.seconds) > 1 else 0.0 if self.seconds else None


def _progress(msg: str) -> None:
    print(f"galaxy bench: {msg}", file=sys.stderr, flush=True)


# --- layouts ----------------------------------------------------------------------------------------

def placements(cfg, seq: int, prof, strategies) -> dict[str, Placement]:
    """The placement of every strategy on this cluster for a `seq`-token prefill."""
    n = len(prof.devices)
    fastest = _fastest(cfg, seq, prof)
    out: dict[str, Placement] = {}
    for s in strategies:
        if s == "local":
            out[s] = Placement(s, [fastest], even_partition(cfg, 1))
        elif s == "megatron":
            out[s] = Placement(s, list(range(n)), even_partition(cfg, n, "megatron"))
        elif s == "seqpar":
            speeds = [_speed(cfg, seq, d) for d in prof.devices]
            out[s] = Placement(s, list(range(n)), seqpar_partition(cfg, speeds))
        elif s == "pipeline" or s.startswith("galaxy"):
            forced = "pipeline" if s == "pipeline" else "galaxy"
            try:
                plan = solve(cfg, seq, prof, forced)
            except ValueError as e:
                out[s] = Placement(s, [], None, str(e))
                continue
            index = {d.name: i for i, d in enumerate(prof.devices)}
            out[s] = Placement(s, [index[d.name] for d in plan.devices], plan.to_partition(cfg))
    return out


def _speed(cfg, seq: int, dev) -> float:
    work = attention_flops(cfg, cfg.n_heads, seq) + mlp_flops(cfg, cfg.ffn, seq)
    return work / (dev.attention.seconds(attention_flops(cfg, cfg.n_heads, seq)) + dev.mlp.seconds(
        mlp_flops(cfg, cfg.ffn, seq)))


def _fastest(cfg, seq: int, prof) -> int:
    return max(range(len(prof.devices)), key=lambda i: _speed(cfg, seq, prof.devices[i]))


# --- the roofline ------------------------------------------------------------------------------------

def roofline(cfg, seq: int, prof) -> dict:
    """Lower bound on the prefill latency with these devices and links (seconds), and its parts."""
    L, n = cfg.n_layers, len(prof.devices)
    work = {
        "attention": L * attention_flops(cfg, cfg.n_heads, seq),
        "mlp": L * mlp_flops(cfg, cfg.ffn, seq),
        "connective": L * connective_flops(cfg, seq) + connective_flops(cfg, seq),
        "head": head_flops(cfg, cfg.vocab_size, 1) if cfg.causal else 0.0,  # last token's logits only
    }

    def rate(d, kind):
        m = (d.head or d.mlp) if kind == "head" else getattr(d, kind)
        return m.flops_per_s

    compute_all = sum(w / sum(rate(d, k) for d in prof.devices) for k, w in work.items())
    # alone, a device that shares its machine may compute faster than profiled (beside the others)
    alone = [co_tenant_speedup(prof.devices, [i])[0] for i in range(n)]
    local = min(sum(w / rate(d, k) for k, w in work.items()) / f for d, f in zip(prof.devices, alone))
    act = seq * cfg.hidden * 4  # one activation, fp32
    # HMP moves 4 (N-1)/N activations per layer per device (+2 once), at best over the slowest link
    comm_bytes = (4 * L + 2) * (n - 1) / n * act
    slowest = min((lk.bandwidth_bps for row in prof.links for lk in row if lk is not None), default=float("inf"))
    comm = comm_bytes * 8 / slowest if n > 1 else 0.0
    parallel = max(compute_all, comm)
    return {"seconds": min(local, parallel), "compute_s": compute_all, "comm_s": comm, "local_s": local,
            "bound_by": "local" if local <= parallel else ("compute" if compute_all >= comm else "network")}


# --- running -----------------------------------------------------------------------------------------

class _Loaded:
    """A strategy's session on its devices (a Cluster of those workers), reloaded if evicted."""

    def __init__(self, layout: Placement, addresses: list[str], token, tls, source, tiles: int):
        self.layout, self.source, self.tiles = layout, source, tiles
        self.cluster = Cluster([addresses[i] for i in layout.ranks], token=token, tls=tls)
        self.weights: list[int] = []
        self.reload_s = 0.0

    def load(self) -> None:
        t0 = time.perf_counter()
        options = LoadOptions(tiles=self.tiles, data_plane=DATA_PLANES.get(self.layout.strategy, "tcp"))
        self.weights = self.cluster.load(self.source, self.layout.partition, options)
        self.reload_s += time.perf_counter() - t0

    def forward(self, req: Request, overlap: bool = True, wire: str | None = None):
        n = len(self.layout.ranks)
        matrix = [[wire] * n for _ in range(n)] if wire else None
        try:
            return self.cluster.forward(req, overlap=overlap, measure_memory=True, wire=matrix)
        except WorkerError as e:
            if not lost_session(e):
                raise
            self.load()  # the workers dropped this session to make room for another: load it again
            return self.cluster.forward(req, overlap=overlap, measure_memory=True, wire=matrix)

    def release(self) -> None:
        self.cluster.release()

    def close(self) -> None:
        self.cluster.close()


def run_config(cfg, source, seq: int, prof, addresses, token=None, tls=None, strategies=STRATEGIES,
               reps: int = 3, tiles: int = 1, seed: int = 0, calibrate_split: bool = False) -> dict:
    """Benchmark every strategy at one sequence length on the cluster as it is now.

    Strategies whose shards fit on the devices side by side are loaded together and their
    repetitions interleaved; one that cannot share a device's memory with them (seqpar: the whole
    model on every device) runs in a round of its own afterwards, noted as such.
    """
    g = torch.Generator().manual_seed(seed)
    # A causal LM's prefill returns the last token's logits (what generation needs); all S x V
    # logits would be 50 MB for GPT-2 at 256 tokens, timing the link to the coordinator instead.
    req = Request(torch.randint(0, cfg.vocab_size, (seq,), generator=g), last_only=cfg.causal)
    lays = placements(cfg, seq, prof, strategies)
    results = {s: Result(s) for s in strategies}
    names = [d.name for d in prof.devices]
    groups, used = [[]], [WORKER_BYTES] * len(prof.devices)
    for s, lay in lays.items():
        if lay.partition is None:
            results[s].note = f"infeasible: {lay.why}"
            continue
        need = [shard_bytes(cfg, lay.partition.spec(r, cfg)) * LOAD_MARGIN for r in range(len(lay.ranks))]
        room = [prof.devices[i].memory_bytes for i in lay.ranks]
        short = [(names[i], a, b) for i, a, b in zip(lay.ranks, need, room) if a + WORKER_BYTES > b]
        if short:
            name, a, b = short[0]
            results[s].note = f"infeasible: {name} would need {a / 2**30:.2f} GiB, its budget is {b / 2**30:.2f} GiB"
            continue
        results[s].devices = [names[i] for i in lay.ranks]
        if s in RIDERS:
            continue  # rides on galaxy's shards (below)
        if all(used[i] + a <= b for i, a, b in zip(lay.ranks, need, room)):
            groups[0].append(s)
            for i, a in zip(lay.ranks, need):
                used[i] += a
        else:
            groups.append([s])
            results[s].note = "measured in a round of its own: its shards do not fit beside the others'"
    home = next((gr for gr in groups if "galaxy" in gr), None)
    for s in RIDERS:
        if s in strategies and results[s].devices and home is not None:
            home.append(s)
    reference = None
    for group in groups:
        reference = _run_group(group, lays, results, req, seq, addresses, token, tls, source, tiles, reps,
                               reference, calibrate_split)
    roof = roofline(cfg, seq, prof)
    local = results.get("local")
    if local is not None and local.median is not None and local.median < roof["seconds"]:
        # Profiles are taken with every device busy (as in a run); alone, the fastest device is
        # faster still, and a lower bound must not exceed what it measurably achieves.
        roof.update(seconds=local.median, bound_by="local (measured)")
    ref_scale = float(reference.abs().max()) if reference is not None else None
    rows = []
    for s, r in results.items():
        med = r.median
        rows.append({
            "strategy": s, "median_s": med, "spread_s": r.spread, "reps": len(r.seconds),
            "speedup_vs_local": (local.median / med) if (med and local and local.median) else None,
            "roofline_fraction": (roof["seconds"] / med) if med else None,
            "max_abs_err": r.max_abs_err, "max_rel_err": _rel(r.max_abs_err, ref_scale),
            "exact": _within(s, r.max_abs_err, ref_scale),
            "devices": r.devices, "weights_bytes": r.weights_bytes, "peak_activation_bytes": r.peak_activation_bytes,
            "peak_rss_bytes": r.peak_rss_bytes, "cpu_s": worker_cpu(r.cpu_s), "note": r.note,
        })
    timeline = []
    if "galaxy" in results and results["galaxy"].devices_ops:
        # galaxy sends only to the next device of its ring
        links = CostModel(cfg, seq, prof).ring_links(lays["galaxy"].ranks)
        timeline = layer_overlap(results["galaxy"].devices_ops, [spb for spb, _ in links])
    out = {"seq_len": seq, "roofline": roof, "strategies": rows, "timeline": timeline}
    if "galaxy" in results and results["galaxy"].devices_ops:
        out["galaxy_devices"] = busy_and_waiting(results["galaxy"].devices_ops, results["galaxy"].devices,
                                                 local.median if local is not None else None)
    return out


def worker_cpu(per_rep: list[list[float]]) -> list[float] | None:
    """Each device's CPU seconds in a pass (median over repetitions), every thread of its worker:
    compute, the data plane, gRPC. Summed over devices it is the work a strategy costs, to set
    against local's: parallel work done at a higher total cost cannot reach the ideal speed-up.
    None when a worker did not report it (in-process runs, workers older than the field)."""
    if not per_rep or any(c <= 0 for rep in per_rep for c in rep):
        return None
    return [statistics.median(col) for col in zip(*per_rep)]


def busy_and_waiting(devices: list[DeviceStats], names: list[str] = (), local_s: float | None = None) -> dict:
    """Where a parallel pass's time went, per device: busy (its forward minus the time it sat
    waiting for a peer) and waiting. A balanced split has equal busy times; the busiest device
    bounds the speed-up even if waiting were removed entirely (`no_wait_speedup`)."""
    busy = [max(1e-9, d.busy_s) for d in devices]
    wait = [d.forward_s - b for d, b in zip(devices, busy)]
    return {"devices": list(names), "busy_s": busy, "waiting_s": wait,
            "no_wait_speedup": (local_s / max(busy)) if local_s else None}


def calibrate(ld: _Loaded, req: Request, rounds: int = 2) -> str:
    """Refine the planner's split on the devices themselves: run it, measure each device's busy
    time (its forward minus the time it waited for peers), and give each device work in proportion
    to the speed it showed (its share of the work / its busy time). What profiles cannot see -- the
    CPU that communication itself costs a small device, contention between devices -- shows up
    here (the Galaxy+ idea, done before timing)."""
    cfg, notes = ld.source.config, []
    for _ in range(rounds):
        res = ld.forward(req)
        busy = busy_and_waiting(res.devices)["busy_s"]
        old = ld.layout.partition
        if max(busy) / min(busy) < 1.05:
            break
        weights = [w / b for w, b in zip(old.work_shares(cfg), busy)]
        ld.layout = Placement(ld.layout.strategy, ld.layout.ranks, weighted_partition(cfg, weights))
        ld.load()
        notes.append("/".join(f"{b:.2f}" for b in busy))
    return f"calibrated on the devices (busy s per round: {'; '.join(notes)})" if notes else ""


def _run_group(group, lays, results, req, seq, addresses, token, tls, source, tiles, reps, reference,
               calibrate_split=False):
    """Load the group's strategies side by side, then interleave their repetitions."""
    loaded: dict[str, _Loaded] = {}
    try:
        for s in group:
            if s in RIDERS and "galaxy" in loaded:
                loaded[s] = loaded["galaxy"]  # the same shards; its requests differ (overlap, wire)
                continue
            _progress(f"seq {seq}: loading {s} on {', '.join(results[s].devices)}")
            loaded[s] = _Loaded(lays[s], addresses, token, tls, source, tiles)
            loaded[s].load()
            if s == "galaxy" and calibrate_split and lays[s].partition.world > 1:
                results[s].note = calibrate(loaded[s], req)
        for rep in range(reps + 1):  # rep 0 warms up and checks exactness
            for s, ld in loaded.items():
                res = ld.forward(req, **RIDERS.get(s, {}))
                r = results[s]
                if rep == 0:
                    out = res.output.float()
                    if reference is None and s == "local":
                        reference = out
                    r.max_abs_err = None if reference is None else float((out - reference).abs().max())
                    continue
                r.seconds.append(res.seconds)
                r.weights_bytes = list(ld.weights)
                r.peak_rss_bytes = [d.peak_rss_bytes for d in res.devices]
                r.peak_activation_bytes = [max(0, d.peak_rss_bytes - d.rss_before_bytes) for d in res.devices]
                r.cpu_s.append([d.cpu_s for d in res.devices])
                if s == "galaxy":
                    r.devices_ops = res.devices
            if rep:
                _progress(f"seq {seq}: {', '.join(group)}: round {rep}/{reps} done")
    finally:
        for ld in set(loaded.values()):
            ld.release()
            ld.close()
    return reference


def _rel(err, scale):
    return None if err is None or not scale else err / scale


def _within(strategy: str, err, scale) -> bool | None:
    """fp32 strategies: max abs error <= 1e-4; a lossy wire: its measured relative bound."""
    if err is None:
        return None
    wire = RIDERS.get(strategy, {}).get("wire")
    if wire is None:
        return err <= EXACT_TOL
    return bool(scale) and err / scale <= LOSSY_REL_BOUND[wire]


def auto_choice(cfg, seq: int, prof, lossy: bool = False) -> dict:
    """What `galaxy plan` would pick on its own here (with --wire auto if lossy), and why, named
    as the bench's strategy it corresponds to."""
    n = len(prof.devices)
    wire = wires.choose(prof) if lossy else [["fp32"] * n for _ in range(n)]
    try:
        plan = solve(cfg, seq, wires.effective(prof, wire))
    except ValueError as e:
        return {"strategy": None, "reason": str(e)}
    used = {wire[i][j] for i in range(n) for j in range(n) if i != j} - {"fp32"}
    name = plan.strategy
    if plan.strategy == "galaxy" and used:
        name = "galaxy-int8" if "int8" in used else "galaxy-fp16"
    elif plan.strategy == "galaxy" and len(plan.devices) == 1:
        name = "local"
    return {"strategy": name, "reason": plan.reason, "predicted_s": plan.latency_s,
            "wire": sorted(used) or ["fp32"]}


def judge_auto(run: dict) -> None:
    """Was the planner's own choice as fast as the best strategy measured, within the spread?"""
    rows = {r["strategy"]: r for r in run["strategies"] if r["median_s"] is not None}
    auto = run.get("auto", {}).get("strategy")
    if auto not in rows or not rows:
        return
    best = min(rows.values(), key=lambda r: r["median_s"])
    chosen = rows[auto]
    run["auto"].update(measured_s=chosen["median_s"], best=best["strategy"], best_s=best["median_s"],
                       within_spread=chosen["median_s"] <= best["median_s"] + max(chosen["spread_s"],
                                                                                 best["spread_s"]))


def cpu_work(run: dict) -> dict | None:
    """Galaxy's CPU seconds per pass against local's, from the rows (None if either is missing)."""
    rows = {r["strategy"]: r for r in run["strategies"]}
    g, loc = rows.get("galaxy", {}).get("cpu_s"), rows.get("local", {}).get("cpu_s")
    if not g or not loc:
        return None
    return {"galaxy_s": g, "local_s": sum(loc), "ratio": sum(g) / sum(loc)}


def table(report: dict) -> str:
    """The terminal view: one block per (bandwidth, sequence length)."""
    lines = []
    for run in report["runs"]:
        bw = run.get("bandwidth_bps")
        head = f"{report['model']}  seq {run['seq_len']}" + (f"  link {bw / 1e6:g} Mbit/s" if bw else "")
        roof = run["roofline"]
        lines.append(head + f"  roofline {roof['seconds']:.3f} s (bound by {roof['bound_by']})")
        lines.append(f"  {'strategy':<19}{'median':>9}{'spread':>9}{'vs local':>10}{'roofline':>10}"
                     f"{'exact':>7}{'CPU s':>7}  weights / peak activations per device")
        for row in run["strategies"]:
            if row["median_s"] is None:
                lines.append(f"  {row['strategy']:<19}{'-':>9}  {row['note']}")
                continue
            mem = ", ".join(f"{w / 2**20:.0f}/{a / 2**20:.0f}" for w, a in zip(row["weights_bytes"],
                                                                             row["peak_activation_bytes"]))
            exact = "-" if row["exact"] is None else ("yes" if row["exact"] else "NO")
            cpu = f"{sum(row['cpu_s']):.2f}" if row.get("cpu_s") else "-"
            lines.append(f"  {row['strategy']:<19}{row['median_s']:>8.3f}s{row['spread_s']:>8.3f}s"
                         f"{_x(row['speedup_vs_local']):>10}{_pct(row['roofline_fraction']):>10}{exact:>7}{cpu:>7}  "
                         f"{mem} MiB")
        a = run.get("auto")
        if a:
            verdict = ""
            if "best" in a:
                verdict = (f" [measured {a['measured_s']:.3f} s; best measured {a['best']} {a['best_s']:.3f} s; "
                           f"within spread: {'yes' if a['within_spread'] else 'NO'}]")
            lines.append(f"  planner's choice: {a['strategy']}{verdict} -- {a['reason']}")
        g = run.get("galaxy_devices")
        if g:
            per = ", ".join(f"{n} {b:.3f} + {w:.3f}" for n, b, w in zip(g["devices"], g["busy_s"], g["waiting_s"]))
            bound = f"; with no waiting at all at most {_x(g['no_wait_speedup'])} local" if g["no_wait_speedup"] else ""
            lines.append(f"  galaxy per device, busy + waiting for peers (s): {per}{bound}")
        work = cpu_work(run)
        if work:
            lines.append(f"  CPU per pass, every thread of each worker (s): galaxy "
                         f"{' + '.join(f'{c:.3f}' for c in work['galaxy_s'])} = {sum(work['galaxy_s']):.3f}, "
                         f"local {work['local_s']:.3f}: the split costs {_x(work['ratio'])} local's work")
        lines.append("")
    bw = report.get("decode_bandwidth_bps")
    for row in report.get("decode", []):
        lines.append(f"decode {row['strategy']:<7}" + (f" at {bw / 1e6:g} Mbit/s" if bw else "") +
                     f" on {', '.join(row['devices'])}: time to first token "
                     f"{row['ttft_s']:.3f} s, {1000 * row['per_token_s']:.1f} ms/token ({row['decode_collective']}); "
                     f"KV cache per device {', '.join(f'{b / 2**20:.1f} MiB' for b in row['kv_cache_bytes'])}; "
                     f"tokens match: {row['tokens_match']}")
    if report.get("backends"):
        lines.append("\nONNX Runtime / torch time per block (1 thread; < 1: ONNX faster)")
        for r in report["backends"]:
            lines.append(f"  {r['kind']:<11} units {r['units']:>5}  seq {r['seq']:>4}  "
                         f"torch {1000 * r['torch_s']:7.2f} ms  onnx {1000 * r['onnx_s']:7.2f} ms  "
                         f"ratio {r['onnx_over_torch']:.2f}")
    return "\n".join(lines)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def plot(report: dict, path: str) -> None:
    """Speed-up over local vs bandwidth per strategy, and one galaxy run's per-layer timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    by_seq: dict[int, list] = {}
    for run in report["runs"]:
        by_seq.setdefault(run["seq_len"], []).append(run)
    seq = max(by_seq, key=lambda s: len(by_seq[s]))
    runs = sorted(by_seq[seq], key=lambda r: r.get("bandwidth_bps") or 0)
    xs = [(r.get("bandwidth_bps") or 0) / 1e6 for r in runs]
    for s in STRATEGIES:
        ys = [next((row["speedup_vs_local"] for row in r["strategies"] if row["strategy"] == s), None) for r in runs]
        if any(y is not None for y in ys):
            a.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=s)
    a.axhline(1.0, color="grey", lw=0.8, ls="--")
    a.set_xscale("log" if len(set(xs)) > 1 and min(xs) > 0 else "linear")
    a.set_xlabel("link bandwidth (Mbit/s)")
    a.set_ylabel("speed-up over the fastest device alone")
    a.set_title(f"{report['model']}, seq {seq}: measured speed-up")
    a.legend(fontsize=8)
    timeline = next((r["timeline"] for r in reversed(runs) if r.get("timeline")), [])
    layers = [t for t in timeline if t["layer"].startswith("L")][:48]
    if layers:
        idx = range(len(layers))
        comp = [1000 * t["compute_s"] for t in layers]
        exposed = [1000 * t["exposed_s"] for t in layers]
        hidden = [1000 * t["hidden_s"] for t in layers]
        b.bar(idx, comp, label="compute in collectives (GEMM tiles)", color="#4c72b0")
        b.bar(idx, exposed, bottom=comp, label="communication not hidden (waiting)", color="#dd8452")
        b.bar(idx, hidden, bottom=[c + e for c, e in zip(comp, exposed)], label="communication hidden by overlap",
              color="#55a868", alpha=0.6)
        b.set_xlabel("layer")
        b.set_ylabel("ms per device (mean)")
        b.set_title("galaxy: per-layer compute vs communication")
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dumps(report: dict) -> str:
    return json.dumps(report, default=lambda o: None)


def decode_bench(session_factory, source, prof, prompt_len: int = 64, new_tokens: int = 16) -> list[dict]:
    """Time to first token and per-token latency, the fastest device alone vs the whole cluster."""
    cfg = source.config
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    fastest = _fastest(cfg, prompt_len, prof)
    rows = []
    for label, ranks, partition in (
        ("local", [fastest], even_partition(cfg, 1)),
        ("galaxy", list(range(len(prof.devices))), None),
    ):
        addrs, token, tls = session_factory()
        if partition is None:
            plan = solve(cfg, prompt_len, prof, "galaxy")
            index = {d.name: i for i, d in enumerate(prof.devices)}
            ranks, partition = [index[d.name] for d in plan.devices], plan.to_partition(cfg)
        with Cluster([addrs[i] for i in ranks], token=token, tls=tls) as c:
            c.load(source, partition)
            engine = Engine(c, cfg)
            try:
                g = engine.generate(prompt, GenerationConfig(new_tokens, stop_at_eos=False))
            finally:
                engine.close()
        rows.append({"strategy": label, "devices": [prof.devices[i].name for i in ranks],
                     "ttft_s": g.ttft_s, "per_token_s": g.per_token_s,
                     "decode_collective": next((x.collective for x in g.steps if x.phase == "decode"), None),
                     "kv_cache_bytes": g.kv_cache_bytes, "tokens": g.tokens})
    same = rows[0]["tokens"] == rows[1]["tokens"]
    for r in rows:
        r["tokens_match"] = same
        del r["tokens"]
    return rows
