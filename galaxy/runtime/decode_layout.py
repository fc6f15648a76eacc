"""Where a loaded causal LM decodes: on its split over every device, on fewer, or on one (issue #20).

Prefill splits well over devices (HMP); decode reads every weight once per token and, split, pays
two all-reduces per layer: on three one-thread workers sharing two cores each waits for a peer the
scheduler has not run, and the split decoded SmolLM2 (int4) 4.7x slower than one device. So a load
that names no decode layout lets the planner choose by predicted ms/token: the devices are profiled
(planner.profiler, cached per device and model shape: about 3.5 s the first time on three loopback
workers, 0.3 s after), every layout is priced with planner.phases.PhaseModel for one sequence
decoding alone (planner.serving.decode_options: the split; the k devices of the most bytes/s; each
device alone), and the fastest whose devices' memory budgets hold it wins. A layout other than the
split is a mixed placement (runtime.placement, engine.disagg): every device still prefills on the
split, and the decode group holds its decode shard beside its prefill shard -- the memory check is
the workers' own model (parallel.memory.shard_need of both shards within the budget's room), and a
layout that fails it is no candidate.

`decode_layout`: "auto" (the API's and `galaxy serve`'s default), "split" (decode on the loaded
split, as before: what exactness tests pin) or a device (index, worker name or address) that decodes
holding the whole model. Auto keeps the split where nothing else can run or be priced: one device,
an encoder, in-process ranks (no profiles), a recovering cluster (it re-plans a colocated split),
per-link wire formats (one ring) and the ONNX backend; the line it says names the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from planner.phases import DecodeLayout, PhaseModel
from planner.plan import PlanError
from planner.profiler import profile_cluster
from planner.serving import DecodeChoice, choose_decode, decode_options

from ..errors import DeviceOutOfMemory, InvalidRequest
from ..model.config import ModelConfig
from ..model.transformer import DTYPES
from ..parallel import memory
from ..parallel.executor import LoadOptions
from ..parallel.sharding import Partition, Strategy, even_partition
from .placement import Placement, device_indices
from .recovery import ResilientCluster

log = logging.getLogger(__name__)

AUTO, SPLIT = "auto", "split"
PROFILE_TOKENS = 128  # the prompt length the devices' blocks are timed at (part of the profile cache's key)


@dataclass(frozen=True)
class DecodeDecision:
    """What a load decodes on: `placement` None for the loaded split, else the mixed placement (every
    device prefills on the split, `placement.decode` decodes); `line` says it, once, at load."""

    placement: Placement | None
    line: str
    choice: DecodeChoice | None = None

    @property
    def layout(self) -> str:
        return SPLIT if self.placement is None else "+".join(map(str, self.placement.decode))


def _split(why: str) -> DecodeDecision:
    return DecodeDecision(None, f"decode layout: split ({why})")


def check_decode_layout(value) -> str:
    """InvalidRequest unless `value` is "auto", "split" or a device (an index, worker name or address)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"decode_layout={value!r}: 'auto', 'split' or a device (index, worker name or address)")
    return value.strip()


def decode_partitions(cfg: ModelConfig, k: int) -> Partition:
    """The split a decode group of k devices loads (Placement.partitions without one given)."""
    return even_partition(cfg, k, Strategy.MEGATRON if k > 1 else Strategy.GALAXY).validate(cfg)


def memory_refusal(cfg: ModelConfig, infos, names, partition: Partition, decode: tuple[int, ...],
                   options: LoadOptions, file_bytes: int | None = None) -> str:
    """Why the devices of `decode` cannot hold their decode shard beside their prefill shard ("" if
    they can): per budgeted device, the prefill shard's weights, KV and pass (its load transient is
    over) plus the decode shard's whole need (parallel.memory.shard_need, as the worker admits a
    load) within memory.room of its budget beside what it holds."""
    params = options.memory_params
    seq = options.seq_len or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
    tokens = partition.tokens(seq) if partition.strategy.splits_tokens else [seq] * partition.world
    dec = decode_partitions(cfg, len(decode))
    for j, r in enumerate(decode):
        info = infos[r]
        if not info.memory_budget:
            continue
        pre = memory.shard_need(cfg, partition.spec(r, cfg), params, seq, tokens[r])
        spec = dec.spec(j, cfg)
        transient = memory.load_transient_bytes(cfg, spec, params, file_bytes, compact_push=file_bytes is None)
        need = memory.shard_need(cfg, spec, params, seq, seq, transient)
        total = pre.weights + pre.kv + pre.activations + need.total
        room = memory.room(info.memory_budget, info.rss - info.droppable)
        if total > room:
            return (f"{names[r]} needs {total / memory.MiB:.0f} MiB for both shards, its budget leaves "
                    f"{max(0, room) / memory.MiB:.0f} MiB")
    return ""


def split_layout(cfg: ModelConfig, partition: Partition, options: LoadOptions) -> DecodeLayout:
    """The loaded split as the phase model prices it: each device's share of the weight bytes it reads."""
    world = tuple(range(partition.world))
    if partition.strategy == Strategy.PIPELINE:
        return DecodeLayout("chain", world, tuple(n / cfg.n_layers for n in partition.layers))
    w = [memory.weight_bytes(cfg, partition.spec(r, cfg), options.memory_params) for r in world]
    return DecodeLayout("tp", world, tuple(x / sum(w) for x in w))


def decide(executor, cfg: ModelConfig, partition: Partition, options: LoadOptions, want: str,
           file_bytes: int | None = None, profile=profile_cluster, greedy: bool = True) -> DecodeDecision:
    """The decode layout of a load on `partition` (see the module docstring). `want`: "auto", "split"
    or a device; `profile(executor, cfg, seq_lens, dtype, show_progress=False)` -> ClusterProfile; greedy:
    the requests' tokens come back as top-1s (else as logit rows: planner/phases.py PhaseModel)."""
    want = check_decode_layout(want)
    if want == SPLIT:
        return _split("as asked")
    world = partition.world
    if want != AUTO:
        if not cfg.causal:
            raise InvalidRequest(f"decode_layout={want!r}: {cfg.name or cfg.family} is an encoder; it does not decode")
        if world < 2:
            return _split("one device")
        infos = executor.hello()
        names = [i.name for i in infos] or list(executor.names)
        (d,) = device_indices([want], names, list(getattr(executor, "addresses", [])), "decode_layout")
        if not 0 <= d < world:
            raise InvalidRequest(f"decode_layout={want!r}: no device {d} among {world}")
        why = memory_refusal(cfg, infos, names, partition, (d,), options, file_bytes)
        if why:
            raise DeviceOutOfMemory(f"decode_layout={want!r}: {why}; nothing was loaded")
        return DecodeDecision(Placement(tuple(range(world)), (d,), prefill_partition=partition),
                              f"decode layout: {names[d]} alone (as asked; it also prefills)")
    reason = _keep_split(executor, cfg, world, options)
    if reason:
        return _split(reason)
    infos = executor.hello()
    names = [i.name for i in infos]
    prof = profile(executor, cfg, [min(PROFILE_TOKENS, cfg.max_positions)], options.dtype, show_progress=False)
    fmt = options.weight_format
    pm = PhaseModel(cfg, prof, DTYPES[options.dtype].itemsize, fmt=None if fmt.name == "fp32" else fmt,
                    greedy=greedy)
    context = min(memory.DEFAULT_SEQ_LEN, options.seq_len or PROFILE_TOKENS, cfg.max_positions)
    split = split_layout(cfg, partition, options)

    def refuse(lay: DecodeLayout) -> str:
        return "" if lay is split else memory_refusal(cfg, infos, names, partition, lay.devices, options, file_bytes)

    try:
        choice = choose_decode(decode_options(pm, split, context, refuse))
    except PlanError as e:
        return _split(f"the planner could not price the others: {e}")
    placement = None
    if choice.chosen.layout is not split:
        placement = Placement(tuple(range(world)), choice.chosen.layout.devices, prefill_partition=partition)
    return DecodeDecision(placement, choice.line(), choice)


def _keep_split(executor, cfg: ModelConfig, world: int, options: LoadOptions) -> str:
    """Why auto cannot place decode elsewhere here ("" when it can)."""
    if not cfg.causal:
        return "an encoder does not decode"
    if world < 2:
        return "one device"
    if not hasattr(executor, "profile") or not hasattr(executor, "link_test"):
        return "in-process devices are not profiled"
    if isinstance(executor, ResilientCluster):
        return "a recovering cluster re-plans a colocated split"
    if options.wire is not None:
        return "wire formats are per link of one ring"
    if options.backend != "torch":
        return f"backend {options.backend!r}: phase separation runs torch shards"
    return ""
