"""Autoregressive generation across devices, driven by the coordinator.

Prefill runs with the plan's strategy (Galaxy HMP splits the prompt's tokens), optionally in
chunks so small devices keep bounded activation memory (SARATHI-style chunked prefill). Decode
steps send one token; each device extends the KV cache of its own heads and the tiny
all-reduces go direct (one hop) instead of around the ring. Sampling happens here, on the
vocabulary-parallel logits the devices return.

A `PrefixCache` remembers which token sequences have KV caches left on the devices: a new
prompt that starts like an earlier one (a repeated system prompt) forks that cache and
computes only its new tokens. At most `max_entries` are kept (LRU); evicted caches are freed
on the devices with the next request.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import CacheLost, DeviceOutOfMemory, GalaxyError
from ..parallel import memory
from ..parallel.executor import DeviceStats
from ..parallel.forward import Request
from .budget import MemoryGuard
from .sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_at_eos: bool = True
    prefill_chunk: int = 0  # prompt tokens per prefill step (0: the whole prompt at once)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be >= 0")


@dataclass
class Step:
    """One request to the cluster: a prefill chunk or a decode step."""

    phase: str  # "prefill" | "decode"
    tokens: int
    seconds: float
    collective: str  # how the joins ran: "ring RS/AG (HMP)", "direct all-reduce", ...


@dataclass
class TokenEvent:
    """What the stream yields: a token and the text it added (may be '' mid-character)."""

    token: int
    text: str


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = ""  # "length" | "eos" | "stop" | "kv_budget" (a device's memory holds no more positions)
    steps: list[Step] = field(default_factory=list)
    reused_prefix: int = 0  # prompt tokens whose KV came from the prefix cache
    kv_cache_bytes: list[int] = field(default_factory=list)  # per device, after the last step

    @property
    def ttft_s(self) -> float:
        """Time to first token: every prefill step (the first token comes out of the last one)."""
        return sum(s.seconds for s in self.steps if s.phase == "prefill")

    @property
    def per_token_s(self) -> float:
        dec = [s.seconds for s in self.steps if s.phase == "decode"]
        return sum(dec) / len(dec) if dec else 0.0


class PrefixCache:
    """Token sequences whose KV caches are still on the devices, most recently used last."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.pending_drop: list[str] = []

    def lookup(self, ids: list[int]) -> tuple[str, int]:
        """The cache sharing the longest prefix with ids, and that length ('' and 0 if none)."""
        best, best_n = "", 0
        for name, toks in self.entries.items():
            n = 0
            for a, b in zip(toks, ids):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = name, n
        if best:
            self.entries.move_to_end(best)
        return best, best_n

    def add(self, name: str, tokens: list[int]) -> None:
        self.entries[name] = tuple(tokens)
        while len(self.entries) > self.max_entries:
            old, _ = self.entries.popitem(last=False)
            self.pending_drop.append(old)

    def forget(self, name: str) -> None:
        self.entries.pop(name, None)
        self.pending_drop.append(name)

    def take_drops(self) -> tuple[str, ...]:
        out, self.pending_drop = tuple(self.pending_drop), []
        return out


def _collective(devices: list[DeviceStats]) -> str:
    tags = {op.tag for op in devices[0].ops} if devices else set()
    if any(t.endswith(".direct") for t in tags):
        return "direct all-reduce (1 hop)"
    if any(".ar." in t for t in tags):
        return "ring all-reduce"
    if any(t.endswith(".rs") for t in tags):
        return "ring ReduceScatter/AllGather (HMP)"
    if any(t.startswith("pipe") for t in tags):
        return "pipeline hand-off"
    return "none (1 device)"


def pending_stop(text: str, stops) -> int:
    """Length of the longest tail of `text` that is the beginning of a stop string (held back
    while streaming, until it is clear either way)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


PREFILL_ATTEMPTS = 4  # a prefill a worker refused is tried again in shorter chunks, this often in all


class TextGenerator:
    """Generation on a loaded executor (gRPC `Cluster` or `InprocCluster`)."""

    _names = itertools.count()

    def __init__(self, executor, tokenizer, config, prefix_cache: PrefixCache | None = None,
                 guard: MemoryGuard | None = None):
        if not config.causal:
            raise GalaxyError(f"{config.name or config.family} is an encoder: it embeds text (encode()), "
                              "it does not generate")
        self.ex, self.tok, self.cfg = executor, tokenizer, config
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache()
        # each device's memory budget as the passes spend it: share one per loaded model, as the prefix cache
        self.guard = guard if guard is not None else MemoryGuard(executor, config)
        self._lost: set[str] = set()  # caches a refused step left half-written on some devices

    def _forward(self, gen: Generation, phase: str, req: Request, before: list[int]) -> torch.Tensor:
        """Run one step; `before` are the tokens already in req.cache (to rebuild it if it was lost)."""
        try:
            res = self.ex.forward(req)
        except CacheLost:  # the devices were re-planned: rebuild this sequence's cache from scratch
            self.prefix.entries.clear()
            self.prefix.pending_drop.clear()
            self.guard.reset()
            ids = torch.tensor(before + req.ids.tolist(), dtype=torch.long)
            res = self.ex.forward(Request(ids, start_pos=0, last_only=True, cache=req.cache))
            phase = "refill"
        self.guard.observe(res)
        gen.steps.append(Step(phase, int(req.ids.shape[0]), res.seconds, _collective(res.devices)))
        gen.kv_cache_bytes = [d.kv_cache_bytes for d in res.devices]
        return res.output[-1]

    def stream(self, prompt_ids: list[int], gc: GenerationConfig,
               gen: Generation | None = None) -> Iterator[TokenEvent]:
        """Yield tokens as they are produced; `gen` (if given) is filled in as it goes."""
        gen = gen if gen is not None else Generation(list(prompt_ids))
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = self.cfg.max_positions
        if len(prompt_ids) + gc.max_new_tokens > limit:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({gc.max_new_tokens}) exceeds the "
                             f"model's {limit} positions")
        name = f"seq{next(self._names)}"
        hit, n = self.prefix.lookup(prompt_ids)
        start = min(n, len(prompt_ids) - 1)  # at least one prompt token must run to get logits
        fork = {"fork_from": hit, "fork_len": start} if start > 0 else {}
        gen.reused_prefix = start
        sampler = Sampler(gc.sampling)
        seq = list(prompt_ids)
        try:
            if self.guard.active:  # a prompt whose KV cache cannot fit is refused before any pass
                for old in sorted(self.prefix.entries, key=lambda k: k == hit):  # kept prefixes give way first,
                    if self.guard.prompt_shortfall(len(prompt_ids), name) is None:  # the one it would fork last
                        break
                    self.guard.forget(len(self.prefix.entries[old]))
                    self.prefix.forget(old)
                    if old == hit:  # computed afresh instead
                        start, fork, gen.reused_prefix = 0, {}, 0
                self.guard.check_prompt(len(prompt_ids), name)
            for attempt in range(PREFILL_ATTEMPTS):
                try:
                    logits = self._prefill(gen, gc, prompt_ids, name, start, fork)
                    break
                except DeviceOutOfMemory:  # a worker refused a chunk the guard let through: the other
                    self.prefix.forget(name)  # devices aborted it, so its cache is half-built: start again,
                    if not self.guard.active or attempt == PREFILL_ATTEMPTS - 1 or not self.guard.refused():
                        raise  # under a new name, in shorter chunks
                    name, start, fork, gen.reused_prefix = f"seq{next(self._names)}", 0, {}, 0
            yield from self._decode(gen, gc, sampler, name, seq, logits)
        except BaseException:
            self.prefix.forget(name)  # a half-built cache must never be reused
            raise
        if name in self._lost:
            self.prefix.forget(name)
        else:
            self.prefix.add(name, seq)  # the whole sequence is a reusable prefix now

    def _prefill(self, gen: Generation, gc: GenerationConfig, prompt_ids: list[int], name: str, start: int,
                 fork: dict) -> torch.Tensor:
        """The prompt from `start` into cache `name`, in chunks every device's memory takes; the last logits."""
        pos = start
        while pos < len(prompt_ids):
            chunk = gc.prefill_chunk or len(prompt_ids)
            if self.guard.active and not fork:  # as many tokens as every device's memory takes at once
                fits = self.guard.prefill_chunk(prompt_ids, pos, name)
                if fits == 0:
                    self.guard.check_prompt(len(prompt_ids) + 1, name)  # raises, naming the device
                chunk = min(chunk, max(1, fits))
            ids = torch.tensor(prompt_ids[pos: pos + chunk], dtype=torch.long)
            req = Request(ids, start_pos=pos, last_only=True, cache=name, drop=self.prefix.take_drops(),
                          **(fork if pos == start else {}))
            logits = self._forward(gen, "prefill", req, prompt_ids[:pos])
            pos += ids.shape[0]
        return logits

    def _decode(self, gen: Generation, gc: GenerationConfig, sampler: Sampler, name: str, seq: list[int],
                logits: torch.Tensor) -> Iterator[TokenEvent]:
        shown = ""
        eos = self.cfg.eos_token_id if gc.stop_at_eos else None
        if gc.max_new_tokens == 0:
            gen.finish = "length"
            return
        while True:
            tok = sampler(logits)
            if tok == eos:
                gen.finish = "eos"
                break
            gen.tokens.append(tok)
            full = self.tok.decode(gen.tokens) if self.tok else ""
            cut = min((full.find(s) for s in gc.stop if s in full), default=-1)
            if cut >= 0:
                gen.text, gen.finish = full[:cut], "stop"
                if len(gen.text) > len(shown):
                    yield TokenEvent(tok, gen.text[len(shown):])
                break
            safe = len(full) - pending_stop(full, gc.stop)  # hold back what may start a stop string
            delta = full[len(shown):safe] if not full[:safe].endswith("\ufffd") else ""  # whole characters only
            shown += delta
            gen.text = full
            yield TokenEvent(tok, delta)
            if len(gen.tokens) >= gc.max_new_tokens:
                gen.finish = "length"
                break
            req = Request(torch.tensor([tok]), start_pos=len(seq), last_only=True, cache=name,
                          drop=self.prefix.take_drops())
            if self.guard.shortfall(req, memory.kv_alloc_positions(len(seq))) is not None:
                gen.finish = "kv_budget"  # the next position's KV cache does not fit some device
                break
            try:
                logits = self._forward(gen, "decode", req, list(seq))
            except DeviceOutOfMemory:  # a worker's own check refused it (its heap had grown): the same end,
                self._lost.add(name)  # but the other devices aborted the step: this cache is not reusable
                gen.finish = "kv_budget"
                break
            seq.append(tok)
        if gen.finish != "stop" and len(gen.text) > len(shown):  # a held-back tail that stopped nothing
            yield TokenEvent(gen.tokens[-1], gen.text[len(shown):])

    def generate(self, prompt_ids: list[int], gc: GenerationConfig) -> Generation:
        gen = Generation(list(prompt_ids))
        for _ in self.stream(prompt_ids, gc, gen):
            pass
        return gen
