"""The interface every way of running a partition's ranks offers: load a model, run passes on it.

Three executors implement it, and everything above them -- generation, the serving engine, the
Python API, the OpenAI server, the bench -- speaks only this interface:

- `transport.client.Cluster`: one worker process per device, driven over gRPC;
- `runtime.inproc.InprocCluster`: the ranks as threads of this process (tests, `--transport inproc`);
- `runtime.recovery.ResilientCluster`: a `Cluster` that re-plans around devices that drop out.

How a model is loaded is one frozen, validated `LoadOptions` rather than a dozen keyword arguments,
so a wrapper that reloads (after a fail-over or a re-balance) reloads exactly what was asked for.
What a pass reports is typed: a `DeviceStats` per rank with its `OpStat`s, never positional tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import PlanMismatch
from ..model.checkpoints import WeightSource
from ..model.quant import FormatError, WeightFormat, parse_format
from ..model.transformer import DTYPES
from .codec import FORMATS as WIRE_FORMATS
from .collectives import OpStat
from .forward import Request, Step
from .kv_stash import StashCall, StashResult
from .memory import MemoryParams
from .rank import KVPool
from .sharding import Partition

BACKENDS = ("torch", "onnx", "auto")  # auto: each device times both and keeps the faster
DATA_PLANES = ("tcp", "grpc")


@dataclass(frozen=True)
class LoadOptions:
    """How a model is put on the devices, besides which model and which split."""

    dtype: str = "float32"  # compute dtype, a key of model.transformer.DTYPES
    tiles: int = 1  # sub-tiles per device chunk in each ring step (finer overlap, more messages)
    stream: bool = False  # push each device its shard from the coordinator: devices need no model file
    wire: tuple[tuple[str, ...], ...] | None = None  # wire[i][j]: format rank i sends to rank j; None: fp32
    overlap: bool = True  # tile overlap of communication with computation (False: the no-overlap baseline)
    backend: str = "torch"  # one of BACKENDS
    data_plane: str = "tcp"  # tiles over the workers' TCP data ports, or over gRPC Exchange streams
    # how each device holds its linear weights (model.quant.parse_format syntax; parallel.compact puts a
    # shard in it, on in-process ranks and gRPC workers alike; a streamed shard travels in it,
    # parallel.compact_wire): fp32 is the exact reference.
    weights_format: str = "fp32"
    seq_len: int = 0  # tokens each device reserves memory for (KV + a prefill of as many); 0: memory's default
    # intra-op threads of a step of few tokens (decode; parallel/threads.py), on every device; steps of
    # many tokens keep the device's own count. 0: each device measures its own at load
    decode_threads: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PlanMismatch(f"load options: {msg}")

        need(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        need(isinstance(self.tiles, int) and self.tiles >= 1, f"tiles={self.tiles!r} must be an integer >= 1")
        need(self.backend in BACKENDS, f"backend={self.backend!r} is not one of {BACKENDS}")
        need(self.data_plane in DATA_PLANES, f"data_plane={self.data_plane!r} is not one of {DATA_PLANES}")
        try:
            fmt = parse_format(self.weights_format)
        except FormatError as e:
            raise PlanMismatch(f"load options: weights_format={self.weights_format!r}: {e}") from None
        need(fmt.name == "fp32" or self.dtype == "float32",
             f"weights_format={self.weights_format!r} quantizes float32 weights; dtype={self.dtype!r} must be float32")
        need(fmt.name == "fp32" or self.backend == "torch",
             f"weights_format={self.weights_format!r} runs on the torch backend, not backend={self.backend!r}")
        need(isinstance(self.seq_len, int) and self.seq_len >= 0, f"seq_len={self.seq_len!r} must be an integer >= 0")
        need(isinstance(self.decode_threads, int) and not isinstance(self.decode_threads, bool)
             and self.decode_threads >= 0,
             f"decode_threads={self.decode_threads!r} must be an integer >= 1, or 0 to measure it on each device")
        if self.wire is not None:
            wire = tuple(tuple(row) for row in self.wire)
            object.__setattr__(self, "wire", wire)  # lists in, tuples kept: the options stay hashable
            need(all(len(row) == len(wire) for row in wire), f"wire is not a square matrix: {list(map(len, wire))}")
            bad = sorted({f for row in wire for f in row if f not in WIRE_FORMATS})
            need(not bad, f"wire formats {bad} are not among {WIRE_FORMATS}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def weight_format(self) -> WeightFormat:
        return parse_format(self.weights_format)

    @property
    def memory_params(self) -> MemoryParams:
        """The memory model's element sizes for these options (parallel/memory.py): the compute dtype's,
        the linears held in weights_format."""
        return MemoryParams.for_dtype(self.torch_dtype.itemsize, self.weights_format)

    def check_world(self, world: int) -> None:
        """Refuse a wire matrix made for another number of devices."""
        if self.wire is not None and len(self.wire) != world:
            raise PlanMismatch(f"the wire formats are for {len(self.wire)} devices, the cluster has {world}")


@dataclass(frozen=True)
class DeviceInfo:
    """What a device reports of itself (Hello): the coordinator's view of it."""

    address: str
    name: str
    cpu_count: int
    threads: int
    compute_device: str
    total_memory: int
    available_memory: int
    memory_budget: int
    state: str
    rss: int = 0  # the worker process's own resident memory
    data_port: int = 0  # its TCP tensor data port (0: none, peers send over gRPC)
    cpu_limit: float = 0.0  # cores it may use (cgroup quota or CPU count); 0: not reported
    host_id: str = ""  # its machine's boot id: equal ids share cores and memory; "": not reported
    host_cpus: int = 0  # CPUs of that whole machine; 0: not reported
    droppable: int = 0  # of rss: what its loaded sessions and pushed shards hold, which a new load may free


@dataclass(frozen=True)
class LoadedMemory:
    """What a loaded device may still spend (galaxy.parallel.memory): its budget less what it held
    once the load's transients were given back, of which `kv_budget` goes to the engine's KV pool.
    The coordinator refuses a pass too large for it with the figure the worker admits it by."""

    budget: int  # bytes the worker process may hold; 0: no cap
    resident: int  # bytes it held after the load
    act_bytes: int = 4  # one activation / KV element (the compute dtype)
    kv_budget: int = 0  # bytes its serving engine's KV pool may take (memory.kv_pool_budget beside the rest)


@dataclass(frozen=True)
class DeviceStats:
    """One rank's part of one pass."""

    rank: int
    forward_s: float  # its whole forward, waiting included
    ops: tuple[OpStat, ...] = ()  # one per collective, in order
    peak_rss_bytes: int = 0  # resident-memory peak during the pass (0: not measured)
    rss_before_bytes: int = 0  # resident memory when the pass began (peak - this: activations)
    kv_cache_bytes: int = 0  # KV caches the device holds after the pass
    cpu_s: float = 0.0  # CPU time of the whole worker process (every thread) in the pass; 0: not reported

    @property
    def busy_s(self) -> float:
        """Its own work: the forward minus the time it sat blocked waiting for a peer. Equal on
        every device when the split is balanced."""
        return self.forward_s - sum(op.wait_s for op in self.ops)


@dataclass
class ForwardResult:
    output: torch.Tensor  # the assembled model output, float32
    seconds: float  # wall time at the coordinator
    devices: list[DeviceStats] = field(default_factory=list)  # per rank
    # a Step with top1_rows: the token each of those rows' argmax picked, (top-1 rows,) int64, on the devices
    # (parallel/top1.py); `output` then holds the logits of the step's other logit rows only
    top1: torch.Tensor | None = None


class Executor(Protocol):
    """A set of ranks in ring order that hold a model's shards and run passes over them."""

    names: list[str]  # how errors and reports name each device, in ring order
    backends: list[str]  # the backend each rank runs, "auto" resolved (after load)
    loaded_memory: list[LoadedMemory]  # per rank after load; [] where devices report no memory (in-process)

    @property
    def world(self) -> int: ...

    @property
    def partition(self) -> Partition | None:
        """The split loaded now (None before load); a re-planning executor may change it."""

    def hello(self) -> list[DeviceInfo]:
        """What each device reports of itself, in ring order ([] where there is nothing to ask)."""

    def hello_each(self, timeout: float = 1.0) -> list[DeviceInfo | Exception]:
        """Each device's hello or the error it answered with, within `timeout`, never raising or
        waiting for a connection ([] where there is nothing to ask): a liveness poll."""

    def load(self, source: WeightSource, partition: Partition, options: LoadOptions = LoadOptions()) -> list[int]:
        """Put `source` on the devices split by `partition`; returns each rank's weight bytes."""

    def forward(self, req: Request, *, overlap: bool = True, measure_memory: bool = False,
                wire: list[list[str]] | None = None) -> ForwardResult:
        """One pass. overlap=False and `wire` override the loaded options for this pass only (the bench's
        side-by-side variants); measure_memory returns free heap to the OS first so the peak is this pass's."""

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks of `block_size` positions that every device can hold within its KV budget: the
        serving engine's pool (the smallest count over devices that hold KV heads)."""

    def step(self, step: Step, pool: KVPool) -> ForwardResult:
        """One iteration of the serving engine on every device: output is the logits (logit rows, V),
        but for the step's top1_rows, whose argmax comes back as `top1` instead (parallel/top1.py).
        The pool is allocated on each device at the first step that names it."""

    def export_kv(self, rank: int, block_table: tuple[int, ...], tokens: int, layers: tuple[int, int],
                  heads: tuple[int, int], pool: KVPool, start: int = 0, while_stepping: bool = False
                  ) -> torch.Tensor:
        """Phase-separated serving: positions [start, tokens) of the sequence in `block_table` of the
        pool, layers x KV heads (global ids) that `rank` holds -> (layers, 2, heads, tokens - start,
        head_dim) (parallel.kv_transfer: the box format). Between steps, unless `while_stepping`: the
        caller vouches that no step writes those positions (a prompt's finished chunk, streamed while
        its next chunk runs: engine/kv_stream.py)."""

    def import_kv(self, rank: int, block_table: tuple[int, ...], box: torch.Tensor, layers: tuple[int, int],
                  heads: tuple[int, int], pool: KVPool, start: int = 0) -> None:
        """Write such a box at positions [start, start + box.shape[3]) into `rank`'s pool (allocated
        first if no step has), after checking its shape, dtype and blocks (KVTransferError: refused,
        pool untouched). Between steps only."""

    def kv_stash(self, rank: int, call: StashCall, pool: KVPool) -> StashResult:
        """The device-local K/V pool on `rank` (parallel/kv_stash.py): open (refused with DeviceOutOfMemory, before
        allocating, when the budget does not fit beside the device's plan and `pool`) or close its store, drop,
        keep and restore named blocks of the pool. A malformed call is refused (KVTransferError), nothing
        touched. Between steps only."""

    def release(self) -> None:
        """Drop the loaded model on every device (the executor stays usable)."""

    def close(self) -> None:
        """Release, and free the executor's own resources (connections, threads)."""


def pool_blocks(per_rank: list[tuple[int, int]], block_size: int) -> int:
    """The engine's pool size from each rank's (KV bytes per token, KV budget bytes): the smallest
    count of `block_size`-position blocks any rank holding KV heads can keep. 0: none can hold one."""
    counts = [budget // (per_token * block_size) for per_token, budget in per_rank if per_token > 0]
    return min(counts) if counts else 0
