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


def _row(first: Generation, repeats: list[Generation]) -> dict:
    def computed(g: Generation) -> int:
        return sum(s.tokens for s in g.steps if s.phase == "prefill")

    rep_ttft = [g.first_token_s for g in repeats]
    return {"first_ttft_s": first.first_token_s, "repeat_ttft_s": statistics.median(rep_ttft),
            "first_second_s": first.token_times[1],
            "repeat_second_s": statistics.median(g.token_times[1] for g in repeats),
            "first_e2e_s": first.token_times[-1], "repeat_e2e_s": statistics.median(g.token_times[-1] for g in repeats),
            "repeat_ttft_max_s": max(rep_ttft), "ratio": statistics.median(rep_ttft) / first.first_token_s,
            "first_computed": computed(first), "repeat_computed": statistics.median(computed(g) for g in repeats),
            "first_kv_bytes": first.handoff.nbytes if first.handoff else 0,
            "repeat_kv_bytes": statistics.median(g.handoff.nbytes if g.handoff else 0 for g in repeats)}


def run_prefix_bench(prefill: Executor, decode: Executor, cfg, tokenizer, doc_len: int, question_len: int = 16,
                     output_len: int = 8, repeats: int = 6, clients: int = 3, engine: EngineConfig = EngineConfig(),
                     seed: int = 0, progress=lambda msg: None) -> dict:
    """First against repeats of one document in each placement, and the cache-off outputs to check."""
    if output_len < 2:
        raise GalaxyError(f"output_len={output_len}: the second token's time needs at least 2 tokens out")
    makers = {"colocated": lambda ec: Engine(prefill, cfg, tokenizer, ec),
              "disaggregated": lambda ec: DisaggEngine(prefill, decode, cfg, tokenizer, ec, ec, DisaggConfig())}
    specs = prompts(doc_len, question_len, repeats + 1, cfg.vocab_size, seed)
    warm = prompts(question_len, 1, 1, cfg.vocab_size, seed + 1)[0]
    report = {"doc_len": doc_len, "question_len": question_len, "output_len": output_len, "repeats": repeats,
              "clients": clients, "prefill_devices": list(prefill.names), "decode_devices": list(decode.names),
              "placements": {}}
    outputs = {}
    runs = [(name, make, engine) for name, make in makers.items()]
    runs.append(("colocated, prefix cache off", makers["colocated"], replace(engine, prefix_caching=False)))
    for name, make, ec in runs:
        eng = make(ec)
        try:
            eng.generate(warm, GenerationConfig(2, stop_at_eos=False))
            progress(f"{name}: a {doc_len}-token document, then {repeats} repeats from {clients} clients")
            first = _run_clients(eng, specs[:1], output_len, 1)[0]
            rest = _run_clients(eng, specs[1:], output_len, clients)
            load = eng.load
        finally:
            eng.close()
        report["placements"][name] = _row(first, rest)
        report["placements"][name]["kv_blocks"] = {g: load[g]["kv_blocks"] for g in ("prefill", "decode")} \
            if "prefill" in load else {"prefill": load["kv_blocks"]}  # each pool's blocks of block_size positions
        outputs[name] = [g.tokens for g in [first, *rest]]
    ref = outputs["colocated, prefix cache off"]
    report["outputs_identical"] = {name: out == ref for name, out in outputs.items() if out is not ref}
    return report


def table(report: dict) -> str:
    lines = [f"a {report['doc_len']}-token document + {report['question_len']}-token questions, "
             f"{report['output_len']} tokens out; {report['repeats']} repeats from {report['clients']} clients; "
             f"prefill on {', '.join(report['prefill_devices'])}, decode on {', '.join(report['decode_devices'])} "
             "(disaggregated)", "",
             "| placement | first TTFT ms | repeats TTFT p50 (max) ms | repeats / first | 2nd token first / repeats "
             "p50 ms | last token first / repeats p50 ms | prompt tokens computed first / repeat | K/V moved first / "
             "repeat KiB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["placements"].items():
        lines.append(f"| {name} | {1000 * r['first_ttft_s']:.0f} | {1000 * r['repeat_ttft_s']:.0f} "
                     f"({1000 * r['repeat_ttft_max_s']:.0f}) | {r['ratio']:.2f}x | {1000 * r['first_second_s']:.0f} / "
                     f"{1000 * r['repeat_second_s']:.0f} | {1000 * r['first_e2e_s']:.0f} / "
                     f"{1000 * r['repeat_e2e_s']:.0f} | {r['first_computed']} / "
                     f"{r['repeat_computed']:.0f} | {r['first_kv_bytes'] / 1024:.0f} / "
                     f"{r['repeat_kv_bytes'] / 1024:.0f} |")
    same = report["outputs_identical"]
    lines.append("\ngreedy outputs identical to the cache-off run: "
                 + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()))
    return "\n".join(lines)
