"""Run every rank of a partition as a thread of this process (no network).

The test bed for the parallel forwards and `--transport inproc`. `InprocCluster` is an Executor
like the gRPC `Cluster`, so generation, the Python API and the serving engine run on either.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch

from ..backends.select import use_backend
from ..errors import GalaxyError, KVTransferError, PlanMismatch
from ..parallel.compact import compact_shard, held_bytes
from ..parallel.executor import DeviceStats, ForwardResult, LoadOptions, pool_blocks
from ..parallel.forward import Request, Step, assemble
from ..parallel.kv_stash import StashCall, StashResult, open_stash
from ..parallel.kv_transfer import export_box, import_box
from ..parallel.local_transport import LocalGroup
from ..parallel.memory import DEFAULT_SEQ_LEN, pass_reserve, stash_room
from ..parallel.rank import KVPool, RankRuntime
from ..parallel.sharding import Partition, load_shard, shard_bytes
from ..parallel.threads import measure_step_threads
from ..parallel.top1 import join_top1


def _run_ranks(runtimes: list[RankRuntime], run, timeout: float, overlap: bool = True):
    """run(runtime, comm) on every rank at once, rank 0 here and the others in threads; the first failure
    aborts the others."""
    n = len(runtimes)
    group = LocalGroup(n, timeout)
    comms = [runtimes[r].new_comm(group.transport(r), overlap=runtimes[r].overlap and overlap) for r in range(n)]
    outputs: list = [None] * n
    errors: list = [None] * n

    def work(r: int) -> None:
        try:
            outputs[r] = run(runtimes[r], comms[r])
        except BaseException as e:  # noqa: BLE001 - reported below, after every rank stopped
            errors[r] = e
            group.abort()

    # Rank 0 runs on the calling thread: a one-device step then starts no thread at all (a thread's
    # start and join cost about 1 ms, as much as a small decode step's own work).
    threads = [threading.Thread(target=work, args=(r,), name=f"galaxy-rank{r}") for r in range(1, n)]
    for t in threads:
        t.start()
    work(0)
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
    outputs, comms = _run_ranks(runtimes, lambda rt, comm: rt.run(comm, req), timeout)
    return assemble(models[0].cfg, partition, outputs, req.ids.shape[0]), comms


INPROC_KV_BYTES = 64 << 20  # each rank's KV budget: every rank's pool shares this one process's memory


class InprocCluster:
    """`world` ranks as threads of this process: an Executor with no sockets (tests, `--transport inproc`)."""

    def __init__(self, world: int, timeout: float = 120.0, kv_bytes: int = INPROC_KV_BYTES):
        self.world, self.timeout, self.kv_bytes = world, timeout, kv_bytes
        self.runtimes: list[RankRuntime] = []
        self.partition: Partition | None = None
        self.config = None
        self.names = [f"thread{r}" for r in range(world)]
        self.backends: list[str] = []
        self.loaded_memory: list = []  # threads of this process: no per-device budget
        self.options: LoadOptions | None = None  # what the model is loaded with (the engine reads its format)
        self._prefill_threads = 1  # this thread's count at load: what a rank without StepThreads runs with

    @property
    def decode_threads(self) -> list[int]:
        """Each rank's intra-op threads on a decode step now (parallel/threads.py: given, or measured at
        load and then settled on the rank's first decode steps)."""
        return [rt.threads.decode_now if rt.threads else self._prefill_threads for rt in self.runtimes]

    def hello(self) -> list:
        return []

    def hello_each(self, timeout: float = 1.0) -> list:
        """Threads of this process: nothing to ask, nothing that can drop out alone."""
        return []

    def load(self, source, partition: Partition, options: LoadOptions = LoadOptions()) -> list[int]:
        """options.stream and options.data_plane change nothing here: in-process ranks share memory."""
        if partition.world != self.world:
            raise PlanMismatch(f"the partition has {partition.world} devices, the executor {self.world}")
        options.check_world(self.world)
        cfg = source.config
        partition.validate(cfg)
        fmt = options.weight_format
        models = [compact_shard(load_shard(source, partition.spec(r, cfg), dtype=options.torch_dtype), source, fmt)
                  for r in range(self.world)]
        self.options = options
        self.runtimes = [RankRuntime(m, partition, r, options.tiles, kv_max_bytes=self.kv_bytes,
                                     overlap=options.overlap) for r, m in enumerate(models)]
        self.backends = [use_backend(rt.model, options.backend, torch.get_num_threads()) for rt in self.runtimes]
        # on torch, prefill steps run with this thread's count at load, decode steps with options.decode_threads
        # or the count each rank's shard measured fastest on one row (ONNX Runtime keeps its own threads)
        prefill = torch.get_num_threads()
        for rt, backend in zip(self.runtimes, self.backends):
            if backend == "torch":
                rt.threads = measure_step_threads(rt.model, prefill, options.decode_threads)[0]
                rt.prepare_decode()
        self._prefill_threads = prefill
        self.partition, self.config = partition, cfg
        self.kv_dtype = options.torch_dtype  # the K/V's dtype in every pool (the spill tier sizes blocks by it)
        if fmt.name != "fp32":
            return [held_bytes(m) for m in models]
        return [shard_bytes(cfg, partition.spec(r, cfg), options.torch_dtype) for r in range(self.world)]

    def forward(self, req: Request, *, overlap: bool = True, measure_memory: bool = False,
                wire: list[list[str]] | None = None) -> ForwardResult:
        """`wire` and `measure_memory` change nothing here (no wire, one process's memory)."""
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        for rt in self.runtimes:
            rt.validate(req)
        return self._run(lambda rt, comm: rt.run(comm, req), req.ids.shape[0], overlap)

    def kv_blocks(self, block_size: int) -> int:
        return pool_blocks([(rt.kv_bytes_per_token, rt.kv_max_bytes) for rt in self.runtimes], block_size)

    def step(self, step: Step, pool: KVPool) -> ForwardResult:
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        for rt in self.runtimes:
            rt.validate_step(step, pool)
        res = self._run(lambda rt, comm: rt.run_step(comm, step, pool), step.ids.shape[0], top1=bool(step.top1_rows))
        if step.top1_rows:  # the ranks' pieces: the other rows' logits, and each rank's top-1 (parallel/top1.py)
            pieces = res.output
            res.output = assemble(self.config, self.partition, [p and p.logits for p in pieces], step.ids.shape[0])
            res.top1 = join_top1([p and p.top1 for p in pieces], len(step.top1_rows))
        return res

    def export_kv(self, rank: int, block_table, tokens: int, layers, heads, pool: KVPool, start: int = 0,
                  while_stepping: bool = False) -> torch.Tensor:
        return export_box(self._runtime(rank), pool, block_table, tokens, layers, heads, self.names[rank], start)

    def import_kv(self, rank: int, block_table, box: torch.Tensor, layers, heads, pool: KVPool, start: int = 0) -> None:
        import_box(self._runtime(rank), pool, block_table, box, layers, heads, self.names[rank], start)

    def kv_stash(self, rank: int, call: StashCall, pool: KVPool) -> StashResult:
        """The device-local K/V pool of rank `rank`: a store per rank, as on a worker; an open must fit in the
        memory this process has available beside every rank's pass and pool and the other ranks' store budgets
        (they share one process: admitting each against the same free memory would promise it N times)."""
        rt, who = self._runtime(rank), self.names[rank]
        call.check(who)
        if call.close or call.open_bytes:
            rt.stash = None
        if call.close:
            return StashResult()
        if call.open_bytes:  # every rank shares this process's memory: the others' stores may still grow to their
            # budgets, and every rank's pass and pool come out of the same memory
            others = sum(max(0, o.stash.max_bytes - o.stash.bytes) for o in self.runtimes
                         if o is not rt and o.stash is not None)
            seq = self.options.seq_len or min(DEFAULT_SEQ_LEN, self.config.max_positions)
            reserve = sum(pass_reserve(self.config, self.partition, r, self.kv_dtype.itemsize, seq)
                          for r in range(self.world))
            room = stash_room(psutil.virtual_memory().available - others, reserve,
                              sum(o.pool_bytes(pool) for o in self.runtimes))
            rt.stash = open_stash(rt, pool, call.open_bytes, room, who)
        if rt.stash is None:
            raise KVTransferError(f"{who}: no device-local K/V pool open here")
        return rt.stash.apply(rt, pool, call, who)

    def _runtime(self, rank: int) -> RankRuntime:
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        if not 0 <= rank < self.world:
            raise GalaxyError(f"rank {rank} outside 0..{self.world - 1}")
        return self.runtimes[rank]

    def _run(self, run, seq: int, overlap: bool = True, top1: bool = False) -> ForwardResult:
        """With `top1`, the result's output is the ranks' StepPieces, for `step` to join."""
        t0 = time.perf_counter()
        outputs, comms = _run_ranks(self.runtimes, run, self.timeout, overlap)
        seconds = time.perf_counter() - t0
        devices = [DeviceStats(r, seconds, tuple(c.stats.ops), kv_cache_bytes=self.runtimes[r].kv_bytes)
                   for r, c in enumerate(comms)]
        return ForwardResult(outputs if top1 else assemble(self.config, self.partition, outputs, seq), seconds, devices)

    def release(self) -> None:
        self.runtimes, self.partition = [], None

    def close(self) -> None:
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
