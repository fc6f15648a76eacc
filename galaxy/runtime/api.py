"""The Python API for an app on one of the devices.

    import galaxy

    with galaxy.connect(local=3) as cluster:            # or addresses=[...], cluster_file="lan.yaml"
        lm = cluster.load("smollm2")                    # path, .gguf, 'minilm', or random_init=PRESET
        print(lm.generate("The capital of France is", max_new_tokens=16))
        for piece in lm.stream("Tell me about Jetsons."):
            print(piece, end="", flush=True)

Errors are typed (galaxy.errors): PeerUnreachable, DeviceOutOfMemory, PlanMismatch, AuthError,
ProtocolMismatch, WorkerError -- all GalaxyError.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from devices.emulate import cluster_endpoints
from planner.plan import Plan

from ..errors import DeviceOutOfMemory, GalaxyError, PlanMismatch
from ..model.checkpoints import WeightSource
from ..model.checkpoints.random import RandomWeights
from ..model.transformer import mean_pool
from ..parallel.executor import DeviceStats, Executor, ForwardResult, LoadOptions
from ..parallel.forward import Request
from ..parallel.sharding import Partition, Strategy, even_partition, weighted_partition
from ..transport.client import Cluster
from ..transport.security import COORDINATOR, TlsFiles, init_keys
from ..transport.shardstore import source_file_bytes
from ..transport.spawn import LocalWorkers
from .budget import MemoryGuard, fit_partition
from .generate import Generation, GenerationConfig, PrefixCache, TextGenerator
from .inproc import InprocCluster
from .recovery import ResilientCluster
from .sampling import SamplingConfig
from .sources import open_source


class Session:
    """A connection to a set of devices; `load` puts a model on them. Close it (or use `with`)."""

    def __init__(self, executor: Executor, owned: LocalWorkers | None = None, token: str | None = None):
        self._ex = executor
        self._owned = owned  # LocalWorkers to stop on close
        self.token = token
        self.model: Model | None = None

    @property
    def world(self) -> int:
        return self._ex.world

    @property
    def executor(self) -> Executor:
        """What runs the passes: a gRPC Cluster, a ResilientCluster or an InprocCluster."""
        return self._ex

    def devices(self):
        """What each device reports (name, cores, memory), in ring order."""
        return self._ex.hello()

    def load(self, model: str | Path | WeightSource | None = None, *, random_init: str | None = None, seed: int = 0,
             strategy: str = "galaxy", weights: list[float] | None = None, partition: Partition | None = None,
             plan=None, dtype: str = "float32", tiles: int = 1, prefix_cache_entries: int = 4,
             stream_weights: bool | None = None, wire: list[list[str]] | str | None = None,
             backend: str = "torch", seq_len: int = 0) -> Model:
        """Load `model` (default: the embedded SmolLM2) split across the devices.

        The split comes from `plan` (a planner Plan or a plan file path), an explicit `partition`,
        relative device `weights`, or else from the devices themselves: when any has a memory
        budget, a Galaxy split by each device's speed within what its memory holds (an even one
        under another `strategy`), refused with DeviceOutOfMemory before any weight moves when they
        cannot hold the model; without budgets, an even split. seq_len: tokens each device reserves
        memory for (KV cache and a prefill of as many; default 512). wire: lossy activation format
        on every link ("bf16", "fp16", "int8") or a per-link matrix (default exact fp32). backend:
        "torch", "onnx" (ONNX Runtime per shard) or "auto" (each device times both and keeps the
        faster). stream_weights: send each
        device its shard from here, so devices need no model file (default: yes unless the
        devices are local workers this session started, which read the file directly).
        """
        if isinstance(model, WeightSource):
            source = model
        else:
            source = open_source(None if model is None else str(model), random_init, seed)
        cfg = source.config
        if isinstance(wire, str):
            wire = [[wire] * self.world for _ in range(self.world)]
        if stream_weights is None:
            stream_weights = self._owned is None and not isinstance(source, RandomWeights)
        if plan is not None and not isinstance(plan, Plan):
            plan = Plan.from_json(Path(plan).read_text(), cfg=cfg)
        if plan is not None and not seq_len and plan.seq_len:
            seq_len = plan.seq_len  # what the plan reserved memory for
        options = LoadOptions(dtype=dtype, tiles=tiles, stream=stream_weights, wire=wire, backend=backend,
                              seq_len=min(seq_len, cfg.max_positions))
        if plan is not None:
            partition = plan_partition(plan, cfg, self.world)
        elif partition is None:
            if weights is not None and len(weights) != self.world:
                raise PlanMismatch(f"{len(weights)} weights for {self.world} devices")
            partition = (weighted_partition(cfg, weights) if weights is not None
                         else self._split(source, strategy, options))
        if partition.world != self.world:
            raise PlanMismatch(f"the split has {partition.world} devices, the session {self.world}")
        if self.model is not None:
            self._ex.release()
        weight_bytes = self._ex.load(source, partition, options)
        self.model = Model(self, source, partition, PrefixCache(prefix_cache_entries))
        self.model.weight_bytes = list(weight_bytes)
        return self.model

    def _split(self, source: WeightSource, strategy: str, options: LoadOptions) -> Partition:
        """No plan: even, unless devices have memory budgets -- then Galaxy's split by speed within
        what each one's memory holds (runtime.budget.fit_partition)."""
        cfg = source.config
        if Strategy(strategy) != Strategy.GALAXY:
            return even_partition(cfg, self.world, strategy)
        if self.model is not None:
            self._ex.release()  # what is loaded now is not in the way of the sizing
        infos = self._ex.hello()
        if not infos or not any(i.memory_budget for i in infos):
            return even_partition(cfg, self.world, strategy)
        names = list(self._ex.names)
        return fit_partition(cfg, infos, names, options, None if options.stream else source_file_bytes(source))

    def close(self) -> None:
        try:
            self._ex.close()
        finally:
            if self._owned is not None:
                self._owned.stop()
                self._owned = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plan_partition(plan, cfg, world: int) -> Partition:
    if not isinstance(plan, Plan):
        plan = Plan.from_json(Path(plan).read_text(), cfg=cfg)
    part = plan.to_partition(cfg)
    if part.world != world:
        raise PlanMismatch(f"the plan has {part.world} devices, the session {world}")
    return part


class Model:
    """A model loaded on a session's devices."""

    def __init__(self, session: Session, source: WeightSource, partition: Partition, prefix: PrefixCache):
        self.session, self.source, self._partition = session, source, partition
        self.config = source.config
        self.tokenizer = source.tokenizer()
        self._prefix = prefix
        self._guard = MemoryGuard(session.executor, self.config)  # the devices' memory, as passes spend it
        self.weight_bytes: list[int] = []  # per device, as loaded

    @property
    def partition(self) -> Partition:
        """The current split (recovery may have changed it since load)."""
        return getattr(self.session._ex, "partition", None) or self._partition

    def _tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GalaxyError(f"{self.source.path} has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generation_config(self, max_new_tokens, temperature, top_k, top_p, seed, stop,
                          prefill_chunk) -> GenerationConfig:
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return GenerationConfig(max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed), stop,
                                prefill_chunk=prefill_chunk)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
                 prefill_chunk: int = 0, details: bool = False) -> str | Generation:
        """The generated text (or, with details=True, the Generation with tokens and timings)."""
        gen = self.generator().generate(self._tokens(prompt), self.generation_config(
            max_new_tokens, temperature, top_k, top_p, seed, stop, prefill_chunk))
        return gen if details else gen.text

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
               prefill_chunk: int = 0) -> Iterator[str]:
        """Text pieces as the tokens are produced."""
        gc = self.generation_config(max_new_tokens, temperature, top_k, top_p, seed, stop, prefill_chunk)
        for ev in self.generator().stream(self._tokens(prompt), gc):
            if ev.text:
                yield ev.text

    def chat(self, messages: list[dict], **kw) -> str:
        """Generate a reply to chat messages with the model's chat template."""
        if self.tokenizer is None:
            raise GalaxyError("this model has no tokenizer and no chat template")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(prompt), **kw)

    def encode(self, texts: str | list[str], normalize: bool = True) -> np.ndarray:
        """Sentence embeddings (mean pooling, as sentence-transformers) for an encoder model."""
        if self.config.causal:
            raise GalaxyError(f"{self.config.name} is a causal LM; encode() needs an encoder such as 'minilm'")
        single = isinstance(texts, str)
        rows = []
        for text in [texts] if single else texts:
            hidden = self.forward(self._tokens(text))
            rows.append((mean_pool(hidden) if normalize else hidden.mean(0)).numpy())
        out = np.stack(rows).astype(np.float32)
        return out[0] if single else out

    def forward(self, ids: list[int]) -> torch.Tensor:
        """One forward pass: logits (S, V) of a causal LM or hidden states (S, H) of an encoder."""
        return self.execute(Request(torch.tensor(ids, dtype=torch.long))).output

    def execute(self, req: Request) -> ForwardResult:
        """One forward pass with what each device reports of it (time, waiting per collective, memory).

        A causal LM's pass too large for some device's memory budget (activations and logits of a
        long input) runs as several passes over a KV cache, each as long as every device takes
        (the logits are the same); one that cannot fit even so is refused before it starts."""
        ex = self.session.executor
        short = self._guard.shortfall(req)
        if short is None:
            res = ex.forward(req)
            self._guard.observe(res)
            return res
        if not self.config.causal or req.cache or req.start_pos:
            raise DeviceOutOfMemory(short.message(f"a pass of {req.ids.shape[0]} tokens",
                                                  "send fewer tokens at once, or give this device a smaller share"))
        return self._chunked(req)

    def _chunked(self, req: Request) -> ForwardResult:
        for _ in range(3):
            try:
                return self._chunks(req)
            except DeviceOutOfMemory:  # a worker refused a chunk the guard let through: again, shorter
                if not self._guard.refused():
                    raise
        return self._chunks(req)

    def _chunks(self, req: Request) -> ForwardResult:
        ex, ids = self.session.executor, req.ids.tolist()
        name = f"pass{next(_PASSES)}"
        self._guard.check_prompt(len(ids), name)
        results, pos = [], 0
        try:
            while pos < len(ids):
                n = self._guard.prefill_chunk(ids, pos, name, last_only=req.last_only)
                if n == 0:
                    short = self._guard.prompt_shortfall(len(ids), name)
                    raise DeviceOutOfMemory(f"a pass of {len(ids)} tokens does not fit even one token at a time"
                                            + (f": {short.message('it', 'send fewer tokens')}" if short else ""))
                chunk = Request(req.ids[pos: pos + n], None if req.types is None else req.types[pos: pos + n],
                                start_pos=pos, last_only=req.last_only, cache=name)
                results.append(ex.forward(chunk))
                self._guard.observe(results[-1])
                pos += n
        finally:
            try:  # free the cache (with a one-token pass: caches are dropped by requests)
                self._guard.observe(ex.forward(Request(req.ids[:1], cache="", drop=(name,))))
            except GalaxyError:
                pass  # the devices that failed lost it anyway
        return join_results(results, last_only=req.last_only)

    def generator(self) -> TextGenerator:
        return TextGenerator(self.session._ex, self.tokenizer, self.config, self._prefix, self._guard)


_PASSES = itertools.count()


def join_results(results: list[ForwardResult], last_only: bool = False) -> ForwardResult:
    """One pass's result from the passes of its chunks: the output rows joined (the last row with
    last_only), times added, each device's collectives in order and its peaks the largest."""
    out = results[-1].output if last_only else torch.cat([r.output for r in results], 0)
    devices = []
    for per in zip(*(r.devices for r in results)):
        devices.append(DeviceStats(per[0].rank, sum(d.forward_s for d in per), tuple(op for d in per for op in d.ops),
                                   max(d.peak_rss_bytes for d in per), per[0].rss_before_bytes,
                                   per[-1].kv_cache_bytes, sum(d.cpu_s for d in per)))
    return ForwardResult(out, sum(r.seconds for r in results), devices)


def connect(addresses: list[str] | None = None, *, local: int | None = None, cluster_file: str | None = None,
            token: str | None = None, tls: str | None = None, threads: int | None = None,
            transport: str = "grpc", recover: bool = False) -> Session:
    """Open a session on running workers (`addresses` or a `cluster_file`), or on `local` N
    workers this call starts (and the session stops). transport='inproc' runs local devices
    as threads of this process (no sockets) -- handy in tests. tls: a directory from
    `galaxy keys init` (mutual TLS; with local=N, keys for local0..N-1 are created if missing).
    recover=True: when a device drops out, re-split over the survivors and retry; re-balance away
    from a device that turns out much slower than its share (galaxy.runtime.recovery)."""
    given = sum(x is not None for x in (addresses, local, cluster_file))
    if given != 1:
        raise GalaxyError("connect() needs exactly one of addresses=, local= or cluster_file=")
    if transport == "inproc":
        if local is None:
            raise GalaxyError("transport='inproc' needs local=N")
        return Session(InprocCluster(local))
    owned = None
    if cluster_file is not None:
        addresses, file_token = cluster_endpoints(cluster_file)
        token = token or file_token
    elif local is not None:
        if tls is not None:
            init_keys(tls, [f"local{i}" for i in range(local)])
        owned = LocalWorkers(local, threads=threads, token=token, extra_args=["--tls", tls] if tls else None)
        addresses = owned.start()
    tls_files = None
    if tls is not None:
        tls_files = TlsFiles.load(tls, COORDINATOR)
    try:
        if recover:
            ex = ResilientCluster(addresses, token=token, tls=tls_files)
        else:
            ex = Cluster(addresses, token=token, tls=tls_files)
        ex.hello()
    except BaseException:
        if owned is not None:
            owned.stop()
        raise
    return Session(ex, owned, token)
