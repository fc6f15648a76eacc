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

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from devices.emulate import cluster_endpoints
from planner.plan import Plan

from ..engine.engine import Engine, EngineConfig, GenerationStream, check_prompt
from ..engine.generation import Generation, GenerationConfig
from ..engine.sampling import SamplingConfig
from ..errors import GalaxyError, InvalidRequest, ModelUnloaded, PlanMismatch
from ..model.checkpoints import WeightSource
from ..model.checkpoints.random import RandomWeights
from ..model.transformer import mean_pool
from ..parallel.executor import Executor, ForwardResult, LoadOptions
from ..parallel.forward import Request
from ..parallel.sharding import Partition, even_partition, weighted_partition
from ..transport.client import Cluster
from ..transport.security import COORDINATOR, TlsFiles, init_keys
from ..transport.spawn import LocalWorkers
from .inproc import InprocCluster
from .recovery import ResilientCluster
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
             plan=None, dtype: str = "float32", tiles: int = 1, engine: EngineConfig | None = None,
             stream_weights: bool | None = None, wire: list[list[str]] | str | None = None,
             backend: str = "torch") -> Model:
        """Load `model` (default: the embedded SmolLM2) split across the devices.

        The split comes from `plan` (a planner Plan or a plan file path), an explicit `partition`,
        relative device `weights`, or an even split under `strategy`. wire: lossy activation format
        on every link ("bf16", "fp16", "int8") or a per-link matrix (default exact fp32). backend:
        "torch", "onnx" (ONNX Runtime per shard) or "auto" (each device times both and keeps the
        faster). stream_weights: send each device its shard from here, so devices need no model file
        (default: yes unless the devices are local workers this session started, which read the
        file directly). engine: how generation requests are batched (galaxy.engine.EngineConfig).

        A model loaded before is unloaded from the devices; its handle then refuses to run
        (ModelUnloaded) rather than answer with the new model's weights.
        """
        if isinstance(model, WeightSource):
            source = model
        else:
            source = open_source(None if model is None else str(model), random_init, seed)
        cfg = source.config
        if plan is not None:
            partition = plan_partition(plan, cfg, self.world)
        elif partition is None:
            if weights is not None and len(weights) != self.world:
                raise PlanMismatch(f"{len(weights)} weights for {self.world} devices")
            partition = (weighted_partition(cfg, weights) if weights is not None
                         else even_partition(cfg, self.world, strategy))
        if partition.world != self.world:
            raise PlanMismatch(f"the split has {partition.world} devices, the session {self.world}")
        if self.model is not None:
            self.model._unload(cfg.name or source.path)
            self._ex.release()
        if isinstance(wire, str):
            wire = [[wire] * self.world for _ in range(self.world)]
        if stream_weights is None:
            stream_weights = self._owned is None and not isinstance(source, RandomWeights)
        options = LoadOptions(dtype=dtype, tiles=tiles, stream=stream_weights, wire=wire, backend=backend)
        weight_bytes = self._ex.load(source, partition, options)
        self.model = Model(self, source, partition, engine)
        self.model.weight_bytes = list(weight_bytes)
        return self.model

    def close(self) -> None:
        if self.model is not None:
            self.model._unload("nothing (the session was closed)")
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
    """A model loaded on a session's devices. Thread-safe: requests from several threads at once run
    batched by the serving engine (galaxy.engine), each getting what it would get alone."""

    def __init__(self, session: Session, source: WeightSource, partition: Partition,
                 engine: EngineConfig | None = None):
        self.session, self.source, self._partition = session, source, partition
        self.config = source.config
        self.tokenizer = source.tokenizer()
        self.weight_bytes: list[int] = []  # per device, as loaded
        self._engine_config = engine or EngineConfig()
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._unloaded_by: str | None = None  # what replaced it on the devices

    @property
    def partition(self) -> Partition:
        """The current split (recovery may have changed it since load)."""
        self._check_loaded()
        return self.session.executor.partition or self._partition

    @property
    def engine(self) -> Engine:
        """The serving engine that batches this model's generation requests (started on first use)."""
        self._check_loaded()
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.session.executor, self.config, self.tokenizer, self._engine_config)
            return self._engine

    def _unload(self, by: str) -> None:
        """The session loaded something else in this model's place: stop its engine, refuse its use."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
        self._unloaded_by = by

    def _check_loaded(self) -> None:
        if self._unloaded_by is not None:
            raise ModelUnloaded(f"{self.config.name or self.source.path} is no longer on the devices: the session "
                                f"loaded {self._unloaded_by} in its place. Load it again (session.load(...)), or open "
                                "a second session for the other model")

    def _tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(f"{self.source.path} has no tokenizer: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequest("the prompt is empty: give some text or token ids")
            return ids
        return check_prompt(prompt, self.config.vocab_size)

    def generation_config(self, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None,
                          prefill_chunk=0) -> GenerationConfig:
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return GenerationConfig(max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed), stop,
                                prefill_chunk=prefill_chunk)

    def submit(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None, prefill_chunk: int = 0,
               timeout: float | None = None) -> GenerationStream:
        """Queue a generation and return at once: iterate the stream for TokenEvents, or call
        `.result()`. timeout: seconds until it ends with finish 'deadline' (None: no deadline)."""
        gc = self.generation_config(max_new_tokens, temperature, top_k, top_p, seed, stop, prefill_chunk)
        return self.engine.submit(self._tokens(prompt), gc, timeout)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
                 prefill_chunk: int = 0, details: bool = False) -> str | Generation:
        """The generated text (or, with details=True, the Generation with tokens and timings)."""
        gen = self.submit(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop=stop, prefill_chunk=prefill_chunk).result()
        return gen if details else gen.text

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
               prefill_chunk: int = 0) -> Iterator[str]:
        """Text pieces as the tokens are produced."""
        for ev in self.submit(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop=stop, prefill_chunk=prefill_chunk):
            if ev.text:
                yield ev.text

    def chat(self, messages: list[dict], **kw) -> str:
        """Generate a reply to chat messages with the model's chat template."""
        return self.generate(self.chat_ids(messages), **kw)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt of chat messages under the model's chat template, as token ids."""
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer and no chat template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequest("messages must be a list of {'role': ..., 'content': ...} dicts")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def encode(self, texts: str | list[str], normalize: bool = True) -> np.ndarray:
        """Sentence embeddings (mean pooling, as sentence-transformers) for an encoder model."""
        if self.config.causal:
            raise GalaxyError(f"{self.config.name} is a causal LM; encode() needs an encoder such as 'minilm'")
        single = isinstance(texts, str)
        if not single and (not isinstance(texts, list) or not texts):
            raise InvalidRequest("texts must be a string or a non-empty list of strings (or of token id lists)")
        rows = []
        for text in [texts] if single else texts:
            hidden = self.forward(self._tokens(text))
            rows.append((mean_pool(hidden) if normalize else hidden.mean(0)).numpy())
        out = np.stack(rows).astype(np.float32)
        return out[0] if single else out

    def forward(self, ids: list[int]) -> torch.Tensor:
        """One forward pass: logits (S, V) of a causal LM or hidden states (S, H) of an encoder."""
        return self.execute(Request(torch.tensor(check_prompt(ids, self.config.vocab_size), dtype=torch.long))).output

    def execute(self, req: Request) -> ForwardResult:
        """One forward pass with what each device reports of it (time, waiting per collective, memory)."""
        self._check_loaded()
        return self.session.executor.forward(req)


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
