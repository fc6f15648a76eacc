"""`galaxy bench serve`: the serving engine under a synthetic workload, measured as the field does.

The workload is generated in process, as vLLM's `bench serve --dataset-name random`: prompts of
random token ids, input and output lengths uniform in [L(1-r), L(1+r)] or lognormal (the Splitwise
conversation fits, clipped to the context), an optional prefix shared by every prompt, arrivals
Poisson (gamma-bursty with burstiness < 1) at a request rate, or a closed loop of C clients each
sending its next request when the last one ends; one seed fixes it all. Outputs are greedy with a
fixed length (no stop at end-of-sequence), so every configuration does the same work.

Per request: TTFT (arrival to first token), TPOT ((last - first token) / (tokens - 1)), every
inter-token gap (ITL) and end-to-end latency; per run: completed and failed requests, request and
output-token throughput, mean / median / P90 / P99 of each latency, SLO attainment -- the share
of requests meeting both a TTFT and a TPOT objective -- and, over a sweep of rates, goodput: the
highest rate at which at least 90% do (DistServe). The objectives default to multiples of the
unloaded latency of the same cluster, measured first (TTFT <= 3x, TPOT <= 1.5x), so they mean the
same on any hardware.

Schedulers compared side by side in one run on the same loaded model: `batch` (the engine:
continuous batching, chunked prefill, prefix sharing) and `fifo` (the same engine admitting one
request at a time: the one-request-at-a-time path Galaxy had before, as its baseline). With
`admission`, `batch+admission` too: batch with early rejection (engine/admission.py) at the TTFT
objective. A request refused that way is counted as `rejected`, apart from `failed` (an error);
`good_rps` is the requests meeting both objectives per second of the run (Mooncake's goodput at a
load, which rejection can raise), `slo_attainment_admitted` the share of the requests not refused
that met both.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace

from ..engine.engine import Engine, EngineConfig
from ..engine.generation import GenerationConfig
from ..errors import GalaxyError, Overloaded
from ..parallel.executor import Executor

LOGNORMAL_FITS = {"input": (6.73, 0.81), "output": (5.12, 0.68)}  # Splitwise conversations, ln(tokens)
SCHEDULERS = ("batch", "fifo")
ATTAINMENT_GOAL = 0.9  # goodput: the highest rate at which this share of requests meets both objectives


@dataclass(frozen=True)
class Workload:
    num_requests: int = 32
    rate: float = math.inf  # requests/s; inf: all at t = 0; ignored with concurrency
    concurrency: int = 0  # > 0: a closed loop of this many clients instead of arrivals at a rate
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 Poisson, < 1 bursty
    input_len: int = 128
    output_len: int = 32
    range_ratio: float = 0.0  # uniform lengths in [L(1-r), L(1+r)]
    lengths: str = "uniform"  # "uniform" | "lognormal" (LOGNORMAL_FITS, clipped to the context)
    shared_prefix: int = 0  # tokens at the start of every prompt, the same for all
    seed: int = 0
    # long prompts that keep arriving while the requests above stream (Sarathi-Serve's stall test): one
    # more client sends prompts of this many tokens (1 generated token each), one after another, until
    # the other requests are done. Their TTFT is reported apart; ITL and TPOT are the streams' own.
    long_prompt_len: int = 0

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GalaxyError(f"serving workload: {msg}")

        need(self.num_requests >= 1, f"num_requests={self.num_requests} must be >= 1")
        need(self.rate > 0, f"rate={self.rate} must be > 0 requests/s (inf: all at once)")
        need(self.concurrency >= 0, f"concurrency={self.concurrency} must be >= 0")
        need(self.burstiness > 0, f"burstiness={self.burstiness} must be > 0")
        need(self.input_len >= 1 and self.output_len >= 1, "input_len and output_len must be >= 1")
        need(0 <= self.range_ratio < 1, f"range_ratio={self.range_ratio} must be in [0, 1)")
        need(self.lengths in ("uniform", "lognormal"), f"lengths={self.lengths!r} is not uniform|lognormal")
        need(self.shared_prefix >= 0, f"shared_prefix={self.shared_prefix} must be >= 0")
        need(self.long_prompt_len >= 0, f"long_prompt_len={self.long_prompt_len} must be >= 0")


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float  # seconds after the run starts (closed loop: 0, sent when a client is free)
    prompt: tuple[int, ...]
    output_len: int


def requests(w: Workload, vocab_size: int, max_len: int) -> list[RequestSpec]:
    """The workload's requests, reproducible from its seed; every prompt plus its output fits max_len."""
    rnd = random.Random(w.seed)
    prefix = [rnd.randrange(vocab_size) for _ in range(w.shared_prefix)]

    def length(kind: str, mean: int) -> int:
        if w.lengths == "lognormal":
            mu, sigma = LOGNORMAL_FITS[kind]
            return max(1, round(rnd.lognormvariate(mu, sigma)))
        return max(1, round(rnd.uniform(mean * (1 - w.range_ratio), mean * (1 + w.range_ratio))))

    out, t = [], 0.0
    for _ in range(w.num_requests):
        n_out = min(length("output", w.output_len), max_len - len(prefix) - 1)
        n_in = min(length("input", w.input_len), max_len - len(prefix) - n_out)
        if n_out < 1 or n_in < 1:
            raise GalaxyError(f"serving workload: a {len(prefix)}-token shared prefix leaves no room in the "
                              f"model's {max_len} positions")
        prompt = prefix + [rnd.randrange(vocab_size) for _ in range(n_in)]
        out.append(RequestSpec(t, tuple(prompt), n_out))
        if not w.concurrency and math.isfinite(w.rate):  # gamma(shape k, scale 1/(k rate)): mean 1/rate
            t += rnd.gammavariate(w.burstiness, 1.0 / (w.burstiness * w.rate))
    return out


def long_prompts(w: Workload, vocab_size: int, max_len: int, count: int = 64) -> list[RequestSpec]:
    """The long-prompt client's requests (reproducible from the seed): `count` prompts of
    `long_prompt_len` tokens, one generated token each."""
    if not w.long_prompt_len:
        return []
    if w.long_prompt_len >= max_len:
        raise GalaxyError(f"serving workload: long prompts of {w.long_prompt_len} tokens leave no room in the "
                          f"model's {max_len} positions")
    rnd = random.Random(w.seed + 1)
    return [RequestSpec(0.0, tuple(rnd.randrange(vocab_size) for _ in range(w.long_prompt_len)), 1)
            for _ in range(count)]


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token
    error: str = ""
    rejected: bool = False  # refused at once by early rejection (Overloaded), not an error
    predicted_ttft: float | None = None  # early rejection's prediction (admitted or refused)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.arrival


def _send(engine: Engine, spec: RequestSpec, out: Outcome) -> None:
    out.arrival = time.perf_counter()
    try:
        stream = engine.submit(list(spec.prompt), GenerationConfig(spec.output_len, stop_at_eos=False))
        out.predicted_ttft = getattr(stream, "predicted_ttft_s", None)
        for ev in stream:
            out.token_times.append(time.perf_counter())
            out.tokens.append(ev.token)
    except Overloaded as e:
        out.rejected, out.predicted_ttft = True, e.predicted_ttft_s
    except GalaxyError as e:
        out.error = f"{type(e).__name__}: {e}"


def closed_loop(n: int, clients: int, one) -> list[threading.Thread]:
    """`clients` started threads calling `one(i)` for i in 0..n-1, each taking the next index when its
    last call returned (a closed loop, as vLLM's --max-concurrency); the caller joins them."""
    queue = iter(range(n))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            one(i)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    return threads


def run_workload(engine: Engine, specs: list[RequestSpec], concurrency: int = 0, timeout_s: float = 3600.0,
                 background: list[RequestSpec] = (), background_out: list[Outcome] | None = None
                 ) -> tuple[list[Outcome], float]:
    """Send the requests at their arrival times (or from a closed loop of `concurrency` clients) and
    collect every token's arrival; returns the outcomes (in request order) and the run's duration.
    With `background`, one more client sends those requests one after another (cycling) until the
    others are done, appending their outcomes to `background_out`."""
    outcomes = [Outcome() for _ in specs]
    t0 = time.perf_counter()
    done = threading.Event()

    def one(i: int) -> None:
        _send(engine, specs[i], outcomes[i])

    def keep_sending() -> None:
        for i in itertools.count():
            if done.is_set():
                return
            out = Outcome()
            _send(engine, background[i % len(background)], out)
            if background_out is not None and not done.is_set():  # one cut short by the run's end is not kept
                background_out.append(out)

    side = threading.Thread(target=keep_sending, daemon=True) if background else None
    if side is not None:
        side.start()

    threads: list[threading.Thread] = []
    if concurrency:
        threads = closed_loop(len(specs), concurrency, one)
    else:
        for i, spec in enumerate(specs):
            delay = t0 + spec.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(i,), daemon=True)
            th.start()
            threads.append(th)
    deadline = t0 + timeout_s
    for th in threads:
        th.join(max(0.0, deadline - time.perf_counter()))
    duration = time.perf_counter() - t0
    done.set()
    if side is not None:  # the long prompt in flight is cut short: the engine is closed after the run
        side.join(0.0)
    return outcomes, duration


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]  # noqa: E731 - nearest rank
    return {"mean": statistics.fmean(s), "median": statistics.median(s), "p90": pick(0.90), "p99": pick(0.99)}


def summarise(outcomes: list[Outcome], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [o for o in outcomes if not o.error and not o.rejected and o.token_times]
    rejected = sum(o.rejected for o in outcomes)
    tokens = sum(len(o.token_times) for o in ok)
    met = [o for o in ok if o.ttft <= slo_ttft and (o.tpot is None or o.tpot <= slo_tpot)]
    admitted = len(outcomes) - rejected
    ttft_met = sum(1 for o in ok if o.ttft <= slo_ttft)
    predicted = [o.ttft / o.predicted_ttft for o in ok if o.predicted_ttft]  # how early rejection's prediction fared
    refused = [o.predicted_ttft / slo_ttft for o in outcomes if o.rejected]  # how far above the objective
    return {
        "rejected_predicted_x_slo": _stats(refused) if refused else None,
        "ttft_attainment_admitted": ttft_met / admitted if admitted else None,
        "ttft_measured_over_predicted": _stats(predicted) if predicted else None,
        "completed": len(ok), "failed": admitted - len(ok), "rejected": rejected, "duration_s": duration,
        "good_rps": len(met) / duration, "slo_attainment_admitted": len(met) / admitted if admitted else None,
        "request_throughput": len(ok) / duration, "output_throughput": tokens / duration,
        "ttft_s": _stats([o.ttft for o in ok]), "tpot_s": _stats([o.tpot for o in ok if o.tpot is not None]),
        "itl_s": _stats([x for o in ok for x in o.itls]), "e2el_s": _stats([o.e2el for o in ok]),
        "slo_attainment": len(met) / len(outcomes), "errors": sorted({o.error for o in outcomes if o.error})[:3],
    }


@dataclass(frozen=True)
class ServeBench:
    workload: Workload = Workload()
    rates: tuple[float, ...] = ()  # a sweep of request rates (else the workload's rate / concurrency)
    schedulers: tuple[str, ...] = SCHEDULERS
    engine: EngineConfig = EngineConfig()
    slo_ttft_x: float = 3.0  # objectives, as multiples of the unloaded TTFT and TPOT
    slo_tpot_x: float = 1.5
    compare_prefix_cache: bool = False  # also run `batch` with the prefix cache off (a shared-prefix workload)
    admission: bool = False  # also run `batch+admission`: early rejection at the TTFT objective
    objectives_s: tuple[float, float] | None = None  # absolute (TTFT, TPOT) objectives instead of the multiples


def scheduler_config(name: str, engine: EngineConfig) -> EngineConfig:
    """The engine a scheduler name stands for: fifo admits one request at a time, prefill whole.
    `batch:FIELD=VALUE:...` is batch with EngineConfig fields changed (e.g. `batch:max_stall=2:min_chunk=8`,
    `none` for None), so settings are compared side by side in one run on the same requests."""
    base, *changes = name.split(":")
    if base == "batch":
        ec = engine
    elif base == "fifo":
        ec = replace(engine, max_running=1, chunk_size=None)
    else:
        raise GalaxyError(f"scheduler {name!r} is not one of {SCHEDULERS} (optionally with :FIELD=VALUE changes)")
    names = {f.name for f in fields(EngineConfig)}
    for change in changes:
        key, eq, text = change.partition("=")
        if not eq or key not in names:
            raise GalaxyError(f"scheduler {name!r}: {change!r} is not FIELD=VALUE with FIELD one of {sorted(names)}")
        ec = replace(ec, **{key: _value(text)})
    return ec


def _value(text: str):
    if text.lower() in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[text.lower()]
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise GalaxyError(f"{text!r} is not a number, none, true or false") from None


def step_shapes(log) -> dict:
    """What the engine's steps carried and took (Engine.step_log): steps beside running streams with
    prompt tokens (mixed), with none (decode-only), and with no stream (prompt-only). A phase-separated
    engine's log names its groups (DisaggEngine.step_log): then the same per group, under its name."""
    if isinstance(log, dict):
        return {name: shapes for name, group in log.items() if (shapes := step_shapes(group))}
    out = {}
    for kind, keep in (("mixed", lambda d, p: d and p), ("decode_only", lambda d, p: d and not p),
                       ("prompt_only", lambda d, p: not d)):
        steps = [(d, p, s) for d, p, s in log if keep(d, p)]
        if steps:
            out[kind] = {"steps": len(steps), "decodes_p50": statistics.median(d for d, _, _ in steps),
                         "prompt_tokens_p50": statistics.median(p for _, p, _ in steps),
                         "seconds": _stats([s for _, _, s in steps])}
    return out


def run_serve_bench(executor: Executor, model, tokenizer, sb: ServeBench, progress=lambda msg: None,
                    make_engine=None) -> dict:
    """Every scheduler on every rate of the sweep, on one loaded model; the unloaded latency first.
    make_engine(EngineConfig): the engine to run (default: an Engine on `executor`; a DisaggEngine for a
    phase-separated placement)."""
    cfg = model
    make_engine = make_engine or (lambda ec: Engine(executor, cfg, tokenizer, ec))
    unloaded_engine = make_engine(sb.engine)
    try:
        max_len = getattr(unloaded_engine, "prefill", unloaded_engine).sched.cfg.max_model_len
        w = sb.workload
        alone = requests(replace(w, num_requests=3, lengths="uniform", range_ratio=0.0, shared_prefix=0),
                         cfg.vocab_size, max_len)
        progress(f"unloaded latency: {len(alone)} requests of {w.input_len} + {w.output_len} tokens, one at a time")
        base = [run_workload(unloaded_engine, [s])[0][0] for s in alone]
    finally:
        unloaded_engine.close()
    base_ttft = statistics.median(o.ttft for o in base)
    base_tpot = statistics.median(o.tpot for o in base if o.tpot is not None)
    slo_ttft, slo_tpot = sb.objectives_s or (sb.slo_ttft_x * base_ttft, sb.slo_tpot_x * base_tpot)
    report = {"workload": asdict(w), "engine": asdict(sb.engine),
              "unloaded": {"ttft_s": base_ttft, "tpot_s": base_tpot},
              "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "ttft_x": slo_ttft / base_ttft,
                      "tpot_x": slo_tpot / base_tpot},  # the multiples: given, or the plan's objectives over these
              "runs": []}
    points = [replace(w, rate=r, concurrency=0) for r in sb.rates] or [w]
    variants = [(s, scheduler_config(s, sb.engine)) for s in sb.schedulers]
    if sb.compare_prefix_cache:
        variants.append(("batch-no-prefix-cache", replace(sb.engine, prefix_caching=False)))
    if sb.admission:
        variants.append(("batch+admission", replace(sb.engine, slo_ttft=slo_ttft)))
    if w.long_prompt_len and "batch" in sb.schedulers and sb.engine.max_stall is not None:
        variants.append(("batch-no-stall-bound", replace(sb.engine, max_stall=None)))  # only the token budget
    for point in points:
        specs = requests(point, cfg.vocab_size, max_len)
        longs = long_prompts(point, cfg.vocab_size, max_len)
        for name, ec in variants:  # side by side: the same requests for every scheduler
            label = f"{point.concurrency} clients" if point.concurrency else f"{point.rate:g} req/s"
            progress(f"{name}: {len(specs)} requests, {label}"
                     + (f", {point.long_prompt_len}-token prompts arriving" if longs else ""))
            engine = make_engine(ec)
            long_out: list[Outcome] = []
            try:
                outcomes, duration = run_workload(engine, specs, point.concurrency, background=longs,
                                                  background_out=long_out)
                load = engine.load
                preemptions, hit_rate = load["preemptions"], load["prefix_hit_rate"]
                shapes = step_shapes(getattr(engine, "step_log", ()))
            finally:
                engine.close()
            row = summarise(outcomes, duration, slo_ttft, slo_tpot)
            row.update(scheduler=name, rate=point.rate, concurrency=point.concurrency, preemptions=preemptions,
                       prefix_hit_rate=hit_rate, steps=shapes,
                       outputs=[None if o.rejected else o.tokens for o in outcomes],
                       itl_p99_x_unloaded_tpot=None if row["itl_s"]["p99"] is None else row["itl_s"]["p99"] / base_tpot)
            if longs:
                done = [o for o in long_out if not o.error and o.token_times]
                row.update(long_prompts=len(done), long_ttft_s=_stats([o.ttft for o in done]))
            report["runs"].append(row)
    report["goodput"] = goodput(report["runs"])
    _compare(report)
    for row in report["runs"]:
        del row["outputs"]
    return report


def goodput(runs: list[dict], key: str = "scheduler") -> dict:
    """Per scheduler (or per run[key]), the highest swept rate at which at least ATTAINMENT_GOAL of
    requests met both objectives."""
    out = {}
    for r in runs:
        if math.isfinite(r["rate"]) and not r["concurrency"] and r["slo_attainment"] >= ATTAINMENT_GOAL:
            out[r[key]] = max(out.get(r[key], 0.0), r["rate"])
    return out


def _compare(report: dict) -> None:
    """Side-by-side ratios against fifo at each point, and whether the outputs agree."""
    by_point: dict = {}
    for r in report["runs"]:
        by_point.setdefault((r["rate"], r["concurrency"]), {})[r["scheduler"]] = r
    for row in report["runs"]:
        peers = by_point[(row["rate"], row["concurrency"])]
        fifo = peers.get("fifo")
        if fifo is not None and fifo is not row and fifo["output_throughput"]:
            row["throughput_vs_fifo"] = row["output_throughput"] / fifo["output_throughput"]
        ref = peers.get("fifo") or peers.get("batch")
        if ref is not None and ref is not row:  # a request refused by early rejection has nothing to compare
            row["outputs_match"] = all(a == b for a, b in zip(row["outputs"], ref["outputs"])
                                       if a is not None and b is not None)
    nocache, batch = (next((r for r in report["runs"] if r["scheduler"] == s), None)
                      for s in ("batch-no-prefix-cache", "batch"))
    if nocache and batch and nocache["ttft_s"]["median"]:
        report["prefix_cache"] = {"p50_ttft_ratio": batch["ttft_s"]["median"] / nocache["ttft_s"]["median"],
                                  "outputs_match": batch["outputs"] == nocache["outputs"]}


def _ms(x):
    return "-" if x is None else f"{x * 1000:.0f}"


def table(report: dict) -> str:
    w, u, slo = report["workload"], report["unloaded"], report["slo"]
    lines = [f"workload  {w['num_requests']} requests, input {w['input_len']} ({w['lengths']}, "
             f"r={w['range_ratio']}), output {w['output_len']}, shared prefix {w['shared_prefix']}, "
             f"burstiness {w['burstiness']}, seed {w['seed']}",
             f"unloaded  TTFT {_ms(u['ttft_s'])} ms, TPOT {_ms(u['tpot_s'])} ms; objectives TTFT <= "
             f"{_ms(slo['ttft_s'])} ms ({slo['ttft_x']:g}x), TPOT <= {_ms(slo['tpot_s'])} ms ({slo['tpot_x']:g}x)", "",
             "| scheduler | load | done | rejected | tok/s | vs fifo | TTFT p50/p99 ms | TPOT p50/p99 ms | "
             "ITL p99 ms | E2E p50 ms | SLO met | SLO met (admitted) | good req/s | preempt | prefix hit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        load = f"{r['concurrency']} clients" if r["concurrency"] else (
            "all at once" if not math.isfinite(r["rate"]) else f"{r['rate']:g}/s")
        vs = f"{r['throughput_vs_fifo']:.2f}x" if "throughput_vs_fifo" in r else "-"
        admitted = "-" if r["slo_attainment_admitted"] is None else f"{100 * r['slo_attainment_admitted']:.0f}%"
        lines.append(f"| {r['scheduler']} | {load} | {r['completed']}/{r['completed'] + r['failed'] + r['rejected']} "
                     f"| {r['rejected']} | "
                     f"{r['output_throughput']:.1f} | {vs} | {_ms(r['ttft_s']['median'])}/{_ms(r['ttft_s']['p99'])} | "
                     f"{_ms(r['tpot_s']['median'])}/{_ms(r['tpot_s']['p99'])} | {_ms(r['itl_s']['p99'])} | "
                     f"{_ms(r['e2el_s']['median'])} | {100 * r['slo_attainment']:.0f}% | {admitted} | "
                     f"{r['good_rps']:.2f} | {r['preemptions']} | {100 * r['prefix_hit_rate']:.0f}% |")
    if report.get("goodput"):
        lines += ["", "goodput (highest rate with >= 90% meeting both objectives): " +
                  ", ".join(f"{k} {v:g} req/s" for k, v in report["goodput"].items())]
    if "prefix_cache" in report:
        p = report["prefix_cache"]
        lines.append(f"prefix cache: P50 TTFT {p['p50_ttft_ratio']:.2f}x of the cache-off run; outputs identical: "
                     f"{p['outputs_match']}")
    for r in report["runs"]:
        if "long_prompts" in r:
            lt = r["long_ttft_s"]
            lines.append(f"{r['scheduler']}: ITL p99 {r['itl_p99_x_unloaded_tpot']:.2f}x the unloaded TPOT while "
                         f"{w['long_prompt_len']}-token prompts kept arriving ({r['long_prompts']} done, their TTFT "
                         f"p50/p99 {_ms(lt['median'])}/{_ms(lt['p99'])} ms)")
    for r in report["runs"]:
        m = r.get("ttft_measured_over_predicted")
        if r["rejected"] or m:
            load = f"{r['rate']:g}/s" if not r["concurrency"] else f"{r['concurrency']} clients"
            share = "-" if r["ttft_attainment_admitted"] is None else f"{100 * r['ttft_attainment_admitted']:.0f}%"
            x = r.get("rejected_predicted_x_slo")
            lines.append(f"{r['scheduler']} at {load}: {r['rejected']} rejected"
                         + ("" if not x else f" (predicted TTFT {x['median']:.2f}x the objective at the median, "
                            f"p90 {x['p90']:.2f}x)")
                         + f", TTFT met by {share} of the admitted"
                         + ("" if not m else f"; their TTFT measured / predicted at admission: median "
                            f"{m['median']:.2f}, p90 {m['p90']:.2f}"))
    for r in report["runs"]:
        lines += _shape_lines(r["scheduler"], r.get("steps") or {})
    mismatch = [r["scheduler"] for r in report["runs"] if r.get("outputs_match") is False]
    lines.append("outputs identical across schedulers: " + ("yes" if not mismatch else f"NO ({mismatch})"))
    return "\n".join(lines)


def _shape_lines(name: str, shapes: dict) -> list[str]:
    """step_shapes' report as lines: one, or one per group of a phase-separated engine ("batch decode group")."""
    if any("steps" not in v for v in shapes.values()):  # named groups, each of kinds
        return [line for group, kinds in shapes.items() for line in _shape_lines(f"{name} {group} group", kinds)]
    return [f"{name} steps: " + "; ".join(
        f"{k.replace('_', '-')} {v['steps']} (decodes {v['decodes_p50']:g}, prompt tokens "
        f"{v['prompt_tokens_p50']:g}, {_ms(v['seconds']['median'])}/{_ms(v['seconds']['p99'])} ms p50/p99)"
        for k, v in shapes.items())] if shapes else []


def plot(report: dict, path: str, key: str = "scheduler", suptitle: str = "") -> None:
    """Latency percentiles and SLO attainment against the request rate, one line per scheduler (or
    per run[key]: the phase bench's placements)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if math.isfinite(r["rate"]) and not r["concurrency"]]
    if not runs:
        raise GalaxyError("the serving plot needs a sweep of request rates (--rates)")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in dict.fromkeys(r[key] for r in runs):
        rs = sorted((r for r in runs if r[key] == name), key=lambda r: r["rate"])
        x = [r["rate"] for r in rs]
        for q, style in (("median", "-"), ("p99", "--")):
            axes[0].plot(x, [r["ttft_s"][q] for r in rs], style, marker="o", label=f"{name} {q}")
            axes[1].plot(x, [r["tpot_s"][q] for r in rs], style, marker="o", label=f"{name} {q}")
        axes[2].plot(x, [100 * r["slo_attainment"] for r in rs], marker="o", label=name)
    axes[0].axhline(report["slo"]["ttft_s"], color="grey", lw=0.8)
    axes[1].axhline(report["slo"]["tpot_s"], color="grey", lw=0.8)
    axes[2].axhline(100 * ATTAINMENT_GOAL, color="grey", lw=0.8)
    for ax, title in zip(axes, ("time to first token (s)", "time per output token (s)", "SLO attainment (%)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
