"""Latency of one decode-sized collective through the real data plane (`galaxy bench collectives`).

A decode step of SmolLM2-135M all-reduces one hidden row, 576 float32 values (2.3 KB), twice per
layer: 60 collectives per token on 30 layers, so a millisecond each is most of a token. This bench
times exactly that: `world` processes on loopback, each a rank with its own data port
(transport/datalink.py), an authenticated `PeerTransport` (transport/peers.py) and `Collectives`
(parallel/collectives.py) -- the objects a worker uses, without the model -- calling `all_reduce`
back to back. Two algorithms: `direct` (every rank sends its partial to every other and sums in
rank order: one hop) and `ring` (ReduceScatter + AllGather: 2(world-1) hops).

Each rank times every call; the report pools the timed calls of all ranks (median and p99, in
microseconds) and checks that every rank got bit-identical sums equal to the rank-order sum.
With `--cluster FILE` (root) the ranks run in the namespaces of an emulated LAN (devices/), one per
device, across its veth links and tbf rate limits. Run it under the CPU lock (every rank shares this
host's cores, emulated devices included):

    flock /tmp/galaxy-cpu.lock galaxy bench collectives --world 2,3 --reps 2000
    flock /tmp/galaxy-cpu.lock galaxy bench collectives --cluster devices/clusters/homo-trio.yaml
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import torch

from devices.emulate import emulated
from devices.enter import join_netns
from devices.spec import load_cluster

from ..errors import GalaxyError
from ..parallel.collectives import Collectives
from ..transport.datalink import DataServer
from ..transport.peers import PeerTransport

ALGORITHMS = ("direct", "ring")
_SESSION, _TOKEN = "bench-collectives", "bench-token"


@dataclass(frozen=True)
class CollectiveBench:
    """What to time: `values` float32 per rank, each world size and algorithm, `reps` timed calls."""

    worlds: tuple[int, ...] = (2, 3)
    algorithms: tuple[str, ...] = ALGORITHMS
    values: int = 576  # SmolLM2-135M's hidden size: one decode token's row
    reps: int = 2000
    warmup: int = 200
    timeout_s: float = 30.0  # every wait of every rank
    # An emulated LAN (devices/): per rank, (network namespace, its address, one-way latency in ms).
    # Rank r joins namespace r before it opens a socket, so its frames cross that device's veth and
    # tbf-shaped link; the latency is added on receipt, as the emulated workers add it (tbf adds none).
    lan: tuple[tuple[str, str, float], ...] = ()

    def __post_init__(self):
        if not self.worlds or min(self.worlds) < 2:
            raise GalaxyError(f"worlds: each world size must be at least 2, got {list(self.worlds)}")
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms:
            raise GalaxyError(f"algorithms: {bad or 'none'} given, choose from {ALGORITHMS}")
        if self.lan and len(self.lan) < max(self.worlds):
            raise GalaxyError(f"lan: {len(self.lan)} emulated devices for a world of {max(self.worlds)}")
        if self.values < 1 or self.reps < 1 or self.warmup < 0:
            raise GalaxyError(f"values ({self.values}) and reps ({self.reps}) must be positive, warmup "
                              f"({self.warmup}) not negative")


def _partial(rank: int, values: int) -> torch.Tensor:
    return torch.randn(values, generator=torch.Generator().manual_seed(1000 + rank))


def _rank_main(rank: int, world: int, algorithm: str, cfg: CollectiveBench, conn) -> None:
    """One rank in its own process: data port, transport, then `reps` timed all-reduces."""
    torch.set_num_threads(1)
    host, delay_s = "127.0.0.1", 0.0
    if cfg.lan:
        netns, host, latency_ms = cfg.lan[rank]
        join_netns(netns)
        delay_s = latency_ms / 1000
    sessions: dict = {}
    server = DataServer(host, 0, sessions.get, _TOKEN, None, 1 << 24)
    transport = None
    try:
        conn.send(f"{host}:{server.port}")
        ports = conn.recv()
        transport = PeerTransport(rank, [""] * world, _SESSION, _TOKEN, cfg.timeout_s, link_delay_s=delay_s,
                                  data_peers=ports)
        transport.begin(1)
        sessions[_SESSION] = transport
        conn.send("ready")
        conn.recv()  # every rank's session is registered: links may open
        comm = Collectives(transport, direct_max_bytes=(1 << 30) if algorithm == "direct" else 0)
        x = _partial(rank, cfg.values)
        times = []
        for i in range(cfg.warmup + cfg.reps):
            t0 = time.perf_counter()
            y = comm.all_reduce(x)
            dt = time.perf_counter() - t0
            if i >= cfg.warmup:
                times.append(dt)
        conn.send((times, hashlib.sha256(y.numpy().tobytes()).hexdigest(), y))
        conn.recv()  # every rank is done: closing now cannot break a peer's last call
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}"))
    finally:
        if transport is not None:
            transport.close()
        server.close()


def _run_one(cfg: CollectiveBench, world: int, algorithm: str) -> dict:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    try:
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(r, world, algorithm, cfg, child), daemon=True)
            p.start()
            pipes.append(parent)
            procs.append(p)

        def gather(what: str):
            got = []
            for r, c in enumerate(pipes):
                if not c.poll(cfg.timeout_s + 60):
                    raise GalaxyError(f"bench collectives: rank {r} sent no {what} within {cfg.timeout_s + 60:.0f} s")
                try:
                    m = c.recv()
                except EOFError:
                    raise GalaxyError(f"bench collectives: rank {r} exited before its {what}") from None
                if isinstance(m, tuple) and m and m[0] == "error":
                    raise GalaxyError(f"bench collectives ({algorithm}, world {world}): {m[1]}")
                got.append(m)
            return got

        ports = gather("data port")
        for c in pipes:
            c.send(ports)
        gather("ready")
        for c in pipes:
            c.send("go")
        results = gather("timings")
        for c in pipes:
            c.send("done")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    want = sum((_partial(r, cfg.values) for r in range(1, world)), _partial(0, cfg.values).clone())
    digests = {d for _, d, _ in results}
    times = sorted(t for ts, _, _ in results for t in ts)
    err = max(float((y - want).abs().max()) for _, _, y in results)
    return {"world": world, "algorithm": algorithm, "network": "emulated LAN" if cfg.lan else "loopback",
            "values": cfg.values, "bytes": cfg.values * 4,
            "calls": len(times), "median_us": 1e6 * statistics.median(times),
            "p99_us": 1e6 * times[min(len(times) - 1, int(0.99 * len(times)))],
            "identical_on_every_rank": len(digests) == 1, "max_abs_error": err}


@contextlib.contextmanager
def lan_of(cluster_file: str, progress=lambda s: None):
    """The emulated cluster of `cluster_file` brought up (root only) and always torn down, yielding its
    devices as CollectiveBench.lan. Its idle workers stay up meanwhile; the bench's ranks join the
    namespaces only, not the devices' CPU cgroups: this measures the links."""
    with emulated(load_cluster(cluster_file), progress=progress) as ec:
        if ec.mode != "emulated":
            raise GalaxyError(f"{cluster_file}: not emulated ({'; '.join(ec.notes)}): the LAN bench needs root")
        yield tuple((d["netns"], d["address"].rpartition(":")[0], float(d["latency_ms"])) for d in ec.devices)


def run_collective_bench(cfg: CollectiveBench, progress=lambda s: None) -> dict:
    rows = []
    for world in cfg.worlds:
        for algorithm in cfg.algorithms:
            where = "emulated LAN" if cfg.lan else "loopback"
            progress(f"{algorithm} all-reduce of {cfg.values} float32 over {world} {where} ranks, {cfg.reps} calls")
            rows.append(_run_one(cfg, world, algorithm))
    return {"config": cfg.__dict__, "rows": rows}


def table(report: dict) -> str:
    lines = [f"{'network':>12} {'world':>5} {'algorithm':>9} {'bytes':>6} {'median us':>10} {'p99 us':>8} "
             f"{'identical':>9} {'max err':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['network']:>12} {r['world']:>5} {r['algorithm']:>9} {r['bytes']:>6} {r['median_us']:>10.0f} "
                     f"{r['p99_us']:>8.0f} {str(r['identical_on_every_rank']):>9} {r['max_abs_error']:>8.1e}")
    return "\n".join(lines)
