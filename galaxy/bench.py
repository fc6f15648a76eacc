"""`galaxy bench`: Galaxy against its baselines and the roofline, side by side, in one run.

Every strategy runs on the same devices, model and input. Repetitions are interleaved
(A B C A B C ...) so that drift on a shared machine hits all strategies alike, and each
strategy's first output is checked against the single-device one. Reported per strategy:
median latency and spread, speed-up over the fastest device alone ("local"), the fraction of
the roofline achieved, and per-device memory (weights held + peak activations of a pass).

The roofline is a lower bound from the profiled compute rates and the measured links: the whole
pass's floating point work spread perfectly over all devices, or the communication Galaxy's
layout cannot avoid, whichever is larger -- or the fastest device alone, if that is lower.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import WorkerError
from .parallel import Request
from .sharding import Partition, even_partition, seqpar_partition, shard_bytes

log = logging.getLogger(__name__)

STRATEGIES = ("local", "megatron", "seqpar", "pipeline", "galaxy", "galaxy-no-overlap")
EXACT_TOL = 1e-4  # fp32 max abs error of every strategy's output against local's


@dataclass
class Layout:
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
    layers: list = field(default_factory=list)  # per-layer timeline of the last run (galaxy only)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def spread(self) -> float | None:
        return (max(self.seconds) - min(self.seconds)) if len(self.seconds) > 1 else 0.0 if self.seconds else None


def _progress(msg: str) -> None:
    print(f"galaxy bench: {msg}", file=sys.stderr, flush=True)


# --- layouts ----------------------------------------------------------------------------------------

def layouts(cfg, seq: int, prof, strategies) -> dict[str, Layout]:
    """The placement of every strategy on this cluster for a `seq`-token prefill."""
    from planner.solver import solve

    n = len(prof.devices)
    fastest = _fastest(cfg, seq, prof)
    out: dict[str, Layout] = {}
    for s in strategies:
        if s == "local":
            out[s] = Layout(s, [fastest], even_partition(cfg, 1))
        elif s == "megatron":
            out[s] = Layout(s, list(range(n)), even_partition(cfg, n, "megatron"))
        elif s == "seqpar":
            speeds = [_speed(cfg, seq, d) for d in prof.devices]
            out[s] = Layout(s, list(range(n)), seqpar_partition(cfg, speeds))
        elif s in ("pipeline", "galaxy", "galaxy-no-overlap"):
            forced = "pipeline" if s == "pipeline" else "galaxy"
            try:
                plan = solve(cfg, seq, prof, forced)
            except ValueError as e:
                out[s] = Layout(s, [], None, str(e))
                continue
            index = {d.name: i for i, d in enumerate(prof.devices)}
            out[s] = Layout(s, [index[d.name] for d in plan.devices], plan.to_partition(cfg))
    return out


def _speed(cfg, seq: int, dev) -> float:
    from planner.profile import attention_flops, mlp_flops

    work = attention_flops(cfg, cfg.n_heads, seq) + mlp_flops(cfg, cfg.ffn, seq)
    return work / (dev.attention.seconds(attention_flops(cfg, cfg.n_heads, seq)) + dev.mlp.seconds(
        mlp_flops(cfg, cfg.ffn, seq)))


def _fastest(cfg, seq: int, prof) -> int:
    return max(range(len(prof.devices)), key=lambda i: _speed(cfg, seq, prof.devices[i]))


# --- the roofline ------------------------------------------------------------------------------------

def roofline(cfg, seq: int, prof) -> dict:
    """Lower bound on the prefill latency with these devices and links (seconds), and its parts."""
    from planner.profile import attention_flops, connective_flops, head_flops, mlp_flops

    L, n = cfg.n_layers, len(prof.devices)
    work = {
        "attention": L * attention_flops(cfg, cfg.n_heads, seq),
        "mlp": L * mlp_flops(cfg, cfg.ffn, seq),
        "connective": L * connective_flops(cfg, seq) + connective_flops(cfg, seq),
        "head": head_flops(cfg, cfg.vocab_size, seq) if cfg.causal else 0.0,
    }

    def rate(d, kind):
        m = (d.head or d.mlp) if kind == "head" else getattr(d, kind)
        return m.flops_per_s

    compute_all = sum(w / sum(rate(d, k) for d in prof.devices) for k, w in work.items())
    local = min(sum(w / rate(d, k) for k, w in work.items()) for d in prof.devices)
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

    def __init__(self, layout: Layout, addresses: list[str], token, tls, source, tiles: int):
        from .rpc.client import Cluster

        self.layout, self.source, self.tiles = layout, source, tiles
        self.cluster = Cluster([addresses[i] for i in layout.ranks], token=token, tls=tls)
        self.weights: list[int] = []
        self.reload_s = 0.0

    def load(self) -> None:
        t0 = time.perf_counter()
        self.weights = self.cluster.load_source(self.source, self.layout.partition)
        self.reload_s += time.perf_counter() - t0

    def forward(self, req: Request, overlap: bool = True):
        try:
            return self.cluster.forward(req, overlap=overlap, measure_memory=True)
        except WorkerError as e:
            if "no loaded session" not in str(e):
                raise
            self.load()  # the workers dropped this session to make room for another: load it again
            return self.cluster.forward(req, overlap=overlap, measure_memory=True)

    def close(self) -> None:
        self.cluster.close()


def run_config(cfg, source, seq: int, prof, addresses, token=None, tls=None, strategies=STRATEGIES,
               reps: int = 3, tiles: int = 1, seed: int = 0) -> dict:
    """Benchmark every strategy at one sequence length on the cluster as it is now."""
    g = torch.Generator().manual_seed(seed)
    req = Request(torch.randint(0, cfg.vocab_size, (seq,), generator=g), last_only=False)
    lays = layouts(cfg, seq, prof, strategies)
    results = {s: Result(s) for s in strategies}
    loaded: dict[str, _Loaded] = {}
    names = [d.name for d in prof.devices]
    try:
        for s, lay in lays.items():
            if lay.partition is None:
                results[s].note = f"infeasible: {lay.why}"
                continue
            need = [shard_bytes(cfg, lay.partition.spec(r, cfg)) for r in range(len(lay.ranks))]
            room = [prof.devices[i].memory_bytes for i in lay.ranks]
            if any(a > b for a, b in zip(need, room)):
                results[s].note = "infeasible: a device's memory cannot hold its shard"
                continue
            results[s].devices = [names[i] for i in lay.ranks]
            if s == "galaxy-no-overlap" and "galaxy" in loaded:
                loaded[s] = loaded["galaxy"]  # the same shards; its requests just skip the overlap
                continue
            _progress(f"seq {seq}: loading {s} on {', '.join(results[s].devices)}")
            loaded[s] = _Loaded(lay, addresses, token, tls, source, tiles)
            loaded[s].load()
        reference = None
        for rep in range(reps + 1):  # rep 0 warms up and checks exactness
            for s, ld in loaded.items():
                res = ld.forward(req, overlap=s != "galaxy-no-overlap")
                r = results[s]
                if rep == 0:
                    out = res.output.float()
                    if reference is None and s == "local":
                        reference = out
                    r.max_abs_err = None if reference is None else float((out - reference).abs().max())
                    continue
                r.seconds.append(res.seconds)
                r.weights_bytes = list(ld.weights)
                r.peak_rss_bytes = [d["peak_rss_bytes"] for d in res.devices]
                r.peak_activation_bytes = [max(0, d["peak_rss_bytes"] - d.get("rss_before_bytes", 0))
                                           for d in res.devices]
                if s == "galaxy":
                    from .run import layer_overlap

                    r.layers = layer_overlap(res.devices)
            _progress(f"seq {seq}: round {rep}/{reps} done")
    finally:
        for ld in set(loaded.values()):
            ld.close()
    roof = roofline(cfg, seq, prof)
    local = results.get("local")
    rows = []
    for s, r in results.items():
        med = r.median
        rows.append({
            "strategy": s, "median_s": med, "spread_s": r.spread, "reps": len(r.seconds),
            "speedup_vs_local": (local.median / med) if (med and local and local.median) else None,
            "roofline_fraction": (roof["seconds"] / med) if med else None,
            "max_abs_err": r.max_abs_err, "exact": None if r.max_abs_err is None else r.max_abs_err <= EXACT_TOL,
            "devices": r.devices, "weights_bytes": r.weights_bytes, "peak_activation_bytes": r.peak_activation_bytes,
            "peak_rss_bytes": r.peak_rss_bytes, "note": r.note,
        })
    timeline = results["galaxy"].layers if "galaxy" in results else []
    return {"seq_len": seq, "roofline": roof, "strategies": rows, "timeline": timeline}


def auto_choice(cfg, seq: int, prof) -> dict:
    """What `galaxy plan` would pick on its own here, and why."""
    from planner.solver import solve

    try:
        plan = solve(cfg, seq, prof)
    except ValueError as e:
        return {"strategy": None, "reason": str(e)}
    return {"strategy": plan.strategy, "reason": plan.reason, "predicted_s": plan.latency_s}


def table(report: dict) -> str:
    """The terminal view: one block per (bandwidth, sequence length)."""
    lines = []
    for run in report["runs"]:
        bw = run.get("bandwidth_bps")
        head = f"{report['model']}  seq {run['seq_len']}" + (f"  link {bw / 1e6:g} Mbit/s" if bw else "")
        roof = run["roofline"]
        lines.append(head + f"  roofline {roof['seconds']:.3f} s (bound by {roof['bound_by']})")
        lines.append(f"  {'strategy':<19}{'median':>9}{'spread':>9}{'vs local':>10}{'roofline':>10}"
                     f"{'exact':>7}  weights / peak activations per device")
        for row in run["strategies"]:
            if row["median_s"] is None:
                lines.append(f"  {row['strategy']:<19}{'-':>9}  {row['note']}")
                continue
            mem = ", ".join(f"{w / 2**20:.0f}/{a / 2**20:.0f}" for w, a in zip(row["weights_bytes"],
                                                                             row["peak_activation_bytes"]))
            exact = "-" if row["exact"] is None else ("yes" if row["exact"] else "NO")
            lines.append(f"  {row['strategy']:<19}{row['median_s']:>8.3f}s{row['spread_s']:>8.3f}s"
                         f"{_x(row['speedup_vs_local']):>10}{_pct(row['roofline_fraction']):>10}{exact:>7}  "
                         f"{mem} MiB")
        if run.get("auto"):
            lines.append(f"  planner's choice: {run['auto']['strategy']} -- {run['auto']['reason']}")
        lines.append("")
    for row in report.get("decode", []):
        lines.append(f"decode {row['strategy']:<7} on {', '.join(row['devices'])}: time to first token "
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
    from .generate import GenerationConfig, PrefixCache, TextGenerator
    from .rpc.client import Cluster

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
            from planner.solver import solve

            plan = solve(cfg, prompt_len, prof, "galaxy")
            index = {d.name: i for i, d in enumerate(prof.devices)}
            ranks, partition = [index[d.name] for d in plan.devices], plan.to_partition(cfg)
        with Cluster([addrs[i] for i in ranks], token=token, tls=tls) as c:
            c.load_source(source, partition)
            gen = TextGenerator(c, None, cfg, PrefixCache(0))
            g = gen.generate(prompt, GenerationConfig(new_tokens, stop_at_eos=False))
        rows.append({"strategy": label, "devices": [prof.devices[i].name for i in ranks],
                     "ttft_s": g.ttft_s, "per_token_s": g.per_token_s,
                     "decode_collective": next((x.collective for x in g.steps if x.phase == "decode"), None),
                     "kv_cache_bytes": g.kv_cache_bytes, "tokens": g.tokens})
    same = rows[0]["tokens"] == rows[1]["tokens"]
    for r in rows:
        r["tokens_match"] = same
        del r["tokens"]
    return rows
