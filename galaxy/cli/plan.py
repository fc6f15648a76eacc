"""`galaxy plan`: profile the devices and solve the split (planner/ does the work; this prints it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from devices.spec import load_cluster
from planner import render, serving
from planner import wire as wire_choice
from planner.cost import weight_bytes
from planner.fit import fit_plan
from planner.phases import COORDINATOR_CORES, Coordinator, KVPath, PhaseModel
from planner.plan import DEFAULT_KV_PATH, KV_PATHS
from planner.profile import ClusterProfile
from planner.profiler import HostLoad, profile_cluster, shape_key
from planner.solver import METHODS
from planner.strategy import RUNNABLE
from planner.synthetic import synthetic_cluster

from ..engine.engine import EngineConfig
from ..errors import GalaxyError
from ..model.quant import parse_format
from ..model.transformer import DTYPES
from ..parallel.sharding import full_spec
from ..runtime.api import default_weights_format, resolve_weights_format
from ..runtime.sources import open_source
from ..transport.resources import host_id
from ..units import fmt_bytes
from .args import add_cluster_args, add_model_args, add_weights_format_arg, int_at_least, number_in, output_file, size
from .session import device_count, open_session

EXAMPLES = """examples:
  galaxy plan --local 3 --random-init gpt2-large --seq-len 256 -o plan.json --png plan.png
  galaxy plan --cluster devices/clusters/hetero-trio.yaml --wire auto -o plan.json
  galaxy run --random-init gpt2-large --seq-len 256 --plan plan.json --check
  galaxy plan --local 3 --weights-format int4 -o plan.json     memory sized for int4 linears; run loads in it
  galaxy plan --synthetic 32 --seed 1 --random-init gpt2-large     a seeded 32-device cluster, no workers needed
  galaxy plan --serve --cluster devices/clusters/hetero-trio.yaml --rate 0.5 --input-len 128 -o plan.json
      where prefill and decode run (colocated, disaggregated or mixed), by simulated goodput
  galaxy plan --serve --synthetic 6 --random-init smollm2-135m --ttft-slo 2 --tpot-slo 50ms
"""


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help="profile the devices and solve the split", epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(plan)
    add_cluster_args(plan, local_help="plan for N local workers (default 3)", transport=False)
    plan.add_argument("--seq-len", type=int, default=256, help="tokens to plan the prefill for (default 256)")
    plan.add_argument("--memory-budget", type=size, metavar="SIZE",
                      help="cap every device's memory for the shard, e.g. 2GB")
    plan.add_argument("--strategy", choices=["auto", *map(str, RUNNABLE)], default="auto",
                      help="force a strategy (default: the fastest predicted)")
    plan.add_argument("--synthetic", type=int_at_least(1), metavar="N",
                      help="plan for N seeded synthetic devices (planner/synthetic.py: mixed speeds, memories, links "
                      "and co-tenants; --seed picks the cluster) instead of profiling workers")
    plan.add_argument("--method", choices=METHODS, default="auto",
                      help="how to search the devices: exact (every subset, exponential), heuristic (polynomial), "
                      "auto (default: exact up to 3 devices, heuristic beyond)")
    plan.add_argument("--reprofile", action="store_true", help="ignore cached device profiles")
    plan.add_argument("--wire", choices=["fp32", "bf16", "fp16", "int8", "auto"], default="fp32",
                      help="activation format on the links: fp32 exact (default), a lossy format everywhere, or "
                           "auto: per link from its measured bandwidth and the devices' codec speed")
    add_weights_format_arg(plan)
    serve = plan.add_argument_group("phase placement (--serve): where prefill and decode run, chosen by "
                                    "simulating the serving engine (docs/planner.md, Phase placements)")
    serve.add_argument("--serve", action="store_true",
                       help="choose a placement of the two phases (colocated, disaggregated, mixed) for a workload; "
                            "the plan's devices prefill, its serve section says where decode runs")
    serve.add_argument("--rate", type=number_in(0.0, low_open=True), default=1.0,
                       help="requests/s, Poisson (default 1)")
    serve.add_argument("--input-len", type=int_at_least(1), help="prompt tokens (default: --seq-len)")
    serve.add_argument("--output-len", type=int_at_least(1), default=32, help="generated tokens (default 32)")
    serve.add_argument("--ttft-slo", type=objective, default="3x", metavar="SECONDS|Nx",
                       help="time-to-first-token objective: seconds (2, 500ms) or a multiple of the colocated "
                            "placement's unloaded TTFT (default 3x, as galaxy bench serve)")
    serve.add_argument("--tpot-slo", type=objective, default="1.5x", metavar="SECONDS|Nx",
                       help="time-per-output-token objective, the same way (default 1.5x)")
    serve.add_argument("--max-batched-tokens", type=int_at_least(1), default=EngineConfig.max_batched_tokens,
                       help="the engine's token budget per step (default %(default)s, as galaxy serve)")
    serve.add_argument("--kv-path", choices=KV_PATHS, default=DEFAULT_KV_PATH,
                       help="how K/V reach the decode group: direct (one hop, device to device: the runtime's "
                            "default; default) or through the coordinator (two hops: `galaxy serve --kv-path "
                            "coordinator`); the plan's serve section records it and `galaxy serve --plan` takes it")
    serve.add_argument("--kv-stream", action="store_true",
                       help="K/V streamed while the prompt is prefilled (the runtime's opt-in streaming)")
    serve.add_argument("--sampling", choices=("greedy", "sampled"), default="greedy",
                       help="greedy (default, as `galaxy bench serve` and the Python API): a decode step returns each "
                            "sequence's top-1, not its logits; sampled: the logit rows come back (the OpenAI "
                            "endpoint's temperature 1 when a request sets none)")
    serve.add_argument("--sim-requests", type=int_at_least(10), default=200,
                       help="requests per simulated run (default 200)")
    serve.add_argument("--sweep-rates", type=rate_list, default=(), metavar="R1,R2,...",
                       help="also simulate every candidate at these rates (a bench's --rates), on the same objectives")
    plan.add_argument("--profile-out", metavar="PROFILE.json", type=output_file,
                      help="write the cluster profile the plan was made from (to plan again on it: --profile-in)")
    plan.add_argument("--profile-in", metavar="PROFILE.json",
                      help="plan on a profile written by --profile-out instead of profiling the workers")
    plan.add_argument("-o", "--output", metavar="PLAN.json", type=output_file, help="write the plan file")
    plan.add_argument("--svg", metavar="FILE.svg", type=output_file, help="draw the plan")
    plan.add_argument("--png", metavar="FILE.png", type=output_file, help="draw the plan")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan, transport="grpc")


def rate_list(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected rates in requests/s, e.g. 0.1,0.2,0.3") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be positive requests/s")
    return rates


def objective(text: str) -> serving.Objective:
    try:
        return serving.Objective.parse(text)
    except GalaxyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serve_plan(args, cfg, cluster, dtype_bytes: int, weights_format: str):
    """--serve: every phase placement simulated under the workload; prints the table, returns the plan."""
    if args.strategy != "auto":
        raise GalaxyError("--serve chooses each group's strategy itself; leave out --strategy")
    input_len = args.input_len or args.seq_len
    if input_len + args.output_len > cfg.max_positions:
        raise GalaxyError(f"--input-len {input_len} + --output-len {args.output_len} exceed the model's "
                          f"{cfg.max_positions} positions")
    goals = serving.ServeGoals(args.rate, input_len, args.output_len, args.ttft_slo, args.tpot_slo,
                               num_requests=args.sim_requests, seed=args.seed,
                               max_batched_tokens=args.max_batched_tokens,
                               max_running=min(64, args.max_batched_tokens), sweep=args.sweep_rates)

    def solver(c, tokens, sub, strategy=None):
        return fit_plan(c, tokens, sub, strategy, dtype_bytes, method=args.method, weights_format=weights_format)

    fmt = parse_format(weights_format) if weights_format != "fp32" else None  # None: the dtype's own bytes
    # the coordinator serves from this machine: beside devices on it, one more co-tenant (phases.Coordinator)
    pm = PhaseModel(cfg, cluster, dtype_bytes, fmt=fmt, solver=solver, kv_path=KVPath(args.kv_path, args.kv_stream),
                    greedy=args.sampling == "greedy", coordinator=Coordinator(host_id(), COORDINATOR_CORES))
    choice = serving.choose(pm, goals)
    return choice.plan(goals), serving.table(choice)


def _check_budget(cfg, n: int, budget: int, dtype_bytes: int) -> None:
    """Refuse a --memory-budget the devices could not meet whatever the split, before profiling them.

    Every strategy stores each weight at least once somewhere, so n devices of `budget` bytes hold a
    model only if n * budget is at least its weights; the solver then accounts for activations and
    for what every device keeps a copy of."""
    weights = weight_bytes(cfg, full_spec(cfg), dtype_bytes)
    if n * budget >= weights:
        return
    raise GalaxyError(f"--memory-budget {fmt_bytes(budget)} per device is too small for {cfg.name}: its weights "
                      f"alone are {fmt_bytes(weights)}, and {n} devices x {fmt_bytes(budget)} = "
                      f"{fmt_bytes(n * budget)} hold {100 * n * budget / weights:.1f}% of them; give each device "
                      f"at least {fmt_bytes(weights / n)} (more for activations and the parts every device keeps "
                      "a copy of), or add devices")


def _capped(prof: ClusterProfile, budget: int | None) -> ClusterProfile:
    """Every device's memory capped by --memory-budget (a profile made without workers, or read from a file)."""
    if budget is None:
        return prof
    return dataclasses.replace(prof, devices=[dataclasses.replace(d, memory_bytes=min(d.memory_bytes, budget))
                                              for d in prof.devices])


def _shape(cfg, args) -> dict:
    """What a profile's timings depend on (planner/profiler.shape_key, as the profile cache keys them), recorded in
    --profile-out; seq_lens left out: the compute models are fitted over the token count, so another --seq-len
    may plan on the same profile."""
    return {k: v for k, v in shape_key(cfg, [args.seq_len], args.dtype).items() if k != "seq_lens"}


def _profile_in(args, cfg) -> ClusterProfile:
    """The profile --profile-in names, refused (GalaxyError naming the file and what is wrong) when it is not one
    --profile-out wrote, was profiled for another model shape, or comes with options it would silently ignore."""
    given = [f"--{o}" for o in ("synthetic", "local", "workers", "cluster", "discover", "reprofile")
             if getattr(args, o, None)]
    if given:
        raise GalaxyError(f"--profile-in plans on a saved profile, not on devices; leave out {', '.join(given)}")
    path = args.profile_in
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise GalaxyError(f"--profile-in {path}: cannot read it ({e.strerror or e})") from None
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("devices"), list):
            raise ValueError("expected a JSON object with a list of devices")
        prof = ClusterProfile.from_json(text)
        if not prof.devices:
            raise ValueError("it lists no device")
    except KeyError as e:
        raise GalaxyError(f"--profile-in {path}: not a profile written by --profile-out (missing field {e})") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise GalaxyError(f"--profile-in {path}: not a profile written by --profile-out ({e})") from None
    want, got = _shape(cfg, args), d.get("shape")
    if got is not None and got != want:
        diff = ", ".join(f"{k} {got.get(k)!r} there, {want[k]!r} here" for k in want if got.get(k) != want[k])
        raise GalaxyError(f"--profile-in {path}: profiled for another model shape ({diff}); profile this model "
                          "(leave out --profile-in) or use a profile written for it")
    return _capped(prof, args.memory_budget)


def _synthetic(args):
    """The seeded synthetic cluster --synthetic asks for (profiles, not devices: nothing is started),
    each budget capped by --memory-budget."""
    given = [f"--{o}" for o in ("local", "workers", "cluster", "discover") if getattr(args, o, None)]
    if given:
        raise GalaxyError(f"--synthetic plans for made-up devices; leave out {', '.join(given)}")
    return _capped(synthetic_cluster(args.synthetic, args.seed), args.memory_budget)


def cmd_plan(args) -> int:
    source = open_source(args.model, args.random_init, args.seed)
    cfg = source.config
    if not 1 <= args.seq_len <= cfg.max_positions:
        raise GalaxyError(f"--seq-len {args.seq_len} outside 1..{cfg.max_positions}")
    saved = _profile_in(args, cfg) if args.profile_in else None
    n = args.synthetic if args.synthetic is not None else len(saved.devices) if saved else device_count(args)
    if args.memory_budget is not None:
        _check_budget(cfg, n, args.memory_budget, DTYPES[args.dtype].itemsize)
    if args.synthetic is not None:
        prof = _synthetic(args)
    elif saved is not None:
        prof = saved
    else:
        budgets = {}
        if args.cluster:
            budgets = {d.name: d.memory for d in load_cluster(args.cluster).devices if getattr(d, "memory", None)}
        with open_session(args, n) as session:
            prof = profile_cluster(session.executor, cfg, [args.seq_len], args.dtype,
                                   memory_budget=args.memory_budget, budgets=budgets, reprofile=args.reprofile,
                                   host_load=HostLoad.now(host_id()))
    if args.profile_out:
        Path(args.profile_out).write_text(json.dumps({**json.loads(prof.to_json()), "shape": _shape(cfg, args)},
                                                     indent=1))
    n_prof = len(prof.devices)
    wire = wire_choice.choose(prof) if args.wire == "auto" else [[args.wire] * n_prof for _ in range(n_prof)]
    serve_table = None
    weights_format = resolve_weights_format(args.weights_format or default_weights_format(args.dtype), source)
    if args.serve:
        plan, serve_table = _serve_plan(args, cfg, wire_choice.effective(prof, wire), DTYPES[args.dtype].itemsize,
                                        weights_format)
    else:
        plan = fit_plan(cfg, args.seq_len, wire_choice.effective(prof, wire),
                        None if args.strategy == "auto" else args.strategy, DTYPES[args.dtype].itemsize,
                        method=args.method, weights_format=weights_format)
    if args.wire != "fp32":
        plan = plan.with_wire(wire, [d.name for d in prof.devices])
    if args.output:
        Path(args.output).write_text(plan.to_json())
    for path in (args.svg, args.png):
        if path:
            render.draw(plan, path)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        if serve_table:
            print(serve_table + "\n\nprefill plan:")
        print(render.table(plan))
        for what, path in (("plan", args.output), ("drawing", args.svg), ("drawing", args.png)):
            if path:
                print(f"{what} written to {path}")
    return 0
