"""What the planner knows about a cluster: per-device compute models, memory, and links.

Profiles are measured (planner/profiler.py runs the timings on each device's worker) and fitted
to the simplest model that predicts well: a block's time is a fixed overhead plus its floating
point work divided by the device's rate for that kind of block.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from galaxy.model.config import ModelConfig
from galaxy.parallel import memory


@dataclass(frozen=True)
class ComputeModel:
    """Seconds for one block: overhead_s + flops / flops_per_s (fitted from measurements)."""

    flops_per_s: float
    overhead_s: float = 0.0

    def seconds(self, flops: float) -> float:
        return 0.0 if flops <= 0 else self.overhead_s + flops / self.flops_per_s

    def faster(self, factor: float) -> ComputeModel:
        return ComputeModel(self.flops_per_s * factor, self.overhead_s / factor)


@dataclass(frozen=True)
class DecodeTiming:
    """A decode step on this device, measured (backends/profiling.py: whole layers stacked past the caches,
    one token of each of several sequences): one layer costs layer_s for one sequence and per_seq_s more
    for each further one. What a decode step costs here is this, not bytes / a streaming rate: the one
    large matrix the LM head is timed on streamed at twice the rate a whole model's many small ones do
    (SmolLM2 fp32 on this host: 251 ms/token predicted from it, 130 measured)."""

    layer_s: float
    per_seq_s: float = 0.0
    # A step of two or more sequences is another kind of step: its linears take sgemm's multi-row path, which
    # costs 1.4-1.7x MKL's one-row path for 2-8 rows and then grows slowly (docs/engine.md, "What a batched step
    # costs, by owner"). multi_s is that line's value at one sequence (the profile's 4 and 16 sequences: a
    # step of B >= 2 costs multi_s + per_seq_s (B - 1) a layer), layer_s the one-row step as measured;
    # 0: one line through every batch (a profile fitted before this: the second sequence priced at per_seq_s).
    multi_s: float = 0.0

    def seconds(self, layers: float, batch: int) -> float:
        if batch <= 0:
            return 0.0
        if batch == 1:
            return layers * self.layer_s
        return layers * ((self.multi_s or self.layer_s) + self.per_seq_s * (batch - 1))

    def faster(self, factor: float) -> DecodeTiming:
        return DecodeTiming(self.layer_s / factor, self.per_seq_s / factor, self.multi_s / factor)


@dataclass(frozen=True)
class Tenancy:
    """A worker that shares its machine with other workers (loopback or emulated devices).

    Co-tenants are profiled all at once (planner/profiler.py), so each profile is the speed it
    has while all of them compute. A layout that leaves some of them out leaves the others more
    of the machine when they asked for more than it has: three one-thread workers on two cores
    get 2/3 of a core each when all are busy, a whole core when two are."""

    host: str  # the machine's boot id (galaxy.resources.host_id)
    cores: float  # cores the worker can use alone: its threads, capped by its CPU quota or affinity
    host_cpus: int  # CPUs of the whole machine


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    address: str
    attention: ComputeModel  # QKV projection + attention core + output projection of h heads
    mlp: ComputeModel  # up (+gate) and down projections of c columns
    connective: ComputeModel  # residual add + norm of s tokens
    memory_bytes: int  # what a shard's weights, KV cache and activations may use (galaxy.parallel.memory.planner_room)
    head: ComputeModel | None = None  # LM head / embedding GEMMs (defaults to the MLP model)
    codec_s_per_byte: dict = field(default_factory=dict)  # wire format -> encode+decode s per fp32 byte
    tenancy: Tenancy | None = None  # None: a machine of its own (or not reported)
    budget_bytes: int = 0  # the worker's memory budget, which it admits loads by (0: none)
    resident_bytes: int = 0  # the worker's resident memory when profiled, less what a load may free
    decode: DecodeTiming | None = None  # a decode step's layers, measured (None: profiled before cache v7)
    # CPU seconds one ring step of a collective costs this device whole, whatever its share of the GEMMs
    # (transport/collective_probe.py: the data plane's hand-offs, system calls, the collective's Python),
    # measured in the worker's process; 0: not measured (a profile before cache v8, a synthetic one)
    collective_cpu_s: float = 0.0

    def collective_wall_s(self) -> float:
        """Wall seconds of collective_cpu_s on this device: a worker capped below a core (a CPU quota, the
        emulated Jetsons' 0.45-0.9) gets that share of a core's time, so each CPU second costs 1 / share.
        Its block timings already ran under the cap; this CPU was measured as CPU, so it is converted here."""
        share = min(1.0, self.tenancy.cores) if self.tenancy is not None and self.tenancy.cores > 0 else 1.0
        return self.collective_cpu_s / share

    def faster(self, factor: float) -> DeviceProfile:
        """This device computing `factor` times as fast (memory and codecs unchanged)."""
        if factor == 1.0:
            return self
        head = self.head.faster(factor) if self.head is not None else None
        decode = self.decode.faster(factor) if self.decode is not None else None
        return replace(self, attention=self.attention.faster(factor), mlp=self.mlp.faster(factor),
                       connective=self.connective.faster(factor), head=head, decode=decode,
                       collective_cpu_s=self.collective_cpu_s / factor)


def co_tenant_speedup(devices: list[DeviceProfile], order, others: dict[str, float] | None = None) -> list[float]:
    """Per device of `order`, how much faster than profiled it computes when only the devices of
    `order` are busy (Tenancy): 1 for a device with a machine of its own, or whose co-tenants
    never asked for more cores than the machine has (the emulated trio: 0.9 + 0.6 + 0.45 of 2).
    others: cores that processes other than workers (the coordinator serving: phases.Coordinator) ask of
    a host meanwhile; they were idle when the workers were profiled, so beside them a device may run
    slower than profiled (a speedup below 1) -- the trio's 1.95 cores and a coordinator's 0.3 on 2."""
    others = others or {}

    def share(ts: list[Tenancy], more: float = 0.0) -> float:
        demand = sum(t.cores for t in ts) + more
        return min(1.0, ts[0].host_cpus / demand) if demand > 0 else 1.0

    out = []
    for i in order:
        t = devices[i].tenancy
        if t is None or not t.host or t.host_cpus <= 0 or t.cores <= 0:
            out.append(1.0)
            continue
        on_host = [j for j, d in enumerate(devices) if d.tenancy is not None and d.tenancy.host == t.host]
        busy = [devices[j].tenancy for j in on_host if j in order]
        out.append(share(busy, others.get(t.host, 0.0)) / share([devices[j].tenancy for j in on_host]))
    return out


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float  # measured goodput, bits per second
    latency_s: float  # one-way, per message


@dataclass
class ClusterProfile:
    """Devices in the order given; links[i][j] is the link from device i to device j."""

    devices: list[DeviceProfile]
    links: list[list[Link | None]] = field(default_factory=list)

    def link(self, i: int, j: int) -> Link:
        return self.links[i][j]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ClusterProfile:
        d = json.loads(text)

        def cm(x):
            return None if x is None else ComputeModel(**x)

        devices = [DeviceProfile(x["name"], x["address"], cm(x["attention"]), cm(x["mlp"]), cm(x["connective"]),
                                 int(x["memory_bytes"]), cm(x.get("head")), dict(x.get("codec_s_per_byte", {})),
                                 Tenancy(**x["tenancy"]) if x.get("tenancy") else None,
                                 int(x.get("budget_bytes", 0)), int(x.get("resident_bytes", 0)),
                                 DecodeTiming(**x["decode"]) if x.get("decode") else None,
                                 float(x.get("collective_cpu_s", 0.0)))
                   for x in d["devices"]]
        links = [[None if lk is None else Link(**lk) for lk in row] for row in d.get("links", [])]
        return cls(devices, links)


# --- floating point work of each block (forward, batch 1) -------------------------------------

def kv_heads_touched(cfg: ModelConfig, h0: int, h1: int) -> int:
    """KV heads a device holding query heads [h0, h1) computes (partial groups replicated)."""
    return 0 if h1 <= h0 else -(-h1 // cfg.group) - h0 // cfg.group


def attention_flops(cfg: ModelConfig, heads: int, seq: int, kv_heads: int | None = None) -> float:
    """QKV projection, QK^T and AV over `seq` tokens, and the output projection, for `heads` heads."""
    hd, h = cfg.head_dim, cfg.hidden
    kv = heads if kv_heads is None else kv_heads
    return 2.0 * seq * h * hd * (heads + 2 * kv) + 4.0 * seq * seq * hd * heads + 2.0 * seq * hd * heads * h


def mlp_flops(cfg: ModelConfig, cols: int, seq: int) -> float:
    return 2.0 * seq * cfg.hidden * cols * (3 if cfg.gated_mlp else 2)


def connective_flops(cfg: ModelConfig, tokens: int) -> float:
    """Residual add + norm: a handful of element operations per value."""
    return 8.0 * tokens * cfg.hidden


def head_flops(cfg: ModelConfig, vocab_rows: int, seq: int) -> float:
    return 2.0 * seq * cfg.hidden * vocab_rows


# --- memory of a shard ---------------------------------------------------------------------

def bytes_per_head(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """Q and output-projection weights of one query head (its KV share is counted separately)."""
    return 2 * cfg.hidden * cfg.head_dim * dtype_bytes


def bytes_per_kv_head(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    return 2 * cfg.hidden * cfg.head_dim * dtype_bytes


def bytes_per_col(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    return (3 if cfg.gated_mlp else 2) * cfg.hidden * dtype_bytes


def bytes_per_vocab_row(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    untied_head = cfg.causal and not cfg.tie_embeddings
    return (2 if untied_head else 1) * cfg.hidden * dtype_bytes


def activation_bytes(cfg: ModelConfig, seq: int, heads: int, cols: int, tokens: int, dtype_bytes: int = 4) -> int:
    """Peak activations of one layer on a device, as the cost model and the solver price them
    (galaxy.parallel.memory.planner_activation_bytes). What a device really needs beyond this --
    the KV cache, the allocator's heap, a load's transient -- is taken off its `memory_bytes` by
    the profiler (memory.solver_room), so a plan that fits here fits the worker's admission."""
    return memory.planner_activation_bytes(cfg, seq, heads, cols, tokens, dtype_bytes)
