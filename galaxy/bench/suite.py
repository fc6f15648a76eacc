"""The benchmark suite `galaxy bench` runs: which devices, model, sequence lengths, link rates and
strategies, and in what order -- the policy; `strategies.py` times one configuration.

The default suite (as root) is the emulated heterogeneous trio (devices/clusters/hetero-bench.yaml),
GPT2-Large's layer shape (12 of its 36 identical layers), prefill of 256 and 512 tokens at 1 Gbit/s
and of 256 tokens at 100 and 50 Mbit/s with the links re-shaped live, kept under 10 minutes: lossy
wire formats only on slow links, the also-rans only on fast ones. `quick` is GPT-2 small on three
loopback workers.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from devices.emulate import cluster_endpoints, down, read_state, set_link_rate, up
from devices.spec import CLUSTERS_DIR, load_cluster
from planner.profiler import profile_cluster

from ..errors import GalaxyError
from ..model.checkpoints.random import RandomWeights
from ..runtime.sources import open_source
from ..transport.client import Cluster
from ..transport.security import COORDINATOR, TlsFiles
from ..transport.spawn import LocalWorkers
from . import strategies as bench
from .backends import compare

DEFAULT_CLUSTER = CLUSTERS_DIR / "hetero-bench.yaml"
DEFAULT_RATES = (1e9, 1e8, 5e7)  # bits/s swept on an emulated LAN; the first gets every sequence length
LOSSY_BELOW_BPS = 5e8  # compressed activations pay off on links slower than this
LOSSY = ("galaxy-fp16", "galaxy-int8")
ALSO_RANS = ("seqpar", "galaxy-no-overlap", "galaxy-grpc")  # left out on slow links by the default suite


@dataclass(frozen=True)
class SuiteConfig:
    """What `galaxy bench` was asked for; None fields take the suite's defaults."""

    model: str | None = None
    random_init: str | None = None
    seed: int = 0
    layers: int | None = None  # keep the first N layers of a random-init model
    cluster: str | None = None  # a cluster file (an emulated one is brought up if not running)
    local: int | None = None  # N plain loopback workers instead
    workers: tuple[str, ...] | None = None  # running workers
    token: str | None = None
    tls: str | None = None  # directory from `galaxy keys init`
    threads: int | None = None
    seq_lens: tuple[int, ...] | None = None
    bandwidths: tuple[float, ...] | None = None
    reps: int | None = None
    strategies: tuple[str, ...] | None = None  # None: the default suite
    quick: bool = False
    calibrate: bool = False
    decode: bool = False
    backends: bool = False


def run_suite(sc: SuiteConfig) -> dict:
    """Run the suite; returns the report (bench.table / bench.plot / bench.dumps render it)."""
    random_init, layers = sc.random_init, sc.layers
    if random_init is None and sc.model is None:
        random_init = "gpt2" if sc.quick else "gpt2-large"
        if layers is None and not sc.quick:
            layers = 12
    source = open_source(sc.model, random_init, sc.seed)
    if layers:
        if sc.model is not None:
            raise GalaxyError("--layers applies to --random-init models")
        cfg0 = source.config
        kept = min(layers, cfg0.n_layers)
        source = RandomWeights(cfg0.replace(n_layers=kept, name=f"{cfg0.name} ({kept} of {cfg0.n_layers} layers)"),
                               seed=sc.seed)
    cfg = source.config
    seqs = list(sc.seq_lens or ([64] if sc.quick else [256, 512]))
    reps = sc.reps or (2 if sc.quick else 3)
    strategies = list(sc.strategies or bench.STRATEGIES)
    bad = [x for x in strategies if x not in bench.STRATEGIES]
    if bad:
        raise GalaxyError(f"--strategies: unknown {bad}; choose from {', '.join(bench.STRATEGIES)}")
    with ExitStack() as stack:
        emulated, addresses, token = bench_devices(stack, sc.local, sc.workers, sc.cluster, sc.token, sc.threads,
                                                   sc.quick)
        tls = TlsFiles.load(sc.tls, COORDINATOR) if sc.tls else None
        rates = list(sc.bandwidths or ([] if sc.quick else DEFAULT_RATES)) if emulated else [None]
        bench._progress(f"profiling {len(addresses)} devices for {cfg.name} (cached per device and shape)")
        with Cluster(addresses, token=token, tls=tls) as c:
            prof = profile_cluster(c, cfg, seqs, show_progress=False)
        report = {"model": cfg.name, "family": cfg.family, "devices": [d.name for d in prof.devices],
                  "machine": machine(), "strategies": strategies, "reps": reps, "runs": []}
        for i, rate in enumerate(rates or [None]):
            if rate is not None:
                before = set_link_rate(emulated, rate, progress=bench._progress)
                if i == 0:  # a cluster that stays up is left with the links it had
                    stack.callback(set_link_rate, emulated, before, progress=bench._progress)
                with Cluster(addresses, token=token, tls=tls) as c:
                    prof = profile_cluster(c, cfg, seqs, show_progress=False)  # links re-measured
            lossy_here = rate is not None and rate < LOSSY_BELOW_BPS
            here = strategies if sc.strategies else [  # the default suite, kept under 10 minutes
                x for x in strategies
                if (lossy_here or x not in LOSSY) and (not lossy_here or x not in ALSO_RANS)]
            for seq in (seqs if i == 0 else seqs[:1]):
                run = bench.run_config(cfg, source, seq, prof, addresses, token, tls, here, reps, seed=sc.seed,
                                       calibrate_split=sc.calibrate)
                run["bandwidth_bps"] = rate
                links = [lk.bandwidth_bps for row in prof.links for lk in row if lk]
                run["measured_link_bps"] = min(links) if links else None
                run["auto"] = bench.auto_choice(cfg, seq, prof, lossy=lossy_here)
                bench.judge_auto(run)
                report["runs"].append(run)
            if i == 0 and sc.decode and cfg.causal:  # generation on the first (fastest) links
                bench._progress("timing generation (TTFT and per-token latency)")
                report["decode"] = bench.decode_bench(lambda: (addresses, token, tls), source, prof)
                if rate is not None:
                    report["decode_bandwidth_bps"] = rate
        if sc.backends:
            bench._progress("timing torch vs ONNX Runtime per block (this machine, 1 thread)")
            torch.set_num_threads(1)
            report["backends"] = [dict(r, onnx_over_torch=r["onnx_s"] / r["torch_s"])
                                  for r in compare(cfg, seqs, repeats=3, rounds=2)]
    return report


def bench_devices(stack: ExitStack, local: int | None = None, workers=None, cluster: str | None = None,
                  token: str | None = None, threads: int | None = None, quick: bool = False):
    """The devices a benchmark runs on: running workers, N loopback workers, or (the default as root,
    unless quick) an emulated cluster -- up already, or brought up now and down at the end of
    `stack`. Returns (the emulated cluster's name or None, worker addresses, token)."""
    if workers:
        return None, list(workers), token
    if local or (not cluster and (quick or os.geteuid() != 0)):
        return None, stack.enter_context(LocalWorkers(local or 3, threads=threads, token=token)), token
    emulated, addresses, file_token = _bench_cluster(cluster, stack)
    return emulated, addresses, token or file_token


def _bench_cluster(path: str | None, stack: ExitStack):
    """The emulated cluster to bench on: up already, or brought up now (and down at the end)."""
    spec = load_cluster(path or str(DEFAULT_CLUSTER))
    if spec.emulated and read_state(spec.name) is None:
        up(spec, progress=lambda m: print(f"galaxy devices: {m}", file=sys.stderr))
        stack.callback(down, spec.name)
    addresses, token = cluster_endpoints(spec.path)
    return (spec.name if spec.emulated else None), addresses, token


def machine() -> str:
    """The CPU model, core count and kernel a report was measured on."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor()} x{os.cpu_count()}, {platform.system()} {platform.release()}"
