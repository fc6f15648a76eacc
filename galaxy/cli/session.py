"""From the device options of a subcommand (args.add_cluster_args) to an open Session: which workers,
which token, which split (a plan file, --weights, --strategy) and which wire formats."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from devices.emulate import cluster_endpoints
from planner.plan import Plan

from ..addresses import split_address
from ..errors import GalaxyError
from ..model.quant import parse_format
from ..parallel.compact import align_partition
from ..parallel.sharding import Partition, Strategy, weighted_partition
from ..runtime.api import Session, connect, default_weights_format, plan_partition, resolve_weights_format
from ..transport.discovery import discovered_addresses
from .args import progress

DEFAULT_LOCAL = 3


def read_plan(args) -> Plan | None:
    if not getattr(args, "plan", None):
        return None
    try:
        return Plan.from_json(Path(args.plan).read_text())
    except OSError as e:
        raise GalaxyError(f"--plan {args.plan}: {e.strerror}") from None


def endpoints(args) -> tuple[list[str] | None, str | None]:
    """Worker addresses (None: spawn local ones) and token; a plan picks its own devices."""
    if not hasattr(args, "_endpoints"):  # discovery listens for seconds: do it once
        args._endpoints = _find_endpoints(args)
    return args._endpoints


def _find_endpoints(args) -> tuple[list[str] | None, str | None]:
    token = args.token
    if getattr(args, "discover", None):
        progress(f"listening for workers of cluster {args.discover!r}")
        addresses = discovered_addresses(args.discover, timeout_s=3.0, expect=args.expect, token=token)
    elif getattr(args, "cluster", None):
        addresses, file_token = cluster_endpoints(args.cluster)
        token = token or file_token
    else:
        addresses = args.workers
    plan = read_plan(args)
    if plan is not None and addresses is None and getattr(args, "local", None) is None:
        remote = [a for a in plan.addresses() if not _loopback(a)]
        if remote:  # the plan was made for devices on the LAN: run there, not on local stand-ins
            progress(f"using the devices of {args.plan}: {', '.join(plan.addresses())}")
            return plan.addresses(), token
        # a plan made on local workers: their ports are gone with them, new ones take their place
    if plan is not None and addresses is not None:
        missing = [a for a in plan.addresses() if a not in addresses]
        if missing:
            raise GalaxyError(f"--plan {args.plan} uses devices {missing} that the cluster does not have "
                              f"({addresses}); re-plan with `galaxy plan`")
        addresses = plan.addresses()  # the plan may leave slow devices out
    return addresses, token


def wire_formats(args, n: int) -> list[list[str]] | None:
    """Per-link activation formats: --wire for every link, else the plan's, else None (fp32)."""
    if getattr(args, "wire", None):
        return [[args.wire] * n for _ in range(n)]
    plan = read_plan(args)
    return plan.wire() if plan is not None else None


def stream_flag(args) -> bool | None:
    return {"auto": None, "coordinator": True, "path": False}[getattr(args, "weights_from", "auto")]


def open_session(args, n: int) -> Session:
    recover = bool(getattr(args, "recover", False))
    if getattr(args, "transport", "grpc") == "inproc":
        if getattr(args, "workers", None) or getattr(args, "cluster", None) or getattr(args, "discover", None):
            raise GalaxyError("--transport inproc runs local threads; drop --workers/--cluster/--discover")
        return connect(local=n, transport="inproc")
    addresses, token = endpoints(args)
    if addresses is not None:
        return connect(addresses=addresses, token=token, tls=args.tls, recover=recover)
    progress(f"starting {n} local workers")
    return connect(local=n, token=token, threads=args.threads, tls=args.tls, recover=recover)


def _loopback(address: str) -> bool:
    host = split_address(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def device_count(args) -> int:
    plan = read_plan(args)
    if plan is not None:
        local = getattr(args, "local", None)
        if local is not None and local != len(plan.devices):
            raise GalaxyError(f"--local {local}, but {args.plan} splits the model over {len(plan.devices)} devices; "
                              f"use --local {len(plan.devices)} (or leave --local out), or re-plan")
        return len(plan.devices)
    addresses, _ = endpoints(args)
    n = len(addresses) if addresses is not None else (args.local if args.local is not None else DEFAULT_LOCAL)
    if n < 1:
        raise GalaxyError(f"--local {n}: need at least one device")
    return n


def weights_format_from_args(args, source) -> str:
    """The weights format a run loads in: --weights-format ("auto" resolved for the source), else its
    plan's, else the file's own (auto: int4 for the embedded Q4 GGUF, fp32 for float checkpoints) -- but
    fp32 for `--check`, whose 1e-4 comparison is the exact path's (int4's bf16 activations get a 5% bound),
    and for a bfloat16 dtype or another backend (runtime.api.default_weights_format)."""
    fmt = getattr(args, "weights_format", None)
    if fmt is None and getattr(args, "plan", None):
        fmt = Plan.from_json(Path(args.plan).read_text()).weights_format
    if fmt is None:
        fmt = "fp32" if getattr(args, "check", False) else default_weights_format(
            getattr(args, "dtype", "float32"), getattr(args, "backend", "torch"))
    return resolve_weights_format(fmt, source)


def partition_from_args(args, cfg, n: int, weights_format: str = "fp32") -> Partition | None:
    """The split a run asks for: its plan file, else --weights (an uneven Galaxy split), else None:
    the session sizes one by the devices' memory and speed (runtime.api.Session.load). Cut on the
    granules of `weights_format` (parallel.compact.align_partition)."""
    fmt = parse_format(weights_format)
    if getattr(args, "plan", None):
        return align_partition(cfg, plan_partition(args.plan, cfg, n), fmt)
    if args.weights is not None:
        if len(args.weights) != n:
            raise GalaxyError(f"--weights has {len(args.weights)} entries for {n} devices")
        if args.strategy != Strategy.GALAXY:
            raise GalaxyError("--weights shapes an uneven Galaxy split; drop it for megatron/pipeline")
        return align_partition(cfg, weighted_partition(cfg, args.weights), fmt)
    return None
