"""`galaxy bench`: Galaxy against its baselines and the roofline, side by side (galaxy.bench does it)."""

from __future__ import annotations

import argparse

from ..bench import strategies as bench
from ..bench.suite import SuiteConfig, run_suite
from .args import add_cluster_args, add_model_args, ints, output_file, rates

EXAMPLES = """examples:
  galaxy bench --quick                                        < 2 minutes, 3 loopback workers, GPT-2 small
  galaxy bench --decode --plot docs/bench/hetero-bench.png    as root: the emulated heterogeneous trio
  galaxy bench --local 2 --strategies local,galaxy --seq-len 128,256 --json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="Galaxy against its baselines and the roofline, side by side", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_cluster_args(p, local_help="N plain loopback workers instead of an emulated LAN (no root needed)",
                     discover=False, transport=False)
    p.add_argument("--seq-len", type=ints, help="prompt lengths (default 256,512; --quick: 64)")
    p.add_argument("--bandwidth", type=rates, help="link rates to sweep on an emulated LAN, e.g. "
                   "1gbit,100mbit,50mbit (default that sweep; the first rate gets every --seq-len)")
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
    p.set_defaults(func=cmd_bench, transport="grpc")


def cmd_bench(args) -> int:
    report = run_suite(SuiteConfig(
        model=args.model, random_init=args.random_init, seed=args.seed, layers=args.layers, cluster=args.cluster,
        local=args.local, workers=tuple(args.workers) if args.workers else None, token=args.token, tls=args.tls,
        threads=args.threads, seq_lens=tuple(args.seq_len) if args.seq_len else None,
        bandwidths=tuple(args.bandwidth) if args.bandwidth else None, reps=args.reps,
        strategies=tuple(args.strategies) if args.strategies else None, quick=args.quick, calibrate=args.calibrate,
        decode=args.decode, backends=args.backends))
    if args.plot:
        bench.plot(report, args.plot)
    if args.json:
        print(bench.dumps(report))
    else:
        print(bench.table(report))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
