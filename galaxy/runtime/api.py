"""The Python API for an app on one of the devices.

    import galaxy

    with galaxy.connect(local=3) as cluster:            # or addresses=[...], cluster_file="lan.yaml"
        lm = cluster.load("smollm2")                    # path, .gguf, 'minilm', or random_init=PRESET
        print(lm.generate("The capital of France is", max_new_tokens=16))
        for piece in lm.stream("Tell me about Jetsons."):
            print(piece, end="", flush=True)

Errors are typed (galaxy.errors): PeerUnreachable, DeviceOutOfMemory, PlanMismatch, AuthError,
ProtocolMismatch, WorkerError, InvalidRequest (a bad argument), ModelUnloaded (a model used after the
session loaded another) -- all GalaxyError.

A session holds one model at a time: `load` replaces the model on the devices, and a `Model` handle
from an earlier load refuses to run (ModelUnloaded) instead of running the new model's weights
under the old one's tokenizer. Generation goes through the model's serving engine (galaxy.engine):
calls from several threads at once are batched on the devices, each getting what it gets alone.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from devices.emulate import cluster_endpoints
from planner.plan import DEFAULT_KV_PATH, KV_PATHS, Plan

from ..addresses import split_address
from ..engine.arguments import need_choice, need_int, need_number, stop_strings, token_ids
from ..engine.disagg import DisaggConfig, DisaggEngine
from ..engine.engine import Engine, EngineConfig, GenerationStream
from ..engine.generation import Generation, GenerationConfig
from ..engine.sampling import SamplingConfig
from ..errors import GalaxyError, InvalidRequest, ModelUnloaded, PlanMismatch
from ..model.checkpoints import WeightSource
from ..model.checkpoints.random import RandomWeights
from ..model.decode import native_format
from ..model.transformer import mean_pool
from ..parallel import memory
from ..parallel.compact import align_partition
from ..parallel.executor import Executor, ForwardResult, LoadOptions
from ..parallel.forward import Request
from ..parallel.sharding import Partition, Strategy, even_partition, weighted_partition
from ..transport.client import Cluster
from ..transport.security import COORDINATOR, TlsFiles, init_keys
from ..transport.shardstore import source_file_bytes
from ..transport.spawn import LocalWorkers
from .budget import check_pass, fit_partition, kv_blocks_now
from .decode_layout import AUTO, SPLIT, DecodeDecision, check_decode_layout, decide
from .inproc import InprocCluster
from .placement import Placement
from .recovery import ResilientCluster
from .sources import open_source

log = logging.getLogger(__name__)

class Session:
    """A connection to a set of devices; `load` puts a model on them. Close it (or use `with`)."""

    def __init__(self, executor: Executor, owned: LocalWorkers | None = None, token: str | None = None):
        self._ex = executor
        self._owned = owned  # LocalWorkers to stop on close
        self.token = token
        self.model: Model | None = None  # the one model on the devices now
        self.closed = False

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
             backend: str = "torch", weights_format: str | None = None, seq_len: int = 0,
             placement: Placement | dict | None = None, decode_threads: int | None = None,
             decode_layout: str | int = AUTO, kv_path: str | None = None, greedy: bool = True) -> Model:
        """Load `model` (default: the embedded SmolLM2) split across the devices.

        The split comes from `plan` (a planner Plan or a plan file path), an explicit `partition`,
        relative device `weights`, or else from the devices themselves: when any has a memory
        budget, a Galaxy split by each device's speed within what its memory holds (an even one
        under another `strategy`), refused with DeviceOutOfMemory before any weight moves when they
        cannot hold the model; without budgets, an even split. seq_len: tokens each device reserves
        memory for (KV cache and a prefill of as many; default 512). wire: lossy activation format
        on every link ("bf16", "fp16", "int8") or a per-link matrix (default exact fp32). backend:
        "torch", "onnx" (ONNX Runtime per shard) or "auto" (each device times both and keeps the
        faster). stream_weights: send each device its shard from here, so devices need no model file
        (default: yes unless the devices are local workers this session started, which read the
        file directly). engine: how generation requests are batched (galaxy.engine.EngineConfig).
        weights_format: how each device holds its linear weights, e.g. "fp32" (the exact reference), "fp16",
        "int8", "int4" (galaxy.model.quant.parse_format), on workers and in-process devices alike (a streamed
        shard travels in it); "auto": the file's own compact counterpart (int4 for a Q4 GGUF such as the
        embedded SmolLM2, model.decode.native_format; fp32 for float checkpoints and random init). Default: the
        plan's, else "auto" (fp32 with dtype="bfloat16" or another backend, which compact formats do not take):
        a quantized file runs in its compact format, as llama.cpp would, and each request still gets the
        tokens it gets alone however many share its steps (docs/decode-formats.md). A split from a plan or made
        here (even, weighted, fitted to memory) is cut on the format's granules (compact.align_partition:
        less than one granule moves per device); a given partition must already be. docs/decode-formats.md.
        placement: phase-separated serving (galaxy.runtime.placement: a Placement, or a plan's serve
        section {"placement": "disaggregated", "prefill": [0, 1, 2], "decode": [3]}): prompts are
        prefilled on one group of devices and decoded on another, each sequence's K/V moved between
        them (galaxy.engine.disagg, docs/engine.md "Phase separation"); plan, partition, weights and
        strategy then do not apply.
        decode_threads: intra-op threads of a step of few tokens (decode, galaxy.parallel.threads) on every
        device; steps of many tokens (prefill chunks) keep each device's own count. Default: each device
        times its shard's decode matmuls at 1 and at all its threads at load and keeps the faster.
        decode_layout: where a causal LM decodes when no placement is given (galaxy.runtime.decode_layout):
        "auto" (default) -- the planner's fastest predicted layout among the split over every device,
        fewer devices, or one device holding the whole model beside its prefill shard (every device
        still prefills), said once at load (`Model.decode.line`, logged); "split" -- on the loaded
        split (the exact tensor-parallel path, as before); or a device (index, worker name or address)
        that decodes alone.
        kv_path: how a phase-separated placement moves each sequence's K/V to the decode group (engine/disagg.py
        KV_PATHS, the planner's `--kv-path`): "direct" -- one hop, each prefill device to each decode device with
        the coordinator's ticket, where both groups are workers (in-process groups have no hop to save and go
        "coordinator"); "coordinator" -- pulled here, then pushed. Default: the plan's serve section's path if it
        names one, else "direct".
        greedy: whether requests will mostly decode greedily, for the auto decode layout's pricing: a greedy
        step returns each sequence's top-1 from the devices, a sampled one its whole logit row (16.5 ms a token
        over 100 Mbit/s for SmolLM2). `galaxy serve` passes False unless its default temperature is 0.
        """
        if self.closed:
            raise GalaxyError("this session is closed; open a new one with galaxy.connect(...)")
        if model is not None and random_init is not None:
            raise InvalidRequest(f"load(model={model!r}, random_init={random_init!r}): give one of them, not both")
        if not (model is None or isinstance(model, (str, Path, WeightSource))):
            raise InvalidRequest(f"model={model!r}: must be a path, 'smollm2', 'minilm' or a WeightSource, "
                                 f"got {type(model).__name__}")
        need_int("seed", seed)
        if decode_threads is not None:
            need_int("decode_threads", decode_threads, 1)
        check_decode_layout(decode_layout)
        if kv_path is not None:
            need_choice("kv_path", kv_path, list(KV_PATHS))
        if engine is not None and not isinstance(engine, EngineConfig):
            raise InvalidRequest(f"engine={engine!r}: must be a galaxy.engine.EngineConfig")
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
        if weights_format is None:
            weights_format = plan.weights_format if plan is not None else default_weights_format(dtype, backend)
        weights_format = resolve_weights_format(weights_format, source)
        options = LoadOptions(dtype=dtype, tiles=tiles, stream=stream_weights, wire=wire, backend=backend,
                              weights_format=weights_format, seq_len=min(seq_len, cfg.max_positions),
                              decode_threads=decode_threads or 0)
        if placement is None and plan is not None and plan.serve is not None and plan.serve.placement != "colocated":
            placement = self._plan_placement(plan, cfg)
        if kv_path is None:
            kv_path = (plan.serve.kv_path if plan is not None and plan.serve is not None else "") or DEFAULT_KV_PATH
        if isinstance(placement, dict):
            placement = self._placement(placement)
        if placement is not None:
            loaded = self._load_disaggregated(source, placement, options, _describe(model, random_init, source),
                                              engine)
            loaded.kv_path = kv_path
            return loaded
        if plan is not None:
            partition = align_partition(cfg, plan_partition(plan, cfg, self.world), options.weight_format)
        elif partition is None:
            if weights is not None:
                partition = weighted_partition(cfg, self._weights(weights))
            else:
                need_choice("strategy", strategy, [s.value for s in Strategy])
                partition = self._split(source, strategy, options, _describe(model, random_init, source))
            partition = align_partition(cfg, partition, options.weight_format)
        elif not isinstance(partition, Partition):
            raise InvalidRequest(f"partition={partition!r}: must be a galaxy.parallel.sharding.Partition")
        if partition.world != self.world:
            raise PlanMismatch(f"the split has {partition.world} devices, the session {self.world}")
        what = _describe(model, random_init, source)
        if plan is not None and plan.serve is not None and check_decode_layout(decode_layout) == AUTO:
            decision = DecodeDecision(None, "decode layout: split (the plan's serve section places it there)")
        else:
            decision = self._decode_layout(source, partition, options, decode_layout, what, greedy)
        if decision.placement is not None:
            loaded = self._load_disaggregated(source, decision.placement, options, what, engine)
            loaded.decode = decision
            loaded.kv_path = kv_path
            return loaded
        if self.model is not None:
            self.model._unload(_describe(model, random_init, source))
            self.model = None  # from here on the devices do not hold it, whether or not this load succeeds
            self._ex.release()
        weight_bytes = self._ex.load(source, partition, options)
        self.model = Model(self, source, partition, _describe(model, random_init, source), engine)
        self.model.weight_bytes = list(weight_bytes)
        self.model.seq_len = options.seq_len or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
        self.model.weights_format = options.weights_format
        self.model.decode = decision
        return self.model

    def _decode_layout(self, source: WeightSource, partition: Partition, options: LoadOptions, want,
                       what: str, greedy: bool = True) -> DecodeDecision:
        """Where the model decodes (runtime.decode_layout), said once (logged, and Model.decode.line)."""
        if check_decode_layout(want) != SPLIT and self.model is not None:  # profiling wants the devices free
            self.model._unload(what)
            self.model = None
            self._ex.release()
        decision = decide(self._ex, source.config, partition, options, want,
                          None if options.stream else source_file_bytes(source), greedy=greedy)
        log.info("%s", decision.line)  # galaxy run / serve print INFO: the line is said there
        return decision

    def _placement(self, serve: dict) -> Placement | None:
        return Placement.from_serve(serve, [i.name for i in self._ex.hello()] or list(self._ex.names),
                                    list(getattr(self._ex, "addresses", [])))

    def _plan_placement(self, plan: Plan, cfg) -> Placement:
        """A `galaxy plan --serve` plan that separates the phases: its devices prefill with the split it
        solved for them, in its order; its serve section names the decode devices (the session must
        reach them all: a cluster file or --workers with every device, not the plan's devices alone)."""
        serve = {"placement": plan.serve.placement, "prefill": [d.name for d in plan.devices],
                 "decode": list(plan.serve.decode)}
        return dataclasses.replace(self._placement(serve), prefill_partition=plan.to_partition(cfg))

    def _load_disaggregated(self, source: WeightSource, placement: Placement, options: LoadOptions, what: str,
                            engine: EngineConfig | None) -> Model:
        """Load the prefill group's and the decode group's shards, each on executors of its own."""
        if not isinstance(placement, Placement):
            raise InvalidRequest(f"placement={placement!r}: must be a galaxy.runtime.placement.Placement or a dict")
        if options.wire is not None:
            raise PlanMismatch("wire formats are per link of one ring; a disaggregated placement has two groups")
        placement.check(self.world)
        cfg = source.config
        pre_part, dec_part = (align_partition(cfg, p, options.weight_format) for p in placement.partitions(cfg))
        if self.model is not None:
            self.model._unload(what)
            self.model = None
            self._ex.release()
        groups = []
        try:
            for indices, part in ((placement.prefill, pre_part), (placement.decode, dec_part)):
                ex = self._group(indices)
                groups.append(ex)
                ex.load(source, part, options)
        except BaseException:
            for ex in groups:
                ex.close()
            raise
        self.model = Model(self, source, pre_part, what, engine, groups=(groups[0], groups[1]))
        self.model.placement = placement
        self.model.seq_len = options.seq_len or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
        self.model.weights_format = options.weights_format
        return self.model

    def _group(self, indices) -> Executor:
        """An executor over some of the session's devices (a plain gRPC Cluster, or in-process ranks);
        with recovery (connect(recover=True)) a ResilientCluster of its own: a group that loses a device
        re-plans over its own survivors (docs/faults.md, "Phase-separated serving")."""
        if isinstance(self._ex, InprocCluster):
            return InprocCluster(len(indices), self._ex.timeout, self._ex.kv_bytes)
        base = getattr(self._ex, "cluster", self._ex)  # a ResilientCluster's Cluster: its token and keys
        addresses = [base.addresses[i] for i in indices]
        if isinstance(self._ex, ResilientCluster):
            return ResilientCluster(addresses, token=base.token, tls=base.tls)
        return Cluster(addresses, token=base.token, tls=base.tls)

    def _weights(self, weights) -> list[float]:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise InvalidRequest(f"weights={weights!r}: must be a list of relative device speeds, one per device")
        if len(weights) != self.world:
            raise PlanMismatch(f"{len(weights)} weights for {self.world} devices")
        out = [need_number(f"weights[{i}]", w, 0.0) for i, w in enumerate(weights)]
        if not any(out):
            raise InvalidRequest(f"weights={list(weights)}: at least one device needs a weight above 0")
        return out

    def _split(self, source: WeightSource, strategy: str, options: LoadOptions, what: str) -> Partition:
        """No plan: even, unless devices have memory budgets -- then Galaxy's split by speed within
        what each one's memory holds (runtime.budget.fit_partition)."""
        cfg = source.config
        if Strategy(strategy) != Strategy.GALAXY:
            return even_partition(cfg, self.world, strategy)
        if self.model is not None:  # what is loaded now is not in the way of the sizing
            self.model._unload(what)
            self.model = None
            self._ex.release()
        infos = self._ex.hello()
        if not infos or not any(i.memory_budget for i in infos):
            return even_partition(cfg, self.world, strategy)
        names = list(self._ex.names)
        return fit_partition(cfg, infos, names, options, None if options.stream else source_file_bytes(source))

    def close(self) -> None:
        self.closed = True
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


def default_weights_format(dtype: str = "float32", backend: str = "torch") -> str:
    """The weights format a load takes when none is given: "auto" (the file's own), except with a bfloat16
    dtype or another backend than torch, which compact formats do not run on (LoadOptions refuses them)."""
    return "auto" if dtype == "float32" and backend == "torch" else "fp32"


def resolve_weights_format(weights_format: str, source: WeightSource) -> str:
    """A weights format as LoadOptions takes it: "auto" -> the source's own compact counterpart (int4 for a
    Q4 GGUF, fp32 for float checkpoints and random init: model.decode.native_format); others unchanged."""
    return str(native_format(source)) if weights_format == "auto" else weights_format


def _describe(model, random_init, source: WeightSource) -> str:
    """How the caller named a model: what they passed to load(), else the source's name."""
    if random_init is not None:
        return f"random_init={random_init!r}"
    if model is None:
        return "the embedded SmolLM2"
    if isinstance(model, WeightSource):
        return repr(source.config.name or str(source.path))
    return repr(str(model))


def plan_partition(plan, cfg, world: int) -> Partition:
    if not isinstance(plan, Plan):
        plan = Plan.from_json(Path(plan).read_text(), cfg=cfg)
    part = plan.to_partition(cfg)
    if part.world != world:
        raise PlanMismatch(f"the plan has {part.world} devices, the session {world}")
    return part


class Model:
    """A model loaded on a session's devices."""

    def __init__(self, session: Session, source: WeightSource, partition: Partition, name: str = "",
                 engine: EngineConfig | None = None, groups: tuple[Executor, Executor] | None = None):
        self.session, self.source, self._partition = session, source, partition
        self.config = source.config
        self.tokenizer = source.tokenizer()
        self.name = name or repr(source.config.name)
        self.replaced_by = ""  # what the session loaded over this model (for ModelUnloaded)
        self.weight_bytes: list[int] = []  # per device, as loaded
        self.weights_format = "fp32"  # how the devices hold the linears ("auto" resolved)
        self.seq_len = memory.DEFAULT_SEQ_LEN  # tokens of one pass the devices reserved memory for (load)
        self._engine_config = engine or EngineConfig()
        self._engine: Engine | DisaggEngine | None = None
        self._engine_lock = threading.Lock()
        self.groups = groups  # (prefill, decode) executors of a disaggregated placement; None: colocated
        self.placement: Placement | None = None
        self.kv_path = DEFAULT_KV_PATH  # how a phase-separated placement's K/V move (load's kv_path)
        self.decode: DecodeDecision | None = None  # where it decodes and why (runtime.decode_layout), said at load
        self._passes_without_pool = False  # one-shot passes ran on budgeted devices before the engine's pool

    @property
    def executor(self) -> Executor:
        """What runs this model's single passes: the session's devices, or the prefill group's."""
        return self.groups[0] if self.groups else self.session.executor

    @property
    def partition(self) -> Partition:
        """The current split (recovery may have changed it since load)."""
        return getattr(self.executor, "partition", None) or self._partition

    @property
    def engine(self) -> Engine | DisaggEngine:
        """The serving engine that batches this model's generation requests (started on first use):
        a DisaggEngine over the two groups of a disaggregated placement."""
        self._check_loaded()
        with self._engine_lock:
            if self._engine is None and self.groups:
                pre, dec = self.groups
                recover = isinstance(self.session.executor, ResilientCluster)  # connect(recover=True)
                self._engine = DisaggEngine(pre, dec, self.config, self.tokenizer, self._step_config(pre),
                                            self._step_config(dec), DisaggConfig.for_path(self.kv_path,
                                                                                           recover=recover))
            elif self._engine is None:
                self._engine = Engine(self.session.executor, self.config, self.tokenizer, self._step_config())
            return self._engine

    def _step_config(self, executor: Executor | None = None) -> EngineConfig:
        """The engine's config, its steps no longer than the pass the budgeted devices reserved memory
        for at load (seq_len): a longer step would be refused by their workers."""
        c = self._engine_config  # (its `roles`, None: the engine reads them from the executor's format)
        ex = executor or self.session.executor
        if not any(m.budget for m in getattr(ex, "loaded_memory", []) or []):
            return c
        n = min(c.max_batched_tokens, self.seq_len)
        c = dataclasses.replace(c, max_batched_tokens=n, max_running=min(c.max_running, n),
                                chunk_size=None if c.chunk_size is None else min(c.chunk_size, n))
        if self._passes_without_pool:  # the pool fits what the devices hold now, not just after the load
            blocks = kv_blocks_now(ex, self.config, self.seq_len, c.block_size)
            if blocks is not None:
                c = dataclasses.replace(c, kv_blocks=min(blocks, c.kv_blocks or blocks, ex.kv_blocks(c.block_size)))
        return c

    def _unload(self, replaced_by: str) -> None:
        """The session loads something else in this model's place: its engine stops, and requests
        still in it end with ModelUnloaded, as every later use does."""
        self.replaced_by = replaced_by
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close(ModelUnloaded(f"this model ({self.name}) was unloaded while the request ran: the session "
                                       f"loaded {replaced_by} in its place"))
        for ex in self.groups or ():
            ex.close()

    @property
    def loaded(self) -> bool:
        """Whether the devices still hold this model (False once the session loaded another or closed)."""
        return self.session.model is self and not self.session.closed

    def _check_loaded(self) -> None:
        """Refuse to run on devices that hold another model (or none): that would return its output."""
        s = self.session
        if s.closed:
            raise ModelUnloaded(f"this model ({self.name}) belonged to a session that is closed; open a new "
                                "session (galaxy.connect) and load it there")
        if s.model is self:
            return
        after = self.replaced_by or "another model"
        if s.model is None:
            raise ModelUnloaded(f"this model ({self.name}) is no longer on the devices: the session released it to "
                                f"load {after}, and that load did not finish. Load {self.name} again")
        raise ModelUnloaded(f"this model ({self.name}) is no longer on the devices: the session loaded {after} after "
                            f"it, and a session holds one model at a time. Use the handle that load returned, load "
                            f"{self.name} again (replacing {after}), or open a second session for the other model")

    def _tokens(self, prompt: str | list[int], name: str = "prompt") -> list[int]:
        """Token ids of text (through the tokenizer) or of ids given directly, checked against the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest(f"{name}='': the text is empty; give some text or token ids")
            if self.tokenizer is None:
                raise InvalidRequest(f"{name}: {self.source.path} has no tokenizer; pass token ids instead of text")
            return token_ids(name, self.tokenizer.encode(prompt), self.config.vocab_size)
        return token_ids(name, prompt, self.config.vocab_size)

    def _prompt(self, prompt, gc: GenerationConfig) -> list[int]:
        """A prompt's ids, checked to leave room for max_new_tokens in the model's positions."""
        ids = self._tokens(prompt)
        room = self.config.max_positions - len(ids)
        if gc.max_new_tokens > room:
            raise InvalidRequest(f"max_new_tokens={gc.max_new_tokens}: the prompt's {len(ids)} tokens + "
                                 f"{gc.max_new_tokens} new ones exceed the model's {self.config.max_positions} "
                                 f"positions; ask for at most {max(0, room)}")
        return ids

    def generation_config(self, max_new_tokens, temperature, top_k, top_p, seed, stop,
                          prefill_chunk) -> GenerationConfig:
        """Checked generation settings (InvalidRequest names the argument that is out of range)."""
        return GenerationConfig(max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed), stop_strings(stop),
                                prefill_chunk=prefill_chunk)

    def submit(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None, prefill_chunk: int = 0,
               timeout: float | None = None) -> GenerationStream:
        """Queue a generation and return at once: iterate the stream for TokenEvents, or call
        `.result()`. timeout: seconds until it ends with finish 'deadline' (None: no deadline)."""
        gc = self.generation_config(max_new_tokens, temperature, top_k, top_p, seed, stop, prefill_chunk)
        if timeout is not None:
            need_number("timeout", timeout, 0.0, low_open=True)
        return self.engine.submit(self._prompt(prompt, gc), gc, timeout)

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
        """Text pieces as the tokens are produced (arguments are checked here, before the first piece)."""
        stream = self.submit(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             stop=stop, prefill_chunk=prefill_chunk)
        return (ev.text for ev in stream if ev.text)

    def chat(self, messages: list[dict], **kw) -> str:
        """Generate a reply to chat messages with the model's chat template."""
        return self.generate(self.chat_ids(messages), **kw)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt of chat messages under the model's chat template, as token ids."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise InvalidRequest(f"chat(): model {self.name} has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequest(f"messages={messages!r}: must be a non-empty list of "
                                 "{'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InvalidRequest(f"messages[{i}]={m!r}: must be a dict with a 'role' and a 'content' string")
        try:
            prompt = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - templates raise what they like (e.g. "roles must alternate")
            raise InvalidRequest(f"messages: the model's chat template rejected them: {e}") from None
        return self.tokenizer.encode(prompt)

    def encode(self, texts: str | list[str], normalize: bool = True) -> np.ndarray:
        """Sentence embeddings (mean pooling, as sentence-transformers) for an encoder model."""
        if self.config.causal:
            raise InvalidRequest(f"{self.config.name} is a causal LM; encode() needs an encoder such as 'minilm'")
        single = isinstance(texts, str)
        if not single and (not isinstance(texts, (list, tuple)) or not texts):
            raise InvalidRequest(f"texts={texts!r}: must be a string or a non-empty list of strings")
        self._check_loaded()
        rows = []
        for i, text in enumerate([texts] if single else texts):
            hidden = self.forward(self._tokens(text, "texts" if single else f"texts[{i}]"))
            rows.append((mean_pool(hidden) if normalize else hidden.mean(0)).numpy())
        out = np.stack(rows).astype(np.float32)
        return out[0] if single else out

    def forward(self, ids: list[int]) -> torch.Tensor:
        """One forward pass: logits (S, V) of a causal LM or hidden states (S, H) of an encoder."""
        ids = token_ids("ids", ids, self.config.vocab_size)
        if len(ids) > self.config.max_positions:
            raise InvalidRequest(f"ids: {len(ids)} tokens; the model allows at most {self.config.max_positions}")
        return self.execute(Request(torch.tensor(ids, dtype=torch.long))).output

    def execute(self, req: Request) -> ForwardResult:
        """One forward pass with what each device reports of it (time, waiting per collective, memory).
        A pass too large for some device's memory budget (the activations and logits of a long
        input) is refused before any device computes, naming the device and the numbers."""
        self._check_loaded()
        ex = self.executor
        pool = self._engine is not None  # the engine's first step allocates the pool
        check_pass(ex, self.config, req, pool=pool)
        self._passes_without_pool |= not pool
        return ex.forward(req)


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
        raise InvalidRequest("connect() needs exactly one of addresses=, local= or cluster_file=")
    need_choice("transport", transport, ("grpc", "inproc"))
    if local is not None:
        need_int("local", local, 1)
    if threads is not None:
        need_int("threads", threads, 1)
    if addresses is not None and (isinstance(addresses, (str, bytes)) or not isinstance(addresses, (list, tuple))
                                  or not addresses or not all(isinstance(a, str) for a in addresses)):
        raise InvalidRequest(f"addresses={addresses!r}: must be a non-empty list of 'HOST:PORT' strings, "
                             "e.g. ['192.168.1.20:50051']")
    for a in addresses or ():
        split_address(a, "worker address")  # AddressError (a GalaxyError) names it
    if transport == "inproc":
        if local is None:
            raise InvalidRequest("transport='inproc' needs local=N")
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
