"""`galaxy bench serve --shared-prefix N --prefill-devices ... --decode-devices ...`: a long document
asked about several times, from several clients, in each placement: the first request's TTFT against
the repeats' (issue 22's goal: repeats <= 0.3x the first, wherever the request lands).

Per placement (colocated: an Engine on the prefill group; disaggregated: a DisaggEngine, prefill
group then decode group), on a fresh engine: one warm-up request of its own (the first step
allocates each device's KV pool), the document and a first question alone, then `repeats`
requests -- the same document, each with its own question -- from `clients` concurrent clients.
Besides the times it counts what the cache saved, not as time: the prompt tokens each request
computed (its prefill steps' tokens) and the K/V bytes moved to the decode group. The same requests
run once more on the colocated engine with the prefix cache off: every placement's greedy outputs
must equal that run's.

Under memory pressure (`evict_docs`): after the first request, that many other documents are asked
about, one at a time, so that a pool too small for them all (`--kv-blocks`) evicts the first one; then
the first document comes back with a new question, alone ("back": its TTFT against the first's), then
the repeats. With a spill tier (`EngineConfig.spill_bytes`, engine/kv_spill.py) each placement runs
twice, without it and with it, side by side: the evicted blocks written back against computed again. With a
device-local pool (`EngineConfig.device_pool_bytes`, engine/kv_devicepool.py) once more with it alone: the
evicted blocks copied back on every device, nothing on the wire.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

from ..engine.disagg import DisaggConfig, DisaggEngine
from ..engine.engine import Engine, EngineConfig
from ..engine.generation import Generation, GenerationConfig
from ..errors import GalaxyError
from ..parallel.executor import Executor
from .serve import closed_loop


def prompts(doc_len: int, question_len: int, count: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts: one document of `doc_len` tokens, each followed by a question of its own."""
    rnd = random.Random(seed)
    doc = [rnd.randrange(vocab_size) for _ in range(doc_len)]
    return [doc + [rnd.randrange(vocab_size) for _ in range(question_len)] for _ in range(count)]


def _run_clients(engine, specs: list[list[int]], output_len: int, clients: int) -> list[Generation]:
    """Each prompt sent by one of `clients` threads (a closed loop), in order; their Generations."""
    out: list[Generation | BaseException | None] = [None] * len(specs)

    def one(i: int) -> None:
        try:
            out[i] = engine.submit(specs[i], GenerationConfig(output_len, stop_at_eos=False)).result()
        except BaseException as e:  # reported below, after every client finished
            out[i] = e

    for t in closed_loop(len(specs), max(1, clients), one):
        t.join()
    bad = [o for o in out if not isinstance(o, Generation)]
    if bad:
        raise GalaxyError(f"{len(bad)} of {len(specs)} requests failed: {bad[0]}")
    return out  # type: ignore[return-value]


def _computed(g: Generation) -> int:
    return sum(s.tokens for s in g.steps if s.phase == "prefill")


def _row(first: Generation, repeats: list[Generation], back: Generation | None = None) -> dict:
    computed = _computed
    rep_ttft = [g.first_token_s for g in repeats]
    extra = {} if back is None else {"back_ttft_s": back.first_token_s, "back_computed": computed(back),
                                     "back_ratio": back.first_token_s / first.first_token_s,
                                     # before its first step ran (the spill tier's reads and writes are here)
                                     "back_queued_s": back.queued_s,
                                     "back_steps_s": sum(s.seconds for s in back.steps if s.phase == "prefill")}
    return {**extra, "first_ttft_s": first.first_token_s, "repeat_ttft_s": statistics.median(rep_ttft),
            "first_second_s": first.token_times[1],
            "repeat_second_s": statistics.median(g.token_times[1] for g in repeats),
            "first_e2e_s": first.token_times[-1], "repeat_e2e_s": statistics.median(g.token_times[-1] for g in repeats),
            "repeat_ttft_max_s": max(rep_ttft), "ratio": statistics.median(rep_ttft) / first.first_token_s,
            "first_computed": computed(first), "repeat_computed": statistics.median(computed(g) for g in repeats),
            "first_kv_bytes": first.handoff.nbytes if first.handoff else 0,
            "repeat_kv_bytes": statistics.median(g.handoff.nbytes if g.handoff else 0 for g in repeats)}


def run_prefix_bench(prefill: Executor, decode: Executor, cfg, tokenizer, doc_len: int, question_len: int = 16,
                     output_len: int = 8, repeats: int = 6, clients: int = 3, engine: EngineConfig = EngineConfig(),
                     seed: int = 0, progress=lambda msg: None, evict_docs: int = 0) -> dict:
    """First against repeats of one document in each placement, and the cache-off outputs to check; with
    `evict_docs`, other documents in between and the first one back alone (module docstring)."""
    if output_len < 2:
        raise GalaxyError(f"output_len={output_len}: the second token's time needs at least 2 tokens out")
    if evict_docs < 0:
        raise GalaxyError(f"evict_docs={evict_docs}: other documents between the first and the repeats, >= 0")
    makers = {"colocated": lambda ec: Engine(prefill, cfg, tokenizer, ec),
              "disaggregated": lambda ec: DisaggEngine(prefill, decode, cfg, tokenizer, ec, ec, DisaggConfig())}
    specs = prompts(doc_len, question_len, repeats + 1 + bool(evict_docs), cfg.vocab_size, seed)
    others = [prompts(doc_len, question_len, 1, cfg.vocab_size, seed + 2 + k)[0] for k in range(evict_docs)]
    warm = prompts(question_len, 1, 1, cfg.vocab_size, seed + 1)[0]
    report = {"doc_len": doc_len, "question_len": question_len, "output_len": output_len, "repeats": repeats,
              "clients": clients, "prefill_devices": list(prefill.names), "decode_devices": list(decode.names),
              "evict_docs": evict_docs, "spill_bytes": engine.spill_bytes,
              "device_pool_bytes": engine.device_pool_bytes, "placements": {}}
    outputs = {}
    plain = replace(engine, spill_bytes=0, spill_dir=None, device_pool_bytes=0)
    runs = []
    for name, make in makers.items():
        runs.append((name, make, plain))
        if engine.spill_bytes:
            runs.append((f"{name}, spill", make, replace(engine, device_pool_bytes=0)))
        if engine.device_pool_bytes:
            runs.append((f"{name}, device pool", make, replace(engine, spill_bytes=0, spill_dir=None)))
    runs.append(("colocated, prefix cache off", makers["colocated"], replace(plain, prefix_caching=False)))
    for name, make, ec in runs:
        eng = make(ec)
        back = None
        try:
            eng.generate(warm, GenerationConfig(2, stop_at_eos=False))
            progress(f"{name}: a {doc_len}-token document, "
                     + (f"{evict_docs} others, the first back, " if evict_docs else "")
                     + f"then {repeats} repeats from {clients} clients")
            first = _run_clients(eng, specs[:1], output_len, 1)[0]
            between = [_run_clients(eng, [p], output_len, 1)[0] for p in others]
            if evict_docs:
                back = _run_clients(eng, specs[-1:], output_len, 1)[0]
            rest = _run_clients(eng, specs[1:repeats + 1], output_len, clients)
            load = eng.load
        finally:
            eng.close()
        report["placements"][name] = row = _row(first, rest, back)
        row["kv_blocks"] = {g: load[g]["kv_blocks"] for g in ("prefill", "decode")} \
            if "prefill" in load else {"prefill": load["kv_blocks"]}  # each pool's blocks of block_size positions
        for tier in ("spill", "device_pool"):
            row[tier] = load["prefill"][tier] if "prefill" in load else load[tier]
        outputs[name] = [g.tokens for g in [first, *between, *([back] if back else []), *rest]]
    ref = outputs["colocated, prefix cache off"]
    report["outputs_identical"] = {name: out == ref for name, out in outputs.items() if out is not ref}
    return report


def _spill_line(sp: dict) -> str:
    return (f"{sp['spilled_blocks']} evicted blocks read into the spill store when evicted, {sp['kept_blocks']} found "
            f"there already; {sp['pre_read_blocks']} read while idle ({sp['pre_read_s']:.2f} s); "
            f"{sp['restored_blocks']} written back, {sp['refused_blocks']} refused, {sp['dropped_blocks']} dropped; "
            f"{sp['bytes'] / 2**20:.1f} of {sp['max_bytes'] / 2**20:.0f} MiB held at the end; reads {sp['read_s']:.2f} "
            f"s, writes back {sp['write_s']:.2f} s in all")


def _device_pool_line(dp: dict) -> str:
    return (f"{dp['stashed_blocks']} evicted blocks kept on every device when evicted, {dp['kept_blocks']} kept there "
            f"already; {dp['pre_read_blocks']} kept while idle ({dp['pre_read_s']:.2f} s); {dp['restored_blocks']} "
            f"copied back, {dp['refused_blocks']} refused, {dp['dropped_blocks']} dropped, {dp['missed_restores']} "
            f"missed; {dp['blocks']} of {dp['capacity']} blocks held at the end; calls before steps "
            f"{dp['call_s']:.3f} s in all")


_TIERS = {"spill": _spill_line, "device_pool": _device_pool_line}  # each tier's counts in words, under the table


def table(report: dict) -> str:
    lines = [f"a {report['doc_len']}-token document + {report['question_len']}-token questions, "
             f"{report['output_len']} tokens out; {report['repeats']} repeats from {report['clients']} clients; "
             f"prefill on {', '.join(report['prefill_devices'])}, decode on {', '.join(report['decode_devices'])} "
             "(disaggregated)", "",
             "| placement | first TTFT ms | repeats TTFT p50 (max) ms | repeats / first | 2nd token first / repeats "
             "p50 ms | last token first / repeats p50 ms | prompt tokens computed first / repeat | K/V moved first / "
             "repeat KiB |", "|---|---|---|---|---|---|---|---|"]
    evicted = bool(report.get("evict_docs"))
    if evicted:
        lines[2] = lines[2].replace("| repeats TTFT",
                                    "| back after eviction: TTFT ms (x first), computed | repeats TTFT")
        lines[3] += "---|"
    for name, r in report["placements"].items():
        back = (f" {1000 * r['back_ttft_s']:.0f} ({r['back_ratio']:.2f}x; {1000 * r['back_queued_s']:.0f} before its "
                f"step, {1000 * r['back_steps_s']:.0f} in it), {r['back_computed']} |" if evicted else "")
        lines.append(f"| {name} | {1000 * r['first_ttft_s']:.0f} |{back} {1000 * r['repeat_ttft_s']:.0f} "
                     f"({1000 * r['repeat_ttft_max_s']:.0f}) | {r['ratio']:.2f}x | {1000 * r['first_second_s']:.0f} / "
                     f"{1000 * r['repeat_second_s']:.0f} | {1000 * r['first_e2e_s']:.0f} / "
                     f"{1000 * r['repeat_e2e_s']:.0f} | {r['first_computed']} / "
                     f"{r['repeat_computed']:.0f} | {r['first_kv_bytes'] / 1024:.0f} / "
                     f"{r['repeat_kv_bytes'] / 1024:.0f} |")
    for name, r in report["placements"].items():
        for tier in ("spill", "device_pool"):
            if r.get(tier):
                lines.append(f"\n{name}: " + _TIERS[tier](r[tier]))
    same = report["outputs_identical"]
    lines.append("\ngreedy outputs identical to the cache-off run: "
                 + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()))
    return "\n".join(lines)
