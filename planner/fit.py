"""A plan whose memory the devices agree with: the solver's split, checked by the workers' own sum.

The solver fits weights + its linear activation estimate within each device's `memory_bytes`
(profile.py). The profiler sets that to `galaxy.parallel.memory.solver_room`, a bound under which
every split also passes the worker's admission -- safe, but pessimistic where the KV cache is a
large part of a shard. `fit_plan` solves with it, then relaxes each budgeted device's room
towards what its budget really leaves (`memory.room`) as far as the split the solver then picks
still passes the exact check, `memory.shard_need` within `memory.room(budget, resident)` with the
budget and resident memory the profile measured: the function the coordinator checks before a
push and the worker checks at its load. The plan's memory figures are that exact need.
"""

from __future__ import annotations

import dataclasses

from galaxy.model.config import ModelConfig
from galaxy.parallel import memory

from .plan import DeviceMemory, Plan, PlanError
from .profile import ClusterProfile
from .solver import solve

RELAX_STEPS = 5  # bisection steps between the safe room and the budget's whole room
PLAN_MARGIN = memory.RESIDENT_DRIFT  # kept free on every budgeted device, for the worker's drift until its load


def device_need(cfg: ModelConfig, plan: Plan, rank: int, params: memory.MemoryParams,
                transient: int = memory.PUSH_TRANSIENT) -> memory.ShardNeed:
    """What the worker at `rank` of the plan will admit its load by (galaxy.transport.worker)."""
    part = plan.to_partition(cfg)
    seq = plan.seq_len or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
    tokens = part.tokens(seq)[rank] if part.strategy.splits_tokens else seq
    spec = part.spec(rank, cfg)
    transient += memory.load_transient_bytes(cfg, spec, params) - memory.PUSH_TRANSIENT  # a bf16 load's own part
    return memory.shard_need(cfg, spec, params, seq, tokens, transient, seqpar=plan.strategy == "seqpar")


def misfits(cfg: ModelConfig, plan: Plan, cluster: ClusterProfile, params: memory.MemoryParams,
            margin: int = 0, transient: int = memory.PUSH_TRANSIENT) -> list[str]:
    """Devices of the plan whose budget its shard does not fit (with `margin` to spare), by the
    workers' own check."""
    return [f"{d.name} needs {need.total / memory.MiB:.0f} MiB ({need.describe()}), its budget leaves "
            f"{room / memory.MiB:.0f} MiB"
            for d, need, room in _budgeted(cfg, plan, cluster, params, transient) if need.total + margin > room]


def with_exact_memory(cfg: ModelConfig, plan: Plan, cluster: ClusterProfile, params: memory.MemoryParams,
                      transient: int = memory.PUSH_TRANSIENT) -> Plan:
    """The plan with each budgeted device's memory as the worker counts it: weights, then the KV
    cache, activations and a load's transient, within what its budget leaves beside the worker."""
    exact = {d.name: DeviceMemory(need.weights, need.total - need.weights, room)
             for d, need, room in _budgeted(cfg, plan, cluster, params, transient)}
    return dataclasses.replace(plan, devices=tuple(
        dataclasses.replace(d, memory=exact[d.name]) if d.name in exact else d for d in plan.devices))


def with_format_weights(cfg: ModelConfig, plan: Plan, params: memory.MemoryParams) -> Plan:
    """The plan with every device's weight bytes as it holds them in params' weights format (the
    budgeted ones have them already, from `with_exact_memory`); unchanged in fp32."""
    if params.compact is None:
        return plan
    part = plan.to_partition(cfg)
    return dataclasses.replace(plan, devices=tuple(
        dataclasses.replace(d, memory=dataclasses.replace(
            d.memory, weights_bytes=memory.weight_bytes(cfg, part.spec(r, cfg), params)))
        for r, d in enumerate(plan.devices)))


def _budgeted(cfg: ModelConfig, plan: Plan, cluster: ClusterProfile, params: memory.MemoryParams, transient: int):
    """(plan device, what the worker will count for it, the room its budget leaves) for each
    device of the plan that has a memory budget."""
    by_name = {d.name: d for d in cluster.devices}
    for r, d in enumerate(plan.devices):
        prof = by_name[d.name]
        if prof.budget_bytes:
            yield d, device_need(cfg, plan, r, params, transient), memory.room(prof.budget_bytes, prof.resident_bytes)


def fit_plan(cfg: ModelConfig, seq_len: int, cluster: ClusterProfile, strategy: str | None = None,
             dtype_bytes: int = 4, transient: int = memory.PUSH_TRANSIENT, method: str = "auto",
             weights_format: str = "fp32") -> Plan:
    """The solver's plan, with the devices' memory used as far as their budgets really allow.
    transient: a load's, as the profile's rooms were made with (profiler.profile_cluster).
    weights_format: how the devices hold their linears. The solver sizes weights at dtype_bytes (a compact
    format only needs less, so its split is safe); the exact check that relaxes it and the plan's memory
    figures hold the linears at their compact size (memory.MemoryParams.weights_format)."""
    params = memory.MemoryParams.for_dtype(dtype_bytes, weights_format)
    full = [max(d.memory_bytes, memory.room(d.budget_bytes, d.resident_bytes) - PLAN_MARGIN) if d.budget_bytes
            else d.memory_bytes for d in cluster.devices]
    try:
        safe = solve(cfg, seq_len, cluster, strategy, dtype_bytes, method=method)
    except PlanError as e:  # the safe rooms may hold too little (a full-logits reply charged to every weight):
        if full == [d.memory_bytes for d in cluster.devices]:  # the relaxed ones, checked exactly, may not
            raise
        safe, refused = None, e
    else:
        safe = dataclasses.replace(safe, weights_format=weights_format)
        bad = misfits(cfg, safe, cluster, params, transient=transient)
        if bad:  # solver_room is a proof that this cannot happen: say so loudly if it does
            raise PlanError("the planned split does not fit the devices' memory budgets: " + "; ".join(bad))
        if full == [d.memory_bytes for d in cluster.devices]:
            return with_format_weights(cfg, with_exact_memory(cfg, safe, cluster, params, transient), params)
    best, lo, hi = safe, 0.0, 1.0
    for _ in range(RELAX_STEPS):
        mid = (lo + hi) / 2
        devices = [dataclasses.replace(d, memory_bytes=int(d.memory_bytes + mid * (f - d.memory_bytes)))
                   for d, f in zip(cluster.devices, full)]
        try:
            plan = solve(cfg, seq_len, dataclasses.replace(cluster, devices=devices), strategy, dtype_bytes,
                         method=method)
        except PlanError:
            hi = mid
            continue
        plan = dataclasses.replace(plan, weights_format=weights_format)
        if misfits(cfg, plan, cluster, params, PLAN_MARGIN, transient):
            hi = mid
            continue
        lo = mid
        faster = plan.latency_s is not None and (best is None or best.latency_s is None
                                                 or plan.latency_s <= best.latency_s)
        if best is None or faster:
            best = plan
    if best is None:
        raise refused
    return with_format_weights(cfg, with_exact_memory(cfg, best, cluster, params, transient), params)
