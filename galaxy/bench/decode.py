"""`galaxy bench decode`: decode ms/token and prefill of every engine on one model, side by side, and
each compact weight format's accuracy against the fp32 reference.

One process, one model, one thread count at a time. The engines, per thread count:

- galaxy, 1 device: the real path -- the serving engine (`engine.Engine`) over an in-process executor
  with one rank, the paged KV cache, the model's blocks -- in fp32 and in each weight format
  (`LoadOptions.weights_format`, parallel/compact.py); with `local` also in fp32 and each format over
  N loopback worker processes (`galaxy worker`), the path `galaxy run --local N` takes (decode on the
  split, forced), and beside it the same workers loaded as `Session.load` does by default: prefill on
  the split, decode where the planner predicts it fastest (runtime.decode_layout; the row
  "planner's layout", its choice printed under the table);
- the compact-format decoder (`model.decode.LlamaDecoder`) in each weight format, eager and, where
  torch.compile works here, compiled;
- llama.cpp on the same GGUF file and thread count (`anchor.py`), when llama-cpp-python is
  importable (an optional extra: `pip install galaxy[anchor]`).

Every engine runs in turn within each repetition (A B C A B C ...), so drift on a shared machine hits
them alike:

- decode: greedy from PROMPTS[0], `new_tokens` one-token steps each timed (sampling not timed; for
  the engine path, each decode step's wall time as the engine records it); a run's figure is its
  median step, the table's the median over runs. The engine path also reports its `token_gap_ms`:
  the median time between two tokens as the client receives them, which adds the engine loop's own
  work (scheduling, sampling, streaming) to the step;
- prefill: the first `prefill_tokens` tokens of TEXT into an empty cache, one pass (prefix caching
  off, so every run computes it).

Accuracy of each format against the fp32 reference forward (sharding.load_shard +
Transformer.forward on the file's dequantized weights): top-1 agreement and max abs logit error
over the first 512 tokens of TEXT (teacher-forced), and the greedy text of every prompt. Printed, not
asserted: a compact format is not exact, and llama.cpp on the same file is not either (its row sets the bar).

A model without a tokenizer (a random-init preset) runs on seeded random token ids instead of TEXT.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine.engine import Engine, EngineConfig
from ..engine.generation import GenerationConfig
from ..errors import GalaxyError
from ..model.checkpoints import WeightSource
from ..model.checkpoints.gguf import GGUFCheckpoint
from ..model.decode import LlamaDecoder, load_decoder
from ..model.quant import parse_format
from ..parallel.executor import LoadOptions
from ..parallel.sharding import even_partition, full_spec, load_shard
from ..runtime.api import Session
from ..runtime.inproc import InprocCluster
from ..transport.client import Cluster
from ..transport.spawn import LocalWorkers
from . import anchor

# A fixed public-domain text (Gettysburg Address, A Tale of Two Cities, the US Constitution's
# preamble, the Declaration of Independence): ~600 tokens, so 512 are always there.
TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live. It is altogether fitting "
    "and proper that we should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- "
    "we can not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated it, "
    "far above our poor power to add or detract. The world will little note, nor long remember what we say "
    "here, but it can never forget what they did here. It is for us the living, rather, to be dedicated here "
    "to the unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to "
    "be here dedicated to the great task remaining before us -- that from these honored dead we take increased "
    "devotion to that cause for which they gave the last full measure of devotion -- that we here highly "
    "resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new "
    "birth of freedom -- and that government of the people, by the people, for the people, shall not perish "
    "from the earth.\n\n"
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way -- in short, the period was so far like the present period, that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only.\n\n"
    "We the People of the United States, in Order to form a more perfect Union, establish Justice, insure "
    "domestic Tranquility, provide for the common defence, promote the general Welfare, and secure the "
    "Blessings of Liberty to ourselves and our Posterity, do ordain and establish this Constitution for the "
    "United States of America.\n\n"
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and "
    "equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the "
    "opinions of mankind requires that they should declare the causes which impel them to the separation. We "
    "hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of "
    "Happiness. That to secure these rights, Governments are instituted among Men, deriving their just powers "
    "from the consent of the governed."
)
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
ACCURACY_TOKENS = 512




class DecodeBenchError(GalaxyError):
    """A decode benchmark asked for something it cannot run; the message names the field."""


@dataclass(frozen=True)
class DecodeBench:
    """What `galaxy bench decode` measures. `formats` are `--weights-format` specs (quant.parse_format)."""

    formats: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
    threads: tuple[int, ...] = (1, 2)
    new_tokens: int = 64
    prefill_tokens: int = 256
    reps: int = 3
    compile: bool = True  # also time each format's torch.compile'd step (eager stays in the table)
    anchor: bool = True  # llama.cpp, when llama-cpp-python is importable and the model is a GGUF file
    galaxy: bool = True  # the engine path on one in-process device, fp32
    local: int = 0  # also the engine path on N loopback workers (0: not)
    planned: bool = True  # with local: also the decode layout the planner picks (runtime.decode_layout)
    addresses: tuple[str, ...] = ()  # running devices (an emulated cluster) instead of `local` loopback workers
    token: str | None = field(default=None, repr=False)  # the devices' cluster token, if they want one
    accuracy: bool = True
    accuracy_tokens: int = ACCURACY_TOKENS
    seed: int = 0  # random token ids for a model without a tokenizer
    # the galaxy rows' decode-step threads (LoadOptions.decode_threads), a row per value: 0 = each device's
    # own count measured at load (the default everywhere), N = N threads
    decode_threads: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for f in self.formats:
            parse_format(f)  # FormatError names the spec
        if not self.formats and not self.galaxy:
            raise DecodeBenchError("decode bench: no weight formats and no galaxy path: nothing to time")
        for name in ("new_tokens", "prefill_tokens", "reps", "accuracy_tokens"):
            if getattr(self, name) < 1:
                raise DecodeBenchError(f"decode bench: {name}={getattr(self, name)} must be >= 1")
        if not self.threads or min(self.threads) < 1:
            raise DecodeBenchError(f"decode bench: threads={self.threads} must be counts >= 1")
        if self.local and self.addresses:
            raise DecodeBenchError(f"decode bench: local={self.local} and {len(self.addresses)} addresses: one or "
                                   "the other")
        if self.local < 0:
            raise DecodeBenchError(f"decode bench: local={self.local} must be >= 0")
        if not self.decode_threads or min(self.decode_threads) < 0:
            raise DecodeBenchError(f"decode bench: decode_threads={self.decode_threads} must be counts >= 1, or 0 "
                                   "(measured at load)")


def greedy(dec: LlamaDecoder, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (EOS not special: a fixed count) and the seconds of each decode step."""
    dec.reset()
    logits = dec(torch.tensor(prompt_ids))
    ids = torch.empty(1, dtype=torch.long)
    out, steps = [], []
    for _ in range(new_tokens):
        tok = int(logits.argmax())
        out.append(tok)
        ids[0] = tok
        t0 = time.perf_counter()
        logits = dec(ids)
        steps.append(time.perf_counter() - t0)
    return out, steps


def prefill_seconds(dec: LlamaDecoder, ids: list[int]) -> float:
    dec.reset()
    x = torch.tensor(ids)
    t0 = time.perf_counter()
    dec(x)
    return time.perf_counter() - t0


class _Prototype:
    """The compact-format decoder, eager or through its compiled step."""

    def __init__(self, dec: LlamaDecoder, compiled: bool):
        self.dec, self.compiled = dec, compiled

    def decode(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        self.dec.use_compiled = self.compiled
        return greedy(self.dec, prompt_ids, new_tokens)

    def prefill(self, ids: list[int]) -> float:
        return prefill_seconds(self.dec, ids)

    def close(self) -> None:
        pass


def bench_engine(prefill_tokens: int, capacity: int = 0) -> EngineConfig:
    """The engine every galaxy row runs: one step holds the whole prefill; no prefix cache, or every run
    after the first would reuse it; with `capacity`, a KV pool of just the positions a run holds (on
    budgeted devices every row's session shares the budget: a pool sized at its own load would not fit
    beside the rows loaded after it)."""
    return EngineConfig(max_batched_tokens=max(256, prefill_tokens), prefix_caching=False,
                        kv_blocks=-(-capacity // EngineConfig.block_size) + 1 if capacity else None)


class _GalaxyPath:
    """The serving engine over an executor holding the model split evenly over its ranks, in a weights
    format (parallel.compact: in-process ranks and workers alike)."""

    def __init__(self, executor, source: WeightSource, world: int, prefill_tokens: int, workers=None,
                 weights_format: str = "fp32", decode_threads: int = 0, capacity: int = 0):
        cfg = source.config
        self.executor, self.workers = executor, workers  # workers: the processes behind it, stopped on close
        options = LoadOptions(weights_format=weights_format, decode_threads=decode_threads)
        self.weight_bytes = sum(executor.load(source, even_partition(cfg, world), options))
        self.decode_threads = list(executor.decode_threads)  # what each device's decode steps ran with
        self.engine = Engine(executor, cfg, config=bench_engine(prefill_tokens, capacity))

    def decode(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        g = self.engine.generate(prompt_ids, GenerationConfig(new_tokens, stop_at_eos=False))
        # what a client sees between tokens: the step and the engine loop's own work (scheduling, sampling)
        self.token_gaps = [b - a for a, b in zip(g.token_times, g.token_times[1:])]
        return g.tokens, [s.seconds for s in g.steps if s.phase == "decode"]

    def prefill(self, ids: list[int]) -> float:
        g = self.engine.generate(ids, GenerationConfig(1, stop_at_eos=False))
        return sum(s.seconds for s in g.steps if s.phase == "prefill")

    def close(self) -> None:
        try:
            self.engine.close()
            self.executor.close()
        finally:
            if self.workers is not None:
                self.workers.stop()


def _galaxy_entry(name: str, path: _GalaxyPath, fmt: str, decode_threads: int) -> _Entry:
    """A galaxy row: named for its decode threads when they were given, else measured at load."""
    suffix = f", decode {decode_threads} thr" if decode_threads else ""
    return _Entry(name + suffix, path, {"format": f"{parse_format(fmt)} (engine blocks)",
                                        "weight_MB": path.weight_bytes / 1e6,
                                        "decode_threads": max(path.decode_threads, default=0),
                                        "decode_threads_measured": not decode_threads})


class _PlannedPath(_GalaxyPath):
    """The serving engine as `Session.load` sets it up with no decode layout given: the model split
    evenly over the workers for prefill, decode where the planner predicts it fastest
    (runtime.decode_layout: the split, fewer workers, or one holding the whole model)."""

    def __init__(self, addresses: list[str], source: WeightSource, prefill_tokens: int, weights_format: str,
                 token: str | None = None, capacity: int = 0):
        self.workers = None
        self.executor = Session(Cluster(addresses, token=token))  # closed as an executor is: the groups go with it
        model = self.executor.load(source, weights_format=weights_format, stream_weights=False,
                                   engine=bench_engine(prefill_tokens, capacity), decode_layout="auto")
        self.line = model.decode.line
        self.weight_bytes = sum(model.weight_bytes) if model.weight_bytes else 0
        self.engine = model.engine


@dataclass
class _Entry:
    name: str
    engine: object  # decode(prompt_ids, n) -> (tokens, step seconds); prefill(ids) -> seconds; close()
    info: dict
    decode: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # galaxy paths: each run's median time between tokens
    prefill: list[float] = field(default_factory=list)
    tokens: list[int] | None = None


def token_ids(source: WeightSource, bench: DecodeBench) -> tuple[list[int], list[list[int]]]:
    """The fixed text's ids (long enough for prefill and accuracy) and the prompts' ids. A model
    without a tokenizer gets seeded random ids of the same lengths."""
    need = max(bench.prefill_tokens, bench.accuracy_tokens)
    tok = source.tokenizer()
    if tok is None:
        g = torch.Generator().manual_seed(bench.seed)
        vocab = source.config.vocab_size
        return (torch.randint(0, vocab, (need,), generator=g).tolist(),
                [torch.randint(0, vocab, (6,), generator=g).tolist() for _ in PROMPTS])
    text = tok.encode(TEXT)
    text = (text * -(-need // len(text)))[:need]  # the text again after itself if a longer run asks for it
    return text, [tok.encode(p) for p in PROMPTS]


def _anchor_path(source: WeightSource, bench: DecodeBench):
    """The GGUF file llama.cpp can run, or None (not asked, not installed, not a GGUF file)."""
    if bench.anchor and isinstance(source, GGUFCheckpoint) and anchor.available():
        return source.path
    return None


def speed(source: WeightSource, bench: DecodeBench, threads: int, text_ids: list[int], prompt_ids: list[int],
          progress: Callable[[str], None] = lambda m: None) -> list[dict]:
    """One thread count: every engine's decode ms/token and prefill seconds, interleaved repetitions."""
    torch.set_num_threads(threads)
    prefill_ids = text_ids[: bench.prefill_tokens]
    capacity = max(len(prefill_ids), len(prompt_ids) + bench.new_tokens) + 8
    entries: list[_Entry] = []
    workers = None  # the loopback workers every local row's coordinator shares (one session per format)
    try:
        if bench.galaxy:
            galaxy_formats = ["fp32", *(f for f in bench.formats if parse_format(f).name != "fp32")]
            # a decode count above this row's threads is not a run at this thread count: left out
            counts = [dt for dt in bench.decode_threads if dt <= threads] or [0]
            for f in galaxy_formats:
                for dt in counts:
                    progress(f"{threads} thread(s): loading galaxy {f} on 1 in-process device")
                    path = _GalaxyPath(InprocCluster(1), source, 1, bench.prefill_tokens, weights_format=f,
                                       decode_threads=dt)
                    entries.append(_galaxy_entry(f"galaxy {f}, 1 device (in-process)", path, f, dt))
            if bench.local or bench.addresses:
                if bench.addresses:  # running devices (an emulated cluster): each also alone, its whole model
                    addresses, label = list(bench.addresses), f"{len(bench.addresses)} devices"
                else:
                    progress(f"{threads} thread(s): starting {bench.local} loopback workers")
                    workers = LocalWorkers(bench.local, threads=threads)
                    addresses, label = workers.start(), f"{bench.local} local workers"
                n = len(addresses)
                for f in galaxy_formats:
                    fmt_info = {"format": f"{parse_format(f)} (engine blocks)"}
                    for dt in counts:
                        progress(f"{threads} thread(s): loading galaxy {f} on {label}")
                        path = _GalaxyPath(Cluster(addresses, token=bench.token), source, n, bench.prefill_tokens,
                                           weights_format=f, decode_threads=dt, capacity=capacity)
                        entries.append(_galaxy_entry(f"galaxy {f}, {label}", path, f, dt))
                    if bench.planned:
                        progress(f"{threads} thread(s): galaxy {f} on {label}, the planner's decode layout")
                        planned = _PlannedPath(addresses, source, bench.prefill_tokens, f, bench.token, capacity)
                        entries.append(_Entry(f"galaxy {f}, {label}, planner's layout", planned,
                                              {**fmt_info, "decode_layout": planned.line}))
                    for a in addresses if bench.addresses else ():
                        one = Cluster([a], token=bench.token)
                        name = one.hello()[0].name
                        progress(f"{threads} thread(s): galaxy {f} on {name} alone")
                        path = _GalaxyPath(one, source, 1, bench.prefill_tokens, weights_format=f, capacity=capacity)
                        entries.append(_Entry(f"galaxy {f}, {name} alone", path,
                                              {**fmt_info, "weight_MB": path.weight_bytes / 1e6}))
        for f in bench.formats:
            fmt = parse_format(f)
            progress(f"{threads} thread(s): loading the decoder in {fmt}")
            t0 = time.perf_counter()
            dec = load_decoder(source, fmt, capacity)
            info = {"format": str(fmt), "load_s": time.perf_counter() - t0, "weight_MB": dec.weight_bytes / 1e6}
            entries.append(_Entry(f"decoder {fmt} eager", _Prototype(dec, False), info))
            if bench.compile:
                ok = dec.compile()
                if ok:
                    entries.append(_Entry(f"decoder {fmt} compiled", _Prototype(dec, True),
                                          {**info, "compile_s": dec.compile_seconds}))
        gguf = _anchor_path(source, bench)
        if gguf is not None:
            llm = anchor.LlamaCpp(gguf, threads, n_ctx=capacity)
            entries.append(_Entry("llama.cpp", llm, {"format": "GGUF as stored", "version": llm.engine}))
        for rep in range(bench.reps):
            progress(f"{threads} thread(s): repetition {rep + 1} of {bench.reps}")
            for e in entries:
                tokens, steps = e.engine.decode(prompt_ids, bench.new_tokens)
                e.tokens = e.tokens or tokens
                e.decode.append(statistics.median(steps))
                if getattr(e.engine, "token_gaps", None):
                    e.gaps.append(statistics.median(e.engine.token_gaps))
                e.prefill.append(e.engine.prefill(prefill_ids))
        for e in entries:  # a measured decode count may have been settled again on the first steps
            if "decode_threads" in e.info:
                e.info["decode_threads"] = max(e.engine.executor.decode_threads, default=0)
    finally:
        try:
            for e in entries:
                e.engine.close()
        finally:
            if workers is not None:
                workers.stop()
    first = entries[0].tokens if entries else None
    return [{"engine": e.name, "threads": threads, "decode_ms": statistics.median(e.decode) * 1e3,
             "decode_ms_runs": [x * 1e3 for x in e.decode], "prefill_s": statistics.median(e.prefill),
             "prefill_tokens": len(prefill_ids), "greedy_as_first": e.tokens == first, **e.info,
             **({"token_gap_ms": statistics.median(e.gaps) * 1e3} if e.gaps else {})}
            for e in entries]


@torch.inference_mode()
def accuracy(source: WeightSource, bench: DecodeBench, tokens: list[int], prompts: list[list[int]],
             new_tokens: int = 32, progress: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Each format against the fp32 reference forward over `tokens`, and greedy texts of `prompts`."""
    tok = source.tokenizer()
    text = (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))
    progress(f"accuracy: the fp32 reference forward over {len(tokens)} tokens")
    ref = load_shard(source, full_spec(source.config))
    want = ref(torch.tensor(tokens))  # (T, V)
    del ref
    capacity = max(len(tokens), max(map(len, prompts)) + new_tokens) + 8

    def row(name: str, got: torch.Tensor, greedy_ids: list[list[int]]) -> dict:
        err = (got - want).abs()
        return {"format": name, "tokens": len(tokens),
                "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
                "max_abs_logit_err": float(err.max()), "mean_abs_logit_err": float(err.mean()),
                "greedy": [text(g) for g in greedy_ids]}

    rows = []
    for f in bench.formats:
        progress(f"accuracy: {f}")
        dec = load_decoder(source, parse_format(f), capacity)
        dec.reset()
        got = dec(torch.tensor(tokens), all_logits=True)
        rows.append(row(f, got, [greedy(dec, p, new_tokens)[0] for p in prompts]))
    gguf = _anchor_path(source, bench)
    if gguf is not None:  # llama.cpp on the same file is not exact either: its figures set the bar
        progress("accuracy: llama.cpp")
        llm = anchor.LlamaCpp(gguf, 1, n_ctx=capacity, logits_all=True)
        try:
            got = torch.from_numpy(llm.all_logits(tokens))
            rows.append(row("llama.cpp", got, [llm.decode(p, new_tokens)[0] for p in prompts]))
        finally:
            llm.close()
    return rows


def run_decode_bench(source: WeightSource, bench: DecodeBench,
                     progress: Callable[[str], None] = lambda m: None) -> dict:
    """Speed at every thread count, then accuracy; the report `table` renders."""
    cfg = source.config
    if cfg.family != "llama":
        raise DecodeBenchError(f"the decode bench runs llama-family models (the compact decoder's), not {cfg.family}")
    text_ids, prompts = token_ids(source, bench)
    limit = cfg.max_positions
    if bench.prefill_tokens > limit:
        raise DecodeBenchError(f"decode bench: prefill_tokens={bench.prefill_tokens} exceeds "
                               f"{cfg.name or cfg.family}'s max_positions={limit}")
    if len(prompts[0]) + bench.new_tokens > limit:
        raise DecodeBenchError(f"decode bench: the prompt ({len(prompts[0])} tokens) + new_tokens={bench.new_tokens} "
                               f"exceed {cfg.name or cfg.family}'s max_positions={limit}")
    report = {"model": str(getattr(source, "path", None) or cfg.name), "torch": torch.__version__,
              "anchor": ("llama.cpp" if _anchor_path(source, bench) else
                         "off" if not bench.anchor else
                         f"not installed ({anchor.INSTALL_HINT})" if not anchor.available() else
                         "not a GGUF file"),
              "reps": bench.reps, "new_tokens": bench.new_tokens, "speed": [], "accuracy": []}
    saved = torch.get_num_threads()
    try:
        for t in bench.threads:
            report["speed"] += speed(source, bench, t, text_ids, prompts[0], progress)
    finally:
        torch.set_num_threads(saved)
    if bench.accuracy:
        # a model with a short context (a tiny preset) is scored over as many tokens as it holds
        n = min(bench.accuracy_tokens, limit)
        report["accuracy"] = accuracy(source, bench, text_ids[:n], prompts, new_tokens=min(32, limit - 8 - max(
            map(len, prompts))), progress=progress)
    return report


def table(report: dict) -> str:
    """The report as two plain-text tables: speed per thread count, accuracy per format."""
    lines = [f"decode bench: {report['model']} (torch {report['torch']}; llama.cpp: {report['anchor']})",
             f"decode: median over {report['reps']} runs of each run's median one-token step "
             f"({report['new_tokens']} steps); prefill: one pass into an empty cache; token gap: the engine "
             "path's median time between tokens as its client gets them (ms); decode thr: the galaxy path's "
             "threads on a decode step ((m): measured at load, then settled on the first decode steps, as each "
             "device reports it after its steps; prefill runs on all the row's threads)", ""]
    head = f"{'threads':>7}  {'engine':<48} {'weights':<24} {'MB':>7} {'ms/token':>9} {'x llama.cpp':>11} " \
           f"{'prefill':>11} {'greedy=1st':>10} {'token gap':>9} {'decode thr':>10}"
    lines.append(head)
    for t in sorted({r["threads"] for r in report["speed"]}):
        rows = [r for r in report["speed"] if r["threads"] == t]
        anchor_ms = next((r["decode_ms"] for r in rows if r["engine"] == "llama.cpp"), None)
        for r in rows:
            ratio = f"{r['decode_ms'] / anchor_ms:.2f}" if anchor_ms else "-"
            mb = f"{r['weight_MB']:.1f}" if "weight_MB" in r else "-"
            dthr = (f"{r['decode_threads']}{' (m)' if r['decode_threads_measured'] else ''}"
                    if "decode_threads" in r else "-")
            lines.append(f"{t:>7}  {r['engine']:<48} {r['format']:<24} {mb:>7} {r['decode_ms']:>9.1f} {ratio:>11} "
                         f"{r['prefill_s']:>8.3f} s {'yes' if r['greedy_as_first'] else 'no':>10} "
                         f"{format(r['token_gap_ms'], '9.1f') if 'token_gap_ms' in r else '-':>9} {dthr:>10}")
    for r in report["speed"]:
        if "decode_layout" in r:
            lines.append(f"{r['threads']:>7}  {r['engine']}: {r['decode_layout']}")
    if report["accuracy"]:
        lines += ["", f"accuracy vs the fp32 reference forward ({report['accuracy'][0]['tokens']} tokens, "
                  "teacher-forced); greedy text of the first prompt",
                  f"{'format':<16} {'top-1':>7} {'max |dlogit|':>12} {'mean |dlogit|':>13}  greedy"]
        for a in report["accuracy"]:
            lines.append(f"{a['format']:<16} {a['top1_agreement']:>7.1%} {a['max_abs_logit_err']:>12.4f} "
                         f"{a['mean_abs_logit_err']:>13.5f}  {json.dumps(a['greedy'][0][:60])}")
    return "\n".join(lines)
