"""`galaxy bench serve --prefill-devices ... --decode-devices ...`: phase-separated serving against
colocated serving, side by side on the same requests in one run.

Colocated: one Engine over the prefill group's devices (prefill and decode both there, Galaxy's
HMP for prompts, tensor-parallel decode steps). Disaggregated: a DisaggEngine, the same prefill
group, then each sequence's K/V moved to the decode group after its prefill (galaxy/engine/disagg.py).
Streamed: the same, but a prompt of several chunks streams its K/V chunk by chunk while its later
chunks are prefilled (galaxy/engine/kv_stream.py; `--chunk-size` sets the chunks).

Unloaded (one request at a time, `reps` times after one not counted, medians), the first tokens
split as the field splits them (Mooncake #62: PD TTFT = prefill + KV transfer + first decode):
- prefill: submission to the first token (the prefill group's steps; both placements);
- transfer: pulling the sequence's K/V from the prefill devices plus pushing them to the decode
  devices (through the coordinator), and of that busy time the part before the first token (hidden
  behind the prefill) and the time from the first token until the K/V were all on the decode group
  (exposed: what the second token waited for);
- first decode: from the K/V landing on the decode group to its first token;
- TPOT: time per output token after the first, and after the second (the decode group's steady state).
Loaded: the bench's workload (galaxy.bench.serve: closed loop or Poisson arrivals) on each
placement, with the same summary (TTFT, TPOT, ITL percentiles, throughput) and whether the greedy
outputs are identical.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace

from ..engine.disagg import DisaggConfig, DisaggEngine
from ..engine.engine import Engine, EngineConfig
from ..engine.generation import GenerationConfig
from ..engine.kv_stream import StreamConfig
from ..parallel.executor import Executor
from .serve import Workload, requests, run_workload, summarise


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
                    engine: EngineConfig = EngineConfig(), reps: int = 3, progress=lambda msg: None) -> dict:
    """Colocated (an Engine on `prefill`) against disaggregated (`prefill`, then `decode`), unloaded
    then under `workload`, on the same requests."""
    if workload.output_len < 3:
        raise ValueError(f"output_len={workload.output_len}: the steady TPOT needs at least 3 tokens")
    makers = {"colocated": lambda: Engine(prefill, cfg, tokenizer, engine),
              "disaggregated": lambda: DisaggEngine(prefill, decode, cfg, tokenizer, engine, engine,
                                                    DisaggConfig()),
              "streamed": lambda: DisaggEngine(prefill, decode, cfg, tokenizer, engine, engine,
                                               DisaggConfig(stream=StreamConfig()))}
    report = {"workload": asdict(workload), "engine": asdict(engine), "reps": reps,
              "prefill_devices": list(prefill.names), "decode_devices": list(decode.names),
              "unloaded": {}, "loaded": {}}
    probe = makers["colocated"]()
    max_len = probe.sched.cfg.max_model_len
    probe.close()
    alone = requests(replace(workload, num_requests=reps + 1, rate=float("inf"), concurrency=0, lengths="uniform",
                             range_ratio=0.0, shared_prefix=0), cfg.vocab_size, max_len)
    specs = requests(workload, cfg.vocab_size, max_len)
    outputs = {}
    for name, make in makers.items():
        eng = make()
        try:
            # a warm-up, not counted (the first step allocates each device's KV pool), of a prompt of its own:
            # the measured ones must not find it in the prefix cache
            _unloaded(eng, alone[:1])
            progress(f"{name}: {reps} requests of {workload.input_len} + {workload.output_len} tokens, one at a time")
            report["unloaded"][name] = _unloaded(eng, alone[1:])
            label = f"{workload.concurrency} clients" if workload.concurrency else f"{workload.rate:g} req/s"
            progress(f"{name}: {len(specs)} requests, {label}")
            outcomes, duration = run_workload(eng, specs, workload.concurrency)
        finally:
            eng.close()
        row = summarise(outcomes, duration, float("inf"), float("inf"))
        del row["slo_attainment"]
        report["loaded"][name] = row
        outputs[name] = [o.tokens for o in outcomes]
    report["outputs_identical"] = outputs["colocated"] == outputs["disaggregated"] == outputs["streamed"]
    return report


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def table(report: dict) -> str:
    w = report["workload"]
    u, lo = report["unloaded"], report["loaded"]
    lines = [f"prefill on {', '.join(report['prefill_devices'])}; decode on {', '.join(report['decode_devices'])} "
             f"(disaggregated); {w['input_len']}-token prompts, {w['output_len']} tokens out",
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
    label = f"{w['concurrency']} clients" if w["concurrency"] else f"{w['rate']} req/s"
    lines += ["", f"loaded ({w['num_requests']} requests, {label}):",
              "| placement | tok/s | TTFT p50 / p90 ms | TPOT p50 / p90 ms | ITL p99 ms | failed |",
              "|---|---|---|---|---|---|"]
    for name, r in lo.items():
        lines.append(f"| {name} | {r['output_throughput']:.1f} | {_ms(r['ttft_s']['median'])} / "
                     f"{_ms(r['ttft_s']['p90'])} | {_ms(r['tpot_s']['median'])} / {_ms(r['tpot_s']['p90'])} | "
                     f"{_ms(r['itl_s']['p99'])} | {r['failed']} |")
    lines.append(f"\ngreedy outputs identical: {'yes' if report['outputs_identical'] else 'NO'}")
    return "\n".join(lines)
