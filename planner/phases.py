"""Phase placements: which devices prefill, which decode, and what each phase costs there.

Prefill is compute-bound and Galaxy's HMP splits it well across devices; decode is bound by
reading the weights and, split, pays collectives every layer of every token (issue #22). This
module prices both phases of a placement from the same profiles the solver uses, and lists the
placements worth simulating (planner/simulate.py simulates them under load):

- **Decode is measured.** The profiler times a decode step on each device (backends/profiling.py:
  whole layers stacked past the caches, one token of each of 1, 4 and 16 sequences; profile.DecodeTiming),
  in the profile's dtype, all co-tenants busy as every profile. A step of B sequences costs, on each
  device, its layers' measured time (a share of a layer: the blocks' fixed overheads plus that share
  of the rest), its LM head rows' measured one-token time (grown with B as the layers grow), and its
  share of the sequences' KV read at the device's bytes/s; plus the engine's fixed cost of a step
  (STEP_OVERHEAD_S: the coordinator's scheduling and sampling and the Step RPC, measured) and the
  logits' way back to the coordinator (B x vocabulary rows x 4 bytes over the device's own link; a greedy
  workload's steps return each row's top-1 instead, TOP1_BYTES, as the engine asks them of the devices). A
  device alone on its machine's cores runs faster than profiled (profile.co_tenant_speedup).
  Before this, a step was priced as weight bytes / a streaming rate derived from the LM head's
  profile (`streaming_rate`, still the fallback for a profile without decode timings): that one large
  matrix streamed twice as fast as a model's many small ones, 251 ms/token predicted against 130 measured.
  A tensor-parallel decode group pays 2 all-reduces per layer and one for the embedding, each a direct
  exchange of B x hidden values (collectives.all_reduce below 64 KiB): the slowest pair's message time
  (link latency included). Workers of one machine whose threads ask for more cores than it has (three
  one-thread loopback workers on two cores) wait at every all-reduce for a peer the scheduler has not
  run: each costs at least OVERSUBSCRIBED_SYNC_S, measured, not the link's latency.
- **Prefill** of `tokens` on a group is the solver's prediction (the HMP cost model, cost.py) for
  the best layout of that group, at a few lengths, interpolated.
- **KV transfer** of a prompt is its KV bytes (2 x layers x KV heads x head_dim x dtype bytes per
  token) less what already sits on the decode devices, along the path the runtime takes (KVPath):
  direct (the runtime's default between workers, engine/kv_direct.py: each prefill device to each decode
  device over the link between them, in parallel, off both groups' steps: one hop), or through the
  coordinator (`kv_path="coordinator"`: pulled from each prefill device, one message after another,
  between the prefill group's steps, then pushed to each decode device between the decode group's
  steps: two hops, each over the device's own link, the fastest the profile measured from it).
  Streamed behind the prefill (DisaggConfig(stream=...), opt-in), with L layers, prefill P and
  transfer X the part not hidden is max(X / L, X - P (L - 1) / L).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from galaxy.model.config import ModelConfig
from galaxy.model.quant import WeightFormat, decode_bytes

from .cost import DIRECT_ALLREDUCE_BYTES
from .plan import KV_PATHS, Plan, PlanError
from .profile import ClusterProfile, DeviceProfile, co_tenant_speedup, head_flops
from .simulate import PhaseCosts
from .solver import solve

FORMAT_OF_DTYPE = {4: "fp32", 2: "bf16"}
# One decode all-reduce among workers of one machine whose threads ask for more cores than it has: a
# peer is off-core at every collective. Measured: three one-thread workers on this 2-core host decoded
# SmolLM2 int4 at 79.8 ms/token against 17.0 on one device (docs/decode-formats.md, "Everything
# together"), 62.8 ms over the step's 61 all-reduces, 1.0 ms each; 1.1 ms in fp32 (docs/collectives.md:
# the bare 3-rank all-reduce on 2 cores alone took 0.49-0.66 ms, without the compute between them).
OVERSUBSCRIBED_SYNC_S = 1.0e-3
RUN_WITH_ENGINE = ("galaxy", "local", "pipeline", "megatron")  # seqpar has no runtime: re-solved as galaxy
# The engine's own cost of a step beside the devices' compute: scheduling, sampling the logits, the Step RPC
# there and back. Measured: SmolLM2 fp32 on one loopback worker (1 thread), one sequence decoding, the token
# interval less the device's forward: 4.7 ms (132.7 - 128.0; load average 4-5.5) and 12.9 ms (66.7 - 53.8;
# 2.4-3.4) in two runs on this 2-core host; their mean (docs/planner.md "The decode step, measured").
STEP_OVERHEAD_S = 8.8e-3
LOGIT_BYTES = 4  # a logit row comes back in float32 whatever the weights
# A greedy row comes back as its top-1 from each rank holding vocabulary rows (parallel/top1.py Top1: a float32
# value and an int64 id), not as the row: the engine asks every greedy sequence's argmax on the devices
# (EngineConfig.top1_on_device). Priced as the whole row, SmolLM2's 192 KiB a token cost 16.5 ms of a 100 Mbit/s
# link per sequence per step that the runtime never sends (predicted TPOT 107 ms, measured 82; docs/planner.md).
TOP1_BYTES = 4 + 8
KV_MESSAGE_BYTES = 4 << 20  # DisaggConfig.chunk_bytes: a K/V box on the wire is cut into pieces below this


@dataclass(frozen=True)
class KVPath:
    """How a prompt's K/V get from the prefill group to the decode group (module docstring).

    route "direct" (the default, as the runtime's: engine/kv_direct.py wherever both groups are workers):
    each prefill device to each decode device, off both groups' steps (one hop); "coordinator" (the
    runtime's `kv_path="coordinator"`): pulled to the coordinator between the prefill group's steps, pushed
    from it between the decode group's (two hops). stream: sent while the prompt is prefilled
    (DisaggConfig(stream=...), off by default as in the runtime)."""

    route: str = "direct"
    stream: bool = False

    def describe(self) -> str:
        how = ("pulled to the coordinator, then pushed to the decode devices (two hops, between each group's "
               "steps)" if self.route == "coordinator" else "sent from each prefill device to each decode device "
               "(one hop)")
        return f"{how}, {'streamed while the prompt is prefilled' if self.stream else 'after the prefill'}"

    def __post_init__(self) -> None:
        if self.route not in KV_PATHS:
            raise PlanError(f"K/V path: route={self.route!r} is not one of {KV_PATHS}")
        if not isinstance(self.stream, bool):
            raise PlanError(f"K/V path: stream={self.stream!r} must be True or False")


# The coordinator's CPU while it serves the emulated trio's disaggregated and colocated placements (`galaxy bench
# serve`, SmolLM2 fp32, 0.15-0.5 req/s, /proc sampled every second): 0.01-0.03 cores, the highest taken
# (docs/planner.md, "Predicted against measured goodput: the transport CPU, ...").
COORDINATOR_CORES = 0.03


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's own CPU while it serves (its engine loops, the Step RPCs, sampling, the K/V moves'
    bookkeeping), when it runs on the machine of some devices (`host`: the machine's boot id, as their
    Tenancy): one more co-tenant, idle while they were profiled. `cores` is its measured CPU per second of
    wall while the engine serves (COORDINATOR_CORES, measured)."""

    host: str
    cores: float

    def __post_init__(self) -> None:
        if not (self.cores >= 0 and self.cores < 1e3):
            raise PlanError(f"coordinator: cores={self.cores} must be a non-negative number of cores")


@dataclass(frozen=True)
class KVMove:
    """A prompt's K/V move, in seconds: `pull` spent between the prefill group's steps, `push` between
    the decode group's, `wire` in flight off both (direct). `total` is what the prompt waits for."""

    pull: float = 0.0
    push: float = 0.0
    wire: float = 0.0

    @property
    def total(self) -> float:
        return self.pull + self.push + self.wire


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """K and V of every layer for one position."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def streaming_rate(dev: DeviceProfile, dtype_bytes: int = 4) -> float:
    """Bytes/s a device streams weights at, from its LM head's profile (one token over many rows:
    2 flops per weight of dtype_bytes); its MLP's GEMM rate when no head was profiled (optimistic)."""
    cm = dev.head or dev.mlp
    return cm.flops_per_s * dtype_bytes / 2


@dataclass(frozen=True)
class DecodeLayout:
    """Where decode runs: devices (cluster indices) and the share of the weights each reads per step.
    kind "tp": tensor-parallel, every device runs every layer on its share; "chain": pipeline stages."""

    kind: str
    devices: tuple[int, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("tp", "chain"):
            raise PlanError(f"decode layout kind: {self.kind!r} is not tp or chain")
        if len(self.devices) != len(self.shares) or not self.devices:
            raise PlanError(f"decode layout: {len(self.devices)} devices for {len(self.shares)} shares")
        if abs(sum(self.shares) - 1) > 1e-6 or min(self.shares) < 0:
            raise PlanError(f"decode layout shares {list(self.shares)} must be non-negative and sum to 1")


class PhaseModel:
    """Both phases' costs on subsets of one cluster, for one model (see the module docstring).

    solver(cfg, tokens, sub_cluster, strategy=None) -> Plan: the prefill plan of a group (default:
    solve); fmt: the weight format decode streams (default: the dtype's own); rates: bytes/s by
    device name, measured elsewhere, instead of the head profile's (streaming_rate); kv_path: the
    route of the K/V between the groups (KVPath: direct by default, as the runtime between workers);
    step_overhead_s: the engine's own cost of a step (STEP_OVERHEAD_S); greedy: the requests decode greedily,
    so a step returns each sequence's top-1 (TOP1_BYTES per vocabulary-holding device), not its logit row
    (the Python API's and `galaxy bench serve`'s default; the OpenAI endpoint samples at temperature 1 unless
    a request says otherwise: greedy=False)."""

    def __init__(self, cfg: ModelConfig, cluster: ClusterProfile, dtype_bytes: int = 4,
                 fmt: WeightFormat | None = None, solver: Callable[..., Plan] | None = None,
                 rates: dict[str, float] | None = None, kv_path: KVPath = KVPath(),
                 step_overhead_s: float = STEP_OVERHEAD_S, greedy: bool = True,
                 coordinator: Coordinator | None = None):
        if not cfg.causal:
            raise PlanError(f"serving placements need a causal LM; {cfg.name or cfg.family} is an encoder")
        self.cfg, self.cluster, self.b = cfg, cluster, dtype_bytes
        self.fmt = fmt or WeightFormat(FORMAT_OF_DTYPE.get(dtype_bytes, "fp32"))
        self.weight_bytes = decode_bytes(cfg, self.fmt)
        # the decode timings were taken in the profile's dtype; another format is priced by its bytes (not measured)
        self.fmt_scale = self.weight_bytes / decode_bytes(cfg, WeightFormat(FORMAT_OF_DTYPE.get(dtype_bytes, "fp32")))
        if not isinstance(kv_path, KVPath):
            raise PlanError(f"kv_path={kv_path!r} must be a KVPath")
        if not step_overhead_s >= 0:
            raise PlanError(f"step_overhead_s={step_overhead_s} must be >= 0 seconds")
        self.kv_path, self.step_overhead_s, self.greedy = kv_path, float(step_overhead_s), bool(greedy)
        if coordinator is not None and not isinstance(coordinator, Coordinator):
            raise PlanError(f"coordinator={coordinator!r} must be a Coordinator")
        self.coordinator = coordinator
        self.others = {coordinator.host: coordinator.cores} if coordinator is not None and coordinator.host else {}
        self.params = decode_bytes(cfg, WeightFormat("fp32")) / 4
        self.kv_token = kv_bytes_per_token(cfg, dtype_bytes)
        self.n = len(cluster.devices)
        given = rates or {}
        unknown = sorted(set(given) - {d.name for d in cluster.devices})
        if unknown:
            raise PlanError(f"decode rates given for {unknown}, not devices of the cluster "
                            f"{[d.name for d in cluster.devices]}")
        if any(not r > 0 for r in given.values()):
            raise PlanError(f"decode rates {given} must be positive bytes/s")
        self.rate = [float(given.get(d.name, streaming_rate(d, dtype_bytes))) for d in cluster.devices]
        self._solve = solver or (lambda c, s, cl, strategy=None: solve(c, s, cl, strategy, dtype_bytes))
        self._plans: dict[tuple[tuple[int, ...], int], Plan] = {}

    # --- devices ----------------------------------------------------------------------------
    def index(self, name: str) -> int:
        for i, d in enumerate(self.cluster.devices):
            if d.name == name:
                return i
        raise PlanError(f"device {name!r} is not in the cluster profile")

    def names(self, group) -> list[str]:
        return [self.cluster.devices[i].name for i in group]

    def bandwidths(self, group, busy) -> list[float]:
        """Bytes/s of each device of `group` while the devices of `busy` work: a device alone on its
        machine's cores runs faster than profiled (profile.co_tenant_speedup), but co-tenants together
        never stream more than their profiled rates summed (they were profiled all busy: the bus)."""
        busy = sorted(set(busy) | set(group))
        fast = dict(zip(busy, co_tenant_speedup(self.cluster.devices, busy, self.others)))
        out = {i: self.rate[i] * fast[i] for i in busy}
        hosts: dict[str, list[int]] = {}
        for i in busy:
            t = self.cluster.devices[i].tenancy
            if t is not None and t.host:
                hosts.setdefault(t.host, []).append(i)
        for host, members in hosts.items():
            bus = sum(self.rate[j] for j, d in enumerate(self.cluster.devices)
                      if d.tenancy is not None and d.tenancy.host == host)
            used = sum(out[i] for i in members)
            if used > bus:
                for i in members:
                    out[i] *= bus / used
        return [out[i] for i in group]

    def link(self, i: int, j: int) -> tuple[float, float]:
        """(seconds per byte, latency) from i to j."""
        lk = self.cluster.links[i][j] if i < len(self.cluster.links) and j < len(self.cluster.links[i]) else None
        if lk is None or lk.bandwidth_bps <= 0:
            raise PlanError(f"no link from {self.cluster.devices[i].name} to {self.cluster.devices[j].name} "
                            f"in the cluster profile (links[{i}][{j}])")
        return 8.0 / lk.bandwidth_bps, max(0.0, lk.latency_s)

    def _msg(self, i: int, j: int, nbytes: float) -> float:
        a, lat = self.link(i, j)
        return nbytes * a + lat

    # --- decode ------------------------------------------------------------------------------
    def tp_layout(self, group, busy=()) -> DecodeLayout:
        """Decode over `group` with each device's share in proportion to its bytes/s."""
        group = tuple(group)
        bw = self.bandwidths(group, busy)
        return DecodeLayout("tp", group, tuple(x / sum(bw) for x in bw))

    def plan_layout(self, plan: Plan) -> DecodeLayout:
        """Decode on a prefill plan's own split (colocated: the engine decodes on the loaded partition)."""
        group = tuple(self.index(d.name) for d in plan.devices)
        if plan.strategy == "pipeline":
            shares = [d.layers / self.cfg.n_layers for d in plan.devices]
            return DecodeLayout("chain", group, tuple(shares))
        if plan.strategy in ("local", "seqpar") or len(group) == 1:
            return self.tp_layout(group) if len(group) == 1 else DecodeLayout(
                "tp", group, tuple(1 / len(group) for _ in group))
        # tensor-parallel: each device reads the weights of its heads, columns and vocabulary rows
        w = [d.memory.weights_bytes for d in plan.devices]
        if sum(w) <= 0:
            w = [d.heads + d.mlp_cols for d in plan.devices]
        return DecodeLayout("tp", group, tuple(x / sum(w) for x in w))

    def decode_memory(self, layout: DecodeLayout, context: int) -> list[tuple[int, float, float]]:
        """(device, bytes its decode share needs, its memory) for a sequence of `context` positions."""
        return [(i, s * (self.weight_bytes + context * self.kv_token), float(self.cluster.devices[i].memory_bytes))
                for i, s in zip(layout.devices, layout.shares)]

    def fits(self, layout: DecodeLayout, context: int, extra: dict[int, float] | None = None) -> bool:
        """Whether every device holds its decode share and one sequence's KV (plus extra[i] bytes it
        holds for the prefill, mixed)."""
        extra = extra or {}
        return all(need + extra.get(i, 0.0) <= mem for i, need, mem in self.decode_memory(layout, context))

    def decode_s(self, layout: DecodeLayout, batch: int, context: int, busy=()) -> float:
        """One decode step of `batch` sequences holding `context` KV positions in all."""
        return self.decode_fn(layout, busy)(batch, context)

    def speedups(self, group, busy=()) -> list[float]:
        """How much faster than profiled each device of `group` computes while those of `busy` work (and the
        coordinator serves beside them: self.coordinator)."""
        busy = sorted(set(busy) | set(group))
        fast = dict(zip(busy, co_tenant_speedup(self.cluster.devices, busy, self.others)))
        return [fast[i] for i in group]

    def prefill_slowdown(self, group, busy) -> float:
        """How much longer than the solver's prediction a prefill on `group` takes while `busy` work and the
        coordinator serves: the solver prices a group at its profiled speed (its members all busy, as profiled),
        which a coordinator asking for cores on their machine lowers; the group waits for its slowest member."""
        if not self.others:
            return 1.0
        busy = sorted(set(busy) | set(group))
        served = dict(zip(busy, co_tenant_speedup(self.cluster.devices, busy, self.others)))
        bare = dict(zip(busy, co_tenant_speedup(self.cluster.devices, busy)))
        return max(1.0, max(bare[i] / served[i] for i in group))

    def decode_fn(self, layout: DecodeLayout, busy=()) -> Callable[[int, int], float]:
        """decode_s for one layout as a function of (batch, context), its constants computed once
        (the simulator calls it every step): per device its measured layers and head rows and its KV
        read (module docstring; bytes / bytes/s for a profile without decode timings), the slowest
        device (tp) or the sum of stages (chain), plus the all-reduces (tp) or hand-offs (chain) of
        batch x hidden values, the logits' way back and the engine's fixed cost of a step."""
        cfg = self.cfg
        bw = self.bandwidths(layout.devices, busy)
        fast = self.speedups(layout.devices, busy)
        attn_per_ctx = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim
        chain = layout.kind == "chain"
        last = max((k for k, s in enumerate(layout.shares) if s > 0), default=0)
        parts = []  # per device: a function of (batch, context) -> seconds
        reply = 0.0  # seconds per sequence for its logits (or greedy: its top-1) to come back, the slowest holder
        for k, (i, share, rate, f) in enumerate(zip(layout.devices, layout.shares, bw, fast)):
            d = self.cluster.devices[i]
            if chain and share <= 0:
                continue
            rows = cfg.vocab_size * (float(k == last) if chain else share)
            if rows > 0:
                back = TOP1_BYTES if self.greedy else rows * LOGIT_BYTES
                reply = max(reply, back * self.coordinator_link(i)[0])
            kv = share * self.kv_token / rate  # seconds per KV position of the batch's context
            if d.decode is None:
                parts.append(self._streamed_part(d, share, chain, rate, rows, kv, attn_per_ctx))
                continue
            layers = cfg.n_layers * (share if chain else 1.0)
            frac = 1.0 if chain else share  # of each layer this device runs
            t = d.decode
            fixed = min(t.layer_s, d.attention.overhead_s + d.mlp.overhead_s + 2 * d.connective.overhead_s)
            head = (d.head or d.mlp).seconds(head_flops(cfg, rows, 1)) if rows > 0 else 0.0
            scale = self.fmt_scale / f

            def part(batch: int, context: int, t=t, fixed=fixed, layers=layers, frac=frac, head=head,
                     scale=scale, kv=kv) -> float:
                layer = t.seconds(1, batch)
                grow = layer / t.layer_s
                return scale * (layers * (fixed + frac * (layer - fixed)) + head * grow) + context * kv

            parts.append(part)
        group = layout.devices
        stages = [i for i, s in zip(group, layout.shares) if s > 0]
        comm: dict[int, float] = {}

        def step(batch: int, context: int) -> float:
            if batch <= 0:
                return 0.0
            times = [p(batch, context) for p in parts]
            if batch not in comm:
                rows = batch * cfg.hidden * self.b
                comm[batch] = (sum(self._msg(a, b, rows) for a, b in zip(stages, stages[1:])) if chain
                               else (2 * cfg.n_layers + 1) * self.all_reduce_s(group, rows))
            return (sum(times) if chain else max(times)) + comm[batch] + batch * reply + self.step_overhead_s

        return step

    def _streamed_part(self, d: DeviceProfile, share: float, chain: bool, rate: float, rows: float, kv: float,
                       attn_per_ctx: float) -> Callable[[int, int], float]:
        """A device without decode timings (a profile before cache v7, a synthetic one): its share of
        the weight bytes at its streaming rate, or of the flops at its GEMM rate, whichever is slower, plus
        the fixed overheads of its blocks."""
        cfg = self.cfg
        layers = cfg.n_layers * (share if chain else 1.0)
        fixed = layers * (d.attention.overhead_s + d.mlp.overhead_s + 2 * d.connective.overhead_s)
        if rows > 0 or not chain:
            fixed += (d.head or d.mlp).overhead_s
        w, f_seq, f_ctx, gemm = share * self.weight_bytes, share * 2.0 * self.params, share * attn_per_ctx, \
            d.mlp.flops_per_s

        def part(batch: int, context: int) -> float:
            return max(w / rate + context * kv, (f_seq * batch + f_ctx * context) / gemm) + fixed

        return part

    def all_reduce_s(self, group, nbytes: float) -> float:
        """A decode all-reduce of nbytes per device: direct (everyone sends to everyone) up to 64 KiB,
        as collectives.all_reduce; a ring of reduce-scatter + all-gather beyond (2 (k-1) steps); at
        least the wait for a peer off-core when the group oversubscribes a machine (sync_s)."""
        k = len(group)
        if k < 2:
            return 0.0
        if nbytes <= DIRECT_ALLREDUCE_BYTES:
            wire = max(self._msg(i, j, nbytes) for i in group for j in group if i != j)
        else:
            step = max(self._msg(group[r], group[(r + 1) % k], nbytes / k) for r in range(k))
            wire = 2 * (k - 1) * step
        return max(wire, self.sync_s(group))

    def oversubscribed(self, group) -> list[str]:
        """Hosts on which the devices of `group` ask for more cores than the machine has (Tenancy)."""
        demand: dict[str, float] = {}
        cpus: dict[str, int] = {}
        for i in group:
            t = self.cluster.devices[i].tenancy
            if t is not None and t.host and t.host_cpus > 0 and t.cores > 0:
                demand[t.host] = demand.get(t.host, 0.0) + t.cores
                cpus[t.host] = t.host_cpus
        return [h for h, d in demand.items() if sum(1 for i in group if self._host(i) == h) > 1 and d > cpus[h]]

    def _host(self, i: int) -> str | None:
        t = self.cluster.devices[i].tenancy
        return t.host if t is not None else None

    def sync_s(self, group) -> float:
        """The least one collective of `group` costs for its processes to meet: OVERSUBSCRIBED_SYNC_S when
        some of them share a machine with fewer cores than their threads, else 0 (the link's latency)."""
        return OVERSUBSCRIBED_SYNC_S if len(group) > 1 and self.oversubscribed(group) else 0.0

    # --- prefill -----------------------------------------------------------------------------
    def sub_cluster(self, group) -> ClusterProfile:
        links = self.cluster.links
        return ClusterProfile([self.cluster.devices[i] for i in group],
                              [[links[i][j] if i < len(links) and j < len(links[i]) else None for j in group]
                               for i in group])

    def prefill_plan(self, group, tokens: int) -> Plan:
        """The solver's plan for a prompt of `tokens` on the devices of `group` (it may use fewer of
        them); a seqpar plan (no runtime) is re-solved as galaxy."""
        key = (tuple(sorted(group)), tokens)
        if key not in self._plans:
            sub = self.sub_cluster(key[0])
            plan = self._solve(self.cfg, tokens, sub)
            if plan.strategy not in RUN_WITH_ENGINE:
                plan = self._solve(self.cfg, tokens, sub, "galaxy" if len(key[0]) > 1 else "local")
            self._plans[key] = plan
        return self._plans[key]

    def prefill_curve(self, group, lengths) -> PrefillCurve:
        """Prefill seconds against prompt tokens on `group`, from the solver's plans at `lengths`."""
        pts = sorted({max(1, min(int(s), self.cfg.max_positions)) for s in lengths})
        return PrefillCurve(tuple((s, float(self.prefill_plan(group, s).latency_s)) for s in pts))

    # --- KV transfer ---------------------------------------------------------------------------
    def kv_shares(self, plan: Plan) -> dict[int, float]:
        """Share of a prompt's KV each device of a prefill plan computes (and would send)."""
        cfg, devs = self.cfg, plan.devices
        if plan.strategy in ("galaxy", "megatron"):
            share = [d.heads / cfg.n_heads for d in devs]
        elif plan.strategy == "pipeline":
            share = [d.layers / cfg.n_layers for d in devs]
        else:
            share = [1.0 / len(devs)] * len(devs)
        return {self.index(d.name): s for d, s in zip(devs, share)}

    def coordinator_link(self, i: int) -> tuple[float, float]:
        """(seconds per byte, latency) between device i and the coordinator: the profile measures links
        between devices only, so the device's own link is taken as its fastest measured one (on an
        emulated LAN every path of a device crosses its one shaped link; the coordinator's side is not
        shaped). A cluster of one device: the loopback's, free."""
        best = [self.link(i, j) for j in range(self.n) if j != i and self._has_link(i, j)]
        return min(best) if best else (0.0, 0.0)

    def _has_link(self, i: int, j: int) -> bool:
        links = self.cluster.links
        return i < len(links) and j < len(links[i]) and links[i][j] is not None and links[i][j].bandwidth_bps > 0

    def _pieces(self, plan: Plan, decode: DecodeLayout, tokens: int) -> list[tuple[int, int, float]]:
        """(sender, receiver, bytes) of a prompt's K/V: each sender's share split over the receivers by
        theirs; a part that already sits on its receiver (mixed) does not move."""
        total = tokens * self.kv_token
        return [(src, dst, total * s * r) for src, s in self.kv_shares(plan).items()
                for dst, r in zip(decode.devices, decode.shares) if dst != src and s * r > 0]

    def kv_move(self, plan: Plan, decode: DecodeLayout, tokens: int) -> KVMove:
        """A prompt's K/V move along self.kv_path, not overlapped with its prefill (KVMove)."""
        pieces = self._pieces(plan, decode, tokens)
        if self.kv_path.route == "direct":
            return KVMove(wire=self.transfer_s(plan, decode, tokens))
        sent: dict[int, float] = {}
        got: dict[int, float] = {}
        for src, dst, nbytes in pieces:
            sent[src] = sent.get(src, 0.0) + nbytes
            got[dst] = got.get(dst, 0.0) + nbytes

        def hop(per_device: dict[int, float]) -> float:  # one message after another, each a round trip
            total = 0.0
            for i, nbytes in per_device.items():
                a, lat = self.coordinator_link(i)
                total += nbytes * a + 2 * lat * -(-nbytes // KV_MESSAGE_BYTES)
            return total

        return KVMove(pull=hop(sent), push=hop(got))

    def transfer_s(self, plan: Plan, decode: DecodeLayout, tokens: int) -> float:
        """Seconds to move a prompt's K/V straight from the prefill plan's devices to the decode group
        (one hop, not overlapped): each sender's part split over the receivers by their shares, links in
        parallel, but no receiver taking in more than its fastest incoming link carries."""
        recv: dict[int, float] = {}
        worst = 0.0
        for src, dst, nbytes in self._pieces(plan, decode, tokens):
            worst = max(worst, self._msg(src, dst, nbytes))
            recv[dst] = recv.get(dst, 0.0) + nbytes
        for dst, nbytes in recv.items():
            fastest = min(self.link(src, dst)[0] for src in range(self.n) if src != dst and self._has_link(src, dst))
            worst = max(worst, nbytes * fastest)
        return worst

    def exposed_transfer_s(self, transfer: float, prefill: float) -> float:
        """The part of a transfer of `transfer` seconds that streaming it layer by layer behind a
        prefill of `prefill` seconds does not hide (module docstring)."""
        if transfer <= 0:
            return 0.0
        L = self.cfg.n_layers
        return max(transfer / L, transfer - prefill * (L - 1) / L)


@dataclass(frozen=True)
class PrefillCurve:
    """Prefill seconds at a few prompt lengths, linear between them and beyond (the end segments'
    lines: a fixed part and a per-token part), never below the first point's time in proportion."""

    points: tuple[tuple[int, float], ...]

    def __call__(self, tokens: int) -> float:
        pts = self.points
        if tokens <= 0:
            return 0.0
        if len(pts) == 1:
            s, t = pts[0]
            return t * tokens / s
        xs = [p[0] for p in pts]
        k = min(max(bisect.bisect_left(xs, tokens), 1), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[k - 1], pts[k]
        y = y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        if tokens < x0:  # below the smallest solved length: never below the line's fixed part
            y = max(y, y0 * tokens / x0)
        return max(y, 0.0)


@dataclass(frozen=True)
class Placement:
    """A candidate: the prefill plan (its devices run the prompts) and where decode runs."""

    kind: str  # colocated | disaggregated | mixed
    prefill: Plan
    decode: DecodeLayout
    prefill_devices: tuple[int, ...]

    @property
    def busy(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.prefill_devices) | set(self.decode.devices)))


def placements(pm: PhaseModel, input_len: int, context: int) -> tuple[list[Placement], list[str]]:
    """The placements worth simulating, O(N) prefill solves (the solver's own search inside each):

    - colocated: the solver's plan over the whole cluster, decoding on its own split;
    - mixed: that plan's prefill, decode on one of its devices that holds the model beside its shard;
    - disaggregated: decode on one device that holds the model (each in turn), prefill solved on
      the rest; when none holds it, on the fewest devices of the most bytes/s that do (and one more),
      prefill on the rest.
    Returns the candidates and why others were not (e.g. a device too small to decode alone)."""
    notes = []
    everyone = tuple(range(pm.n))
    full = pm.prefill_plan(everyone, input_len)
    full_group = tuple(pm.index(d.name) for d in full.devices)
    out = [Placement("colocated", full, pm.plan_layout(full), full_group)]
    singles = []
    for d in range(pm.n):
        lay = pm.tp_layout((d,), everyone)
        if pm.fits(lay, context):
            singles.append(d)
        else:
            notes.append(f"{pm.names([d])[0]} cannot decode alone: the weights and one sequence's KV need "
                         f"{pm.decode_memory(lay, context)[0][1] / 2**20:.0f} MiB, it has "
                         f"{pm.cluster.devices[d].memory_bytes / 2**20:.0f} MiB")
    weights = {pm.index(d.name): d.memory.weights_bytes for d in full.devices}
    for d in singles:
        if d in full_group and len(full_group) > 1:
            lay = pm.tp_layout((d,), everyone)
            if pm.fits(lay, context, {d: weights[d]}):
                out.append(Placement("mixed", full, lay, full_group))
            else:
                notes.append(f"{pm.names([d])[0]} cannot decode beside its prefill shard (memory)")
    groups = [(d,) for d in singles]
    if not singles:
        ranked = sorted(everyone, key=lambda i: (-pm.rate[i], i))
        for k in range(2, pm.n):
            lay = pm.tp_layout(tuple(sorted(ranked[:k])), everyone)
            if pm.fits(lay, context):
                groups += [tuple(sorted(ranked[:k]))] + ([tuple(sorted(ranked[:k + 1]))] if k + 1 < pm.n else [])
                break
    for g in groups:
        rest = tuple(i for i in everyone if i not in g)
        if not rest:
            continue
        try:
            plan = pm.prefill_plan(rest, input_len)
        except PlanError as e:
            notes.append(f"prefill without {'+'.join(pm.names(g))}: {e}")
            continue
        out.append(Placement("disaggregated", plan, pm.tp_layout(g, everyone),
                             tuple(pm.index(d.name) for d in plan.devices)))
    return out, notes


def phase_costs(pm: PhaseModel, p: Placement, lengths, max_batched_tokens: int = 256,
                max_running: int = 64) -> PhaseCosts:
    """The simulator's step costs of a placement (planner/simulate.py)."""
    busy = p.busy
    solved, slow = pm.prefill_curve(p.prefill_devices, lengths), pm.prefill_slowdown(p.prefill_devices, busy)
    curve = solved if slow == 1.0 else (lambda tokens: slow * solved(tokens))
    lay = p.decode
    decode = pm.decode_fn(lay, busy)

    if p.kind == "colocated":
        bw = sum(pm.bandwidths(lay.devices, busy))

        def colocated(tokens: int, batch: int, context: int) -> float:
            # the packed batch runs as one HMP pass of its tokens; the decodes also read their KV
            return curve(tokens + batch) + context * pm.kv_token / bw

        return PhaseCosts("colocated", curve, decode, colocated_s=colocated,
                          max_batched_tokens=max_batched_tokens, max_running=min(max_running, max_batched_tokens))
    moves: dict[int, KVMove] = {}

    def move(tokens: int) -> KVMove:
        if tokens not in moves:
            moves[tokens] = pm.kv_move(p.prefill, lay, tokens)
        return moves[tokens]

    alone = pm.decode_fn(lay, lay.devices)  # the prefill group idle: a co-tenant's cores are free
    extra = {}
    if p.kind == "disaggregated":
        extra["decode_contended_s"] = decode  # while the prefill group computes beside it
    if pm.kv_path.stream:  # streamed behind the prefill: what shows is a delay, off both loops
        def transfer(tokens: int, prefill: float) -> float:
            return pm.exposed_transfer_s(move(tokens).total, prefill)
    else:
        def transfer(tokens: int, prefill: float) -> float:
            return move(tokens).wire

        extra.update(pull_s=lambda tokens: move(tokens).pull, push_s=lambda tokens: move(tokens).push)
    return PhaseCosts(p.kind, curve, alone, transfer, max_batched_tokens=max_batched_tokens,
                      max_running=min(max_running, max_batched_tokens), **extra)
