"""Run every rank of a partition as a thread of this process (no network).

The test bed for the parallel forwards and `--transport inproc`. `InprocCluster` offers the same
load/forward interface as the gRPC `Cluster`, so generation and the Python API run on either.
"""

from __future__ import annotations

import threading
import time

from .local_transport import LocalGroup
from .parallel import Request, assemble
from .rank import RankRuntime
from .sharding import Partition, load_shard


def _run_ranks(runtimes: list[RankRuntime], req: Request, timeout: float):
    n = len(runtimes)
    group = LocalGroup(n, timeout)
    comms = [runtimes[r].new_comm(group.transport(r)) for r in range(n)]
    outputs: list = [None] * n
    errors: list = [None] * n

    def work(r: int) -> None:
        try:
            outputs[r] = runtimes[r].run(comms[r], req)
        except BaseException as e:  # noqa: BLE001 - reported below, after every rank stopped
            errors[r] = e
            group.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"galaxy-rank{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and "group aborted" not in str(e)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return outputs, comms


def run_inprocess(models: list, partition: Partition, req: Request, tiles: int = 1,
                  timeout: float = 120.0, overlap: bool = True) -> tuple:
    """Forward `req` through one model shard per rank; returns (output, per-rank Collectives)."""
    if len(models) != partition.world:
        raise ValueError(f"{len(models)} model shards for a {partition.world}-device partition")
    runtimes = [RankRuntime(m, partition, r, tiles, overlap=overlap) for r, m in enumerate(models)]
    outputs, comms = _run_ranks(runtimes, req, timeout)
    return assemble(models[0].cfg, partition, outputs, req.ids.shape[0]), comms


class InprocCluster:
    """`world` ranks as threads of this process, with the gRPC Cluster's load/forward interface."""

    def __init__(self, world: int, timeout: float = 120.0):
        self.world, self.timeout = world, timeout
        self.runtimes: list[RankRuntime] = []
        self.partition: Partition | None = None
        self.config = None
        self.names = [f"thread{r}" for r in range(world)]

    def hello(self) -> list:
        return []

    def load_source(self, source, partition: Partition, dtype: str = "float32", tiles: int = 1,
                    stream: bool = False, wire=None, overlap: bool = True, backend: str = "torch") -> list[int]:
        """stream and wire are accepted for interface parity: in-process ranks share memory."""
        from .run import DTYPES
        from .sharding import shard_bytes

        dtype = DTYPES[dtype]
        cfg = source.config
        self.runtimes = [RankRuntime(load_shard(source, partition.validate(cfg).spec(r, cfg), dtype=dtype),
                                     partition, r, tiles, overlap=overlap) for r in range(self.world)]
        if backend != "torch":
            import torch

            from .backends import use_backend

            self.backends = [use_backend(rt.model, backend, torch.get_num_threads()) for rt in self.runtimes]
        self.partition, self.config = partition, cfg
        return [shard_bytes(cfg, partition.spec(r, cfg), dtype) for r in range(self.world)]

    def forward(self, req: Request):
        from .rpc.client import ForwardResult  # the same result type as over gRPC

        for rt in self.runtimes:
            rt.validate(req)
        t0 = time.perf_counter()
        outputs, comms = _run_ranks(self.runtimes, req, self.timeout)
        devices = [{"rank": r, "forward_s": time.perf_counter() - t0, "peak_rss_bytes": 0,
                    "kv_cache_bytes": self.runtimes[r].kv.nbytes,
                    "ops": [(*op, 0.0) for op in c.stats.ops]} for r, c in enumerate(comms)]
        out = assemble(self.config, self.partition, outputs, req.ids.shape[0])
        return ForwardResult(out, time.perf_counter() - t0, devices)

    def release(self) -> None:
        self.runtimes = []

    def close(self) -> None:
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
