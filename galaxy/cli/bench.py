"""`galaxy bench`: Galaxy against its baselines and the roofline, side by side (galaxy.bench does it)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from contextlib import ExitStack
from dataclasses import replace

from devices.emulate import read_state, set_link_rate
from planner import scaling
from planner.plan import DEFAULT_KV_PATH, KV_PATHS

from ..bench import collectives as collective_bench
from ..bench import decode as decode_bench
from ..bench import kernel_survey, paged_kv, phases, serve_predicted, step_shapes
from ..bench import prefix as prefix_bench
from ..bench import serve as serve_bench
from ..bench import strategies as bench
from ..bench.serve import ServeBench, Workload, run_serve_bench
from ..bench.suite import SuiteConfig, bench_devices, run_suite
from ..engine.disagg import DisaggConfig, DisaggEngine
from ..errors import GalaxyError
from ..model.config import preset
from ..runtime.api import connect
from ..runtime.placement import device_indices
from ..runtime.sources import open_source
from .args import (
    add_cluster_args,
    add_model_args,
    floats,
    int_at_least,
    ints,
    output_file,
    progress,
    rates,
    weights_format,
)
from .serve import add_engine_args, engine_config, serve_placement
from .session import read_plan

EXAMPLES = """examples:
  galaxy bench --quick                                        < 2 minutes, 3 loopback workers, GPT-2 small
  galaxy bench --decode --plot docs/bench/hetero-bench.png    as root: the emulated heterogeneous trio
  galaxy bench --local 2 --strategies local,galaxy --seq-len 128,256 --json
  galaxy bench serve --rates 0.5,1,2,4 --plot docs/bench/serve.png   the serving engine against fifo
  galaxy bench serve --concurrency 8 --num-requests 32 --output-len 32
  galaxy bench serve --shared-prefix 512 --input-len 64 --compare-prefix-cache
  galaxy bench serve --local 4 --prefill-devices 0,1,2 --decode-devices 3 --concurrency 4 --num-requests 12
  galaxy bench serve --local 4 --prefill-devices 0,1,2 --decode-devices 3 --shared-prefix 2000 --input-len 16
      --output-len 8 --num-requests 6 --concurrency 3      a repeated document: first against repeats
  galaxy bench planner --sizes 4,8,16,32 --seeds 3 --exact-up-to 8   the solver's time and optimality gap
  galaxy bench decode                      one device: galaxy, the compact formats and llama.cpp, side by side
  galaxy bench decode --weights-format fp32,int4,int4-fp32 --threads 2 --local 3
  galaxy bench collectives --world 2,3 --reps 2000   one decode row's all-reduce through the TCP data plane
  galaxy bench collectives --cluster devices/clusters/homo-trio.yaml   the same across an emulated LAN (root)
  galaxy bench steps --local 3            one engine step's time by its decodes and prompt chunk, per device
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="Galaxy against its baselines and the roofline, side by side", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["strategies", "serve", "decode", "planner", "collectives", "steps"],
                   default="strategies",
                   help="strategies (default): prefill across strategies; serve: the serving engine under load; "
                   "decode: one device's decode and prefill per weight format beside llama.cpp, and each "
                   "format's accuracy (docs/decode-formats.md); planner: the solver's time and optimality gap on "
                   "synthetic clusters (no devices needed); collectives: the latency of one decode-sized all-reduce "
                   "through the TCP data plane on loopback (docs/collectives.md); steps: one engine step's time by its "
                   "decodes and prompt chunk, per device (docs/engine.md)")
    add_model_args(p)
    add_cluster_args(p, local_help="N plain loopback workers instead of an emulated LAN (no root needed)",
                     discover=False, transport=False)
    p.add_argument("--seq-len", type=ints, help="prompt lengths (default 256,512; --quick: 64)")
    p.add_argument("--bandwidth", type=rates, help="link rates to sweep on an emulated LAN, e.g. "
                   "1gbit,100mbit,50mbit (default that sweep; the first rate gets every --seq-len); bench serve: "
                   "one rate the emulated links are re-shaped to for the run")
    p.add_argument("--reps", type=int, help="timed repetitions per strategy, interleaved (default 3; quick 2)")
    p.add_argument("--strategies", type=lambda t: [x for x in t.split(",") if x],
                   help="subset of " + ",".join(bench.STRATEGIES))
    p.add_argument("--quick", action="store_true", help="a small model and one configuration (< 2 minutes)")
    p.add_argument("--layers", type=int, help="keep the first N layers of the model (default: 12 of "
                   "gpt2-large's 36 identical ones, to keep the default suite under 10 minutes)")
    p.add_argument("--calibrate", action="store_true",
                   help="refine Galaxy's split from the devices' measured busy times before timing")
    p.add_argument("--decode", action="store_true", help="also time generation: TTFT and per-token latency")
    p.add_argument("--backends", action="store_true", help="also time torch vs ONNX Runtime per block")
    p.add_argument("--plot", metavar="FILE.png|svg", type=output_file,
                   help="speed-up vs bandwidth and a per-layer timeline")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line of stdout")
    sv = p.add_argument_group("galaxy bench serve: the workload and what is compared")
    sv.add_argument("--rates", type=floats, help="request rates to sweep (req/s), e.g. 0.5,1,2,4 (default: all at "
                    "once)")
    sv.add_argument("--concurrency", type=int, default=0,
                    help="a closed loop of N clients, each sending its next request when the last ends")
    sv.add_argument("--num-requests", type=int, default=32, help="requests per run (default 32)")
    sv.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    sv.add_argument("--output-len", type=int, default=32, help="tokens generated per request (default 32)")
    sv.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)] (default 0)")
    sv.add_argument("--lengths", choices=["uniform", "lognormal"], default="uniform",
                    help="lognormal: Splitwise's conversation fits, clipped to the context")
    sv.add_argument("--shared-prefix", type=int, default=0,
                    help="tokens every prompt starts with (default 0); with --prefill-devices: a document of this "
                    "many tokens, asked about once alone and then --num-requests times more from --concurrency "
                    "clients (--input-len-token questions), first against repeats in each placement")
    sv.add_argument("--evict-docs", type=int, default=0, metavar="N",
                    help="with --shared-prefix and --prefill-devices: N other documents between the first request and "
                    "the repeats, then the first document back alone (evicted from a pool that --kv-blocks keeps too "
                    "small for them all; with --kv-spill-mib each placement also runs with the spill tier, with "
                    "--kv-pool-mib with the device-local pool)")
    sv.add_argument("--long-prompt-len", type=int, default=0,
                    help="one more client keeps sending prompts of this many tokens while the others stream: P99 ITL "
                    "against the unloaded TPOT (Sarathi-Serve's stall test; e.g. 1000)")
    sv.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals: 1 Poisson, < 1 bursty")
    sv.add_argument("--schedulers", type=lambda t: tuple(x for x in t.split(",") if x), default=("batch", "fifo"),
                    help="batch (continuous batching) and/or fifo (one request at a time) (default both)")
    sv.add_argument("--compare-prefix-cache", action="store_true", help="also run batch with the prefix cache off")
    sv.add_argument("--slo-admission", action="store_true",
                    help="also run batch with early rejection at the TTFT objective (batch+admission): rejected "
                    "requests counted apart, goodput with and without it side by side")
    sv.add_argument("--plan", metavar="PLAN.json", help="a plan from `galaxy plan --serve`: run its placement on its "
                    "objectives and print its predictions beside the measurements (default rates: the plan's and "
                    "0.8, 1, 1.25 x its predicted goodput)")
    add_engine_args(p)
    sv.add_argument("--serve-weights-format", type=weights_format, metavar="FORMAT",
                    help="how each device holds its linear weights in `bench serve` and `bench steps`, as `galaxy "
                    "serve --weights-format` (default: the --plan's, else auto: int4 for the embedded Q4 SmolLM2); "
                    "e.g. fp32 to match a plan priced in fp32")
    sv.add_argument("--slo-ttft", type=float, default=3.0, help="TTFT objective, x the unloaded TTFT (default 3)")
    sv.add_argument("--slo-tpot", type=float, default=1.5, help="TPOT objective, x the unloaded TPOT (default 1.5)")
    sv.add_argument("--prefill-devices", metavar="I,J,..", help="with --decode-devices: phase-separated serving "
                    "(prefill there, decode on the others) against colocated serving on the prefill devices, "
                    "side by side (galaxy.bench.phases; --reps: unloaded repetitions, default 3; --rates: a sweep, "
                    "with each placement's goodput and --plot)")
    sv.add_argument("--decode-devices", metavar="I,..", help="the decode group (see --prefill-devices)")
    sv.add_argument("--kv-path", type=kv_paths, metavar="direct|coordinator",
                    help="how K/V reach the decode group, as `galaxy serve --kv-path` (default: the plan's, else "
                    "direct); with --prefill-devices a comma list runs one disaggregated row per path, side by side")
    sv.add_argument("--kv-stream", action="store_true", help="with --prefill-devices: also a row whose chunked "
                    "prompts stream their K/V while prefilled (through the coordinator)")
    sv.add_argument("--colocated-devices", metavar="I,J,..", help="the colocated baseline's devices, loaded as a "
                    "session of their own beside the placement (default: the prefill group; e.g. every device of "
                    "the cluster, as a plain `galaxy serve` would use them)")
    pl = p.add_argument_group("galaxy bench planner: synthetic clusters (planner/scaling.py; --random-init PRESET "
                              "picks the model, default gpt2-large; --seq-len one length, default 256; --reps "
                              "solves timed per cluster, default 3)")
    pl.add_argument("--sizes", type=ints, help="cluster sizes in devices (default 4,5,6,7,8,12,16,24,32,48,64)")
    pl.add_argument("--seeds", type=int, default=10, help="synthetic clusters per size (default 10)")
    pl.add_argument("--exact-up-to", type=int, default=8,
                    help="largest cluster the exact search also solves, for the gap (default 8)")
    pl.add_argument("--brute-force", type=ints, default=[100, 20], metavar="TWO,THREE",
                    help="tiny clusters of two and three devices checked against brute force (default 100,20; 0,0 "
                    "skips)")
    pl.add_argument("--no-emulated", action="store_true", help="skip the emulated clusters' plans")
    pl.add_argument("--rings", type=int, default=0, help="random subsets whose ring orders are checked against every "
                    "order (default 0: skip)")
    dc = p.add_argument_group("galaxy bench decode: the engines compared (--threads: one count; default 1 and all "
                              "cores; --local N: also galaxy on N loopback workers)")
    dc.add_argument("--weights-format", type=lambda t: tuple(x for x in t.split(",") if x),
                    default=("fp32", "bf16", "int8", "int4"),
                    help="the compact decoder's weight formats, NAME[-ACT][-gGROUP][:HEAD] each, comma-separated: "
                    "fp32 bf16 fp16 int8 int8-int8 int4 int4-fp32 int4-g64 int4:bf16 ... (default fp32,bf16,int8,int4)")
    dc.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per run (default 64)")
    dc.add_argument("--prefill-tokens", type=int, default=256, help="prefill length (default 256)")
    dc.add_argument("--no-compile", action="store_true", help="eager decode steps only (no torch.compile)")
    dc.add_argument("--no-anchor", action="store_true", help="leave llama.cpp out even when it is installed")
    dc.add_argument("--no-galaxy", action="store_true", help="leave the galaxy engine path out")
    dc.add_argument("--no-accuracy", action="store_true", help="speed only")
    dc.add_argument("--decode-threads", type=_decode_threads_list, default=(0,), metavar="auto|N,..",
                    help="the galaxy rows' threads on a decode step, a row per value: auto (default: each device "
                    "measures its own at load) or a count, e.g. auto,2 for both side by side")
    co = p.add_argument_group("galaxy bench collectives: loopback ranks (--reps timed calls per case, default 2000)")
    co.add_argument("--world", type=ints, default=[2, 3], help="world sizes (default 2,3)")
    co.add_argument("--values", type=int, default=576, help="float32 values per all-reduce (default 576: SmolLM2's "
                    "hidden row)")
    co.add_argument("--algorithms", type=lambda t: tuple(x for x in t.split(",") if x),
                    default=collective_bench.ALGORITHMS, help="direct and/or ring (default both)")
    micro = p.add_argument_group("micro-benchmarks on this machine (instead of the suite)")
    micro.add_argument("--paged-attention", action="store_true",
                       help="paged attention on CPU: gather vs padded vs contiguous K/V (docs/paged_attention_cpu.md)")
    micro.add_argument("--attention-kernels", action="store_true",
                       help="the kernel choices inside the paged KV cache against their alternatives")
    micro.add_argument("--kernel-survey", action="store_true",
                       help="every candidate packed matmul of each weight format over a whole model's weights "
                       "(--random-init PRESET picks the shapes, default smollm2-135m)")
    p.set_defaults(func=cmd_bench, transport="grpc")


def cmd_bench(args) -> int:
    if args.what == "serve":
        return cmd_bench_serve(args)
    if args.what == "planner":
        return cmd_bench_planner(args)
    if args.what == "decode":
        return cmd_bench_decode(args)
    if args.what == "steps":
        return cmd_bench_steps(args)
    if args.what == "collectives":
        with ExitStack() as stack:
            lan = stack.enter_context(collective_bench.lan_of(args.cluster, progress)) if args.cluster else ()
            cfg = collective_bench.CollectiveBench(worlds=tuple(args.world), algorithms=args.algorithms,
                                                   values=args.values, reps=args.reps or 2000, lan=lan)
            report = collective_bench.run_collective_bench(cfg, progress=progress)
        print(bench.dumps(report) if args.json else collective_bench.table(report))
        return 0
    if args.kernel_survey:
        threads = _thread_counts(args)
        kernel_survey.survey(preset(args.random_init or "smollm2-135m"), threads=threads, reps=args.reps or 5)
        return 0
    if args.paged_attention or args.attention_kernels:
        paged_kv.report(threads=args.threads or 1, reps=args.reps or 21, quick=args.quick,
                        kernel_choices=args.attention_kernels)
        return 0
    report = run_suite(SuiteConfig(
        model=args.model, random_init=args.random_init, seed=args.seed, layers=args.layers, cluster=args.cluster,
        local=args.local, workers=tuple(args.workers) if args.workers else None, token=args.token, tls=args.tls,
        threads=args.threads, seq_lens=tuple(args.seq_len) if args.seq_len else None,
        bandwidths=tuple(args.bandwidth) if args.bandwidth else None, reps=args.reps,
        strategies=tuple(args.strategies) if args.strategies else None, quick=args.quick, calibrate=args.calibrate,
        decode=args.decode, backends=args.backends))
    return _emit(args, report, bench.table, bench.plot)


def _thread_counts(args) -> tuple[int, ...]:
    """The intra-op thread counts a kernel or decode bench compares: --threads, else 1 and every core."""
    return (args.threads,) if args.threads else tuple(sorted({1, os.cpu_count() or 1}))


def _decode_threads_list(text: str) -> tuple[int, ...]:
    """--decode-threads for bench decode: comma-separated "auto" (0: measured at load) or counts >= 1."""
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        out.append(0 if part == "auto" else int_at_least(1)(part))
    if not out:
        raise argparse.ArgumentTypeError("expected auto or thread counts, e.g. auto,2")
    return tuple(out)


def cmd_bench_steps(args) -> int:
    """One engine step's cost by shape on the devices (bench/step_shapes.py), the model as `bench serve` loads it."""
    sb = step_shapes.StepShapes(reps=args.reps or 15, seed=args.seed)
    with ExitStack() as stack:
        _, addresses, token = bench_devices(stack, args.local, args.workers, args.cluster, args.token, args.threads)
        session = stack.enter_context(connect(addresses=addresses, token=token, tls=args.tls))
        progress(f"loading the model on {len(addresses)} devices")
        lm = session.load(args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
                          decode_layout="split", weights_format=args.serve_weights_format)
        report = step_shapes.run_step_shapes(session.executor, lm.config.vocab_size, sb, progress=progress)
        report["devices"] = [d.name for d in session.devices()]
    return _emit(args, report, step_shapes.table, lambda report, path: progress("--plot: steps has no plot"))


def cmd_bench_decode(args) -> int:
    threads = _thread_counts(args)
    config = decode_bench.DecodeBench(
        formats=args.weights_format, threads=threads, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
        reps=args.reps or 3, compile=not args.no_compile, anchor=not args.no_anchor, galaxy=not args.no_galaxy,
        local=args.local or 0, accuracy=not args.no_accuracy, seed=args.seed, decode_threads=args.decode_threads)
    source = open_source(args.model, args.random_init, args.seed)
    with ExitStack() as stack:
        if args.cluster or args.workers:  # running or emulated devices: split, planner's layout, each alone
            _, addresses, token = bench_devices(stack, None, args.workers, args.cluster, args.token)
            config = dataclasses.replace(config, addresses=tuple(addresses), token=token)
        report = decode_bench.run_decode_bench(source, config, progress=progress)
    if args.plot:
        progress("--plot: the decode bench has no plot; its table is below")
    print(bench.dumps(report) if args.json else decode_bench.table(report))
    return 0


def cmd_bench_serve(args) -> int:
    if args.prefill_devices or args.decode_devices:
        return cmd_bench_phases(args)
    sb = ServeBench(
        Workload(num_requests=args.num_requests, concurrency=args.concurrency, burstiness=args.burstiness,
                 input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                 lengths=args.lengths, shared_prefix=args.shared_prefix, seed=args.seed,
                 long_prompt_len=args.long_prompt_len),
        rates=tuple(args.rates or ()), schedulers=args.schedulers,
        engine=engine_config(args),
        slo_ttft_x=args.slo_ttft, slo_tpot_x=args.slo_tpot, compare_prefix_cache=args.compare_prefix_cache,
        admission=args.slo_admission)
    plan = read_plan(args)
    local = args.local
    if plan is not None:
        sb, local = _planned(sb, plan, args)
    kv_path = _one_kv_path(args)  # bad arguments are told before any device is started or model loaded
    for name in sb.schedulers:
        serve_bench.scheduler_config(name, sb.engine)
    with ExitStack() as stack:
        emulated, addresses, token = bench_devices(stack, local, args.workers, args.cluster, args.token, args.threads)
        link_bps = _serve_links(stack, emulated, args.bandwidth)
        session = stack.enter_context(connect(addresses=addresses, token=token, tls=args.tls))
        progress(f"loading the model on {len(addresses)} devices")
        # the bench drives the session's executor itself: the colocated split unless the plan separates the
        # phases (decode_layout: runtime.decode_layout)
        lm = session.load(args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
                          plan=plan, decode_layout="split", kv_path=kv_path, weights_format=args.serve_weights_format)
        make = None
        if lm.groups:  # the plan separates the phases: the bench runs them as `galaxy serve --plan` would
            make = lambda ec: DisaggEngine(*lm.groups, lm.config, lm.tokenizer, ec, ec,  # noqa: E731
                                           DisaggConfig.for_path(lm.kv_path))
        report = run_serve_bench(session.executor, lm.config, lm.tokenizer, sb, progress=progress, make_engine=make)
        report["devices"] = [d.name for d in session.devices()]
        report["link_bps"] = link_bps
    if plan is not None:
        report["predicted_vs_measured"] = serve_predicted.compare(report, plan.serve, args.plan)
    return _emit(args, report, _serve_table, serve_bench.plot)


def _serve_table(report: dict) -> str:
    text = serve_bench.table(report)
    if "predicted_vs_measured" in report:
        text += "\n" + serve_predicted.table(report["predicted_vs_measured"])
    return text


def _planned(sb: ServeBench, plan, args) -> tuple[ServeBench, int | None]:
    """The bench on a `galaxy plan --serve` plan: its objectives, and (unless --rates) its rate and rates
    around its predicted goodput; the local workers it needs (a colocated plan: its own devices)."""
    serve = plan.serve
    if serve is None:
        raise GalaxyError(f"--plan {args.plan} has no serve section: make it with `galaxy plan --serve ... -o`")
    rates = sb.rates
    if not rates:
        g = serve.predicted.goodput_rps
        rates = tuple(sorted({round(r, 3) for r in (serve.rate, 0.8 * g, g, 1.25 * g) if r > 0}))
    local = args.local
    if serve.placement == "colocated" and not (args.workers or args.cluster):
        if args.local is not None and args.local != len(plan.devices):
            progress(f"--plan {args.plan}: a colocated plan on {len(plan.devices)} devices, so "
                     f"{len(plan.devices)} local workers (not --local {args.local})")
        local = len(plan.devices)
    return replace(sb, rates=rates, objectives_s=(serve.ttft_slo_s, serve.tpot_slo_s)), local


def _serve_links(stack: ExitStack, emulated: str | None, bandwidth) -> float | None:
    """`bench serve --bandwidth RATE`: the emulated cluster's links re-shaped to one rate for the run
    (and put back after it, if the cluster stays up). Returns the slowest link's rate in the run, None
    if the links are not shaped."""
    if not bandwidth:
        state = read_state(emulated) if emulated else None
        if not state or state.get("mode") != "emulated":  # loopback workers (`up` without root): not shaped
            return None
        return min((d["rate_bps"] for d in state["devices"] if d.get("rate_bps")), default=None)
    if emulated is None or len(bandwidth) != 1:
        raise GalaxyError("galaxy bench serve --bandwidth: one rate, on an emulated --cluster (got "
                          f"{len(bandwidth)} rate(s), {'an emulated cluster' if emulated else 'no emulated cluster'})")
    before = set_link_rate(emulated, bandwidth[0], progress=progress)
    stack.callback(set_link_rate, emulated, before, progress=progress)
    return bandwidth[0]


def cmd_bench_phases(args) -> int:
    placement = serve_placement(args)  # refuses one flag without the other
    workload = Workload(num_requests=args.num_requests, concurrency=args.concurrency, burstiness=args.burstiness,
                        input_len=args.input_len,
                        output_len=args.output_len, range_ratio=args.range_ratio, lengths=args.lengths, seed=args.seed)
    engine = engine_config(args)
    with ExitStack() as stack:
        emulated, addresses, token = bench_devices(stack, args.local, args.workers, args.cluster, args.token,
                                                   args.threads)
        link_bps = _serve_links(stack, emulated, args.bandwidth)
        session = stack.enter_context(connect(addresses=addresses, token=token, tls=args.tls))
        progress(f"loading the model on {len(addresses)} devices")
        lm = session.load(args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
                          placement=placement, weights_format=args.serve_weights_format)
        if args.shared_prefix:  # a long document asked about again and again: first against repeats
            report = prefix_bench.run_prefix_bench(
                *lm.groups, lm.config, lm.tokenizer, args.shared_prefix, args.input_len, args.output_len,
                repeats=args.num_requests, clients=args.concurrency or 1, engine=engine, seed=args.seed,
                progress=progress, evict_docs=args.evict_docs)
            report["link_bps"] = link_bps
            if args.plot:
                progress("--plot: the repeated-document bench has no plot; its table is below")
            print(bench.dumps(report) if args.json else prefix_bench.table(report))
            return 0
        colocated = None
        if args.colocated_devices:  # the baseline's own session on the same workers (a worker holds several)
            chosen = device_indices(args.colocated_devices, [d.name for d in session.devices()], addresses,
                                    "--colocated-devices")
            alone = stack.enter_context(connect(addresses=[addresses[i] for i in chosen], token=token, tls=args.tls))
            progress(f"loading the model on the colocated baseline's {len(chosen)} devices")
            alone.load(args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
                       decode_layout="split",  # the baseline is colocated: not a mixed placement of its own
                       weights_format=args.serve_weights_format)
            colocated = alone.executor
        report = phases.run_phase_bench(*lm.groups, lm.config, lm.tokenizer, workload, engine, reps=args.reps or 3,
                                        progress=progress, rates=tuple(args.rates or ()), slo_ttft_x=args.slo_ttft,
                                        slo_tpot_x=args.slo_tpot, colocated=colocated,
                                        kv_paths=args.kv_path or [DEFAULT_KV_PATH], stream=args.kv_stream)
        report["link_bps"] = link_bps
    return _emit(args, report, phases.table, phases.plot)


def kv_paths(text: str) -> tuple[str, ...]:
    """--kv-path direct,coordinator: K/V paths by name (planner/plan.py KV_PATHS), at least one."""
    out = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in out if x not in KV_PATHS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(KV_PATHS)}")
    return out


def _one_kv_path(args) -> str | None:
    if args.kv_path and len(args.kv_path) > 1:
        raise GalaxyError(f"--kv-path {','.join(args.kv_path)}: one path, except with --prefill-devices")
    return args.kv_path[0] if args.kv_path else None


def _emit(args, report: dict, table, plot) -> int:
    """The report as a table (or one JSON line with --json), and the plot if one was asked for."""
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(bench.dumps(report))
    else:
        print(table(report))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def cmd_bench_planner(args) -> int:
    if args.model:
        raise GalaxyError("galaxy bench planner: --model takes no file here; name a preset with --random-init")
    if args.seq_len and len(args.seq_len) != 1:
        raise GalaxyError(f"galaxy bench planner: --seq-len takes one length, got {len(args.seq_len)}")
    if len(args.brute_force) != 2:
        raise GalaxyError(f"--brute-force: two counts (two-device,three-device), got {len(args.brute_force)}")
    scaling.run(scaling.ScalingConfig(
        sizes=tuple(args.sizes) if args.sizes else scaling.ScalingConfig.sizes, seeds=args.seeds,
        exact_up_to=args.exact_up_to, repeats=args.reps or 3, model=args.random_init or "gpt2-large",
        seq_len=args.seq_len[0] if args.seq_len else 256, brute_force=tuple(args.brute_force),
        emulated=not args.no_emulated, rings=args.rings))
    return 0

