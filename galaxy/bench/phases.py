"""`galaxy bench serve --prefill-devices ... --decode-devices ...`: phase-separated serving against
colocated serving, side by side on the same requests in one run.

Colocated: one Engine over the prefill group's devices (prefill and decode both there, Galaxy's
HMP for prompts, tensor-parallel decode steps), or over `colocated`. Then a DisaggEngine per K/V path
asked for (`--kv-path`, planner/plan.py KV_PATHS), the same prefill group, each sequence's K/V moved
to the decode group after its prefill: "direct" (the default: each prefill device sends its boxes
straight to the decode devices, one hop, galaxy/engine/kv_direct.py; workers only, so in-process
groups get "coordinator" instead) and "coordinator" (pulled, then pushed: two hops). Streamed
(`--kv-stream`): a prompt of several chunks streams its K/V chunk by chunk while its later chunks are
prefilled (galaxy/engine/kv_stream.py; `--chunk-size` sets the chunks), through the coordinator.

Unloaded (one request at a time, `reps` times after one not counted, medians), the first tokens
split as the field splits them (Mooncake #62: PD TTFT = prefill + KV transfer + first decode):
- prefill: submission to the first token (the prefill group's steps; both placements);
- transfer: pulling the sequence's K/V from the prefill devices plus pushing them to the decode
  devices (through the coordinator), and of that busy time the part before the first token (hidden
  behind the prefill) and the time from the first token until the K/V were all on the decode group
  (exposed: what the second token waited for);
- first decode: from the K/V landing on the decode group to its first token;
- TPOT: time per output token after the first, and after the second (the decode group's steady state).
Loaded: the bench's workload (galaxy.bench.serve: closed loop or Poisson arrivals, or a sweep of
rates) on each placement, with the same summary (TTFT, TPOT, ITL percentiles, throughput), whether
the greedy outputs are identical, each run's SLO attainment and, over a sweep, each placement's
goodput. The objectives are multiples of the *colocated* placement's unloaded TTFT and TPOT (3x and
1.5x by default), as `galaxy plan --serve` sets them, so one set of absolute objectives judges both
placements. Each loaded run gets a fresh engine: the unloaded requests' prompts are the workload's
first ones (one seed), and a prefix cache left over from them would flatter the loaded TTFT.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, replace

from ..engine.disagg import DisaggConfig, DisaggEngine
from ..engine.engine import Engine, EngineConfig
from ..engine.generation import GenerationConfig
from ..engine.kv_direct import supported
from ..engine.kv_stream import StreamConfig
from ..parallel.executor import Executor
from .serve import ATTAINMENT_GOAL, Workload, goodput, requests, run_workload, summarise
from .serve import plot as serve_plot


def _unloaded(engine, specs) -> dict:
    """Each spec alone on `engine`; medians of the first tokens' parts and of TPOT."""
    parts: dict[str, list[float]] = {"ttft_s": [], "prefill_s": [], "transfer_s": [], "export_s": [], "import_s": [],
                                     "hidden_s": [], "exposed_s": [], "first_decode_s": [], "second_token_s": [],
                                     "tpot_s": [], "tpot_steady_s": []}
    for spec in specs:
        gen = engine.submit(list(spec.prompt), GenerationConfig(spec.output_len, stop_at_eos=False)).result()
        t = gen.token_times
        parts["ttft_s"].append(t[0])
        parts["prefill_s"].append(sum(s.seconds for s in gen.steps if s.phase == "prefill"))
        parts["second_token_s"].append(t[1])
        parts["tpot_s"].append(gen.per_token_s)
        parts["tpot_steady_s"].append((t[-1] - t[1]) / (len(t) - 2))
        h = gen.handoff
        if h is not None:
            parts["transfer_s"].append(h.transfer_s)
            parts["export_s"].append(h.export_s)
            parts["import_s"].append(h.import_s)
            parts["hidden_s"].append(h.hidden_s)
            parts["exposed_s"].append(h.exposed_s)
            parts["first_decode_s"].append(t[1] - h.adopted_s)
        else:
            parts["first_decode_s"].append(t[1] - t[0])
    out = {k: statistics.median(v) for k, v in parts.items() if v}
    out["kv_bytes"] = gen.handoff.nbytes if gen.handoff is not None else 0
    return out


def run_phase_bench(prefill: Executor, decode: Executor, cfg, tokenizer, workload: Workload,
                    engine: EngineConfig = EngineConfig(), reps: int = 3, progress=lambda msg: None,
                    rates: tuple[float, ...] = (), slo_ttft_x: float = 3.0, slo_tpot_x: float = 1.5,
                    colocated: Executor | None = None, kv_paths: tuple[str, ...] = ("direct",),
                    stream: bool = False) -> dict:
    """Colocated (an Engine on `colocated`, by default on `prefill`) against disaggregated
    (`prefill`, then `decode`), unloaded then under `workload` (or at each of `rates`, Poisson), on
    the same requests. A `colocated` executor of its own lets the baseline use every device when the
    disaggregated placement splits them (a trio: prefill on two, decode on the third). One disaggregated
    row per K/V path of `kv_paths` ("direct" becomes "coordinator" where the groups are in-process), and
    a streamed one with `stream`."""
    if workload.output_len < 3:
        raise ValueError(f"output_len={workload.output_len}: the steady TPOT needs at least 3 tokens")
    colocated = colocated or prefill
    makers = {"colocated": lambda: Engine(colocated, cfg, tokenizer, engine)}
    for path in kv_paths:
        if path == "direct" and not supported(prefill, decode):  # in-process executors: no second hop to save
            path = "coordinator"
        makers[path] = lambda path=path: DisaggEngine(prefill, decode, cfg, tokenizer, engine, engine,
                                                      DisaggConfig.for_path(path))
    if stream:
        makers["streamed"] = lambda: DisaggEngine(prefill, decode, cfg, tokenizer, engine, engine,
                                                  DisaggConfig(stream=StreamConfig(), direct=None))
    report = {"workload": asdict(workload), "engine": asdict(engine), "reps": reps,
              "prefill_devices": list(prefill.names), "decode_devices": list(decode.names),
              "colocated_devices": list(colocated.names),
              "unloaded": {}, "loaded": {}, "runs": []}
    probe = makers["colocated"]()
    max_len = probe.sched.cfg.max_model_len
    probe.close()
    alone = requests(replace(workload, num_requests=reps + 1, rate=float("inf"), concurrency=0, lengths="uniform",
                             range_ratio=0.0, shared_prefix=0), cfg.vocab_size, max_len)
    for name, make in makers.items():
        eng = make()
        try:
            # a warm-up, not counted (the first step allocates each device's KV pool), of a prompt of its own:
            # the measured ones must not find it in the prefix cache
            _unloaded(eng, alone[:1])
            progress(f"{name}: {reps} requests of {workload.input_len} + {workload.output_len} tokens, one at a time")
            report["unloaded"][name] = _unloaded(eng, alone[1:])
        finally:
            eng.close()
    base = report["unloaded"]["colocated"]
    slo_ttft, slo_tpot = slo_ttft_x * base["ttft_s"], slo_tpot_x * base["tpot_s"]
    report["slo"] = {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "ttft_x": slo_ttft_x, "tpot_x": slo_tpot_x}
    outputs: dict = {}
    for point in [replace(workload, rate=r, concurrency=0) for r in rates] or [workload]:
        specs = requests(point, cfg.vocab_size, max_len)
        label = f"{point.concurrency} clients" if point.concurrency else f"{point.rate:g} req/s"
        for name, make in makers.items():  # side by side: the same requests on each placement
            progress(f"{name}: {len(specs)} requests, {label}")
            eng = make()
            try:
                outcomes, duration = run_workload(eng, specs, point.concurrency)
                prompts = getattr(eng, "prefill", eng).sched.blocks.stats  # where the prompts ran
            finally:
                eng.close()
            row = summarise(outcomes, duration, slo_ttft, slo_tpot)
            row.update(placement=name, rate=point.rate, concurrency=point.concurrency, prefix_hit_rate=prompts.hit_rate)
            report["runs"].append(row)
            report["loaded"].setdefault(name, row)  # the first point's, as before the sweep
            outputs.setdefault(name, []).append([o.tokens for o in outcomes])
    report["goodput"] = goodput(report["runs"], key="placement")
    report["outputs_identical"] = all(o == outputs["colocated"] for o in outputs.values())
    return report


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def table(report: dict) -> str:
    w = report["workload"]
    u = report["unloaded"]
    lines = [f"prefill on {', '.join(report['prefill_devices'])}; decode on {', '.join(report['decode_devices'])} "
             f"(disaggregated); colocated on {', '.join(report['colocated_devices'])}; {w['input_len']}-token "
             f"prompts, {w['output_len']} tokens out",
             "", f"unloaded (median of {report['reps']}), ms:",
             "| placement | TTFT (its prefill steps) | K/V transfer (pull + push) | hidden / exposed | first decode "
             "| 2nd token at | TPOT | TPOT after the 2nd |", "|---|---|---|---|---|---|---|---|"]
    for name, x in u.items():
        transfer = (f"{_ms(x['transfer_s'])} ({_ms(x['export_s'])} + {_ms(x['import_s'])}, "
                    f"{x['kv_bytes'] / 1024:.0f} KiB)" if "transfer_s" in x else "-")
        split = f"{_ms(x['hidden_s'])} / {_ms(x['exposed_s'])}" if "hidden_s" in x else "-"
        lines.append(f"| {name} | {_ms(x['ttft_s'])} ({_ms(x['prefill_s'])}) | {transfer} | {split} | "
                     f"{_ms(x['first_decode_s'])} | {_ms(x['second_token_s'])} | {_ms(x['tpot_s'])} | "
                     f"{_ms(x['tpot_steady_s'])} |")
    slo = report["slo"]
    lines += ["", f"loaded ({w['num_requests']} requests each); objectives TTFT <= {_ms(slo['ttft_s'])} ms "
              f"({slo['ttft_x']:g}x), TPOT <= {_ms(slo['tpot_s'])} ms ({slo['tpot_x']:g}x) of colocated unloaded:",
              "| placement | load | tok/s | TTFT p50 / p90 ms | TPOT p50 / p90 ms | ITL p99 ms | SLO met | failed |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        load = f"{r['concurrency']} clients" if r["concurrency"] else (
            "all at once" if not math.isfinite(r["rate"]) else f"{r['rate']:g}/s")
        lines.append(f"| {r['placement']} | {load} | {r['output_throughput']:.1f} | {_ms(r['ttft_s']['median'])} / "
                     f"{_ms(r['ttft_s']['p90'])} | {_ms(r['tpot_s']['median'])} / {_ms(r['tpot_s']['p90'])} | "
                     f"{_ms(r['itl_s']['p99'])} | {100 * r['slo_attainment']:.0f}% | {r['failed']} |")
    if any(math.isfinite(r["rate"]) and not r["concurrency"] for r in report["runs"]):
        g = report["goodput"]
        lines.append(f"goodput (highest swept rate with >= {100 * ATTAINMENT_GOAL:.0f}% meeting both): "
                     + ", ".join(f"{name} {g.get(name, 0.0):g} req/s" for name in u))
    lines.append(f"\ngreedy outputs identical: {'yes' if report['outputs_identical'] else 'NO'}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """TTFT and TPOT percentiles and SLO attainment against the request rate, one line per placement."""
    def short(key: str) -> str:  # "device 0 'tx2' (10.77.1.11:50051)" -> "tx2"
        return "+".join(re.search(r"'([^']*)'", d).group(1) if "'" in d else d for d in report[key])

    link = f"; links {report['link_bps'] / 1e6:g} Mbit/s" if report.get("link_bps") else ""
    serve_plot(report, path, key="placement", suptitle=(
        f"disaggregated: prefill {short('prefill_devices')}, decode {short('decode_devices')}; colocated on "
        f"{short('colocated_devices')}{link}; objectives {report['slo']['ttft_x']:g}x TTFT, "
        f"{report['slo']['tpot_x']:g}x TPOT of colocated unloaded"))
