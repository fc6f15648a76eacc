"""Predicted prefill latency of one layout: the planner's cost model, pure arithmetic.

A `Layout` says which cluster devices take part, in which ring (or stage) order, and what each
holds; `CostModel.estimate` turns it into a latency, a per-phase breakdown and per-device memory.

The model (docs/planner.md has the derivation):

- **Compute.** A device's time for a block follows its own `ComputeModel` (profile.py):
  overhead_s + flops / flops_per_s for the whole block. When a block is cut into phases (QKV
  projection | attention core | output projection; MLP up | down) or tiles, each part gets the
  block's time in proportion to its flops, so a world of one device predicts exactly the
  profiled block times.
- **Phases synchronise.** A layer is a sequence of phases; each phase starts on every device at
  once and ends when the slowest device ends (the next collective needs everyone). Layer time
  is the sum of the phase times; every layer has the same shape, so a pass is
  embedding + n_layers x layer + LM head. A causal LM's prefill computes the logits of its last
  token only (what generation samples from), so the head costs one row, not S.
- **Ring collectives, event by event.** Device r sends to r+1 in the ring order; a message of m
  bytes leaves when the link is free and arrives m / bandwidth + latency later (links are FIFO,
  the latency is pipelined); an empty chunk sends nothing. Chunk j is device j's token rows, so
  uneven token splits give uneven messages. The recurrences follow collectives.py exactly
  (`all_gather_time`, `reduce_scatter_time`): a step waits for its message, a device forwards
  before it multiplies. With no compute, equal chunks and equal links this is the lock-step
  ring: (N-1) x (chunk bytes / bandwidth + latency); otherwise each step ends when its slowest
  link delivers, but a fast link's chunk may run ahead.
- **Tile overlap.** AllGather -> column GEMM: each device multiplies the tile it holds while the
  ring moves the next, so T ~ sum_k max(comm_k, comp_k) + the last tile, which cannot overlap.
  Row GEMM -> ReduceScatter: the first partial tile must be computed before anything is sent,
  T ~ the first tile + sum_k max(comm_k, comp_{k+1}). The event recurrences give these sums
  exactly when every step is alike, and do not charge a fast device for a slow one's tile in
  the same step (a lock-step max per step made overlap look slower than no overlap for uneven
  splits). Without overlap (the authors' prototype): T = max_r(compute of r) + the wire time.
- **Per strategy.** galaxy: per layer AG->QKV, core, out->RS, CON1, AG->up, down->RS, CON2;
  once: embedding RS (lookup is free) + CON, and for causal models final-norm CON + AG->vocab
  GEMM. megatron: every device computes all tokens; AllReduce = RS + AG of S x H, fully exposed,
  after attention and MLP (and after the embedding); up to 64 KiB it is direct, every rank to
  every rank, as collectives.all_reduce does. seqpar: each device holds the whole model and
  computes its token slice of every block; one AllGather of K and V per layer, exposed.
  pipeline: contiguous layers per stage, latency = sum of stage compute + hand-offs of S x H.
  local: one device, no communication.
- **Memory.** Exact weight bytes of the ShardSpec the layout implies (`weight_bytes`, equal to
  galaxy.parallel.sharding.shard_bytes and checked against it in the tests) plus activations:
  max(profile.activation_bytes(...), the LM head's gathered input + logits). seqpar has its
  own activation estimate (queries of its slice, keys/values of all tokens).

What is not modelled: collecting the output on the caller (the logits stay vocabulary-parallel
where they are computed), contention between links that share a switch, sub-tiles (--tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from galaxy.model.config import ModelConfig
from galaxy.parallel.memory import shard_params
from galaxy.parallel.sharding import ShardSpec, last_token_rank, ranges

from .plan import PlanError
from .profile import (
    ClusterProfile,
    ComputeModel,
    activation_bytes,
    co_tenant_speedup,
    connective_flops,
    head_flops,
    kv_heads_touched,
    mlp_flops,
)
from .strategy import PLANNED, PlanStrategy

MEMO_VALUES = 1_000_000  # per-device values the collective memo holds before it starts afresh (~70 MB)
DIRECT_ALLREDUCE_BYTES = 64 * 1024  # galaxy.parallel.collectives.Collectives(direct_max_bytes=...): no ring below this


@dataclass(frozen=True)
class Layout:
    """Who holds what. Tuples are per device in `order` (cluster indices, ring / stage order).

    galaxy / galaxy-no-overlap: heads, cols, vocab and tokens (any non-negative integers).
    megatron: heads, cols, vocab (tokens unused: every device sees all of them).
    seqpar: tokens (every device holds the whole model).   pipeline: layers.   local: one device.
    """

    strategy: str
    order: tuple[int, ...]
    heads: tuple[int, ...] = ()
    cols: tuple[int, ...] = ()
    vocab: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Phase:
    """One step of a layer (or of the once-per-pass part) on every device of the layout."""

    name: str
    compute_s: tuple[float, ...]  # each device's compute in this phase
    comm_s: float = 0.0  # wire time of the collective alone (sum of its ring steps)
    time_s: float = 0.0  # wall time of the phase: ends when the slowest device ends

    @property
    def hidden_s(self) -> float:
        """Communication that overlap hid behind compute."""
        return max(0.0, self.comm_s + max(self.compute_s, default=0.0) - self.time_s)


@dataclass(frozen=True)
class Memory:
    weights_bytes: int
    activation_bytes: int
    budget_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.budget_bytes


@dataclass(frozen=True)
class Estimate:
    """The prediction for one layout. Per-device tuples follow `layout.order`."""

    layout: Layout
    latency_s: float  # one prefill pass, end to end
    phases: tuple[Phase, ...]  # one transformer layer (empty for pipeline: stages differ)
    once: tuple[Phase, ...]  # embedding and LM head (pipeline: every stage and hand-off)
    repeat: int  # times `phases` run per pass (n_layers)
    memory: tuple[Memory, ...]
    compute_s: tuple[float, ...]  # per device, per layer it runs
    comm_s: tuple[float, ...]  # per device, per layer: the rest of the layer (wire time not hidden, waiting)
    wire_bytes: int = 0  # bytes the busiest device sends per pass
    notes: tuple[str, ...] = field(default=())

    @property
    def strategy(self) -> str:
        return self.layout.strategy

    @property
    def feasible(self) -> bool:
        return all(m.fits for m in self.memory)

    @property
    def layer_s(self) -> float:
        return sum(p.time_s for p in self.phases)

    @property
    def exposed_comm_s(self) -> float:
        """Time per pass the pass waits on the network (phase time beyond the slowest compute)."""
        allp = [(p, self.repeat) for p in self.phases] + [(p, 1) for p in self.once]
        return sum(k * max(0.0, p.time_s - max(p.compute_s, default=0.0)) for p, k in allp)

    def overfull(self) -> list[int]:
        """Positions (in layout order) of devices whose shard does not fit their memory."""
        return [i for i, m in enumerate(self.memory) if not m.fits]


# --- weights ----------------------------------------------------------------------------------

def weight_params(cfg: ModelConfig, spec: ShardSpec) -> int:
    """Parameters a device holds for `spec` (tied head counted once); = shard_bytes / dtype size.
    The closed form is the memory model's (galaxy.parallel.memory), so the plan and the workers'
    admission count the same bytes."""
    return shard_params(cfg, spec)


def weight_bytes(cfg: ModelConfig, spec: ShardSpec, dtype_bytes: int = 4) -> int:
    return weight_params(cfg, spec) * dtype_bytes


def seqpar_activation_bytes(cfg: ModelConfig, seq: int, tokens: int, dtype_bytes: int = 4) -> int:
    """Peak activations of a sequence-parallel layer: own queries, everyone's K and V, own scores."""
    hid, hd, s = cfg.hidden, cfg.head_dim, tokens
    kv_all = 2 * seq * cfg.n_kv_heads * hd
    own = s * hid * 4 + s * hd * cfg.n_heads * 2  # residual, normed input, out; queries + context
    scores = cfg.n_heads * s * seq
    inner = s * cfg.ffn * (2 if cfg.gated_mlp else 1)
    return dtype_bytes * (kv_all + own + scores + inner)


# --- ring collectives (lock-step model, see the module docstring) ----------------------------

def _msg(link: tuple[float, float], nbytes: float) -> float:
    """Seconds for one message over a link (seconds per byte, latency); empty chunks are not sent."""
    return 0.0 if nbytes <= 0 else nbytes * link[0] + link[1]


def all_gather_time(rows, row_bytes, per_row, links, overlap=True, wire=None) -> tuple[float, float, list[float]]:
    """AllGather of rows[j] rows from each device j, fused with a GEMM of per_row[r] s per row on r.

    Event order of collectives.all_gather: step 0 sends the own chunk and multiplies it; in step
    k >= 1 device r waits for chunk r-k, forwards it (k < N-1), then multiplies it. Returns
    (phase time, wire time alone, each device's compute)."""
    n, total = len(rows), sum(rows)
    comp_dev = [g * total for g in per_row]
    if wire is None:
        wire = _all_gather_events(rows, row_bytes, [0.0] * n, links)
    if not overlap:
        return max(comp_dev) + wire, wire, comp_dev
    return _all_gather_events(rows, row_bytes, per_row, links), wire, comp_dev


def _all_gather_events(rows, row_bytes, per_row, links) -> float:
    n = len(rows)
    busy = [per_row[r] * rows[r] for r in range(n)]  # compute clock of each device
    free = [0.0] * n  # when link r -> r+1 can take the next message
    arrive = [0.0] * n  # arrival at device r of the chunk it handles in the current step
    for r in range(n):
        if n > 1 and rows[r]:
            free[r] = rows[r] * row_bytes * links[r][0]
            arrive[(r + 1) % n] = free[r] + links[r][1]
    for k in range(1, n):
        nxt = [0.0] * n
        for r in range(n):
            m = rows[(r - k) % n]
            if not m:
                continue
            t = max(busy[r], arrive[r])
            if k < n - 1:  # forward before computing
                start = max(t, free[r])
                free[r] = start + m * row_bytes * links[r][0]
                nxt[(r + 1) % n] = free[r] + links[r][1]
            busy[r] = t + per_row[r] * m
        arrive = nxt
    return max(busy)


def reduce_scatter_time(rows, row_bytes, per_row, links, overlap=True, wire=None) -> tuple[float, float, list[float]]:
    """Row-parallel GEMM (per_row[r] s per row on r) -> ReduceScatter leaving rows[j] on device j.

    Event order of collectives.reduce_scatter: device r computes the partial of chunk r-1 and
    sends it; in step k >= 1 it computes chunk r-1-k, waits for the partial of that chunk from
    r-1, adds it and sends the sum on (k < N-1) or keeps it (k = N-1: its own rows)."""
    n, total = len(rows), sum(rows)
    comp_dev = [g * total for g in per_row]
    if wire is None:
        wire = _reduce_scatter_events(rows, row_bytes, [0.0] * n, links)
    if not overlap:
        return max(comp_dev) + wire, wire, comp_dev
    return _reduce_scatter_events(rows, row_bytes, per_row, links), wire, comp_dev


def _reduce_scatter_events(rows, row_bytes, per_row, links) -> float:
    n = len(rows)
    if n == 1:
        return per_row[0] * rows[0]
    busy, free, arrive = [0.0] * n, [0.0] * n, [0.0] * n
    for r in range(n):
        m = rows[(r - 1) % n]
        busy[r] = per_row[r] * m
        if m:
            free[r] = busy[r] + m * row_bytes * links[r][0]
            arrive[(r + 1) % n] = free[r] + links[r][1]
    for k in range(1, n):
        nxt = [0.0] * n
        for r in range(n):
            m = rows[(r - 1 - k) % n]
            if not m:
                continue
            t = max(busy[r] + per_row[r] * m, arrive[r])
            if k < n - 1:
                start = max(t, free[r])
                free[r] = start + m * row_bytes * links[r][0]
                nxt[(r + 1) % n] = free[r] + links[r][1]
            busy[r] = t
        arrive = nxt
    return max(busy)


def ring_bytes_sent(rows, row_bytes) -> list[int]:
    """Bytes each device sends in one ring RS or AG (everyone's chunk but one)."""
    n = len(rows)
    return [0 if n == 1 else (sum(rows) - rows[(r + 1) % n]) * row_bytes for r in range(n)]


def last_token_owner(rows) -> tuple[int, ...]:
    """The chunks of the LM head's all-gather: one row, from the device holding the last token."""
    owner = last_token_rank(rows)
    return tuple(1 if r == owner else 0 for r in range(len(rows)))


def with_transport(phase: Phase, transport: tuple[float, ...]) -> Phase:
    """A collective's phase with each device's transport CPU (CostModel.transport_s) added to its work and
    the phase lengthened by the largest: that CPU runs on the compute thread's core between the tiles (the
    hand-offs, the frame reads), so on a device the collective waits for, it adds to the collective."""
    if not any(transport):
        return phase
    return Phase(phase.name, tuple(c + x for c, x in zip(phase.compute_s, transport)), phase.comm_s,
                 phase.time_s + max(transport))


def _split_time(cm: ComputeModel, parts: list[float]) -> list[float]:
    """A block's time (one ComputeModel call) shared among its parts in proportion to flops."""
    total = sum(parts)
    if total <= 0:
        return [0.0] * len(parts)
    t = cm.seconds(total)
    return [t * p / total for p in parts]


# --- the model ---------------------------------------------------------------------------------

class CostModel:
    """Predicts latency and memory of layouts of one model, sequence length and cluster."""

    def __init__(self, cfg: ModelConfig, seq_len: int, cluster: ClusterProfile, dtype_bytes: int = 4):
        if seq_len <= 0:
            raise PlanError(f"seq_len: {seq_len} must be positive")
        if seq_len > cfg.max_positions:
            raise PlanError(f"seq_len: {seq_len} exceeds the model's max_positions={cfg.max_positions}")
        if not cluster.devices:
            raise PlanError("the cluster has no devices")
        self.cfg, self.S, self.cluster, self.b = cfg, seq_len, cluster, dtype_bytes
        self.devices = cluster.devices
        self.n = len(cluster.devices)
        self._links: dict[tuple[int, int], tuple[float, float]] = {}
        self._wire: dict[tuple, float] = {}  # ring wire time by (collective, chunks, row bytes, links)
        self._speedup: dict[frozenset, dict[int, float]] = {}
        self._busy_devices: dict[frozenset, list] = {}  # the devices as fast as they are beside a subset
        # A search prices thousands of layouts that differ in a device or two: what one device's share
        # costs, and each collective's timing, are kept by what they depend on.
        self._parts: dict[tuple, tuple] = {}
        self._coll: dict[tuple, tuple] = {}
        self._memo_values = 0
        for i in range(self.n):
            for j in range(self.n):
                lk = cluster.links[i][j] if i < len(cluster.links) and j < len(cluster.links[i]) else None
                if lk is not None and lk.bandwidth_bps > 0:
                    self._links[i, j] = (8.0 / lk.bandwidth_bps, max(0.0, lk.latency_s))

    # links --------------------------------------------------------------------------------
    def has_link(self, i: int, j: int) -> bool:
        return (i, j) in self._links

    def link(self, i: int, j: int) -> tuple[float, float]:
        """(seconds per byte, latency) of the link i -> j."""
        if (i, j) not in self._links:
            a, b = self.devices[i].name, self.devices[j].name
            raise PlanError(f"no link from {a} to {b} in the cluster profile (links[{i}][{j}])")
        return self._links[i, j]

    def ring_links(self, order) -> list[tuple[float, float]]:
        n = len(order)
        return [self.link(order[r], order[(r + 1) % n]) for r in range(n)] if n > 1 else [(0.0, 0.0)]

    # per-device compute -------------------------------------------------------------------
    def speedup(self, order) -> dict[int, float]:
        """Device -> how much faster than profiled it computes when only `order` is busy: workers that
        share a machine were profiled all busy at once (profile.co_tenant_speedup)."""
        key = frozenset(order)
        if key not in self._speedup:
            ids = sorted(key)
            self._speedup[key] = dict(zip(ids, co_tenant_speedup(self.cluster.devices, ids)))
        return self._speedup[key]

    def transport_s(self, order, steps: int) -> tuple[float, ...]:
        """Per device of `order`, the wall seconds of `steps` ring steps' transport CPU, which every device
        pays whole (profile.DeviceProfile.collective_cpu_s, at its share of a core); none alone."""
        if steps <= 0:
            return (0.0,) * len(order)
        return tuple(steps * self.devices[i].collective_wall_s() for i in order)

    def head_model(self, i: int) -> ComputeModel:
        d = self.devices[i]
        return d.head or d.mlp

    def con_s(self, i: int, tokens: int) -> float:
        return self.devices[i].connective.seconds(connective_flops(self.cfg, tokens))

    def full_layer_s(self, i: int) -> float:
        """One whole layer over all tokens on device i alone (pipeline stages, local)."""
        cfg, S, d = self.cfg, self.S, self.devices[i]
        qkv, core, out = self._attn_parts(cfg.n_heads, cfg.n_kv_heads, S, S)
        mlp = mlp_flops(cfg, cfg.ffn, S)
        return d.attention.seconds(qkv + core + out) + d.mlp.seconds(mlp) + 2 * self.con_s(i, S)

    def _attn_parts(self, heads: int, kv: int, q_tokens: int, kv_tokens: int) -> tuple[float, float, float]:
        """Flops of QKV projection, core (QK^T, AV) and output projection (profile.attention_flops)."""
        hid, hd = self.cfg.hidden, self.cfg.head_dim
        qkv = 2.0 * q_tokens * hid * hd * (heads + 2 * kv)
        core = 4.0 * q_tokens * kv_tokens * hd * heads
        out = 2.0 * q_tokens * hd * heads * hid
        return qkv, core, out

    # memory -------------------------------------------------------------------------------
    def head_activation(self, vocab_rows: int) -> int:
        """LM head peak: the gathered input and this device's logits (causal models only)."""
        if not self.cfg.causal or vocab_rows == 0:
            return 0
        return self.b * self.S * (self.cfg.hidden + vocab_rows)

    def activations(self, heads: int, cols: int, tokens: int, vocab_rows: int) -> int:
        return max(activation_bytes(self.cfg, self.S, heads, cols, tokens, self.b), self.head_activation(vocab_rows))

    def memory(self, i: int, spec: ShardSpec, act: int) -> Memory:
        return Memory(weight_bytes(self.cfg, spec, self.b), act, int(self.devices[i].memory_bytes))

    # estimate -----------------------------------------------------------------------------
    def estimate(self, layout: Layout) -> Estimate:
        self._check(layout)
        if self._memo_values > MEMO_VALUES:
            self._coll.clear()
            self._parts.clear()
            self._memo_values = 0
        key = frozenset(layout.order)
        if key not in self._busy_devices:  # the solver estimates many layouts of each subset
            fast = self.speedup(key)
            self._busy_devices[key] = [d.faster(fast.get(i, 1.0)) for i, d in enumerate(self.cluster.devices)]
        self.devices = self._busy_devices[key]  # as fast as they are beside only this layout's co-tenants
        try:
            s = layout.strategy
            if s in ("galaxy", "galaxy-no-overlap", "local"):
                return self._galaxy(layout, overlap=s != "galaxy-no-overlap")
            if s == "megatron":
                return self._megatron(layout)
            if s == "seqpar":
                return self._seqpar(layout)
            return self._pipeline(layout)
        finally:
            self.devices = self.cluster.devices

    def _check(self, lay: Layout) -> None:
        cfg, n = self.cfg, len(lay.order)
        if lay.strategy not in PLANNED:
            raise PlanError(f"strategy: {lay.strategy!r} is not one of {', '.join(map(str, PLANNED))}")
        if n == 0 or len(set(lay.order)) != n or not all(0 <= i < self.n for i in lay.order):
            raise PlanError(f"order: {list(lay.order)} must be distinct device indices below {self.n}")
        if lay.strategy == "local" and n != 1:
            raise PlanError(f"local runs on one device, the layout has {n}")
        total = {"heads": cfg.n_heads, "cols": cfg.ffn, "vocab": cfg.vocab_size, "tokens": self.S,
                 "layers": cfg.n_layers}
        for name in PlanStrategy(lay.strategy).layout_fields:
            v = getattr(lay, name)
            if len(v) != n:
                raise PlanError(f"{name} has {len(v)} entries for {n} devices")
            if min(v) < 0:
                raise PlanError(f"{name}: {list(v)} has a negative entry")
            if sum(v) != total[name]:
                raise PlanError(f"{name} sum to {sum(v)}, model has {total[name]}")

    def _galaxy(self, lay: Layout, overlap: bool) -> Estimate:
        cfg, S, b, hid = self.cfg, self.S, self.b, self.cfg.hidden
        order, h, c, v, s = lay.order, lay.heads, lay.cols, lay.vocab, lay.tokens
        n = len(order)
        links = self.ring_links(order)
        hr, cr, vr = ranges(h), ranges(c), ranges(v)
        g_qkv, core, g_out, g_up, g_down, g_head, mem = [], [], [], [], [], [], []
        for r, i in enumerate(order):
            d = self.devices[i]
            key = (id(d), hr[r], c[r], v[r], s[r])  # what a device's share costs depends on nothing else
            part = self._parts.get(key)
            if part is None:
                kv = kv_heads_touched(cfg, *hr[r])
                tq, tc, to = _split_time(d.attention, list(self._attn_parts(h[r], kv, S, S)))
                up_f = 2.0 * S * hid * c[r] * (2 if cfg.gated_mlp else 1)
                tu, td = _split_time(d.mlp, [up_f, 2.0 * S * hid * c[r]])
                head = self.head_model(i).seconds(head_flops(cfg, v[r], 1)) if cfg.causal else 0.0
                spec = ShardSpec(hr[r], cr[r], vr[r], (0, cfg.n_layers))
                part = (tq / S, tc, to / S, tu / S, td / S, head,
                        self.memory(i, spec, self.activations(h[r], c[r], s[r], v[r])))
                self._parts[key] = part
            for out, x in zip((g_qkv, core, g_out, g_up, g_down, g_head, mem), part):
                out.append(x)
        row = hid * b
        con = tuple(self.con_s(i, s[r]) for r, i in enumerate(order))

        transport = self.transport_s(order, n - 1)

        def coll(name, fn, per_row, chunks=s):
            key = (fn.__name__, chunks, row, order, tuple(per_row), overlap)
            got = self._coll.get(key)
            if got is None:
                wkey = key[:4]
                t, w, comp = fn(chunks, row, per_row, links, overlap, self._wire.get(wkey))
                self._wire[wkey] = w
                got = self._coll[key] = (t, w, tuple(comp))
                self._memo_values += 3 * n
            return with_transport(Phase(name, got[2], got[1], got[0]), transport)

        def local(name, comp):
            return Phase(name, tuple(comp), 0.0, max(comp))

        phases = (
            coll("attn.allgather+qkv", all_gather_time, g_qkv),
            local("attn.core", core),
            coll("attn.out+reducescatter", reduce_scatter_time, g_out),
            local("con1", con),
            coll("mlp.allgather+up", all_gather_time, g_up),
            coll("mlp.down+reducescatter", reduce_scatter_time, g_down),
            local("con2", con),
        )
        once = [coll("embed.reducescatter", reduce_scatter_time, [0.0] * n), local("embed.con", con)]
        sent = [4 * cfg.n_layers * x + x for x in ring_bytes_sent(s, row)]
        if cfg.causal:  # the last token's row goes round the ring; every device multiplies its vocab rows
            last = last_token_owner(s)
            once += [local("head.con", con), coll("head.allgather+vocab", all_gather_time, g_head, last)]
            sent = [x + y for x, y in zip(sent, ring_bytes_sent(last, row))]
        return self._finish(lay, phases, tuple(once), mem, max(sent))

    def _megatron(self, lay: Layout) -> Estimate:
        cfg, S, b, hid = self.cfg, self.S, self.b, self.cfg.hidden
        order, h, c, v = lay.order, lay.heads, lay.cols, lay.vocab
        n = len(order)
        links = self.ring_links(order)
        hr, cr, vr = ranges(h), ranges(c), ranges(v)
        chunks = [S // n + (1 if r < S % n else 0) for r in range(n)]  # all_reduce: split_even rows
        zero = [0.0] * n
        att, mlp, head, mem = [], [], [], []
        for r, i in enumerate(order):
            d = self.devices[i]
            kv = kv_heads_touched(cfg, *hr[r])
            att.append(d.attention.seconds(sum(self._attn_parts(h[r], kv, S, S))))
            mlp.append(d.mlp.seconds(mlp_flops(cfg, c[r], S)))
            head.append(self.head_model(i).seconds(head_flops(cfg, v[r], 1)) if cfg.causal else 0.0)
            spec = ShardSpec(hr[r], cr[r], vr[r], (0, cfg.n_layers))
            mem.append(self.memory(i, spec, self.activations(h[r], c[r], S, v[r])))
        con = tuple(self.con_s(i, S) for i in order)
        row = hid * b

        def allreduce(name):
            if S * row <= DIRECT_ALLREDUCE_BYTES:  # collectives.all_reduce: everyone sends x to everyone
                t = max(_msg(self.link(i, j), S * row) for i in order for j in order if i != j) if n > 1 else 0.0
                return with_transport(Phase(name, tuple(zero), t, t), self.transport_s(order, n - 1))
            t1, w1, _ = reduce_scatter_time(chunks, row, zero, links)
            t2, w2, _ = all_gather_time(chunks, row, zero, links)
            return with_transport(Phase(name, tuple(zero), w1 + w2, t1 + t2), self.transport_s(order, 2 * (n - 1)))

        def local(name, comp):
            return Phase(name, tuple(comp), 0.0, max(comp))

        phases = (local("attn", att), allreduce("attn.allreduce"), local("con1", con),
                  local("mlp", mlp), allreduce("mlp.allreduce"), local("con2", con))
        once = [allreduce("embed.allreduce"), local("embed.con", con)]
        if cfg.causal:
            once += [local("head.con", con), local("head.vocab", head)]
        sent = max(ring_bytes_sent(chunks, row)) * 2 * (2 * cfg.n_layers + 1)
        return self._finish(lay, phases, tuple(once), mem, sent)

    def _seqpar(self, lay: Layout) -> Estimate:
        cfg, S, b = self.cfg, self.S, self.b
        order, s = lay.order, lay.tokens
        n = len(order)
        links = self.ring_links(order)
        full = ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (0, cfg.n_layers))
        qkv, rest, mlp, head, mem = [], [], [], [], []
        for r, i in enumerate(order):
            d = self.devices[i]
            fq, fc, fo = self._attn_parts(cfg.n_heads, cfg.n_kv_heads, s[r], S)
            tq, tr = _split_time(d.attention, [fq, fc + fo])
            qkv.append(tq)
            rest.append(tr)
            mlp.append(d.mlp.seconds(mlp_flops(cfg, cfg.ffn, s[r])))
            head.append(self.head_model(i).seconds(head_flops(cfg, cfg.vocab_size, 1))
                        if cfg.causal and r == last_token_rank(s) else 0.0)
            act = seqpar_activation_bytes(cfg, S, s[r], b)
            if cfg.causal and s[r]:
                act = max(act, b * s[r] * (cfg.hidden + cfg.vocab_size))
            mem.append(self.memory(i, full, act))
        con = tuple(self.con_s(i, s[r]) for r, i in enumerate(order))
        kv_row = 2 * cfg.n_kv_heads * cfg.head_dim * b
        t, w, _ = all_gather_time(s, kv_row, [0.0] * n, links, overlap=False)

        def local(name, comp):
            return Phase(name, tuple(comp), 0.0, max(comp))

        phases = (local("attn.qkv", qkv), Phase("attn.kv-allgather", (0.0,) * n, w, t), local("attn.core+out", rest),
                  local("con1", con), local("mlp", mlp), local("con2", con))
        once = [local("embed.con", con)]
        if cfg.causal:
            once += [local("head.con", con), local("head.vocab", head)]
        return self._finish(lay, phases, tuple(once), mem, max(ring_bytes_sent(s, kv_row)) * cfg.n_layers)

    def _finish(self, lay, phases, once, mem, wire) -> Estimate:
        L = self.cfg.n_layers
        layer = sum(p.time_s for p in phases)
        compute = tuple(sum(p.compute_s[r] for p in phases) for r in range(len(lay.order)))
        comm = tuple(max(0.0, layer - x) for x in compute)  # equal devices: layer - compute can round below 0
        latency = L * layer + sum(p.time_s for p in once)
        return Estimate(lay, latency, phases, once, L, tuple(mem), compute, comm, int(wire))

    def _pipeline(self, lay: Layout) -> Estimate:
        cfg, S = self.cfg, self.S
        order, layers = lay.order, lay.layers
        n = len(order)
        stages = [r for r in range(n) if layers[r] > 0]
        first, last = stages[0], stages[-1]
        once, mem, compute, comm = [], [], [], []
        handoff = S * cfg.hidden * self.b
        for r, i in enumerate(order):
            lo = sum(layers[:r])
            spec = ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (lo, lo + layers[r]),
                             embed=r == first, head=r == last)
            if layers[r] == 0:  # holds nothing, runs nothing
                spec = ShardSpec((0, 0), (0, 0), (0, 0), (lo, lo), embed=False, head=False)
            act = 0 if layers[r] == 0 else activation_bytes(cfg, S, cfg.n_heads, cfg.ffn, S, self.b)
            if r == last:
                act = max(act, self.head_activation(cfg.vocab_size))
            mem.append(self.memory(i, spec, act))
            layer_s = self.full_layer_s(i)
            t = layers[r] * layer_s
            if r == first:
                t += self.con_s(i, S)
            if r == last and cfg.causal:
                t += self.con_s(i, S) + self.head_model(i).seconds(head_flops(cfg, cfg.vocab_size, 1))
            comp = [0.0] * n
            comp[r] = t
            if layers[r] > 0:
                once.append(Phase(f"stage{r}", tuple(comp), 0.0, t))
            hand = 0.0
            if layers[r] > 0 and r != last:
                nxt = stages[stages.index(r) + 1]
                hand = _msg(self.link(i, order[nxt]), handoff)
                once.append(Phase(f"handoff{r}->{nxt}", (0.0,) * n, hand, hand))
            compute.append(layer_s if layers[r] else 0.0)
            comm.append(hand / layers[r] if layers[r] else 0.0)
        latency = sum(p.time_s for p in once)
        return Estimate(lay, latency, (), tuple(once), 0, tuple(mem), tuple(compute), tuple(comm),
                        handoff if len(stages) > 1 else 0)


def estimate(cfg: ModelConfig, seq_len: int, cluster: ClusterProfile, layout: Layout, dtype_bytes: int = 4) -> Estimate:
    """Predicted latency, breakdown and memory of `layout` (see the module docstring)."""
    return CostModel(cfg, seq_len, cluster, dtype_bytes).estimate(layout)
