"""`galaxy worker`: one long-running peer per device.

A worker is idle until a coordinator sends `Load` (model reference, partition, its rank, the
ring's addresses); it then reads only its own shard of the weights and joins the ring. Each
`Forward` runs this rank's part of the pass, exchanging tiles directly with its neighbours over
`Exchange` streams. `Release` (or a new `Load`) returns it to idle. The servicer methods are
thin: the compute is `galaxy.parallel`, the data plane `peers.PeerTransport`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ipaddress
import json
import logging
import resource
import signal
import socket
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import psutil
import torch
from google.protobuf.message import DecodeError

from ..addresses import AddressError, join_address, split_address
from ..backends.profiling import profile_need, time_blocks
from ..backends.select import use_backend
from ..errors import NO_SESSION, DeviceOutOfMemory, GalaxyError, KVTransferError, TransportError
from ..model.checkpoints import CheckpointError, WeightSource, open_checkpoint
from ..model.checkpoints.random import RandomWeights
from ..model.config import ConfigError, ModelConfig
from ..model.quant import parse_format
from ..model.transformer import DTYPES
from ..parallel import decode_graph, memory
from ..parallel.codec import codec_seconds_per_byte
from ..parallel.compact import check_cuts, compact_shard, held_bytes
from ..parallel.compact_wire import build_compact, is_compact_state
from ..parallel.forward import Request
from ..parallel.kv_stash import StashCall, open_stash
from ..parallel.kv_transfer import export_box, import_box
from ..parallel.rank import DEFAULT_KV_BYTES, KVPool, RankRuntime
from ..parallel.sharding import Partition, PartitionError, Strategy, build_shard, meta_model, shard_state
from ..parallel.threads import measure_step_threads
from ..parallel.top1 import StepPiece
from ..v1 import worker_pb2 as pb
from ..v1 import worker_pb2_grpc as pb_grpc
from ..version import __version__
from . import resources
from .channels import add_port, check_bindable, open_channel, server_options
from .collective_probe import PROBE_KIND, probe_rows, probe_samples
from .datalink import DataServer
from .discovery import start_announcer
from .kv_ticket import MAX_REVOKE, NONCE_BYTES, NonceLog, receipt, verify
from .linktest import measure_link
from .peers import PeerTransport
from .protocol import (
    MAX_MESSAGE_BYTES,
    META_PROTOCOL,
    META_SESSION,
    META_TOKEN,
    PROTOCOL_VERSION,
    WIRE_FORMATS,
    TensorReply,
    fill_proto,
    from_proto,
    kv_box_from_proto,
    kv_box_start,
    metadata,
    serialize_tensor_reply,
    step_from_proto,
    to_proto_dtype,
)
from .security import COORDINATOR, TlsFiles
from .shardstore import ShardStore, model_hash, source_file_bytes, spec_from_json, spec_json

log = logging.getLogger(__name__)

READY_LINE = "GALAXY-WORKER-READY"  # printed with the bound address once the worker serves
MAX_SESSIONS = 8
# Within this of its budget a worker gives the heap's free pages back after each pass (glibc keeps them:
# transport/spawn.MALLOC_ENV), so its resident memory -- which the coordinator plans the next request
# by and the worker admits it by -- is what it really holds. Further away, reusing them is faster.
NEAR_BUDGET = 64 * 2**20
KV_WAIT_S = 30.0  # longest a K/V export or import waits for a step running on this worker (a device in both groups)


@dataclass
class WorkerSettings:
    name: str = ""
    threads: int = 1  # intra-op threads for torch
    device: str = "cpu"  # compute device: cpu, cuda, cuda:1 ...
    token: str | None = None  # shared cluster token; None: loopback only
    memory_budget: int = 0  # bytes this whole worker process may hold, weights included (0: no cap)
    link_delay_ms: float = 0.0  # emulated one-way latency added to every frame this worker receives
    tls: TlsFiles | None = None  # mutual TLS with the cluster CA (security.py); None: plaintext
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger gRPC messages are refused before decoding
    shard_cache: str | None = None  # directory for streamed shards (None: keep them in memory only)
    shard_cache_bytes: int = 4 << 30
    cache_own_shards: bool = False  # also cache shards read from a file / random init (fast reloads)
    data_port: int = 0  # TCP port of the tensor data plane (0: any free one; -1: none, peers use gRPC)


@dataclass
class _Session:
    session_id: str
    runtime: RankRuntime
    transport: PeerTransport
    weight_bytes: int
    load_s: float
    backend: str = "torch"
    act_bytes: int = 4  # bytes of one activation / KV element (the compute dtype)
    seq_len: int = memory.DEFAULT_SEQ_LEN  # tokens the load reserved a pass for (LoadRequest.seq_len)
    resident: int = 0  # the process's resident memory once loaded (transients given back), before any KV pool
    ticket_key: bytes = b""  # the coordinator's secret for direct K/V moves into this session (kv_ticket.py)
    nonces: NonceLog = field(default_factory=NonceLog)  # tickets spent here: a replay is refused

    @property
    def held_bytes(self) -> int:
        """What dropping this session frees: its weights, KV pool and device-local K/V store."""
        return self.weight_bytes + self.runtime.kv_bytes + self.stash_bytes

    @property
    def stash_bytes(self) -> int:
        """What its device-local K/V store holds (parallel/kv_stash.py; 0: none open)."""
        return 0 if self.runtime.stash is None else self.runtime.stash.bytes

    @property
    def stash_unfilled(self) -> int:
        """What its store was admitted for but does not hold yet: memory promised to it, not yet resident, which
        every later admission must leave it (the store fills up to max_bytes without asking again)."""
        st = self.runtime.stash
        return 0 if st is None else max(0, st.max_bytes - st.bytes)


def _peak_rss() -> int:
    """Peak resident memory since the session was loaded (VmHWM, reset at load), in bytes."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Linux resets VmHWM to the current RSS when 5 is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _trim_heap() -> None:
    """Give freed memory back to the OS (glibc keeps it otherwise), so the next session's peak
    memory is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _open_model(ref: pb.ModelRef) -> WeightSource:
    if bool(ref.path) == ref.random_init:
        raise ValueError("model reference needs exactly one of path / random_init")
    if ref.random_init:
        if not ref.config_json:
            raise ValueError("random_init needs the model config (config_json)")
        return RandomWeights(ModelConfig.from_dict(json.loads(ref.config_json)), seed=ref.seed,
                             std=ref.random_std or 0.02)
    return open_checkpoint(ref.path)


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, settings: WorkerSettings):
        self.s = settings
        self.lock = threading.Lock()  # one Load/Forward/Release at a time
        # Loaded sessions, least recently used first. Several coordinators (or a benchmark comparing
        # strategies) may each keep a shard here; the oldest goes when memory or the count runs out.
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.shards = ShardStore(settings.shard_cache, settings.shard_cache_bytes)
        self.data: DataServer | None = None  # the tensor data port, started with the server
        self._kv_peers: dict[str, pb_grpc.WorkerStub] = {}  # other groups' workers this one sent K/V to
        self._kv_peers_lock = threading.Lock()

    def start_data_plane(self, host: str) -> None:
        if self.s.data_port >= 0:
            self.data = DataServer(host, self.s.data_port, self._transport_of, self.s.token, self.s.tls,
                                   self.s.max_message_bytes)

    def close(self) -> None:
        """Drop every session and stop the data port (the gRPC server is the caller's)."""
        with self.lock:
            self._release()
        if self.data is not None:
            self.data.close()

    def _transport_of(self, session_id: str) -> PeerTransport | None:
        sess = self.sessions.get(session_id)
        return None if sess is None else sess.transport

    # -- control -----------------------------------------------------------------------------
    def Hello(self, request, context):
        rss = self._resident() if self.s.memory_budget else _rss()  # live memory, as Load will count it
        vm = psutil.virtual_memory()
        sess = next(reversed(self.sessions.values()), None)
        return pb.HelloReply(
            protocol_version=PROTOCOL_VERSION, device_name=self.s.name, galaxy_version=__version__,
            cpu_count=resources.cpus(), cpu_limit=resources.cpu_limit(), host_id=resources.host_id(),
            host_cpus=resources.host_cpus(),
            threads=self.s.threads,
            compute_device=self.s.device,
            total_memory_bytes=vm.total, available_memory_bytes=vm.available,
            memory_budget_bytes=self.s.memory_budget, state="loaded" if sess else "idle",
            session_id=sess.session_id if sess else "", rss_bytes=rss,
            data_port=self.data.port if self.data else 0, droppable_bytes=self._droppable(),
        )

    def _resident(self) -> int:
        """Resident memory as every admission counts it: after collecting garbage and giving glibc's
        free pages back, so what a finished request left in the heap does not count."""
        gc.collect()
        _trim_heap()
        return _rss()

    def _stash_unfilled(self) -> int:
        """Memory the open device-local K/V stores were promised beyond what they hold now (_Session.stash_unfilled):
        counted as held by every admission under a memory budget, so the stores filling up cannot take the
        process past it."""
        return sum(x.stash_unfilled for x in self.sessions.values())

    def _droppable(self) -> int:
        """Of the resident memory: what loaded sessions and a pushed shard hold, which a load may free."""
        return sum(x.held_bytes for x in self.sessions.values()) + self.shards.pending_bytes

    def Load(self, request, context):
        with self.lock:
            self._release(request.session_id)
            try:
                sess = self._load(request)
            except (MemoryError, DeviceOutOfMemory) as e:
                self.shards.drop_pending()  # a refused load's pushed shard must not pin the memory
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.s.name}: out of memory loading shard: {e}")
            except (CheckpointError, ConfigError, PartitionError, ValueError, GalaxyError) as e:
                self.shards.drop_pending()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: load refused: {e}")
            self.sessions[sess.session_id] = sess
            rss = self._resident() if self.s.memory_budget else _rss()  # the load's transients given back
            rt = sess.runtime
            rt.kv_max_bytes = self._kv_budget(sess, rss + self._stash_unfilled())
            sess.resident = rss
            return pb.LoadReply(weight_bytes=sess.weight_bytes, load_s=sess.load_s, rss_bytes=rss,
                                backend=sess.backend, memory_budget_bytes=self.s.memory_budget,
                                kv_bytes_per_token=rt.kv_bytes_per_token, kv_budget_bytes=rt.kv_max_bytes,
                                decode_threads=rt.threads.decode_now if rt.threads else self.s.threads)

    def _load(self, req: pb.LoadRequest) -> _Session:
        t0 = time.perf_counter()
        source = None
        if req.model.shard_hash:  # streamed by the coordinator: no checkpoint on this device
            cfg = ModelConfig.from_dict(json.loads(req.model.config_json))
        else:
            source = _open_model(req.model)
            if req.model.config_json:
                want = ModelConfig.from_dict(json.loads(req.model.config_json))
                if want.replace(name="") != source.config.replace(name=""):
                    raise ValueError(f"the model at {source.path} does not match the coordinator's config")
            cfg = source.config
        partition = Partition.from_dict(json.loads(req.partition_json)).validate(cfg)
        if len(req.peers) != partition.world:
            raise ValueError(f"{len(req.peers)} peer addresses for a {partition.world}-device partition")
        if not 0 <= req.rank < partition.world:
            raise ValueError(f"rank {req.rank} outside 0..{partition.world - 1}")
        if req.dtype not in DTYPES:
            raise ValueError(f"dtype {req.dtype!r} is not one of {list(DTYPES)}")
        spec = partition.spec(req.rank, cfg)
        fmt = parse_format(req.weights_format or "fp32")  # a FormatError names a bad one: INVALID_ARGUMENT
        if fmt.name != "fp32":
            if req.dtype != "float32" or (req.backend or "torch") != "torch":
                raise ValueError(f"weights_format {fmt} runs float32 on the torch backend, not dtype "
                                 f"{req.dtype!r} on backend {req.backend!r}")
            check_cuts(cfg, spec, fmt)  # before anything is built
        params = memory.MemoryParams.for_dtype(DTYPES[req.dtype].itemsize, str(fmt))
        seq = int(req.seq_len) or min(memory.DEFAULT_SEQ_LEN, cfg.max_positions)
        tokens = partition.tokens(seq)[req.rank] if partition.strategy.splits_tokens else seq
        held = 0  # bytes of this very shard already in memory (just pushed): counted in its need, not twice
        compact_push = False  # the shard arrived with its linears already in `fmt` (compact_wire)
        if source is None:
            pushed = self.shards.pending.get(req.model.shard_hash)
            held = 0 if pushed is None else sum(t.numel() * t.element_size() for t in
                                                {id(t): t for t in pushed.values()}.values())
            compact_push = fmt.name != "fp32" and (pushed is None or is_compact_state(pushed))
            file_bytes = None
        else:
            file_bytes = source_file_bytes(source)
        need = memory.shard_need(cfg, spec, params, seq, tokens,
                                 memory.load_transient_bytes(cfg, spec, params, file_bytes, arrived=held > 0,
                                                             compact_push=compact_push),
                                 seqpar=partition.strategy == Strategy.SEQPAR)
        if self.s.memory_budget:  # refuse rather than be killed by the OOM killer half way through
            resident = self._make_room(need, held)
            memory.check_fits(self.s.name, need, self.s.memory_budget, resident)
        elif len(self.sessions) >= MAX_SESSIONS:
            self._release(next(iter(self.sessions)))
        if source is None:
            state = self.shards.take(req.model.shard_hash)
        else:
            state = self._own_shard(source, spec)
        if is_compact_state(state):
            if fmt.name == "fp32":
                raise GalaxyError("the pushed shard is in a compact weights format and the load asks for fp32: "
                                  "push it again as float32")
            model = build_compact(cfg, spec, state, fmt, self.s.device)
        else:
            model = compact_shard(build_shard(meta_model(cfg, spec), state, DTYPES[req.dtype], self.s.device),
                                  source, fmt)
        del state
        weight_bytes = held_bytes(model) if fmt.name != "fp32" else memory.weight_bytes(cfg, spec, params)
        backend = use_backend(model, req.backend or "torch", self.s.threads)
        _reset_peak_rss()  # from here on, the peak belongs to this session
        bad = [f for f in req.wire_formats if f and f not in WIRE_FORMATS]
        if bad or len(req.wire_formats) not in (0, partition.world):
            raise ValueError(f"wire_formats {list(req.wire_formats)} must list one of {WIRE_FORMATS} per rank")
        transport = PeerTransport(req.rank, list(req.peers), req.session_id, self.s.token,
                                  req.recv_timeout_s or 60.0, channel_factory=lambda a: open_channel(a, self.s.tls),
                                  link_delay_s=self.s.link_delay_ms / 1000, wire_formats=list(req.wire_formats),
                                  data_peers=list(req.data_peers), tls=self.s.tls)
        load_s = time.perf_counter() - t0
        log.info("%s: loaded rank %d/%d of %s (%.0f MiB) in %.2f s", self.s.name, req.rank, partition.world,
                 source.path if source else "a streamed shard", weight_bytes / 2**20, load_s)
        threads = None  # ONNX Runtime sessions keep their own intra-op threads (backends/onnx.py)
        if backend == "torch":  # a step of many tokens runs on --threads, one of few on the decode count
            threads, timings = measure_step_threads(model, max(1, self.s.threads), int(req.decode_threads))
            log.info("%s: decode steps on %d thread(s), prefill on %d%s", self.s.name, threads.decode,
                     threads.prefill, "".join(f"; {n} thread(s) {s * 1e3:.2f} ms" for n, s in timings.items()))
        runtime = RankRuntime(model, partition, req.rank, req.tiles, overlap=not req.no_overlap, threads=threads)
        if backend == "torch" and self._compile_fits(model, partition.world, need):
            runtime.prepare_decode()  # a one-token step's compiled halves, where they pay (parallel/decode_graph.py)
        return _Session(req.session_id, runtime, transport, weight_bytes, load_s, backend, params.act_bytes, seq,
                        ticket_key=bytes(req.kv_ticket_key))

    def _compile_fits(self, model, world: int, need: memory.ShardNeed) -> bool:
        """Whether this device's budget holds building the shard's decode graphs now: their peak
        (memory.decode_compile_bytes: inductor's growth of this process, which stays, and its C++
        compiler's; one compile thread on any host) beside what the process holds with the shard just
        loaded, and the KV and pass the load reserved. If not, the build is refused -- the shard decodes
        eagerly, slower -- rather than the device pushed past its budget (where the OOM killer would end it)."""
        if not self.s.memory_budget or not decode_graph.policy(model, world):
            return True
        peak = memory.decode_compile_bytes()
        build = memory.ShardNeed(0, 0, need.kv, need.activations, compile=peak)
        try:
            memory.check_fits(self.s.name, build, self.s.memory_budget, self._resident(), "compiling its decode step")
        except DeviceOutOfMemory as e:
            log.warning("%s; it decodes eagerly instead", e)
            return False
        return True

    def _kv_budget(self, sess: _Session, resident: int) -> int:
        """Memory the serving engine's paged KV pool may take here. With a memory budget: the one
        memory model's figure (galaxy.parallel.memory.kv_pool_budget) -- the budget less the loaded
        process, a pass of the reserved length and the margins -- so the pool and every later step
        fit the budget together. Without one: half the free memory, within DEFAULT_KV_BYTES."""
        rt = sess.runtime
        reserve = memory.pass_reserve(rt.model.cfg, rt.partition, rt.rank, sess.act_bytes, sess.seq_len)
        if self.s.memory_budget:
            return memory.kv_pool_budget(self.s.memory_budget, resident, reserve)
        return max(0, min(DEFAULT_KV_BYTES, psutil.virtual_memory().available // 2 - reserve))

    def _own_shard(self, source, spec) -> dict:
        """The shard read from the source -- or from this device's shard cache, when a reload of
        the same model and split can skip reading and re-generating it (random init is slow)."""
        if self.s.shard_cache is None or not self.s.cache_own_shards:
            return shard_state(source, spec, meta_model(source.config, spec))
        mh, sj = model_hash(source), spec_json(spec)
        have = self.shards.have(mh, sj)
        if have:
            return self.shards.take(have)
        state = shard_state(source, spec, meta_model(source.config, spec))
        self.shards.put(mh, sj, state)
        return state

    def _make_room(self, need: memory.ShardNeed, held: int = 0) -> int:
        """Drop the least recently used sessions while `need` would not fit beside what this process
        holds (less `held`: bytes of the new shard already in memory), or too many are loaded;
        returns that resident memory, measured again after each drop."""
        while True:
            resident = self._resident() - held + self._stash_unfilled()  # the open stores' budgets are held
            over = (len(self.sessions) >= MAX_SESSIONS
                    or need.total > memory.room(self.s.memory_budget, resident))
            if not (self.sessions and over):
                return resident
            old = next(iter(self.sessions))
            log.info("%s: dropping session %s to make room", self.s.name, old)
            self._release(old)

    def _release(self, session_id: str = "") -> None:
        """Drop one session ("" = all of them) and give its memory back."""
        gone = list(self.sessions) if not session_id else [session_id] if session_id in self.sessions else []
        for sid in gone:
            self.sessions.pop(sid).transport.close()
        if gone:
            gc.collect()
            _trim_heap()

    def Release(self, request, context):
        with self.lock:
            self._release(request.session_id)
        return pb.ReleaseReply()

    def Abort(self, request, context):
        sess = self.sessions.get(request.session_id)
        if sess is not None:
            sess.transport.abort(request.request_id, request.reason)
        return pb.AbortReply()

    # -- compute -------------------------------------------------------------------------------
    def Forward(self, request, context):
        return self._one_at_a_time(request.session_id, context, self._forward, request)

    def Step(self, request, context):
        return self._one_at_a_time(request.session_id, context, self._step, request)

    def _one_at_a_time(self, session_id: str, context, handler, request):
        sess = self._session_or_abort(session_id, context)
        if not self.lock.acquire(timeout=1.0):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.s.name}: busy with another request")
        try:
            return handler(sess, request, context)
        finally:
            self.lock.release()

    # -- phase-separated serving: K/V boxes in and out of the paged pool ------------------------------
    def ExportKV(self, request, context):
        return self._kv_call(request, context, self._export_kv)

    def ImportKV(self, request, context):
        return self._kv_call(request, context, self._import_kv)

    def _kv_call(self, request, context, handler):
        sess = self._session_or_abort(request.session_id, context)
        t0 = time.perf_counter()
        with self._kv_lock(request, context):
            reply = handler(sess, request, context)
        reply.seconds = time.perf_counter() - t0
        return reply

    @contextlib.contextmanager
    def _kv_lock(self, box, context):
        """Between steps: a K/V box waits (at most KV_WAIT_S) for a step running on this worker. A prompt's
        finished chunk, streamed while its next chunk runs (engine/kv_stream.py), is read without waiting:
        no step writes those positions, and the pool is not re-sized under a step."""
        if box.while_stepping and not box.HasField("kv"):
            yield
            return
        if not self.lock.acquire(timeout=KV_WAIT_S):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.s.name}: busy with a step for {KV_WAIT_S:g} s")
        try:
            yield
        finally:
            self.lock.release()

    def _read_box(self, sess: _Session, request, context) -> torch.Tensor:
        try:
            table, tokens, layers, heads, pool = kv_box_from_proto(request)
            return export_box(sess.runtime, pool, table, tokens, layers, heads, self.s.name, kv_box_start(request))
        except (TransportError, ValueError, GalaxyError) as e:  # KVTransferError is a TransportError
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V export refused: {e}")

    def _export_kv(self, sess: _Session, request, context):
        reply = pb.KVReply()
        fill_proto(reply.kv, self._read_box(sess, request, context))
        return reply

    def _import_kv(self, sess: _Session, request, context):
        rt = sess.runtime
        if request.revoke_nonces:  # the coordinator gave a direct move up: none of its tickets may land from now
            if not self._from_coordinator(context):  # (under the K/V lock: an import of them running has ended)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V tickets revoked by a device, "
                              "not the coordinator")
            bad = [len(n) for n in request.revoke_nonces if len(n) != NONCE_BYTES]
            if bad or len(request.revoke_nonces) > MAX_REVOKE:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V revocation refused: "
                              f"{len(request.revoke_nonces)} nonces (at most {MAX_REVOKE}), "
                              f"{len(bad)} not {NONCE_BYTES} bytes; nothing revoked")
            for nonce in request.revoke_nonces:
                sess.nonces.revoke(nonce)
            return pb.KVReply()
        try:
            table, tokens, layers, heads, pool = kv_box_from_proto(request)
            start = kv_box_start(request)
            if request.HasField("ticket"):  # from another group's worker: only what the coordinator authorized
                verify(self.s.token, sess.ticket_key, sess.session_id, rt.rank, request, request.kv.dtype,
                       len(request.kv.data), sess.nonces, self.s.name)
                left = context.time_remaining()  # (a courtesy: the sender sets it; the coordinator reuses the
                if left is not None and left <= 0:  # blocks only once the nonce is spent, by receipt or revocation)
                    raise TransportError("a direct K/V move that arrived after its deadline")
            elif not self._from_coordinator(context):
                raise KVTransferError("K/V from a device, not the coordinator, without the coordinator's ticket")
            box = from_proto(request.kv, "K/V box")
            if box.dim() != 5 or box.shape[3] != tokens - start:
                raise TransportError(f"K/V box of shape {tuple(box.shape)} for positions {start}..{tokens}")
        except (TransportError, ValueError, GalaxyError) as e:
            if request.HasField("ticket"):
                log.warning("%s: refused a direct K/V move: %s", self.s.name, e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V import refused: {e}")
        if self.s.memory_budget and not rt.holds_pool(pool):  # an import may be the first to allocate the pool
            try:
                self._admit(sess, 0, rt.pool_bytes(pool))
            except DeviceOutOfMemory as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            import_box(rt, pool, table, box.to(self.s.device), layers, heads, self.s.name, start)
        except (MemoryError, DeviceOutOfMemory) as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.s.name}: out of memory: {e}")
        except (TransportError, ValueError, GalaxyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V import refused: {e}")
        if request.HasField("ticket"):  # proof for the coordinator that it is in (the sender forwards it)
            return pb.KVReply(receipt=receipt(self.s.token, sess.ticket_key, request.ticket.nonce))
        return pb.KVReply()

    def StashKV(self, request, context):
        """The device-local K/V pool (parallel/kv_stash.py): open / close this session's store, drop, keep and
        restore named blocks of its paged pool, between steps (the worker's lock, as a K/V import). An open is
        admitted against what this device has beside its plan (memory.stash_room); a malformed call, or one from a
        device rather than the coordinator, is refused before anything is touched."""
        sess = self._session_or_abort(request.session_id, context)
        rt, t0 = sess.runtime, time.perf_counter()
        try:
            if not self._from_coordinator(context):
                raise KVTransferError("a K/V store call from a device, not the coordinator")
            if (len(request.put_names) != len(request.put_blocks)
                    or len(request.restore_names) != len(request.restore_blocks)):
                raise KVTransferError(f"{len(request.put_names)} names for {len(request.put_blocks)} blocks to keep, "
                                      f"{len(request.restore_names)} for {len(request.restore_blocks)} to restore")
            pool = KVPool(int(request.num_blocks), int(request.block_size))
            call = StashCall(int(request.open_bytes), bool(request.close), tuple(request.drop),
                             tuple(zip(request.put_names, request.put_blocks)),
                             tuple(zip(request.restore_names, request.restore_blocks)))
            call.check(self.s.name)
        except (ValueError, GalaxyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V store call refused: {e}")
        if not self.lock.acquire(timeout=KV_WAIT_S):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.s.name}: busy with a step for {KV_WAIT_S:g} s")
        try:
            if call.close or call.open_bytes:
                rt.stash = None  # the old store's memory goes before a new budget is weighed
            if call.open_bytes:
                try:
                    rt.stash = open_stash(rt, pool, call.open_bytes, self._stash_room(sess, pool), self.s.name)
                except DeviceOutOfMemory as e:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            if call.close:
                gc.collect()
                _trim_heap()
                return pb.KVStashReply(seconds=time.perf_counter() - t0)
            if rt.stash is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: no device-local K/V pool open "
                              "in this session (a re-plan or a restart dropped it)")
            try:
                res = rt.stash.apply(rt, pool, call, self.s.name)
            except (ValueError, GalaxyError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: K/V store call refused: {e}")
        finally:
            self.lock.release()
        return pb.KVStashReply(stored=list(res.stored), missing=list(res.missing), held_bytes=res.held_bytes,
                               max_bytes=res.max_bytes, seconds=time.perf_counter() - t0)

    def _stash_room(self, sess: _Session, pool: KVPool) -> int:
        """Bytes this device may give a device-local K/V store beside its plan (memory.stash_room): with a memory
        budget, what it leaves beside the loaded process; without one, the memory available now. Less a pass of
        the reserved length and the engine's pool here, allocated or not."""
        rt = sess.runtime
        reserve = memory.pass_reserve(rt.model.cfg, rt.partition, rt.rank, sess.act_bytes, sess.seq_len)
        if self.s.memory_budget:
            free = memory.room(self.s.memory_budget, max(sess.resident, self._resident() - rt.kv_bytes)
                               + self._stash_unfilled())  # the other sessions' stores may still fill to their budgets
        else:
            free = psutil.virtual_memory().available
        return memory.stash_room(free, reserve, rt.pool_bytes(pool))

    def _from_coordinator(self, context) -> bool:
        """Whether the caller is the coordinator: with mutual TLS its certificate names it (security.COORDINATOR);
        with the cluster token alone every device holds the same credential, so any holder counts."""
        if self.s.tls is None:
            return True
        return COORDINATOR.encode() in context.auth_context().get("x509_common_name", [])

    def SendKV(self, request, context):
        """A direct K/V move: read a box from this worker's pool (as ExportKV) and import it, with the
        coordinator's ticket (kv_ticket.py), into the worker of another session at `dst_address` -- one
        hop, not through the coordinator. Two replies: one once the box is read (the coordinator may free
        or reuse the blocks it came from: the prefill engine goes on), one once it is imported. The read
        holds this worker's lock; the send does not, so the next step here runs while the box travels.
        The receiver gets this call's deadline, less a margin. A receiver that refuses or cannot be
        reached ends this call ABORTED, naming it; the second reply forwards the receiver's receipt."""
        t0 = time.perf_counter()
        sess = self._session_or_abort(request.box.session_id, context)
        with self._kv_lock(request.box, context):
            box = self._read_box(sess, request.box, context)
        t = request.ticket
        nbytes = box.numel() * box.element_size()
        if (nbytes != t.nbytes or to_proto_dtype(box.dtype) != t.dtype or t.start != request.box.start
                or box.shape[3] != t.num_tokens - t.start or (t.layer_lo, t.layer_hi, t.head_lo, t.head_hi)
                != (request.box.layer_lo, request.box.layer_hi, request.box.head_lo, request.box.head_hi)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: a K/V box of {nbytes} bytes "
                          f"({tuple(box.shape)}) does not match its ticket ({t.nbytes} bytes, positions "
                          f"{t.start}..{t.num_tokens})")
        yield pb.KVReply(seconds=time.perf_counter() - t0, bytes=nbytes)  # read (a copy): its blocks may go
        msg = pb.KVBox(session_id=t.dst_session, block_table=list(t.block_table), num_tokens=t.num_tokens,
                       layer_lo=t.layer_lo, layer_hi=t.layer_hi, head_lo=t.head_lo, head_hi=t.head_hi,
                       num_blocks=t.num_blocks, block_size=t.block_size, start=t.start, ticket=t)
        fill_proto(msg.kv, box)
        del box
        left = context.time_remaining()
        timeout = max(0.1, (left if left is not None else 2 * KV_WAIT_S) - 0.5)
        t1 = time.perf_counter()
        try:
            rep = self._kv_peer(request.dst_address).ImportKV(msg, timeout=timeout,
                                                               metadata=metadata(self.s.token, t.dst_session))
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.ABORTED, f"{self.s.name}: the direct K/V move to {request.dst_address} "
                          f"failed ({e.code().name}): {e.details()}")
        now = time.perf_counter()
        yield pb.KVReply(seconds=now - t0, bytes=len(msg.kv.data), send_s=now - t1, receipt=rep.receipt)

    def _kv_peer(self, address: str) -> pb_grpc.WorkerStub:
        """A stub to another group's worker (a channel kept per address, as PeerTransport's)."""
        with self._kv_peers_lock:
            stub = self._kv_peers.get(address)
            if stub is None:
                stub = self._kv_peers[address] = pb_grpc.WorkerStub(open_channel(address, self.s.tls))
            return stub

    def _forward(self, sess: _Session, request, context):
        rt = sess.runtime
        try:
            types = from_proto(request.token_types, "token_types") if request.HasField("token_types") else None
            req = Request(from_proto(request.input_ids, "input_ids").to(self.s.device),
                          None if types is None else types.to(self.s.device), int(request.start_pos),
                          bool(request.last_only))
            rt.validate(req)
        except (TransportError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: bad request: {e}")
        bad = [f for f in request.wire_formats if f and f not in WIRE_FORMATS]
        if bad or len(request.wire_formats) not in (0, rt.partition.world):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: wire_formats "
                          f"{list(request.wire_formats)} must list one of {WIRE_FORMATS} per rank")
        if self.s.memory_budget:  # refuse before computing, while no peer has spent anything on it
            try:
                self._admit(sess, memory.request_need(rt.model.cfg, rt.partition, rt.rank, sess.act_bytes, req))
            except DeviceOutOfMemory as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return self._run(sess, context, request.request_id, lambda comm: rt.run(comm, req),
                         list(request.wire_formats), overlap=not request.no_overlap,
                         measure_memory=request.measure_memory)

    def _step(self, sess: _Session, request, context):
        rt = sess.runtime
        try:
            step, pool = step_from_proto(request, self.s.device)
            rt.validate_step(step, pool)
        except (TransportError, ValueError, GalaxyError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: bad step: {e}")
        if self.s.memory_budget:  # the pool first (refused over its KV budget), then the step's activations
            try:
                b = step.batch
                need = memory.pass_need(rt.model.cfg, rt.partition, rt.rank, sess.act_bytes, b.num_tokens,
                                        max(b.context_lens), len(step.logit_rows))
                self._admit(sess, need, 0 if rt.holds_pool(pool) else rt.pool_bytes(pool))
            except DeviceOutOfMemory as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return self._run(sess, context, request.request_id, lambda comm: rt.run_step(comm, step, pool), rss=False)

    def _run(self, sess: _Session, context, request_id: int, run, wire_formats=(), overlap: bool = True,
             measure_memory: bool = False, rss: bool = True):
        """Run this rank's part of a request on the session's transport; the reply carries its output
        piece and where its time went, and with `rss` the process's resident memory before and at its
        peak. Engine steps leave that out (0: not measured): nobody reads it of a step, and its three
        /proc reads cost about 0.1 ms of a decode step's time on the critical path."""
        rt = sess.runtime
        sess.transport.begin(request_id, list(wire_formats))
        comm = rt.new_comm(sess.transport, overlap=rt.overlap and overlap)
        if measure_memory:
            _trim_heap()  # otherwise activations reuse freed pages and the peak does not move
        if rss:
            _reset_peak_rss()
        rss_before = psutil.Process().memory_info().rss if rss else 0
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = run(comm)
        except TransportError as e:
            context.abort(grpc.StatusCode.ABORTED, f"{self.s.name} (rank {rt.rank}): {e}")
        except (MemoryError, DeviceOutOfMemory) as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.s.name}: out of memory: {e}")
        except (ValueError, GalaxyError) as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.s.name} (rank {rt.rank}): {e}")
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if self.s.memory_budget and _rss() > self.s.memory_budget - NEAR_BUDGET:
            _trim_heap()  # near its budget: what the pass left in the heap must not count against the next
        send_s = dict(sess.transport.send_s)
        ops = [pb.OpStat(tag=o.tag, wall_s=o.wall_s, wait_s=o.wait_s, compute_s=o.compute_s, bytes=o.bytes,
                         send_s=send_s.get(o.tag, 0.0)) for o in comm.stats.ops]
        reply = pb.ForwardReply(forward_s=elapsed, ops=ops, peak_rss_bytes=_peak_rss() if rss else 0,
                                kv_cache_bytes=rt.kv_bytes, rss_before_bytes=rss_before, cpu_s=cpu_s,
                                decode_threads=rt.threads.decode_now if rt.threads else 0)
        if isinstance(out, StepPiece):  # a step's top-1 rows (parallel/top1.py): a few numbers, not their logits
            if out.top1 is not None:
                reply.top1_values.extend(out.top1.values.tolist())
                reply.top1_ids.extend(out.top1.ids.tolist())
            out = out.logits
        if out is None:
            return reply
        if self.s.memory_budget:  # the pass's freed activations go back first, or the reply's copies
            _trim_heap()  # add to them: a 1,024-token full-logits reply peaked 416 MiB over, 297 with this
        return TensorReply(reply, "output", out.float())  # serialized from its buffer (_TensorReplies)

    def _admit(self, sess: _Session, need: int, pool: int = 0) -> None:
        """A pass's `need` (galaxy.parallel.memory.pass_need), and `pool` bytes of a KV pool it
        allocates first, must fit beside what this process holds: at least the loaded process and
        the pool it keeps (pages of a fresh pool become resident only as the engine writes them)."""
        rt = sess.runtime
        # the K/V stores (every session's) count at their admitted budgets: they fill without asking again
        unfilled = self._stash_unfilled()
        held = sess.resident + (rt.kv_bytes if not pool else 0) + sess.stash_bytes + unfilled
        own = rt.kv_bytes if pool else 0  # a fresh pool replaces this session's old one
        if need + pool <= memory.room(self.s.memory_budget, max(held, _rss() - own + unfilled)):
            return
        resident = max(held, self._resident() - own + unfilled)
        if pool and need + pool > memory.room(self.s.memory_budget, resident):
            raise DeviceOutOfMemory(
                f"{self.s.name}: a KV pool of {pool / 2**20:.1f} MiB and a step's {need / 2**20:.1f} MiB do not fit "
                f"beside the {resident / 2**20:.0f} MiB the worker holds within its memory budget of "
                f"{self.s.memory_budget / 2**20:.0f} MiB; serve with fewer KV blocks or fewer tokens per step")
        memory.check_request(self.s.name, need, self.s.memory_budget, resident)

    def _session_or_abort(self, session_id: str, context) -> _Session:
        sess = self.sessions.get(session_id)
        if sess is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.s.name}: {NO_SESSION} {session_id!r} ({len(self.sessions)} loaded; "
                          "dropped for room, or never loaded); send Load first")
        self.sessions.move_to_end(session_id)
        return sess

    # -- profiling -----------------------------------------------------------------------------
    def Profile(self, request, context):
        try:
            cfg = ModelConfig.from_dict(json.loads(request.config_json))
            dtype = DTYPES[request.dtype or "float32"]
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: bad profile request: {e}")
        seqs = [int(s) for s in request.seq_lens]
        if not seqs or min(seqs) < 1 or max(seqs) > 16384:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.s.name}: seq_lens must be within 1..16384")
        t0 = time.perf_counter()
        with self.lock:  # never time while a request runs
            between = None
            if self.s.memory_budget:  # the blocks it times must fit beside what it keeps: drop sessions if not
                need = memory.ShardNeed(0, profile_need(cfg, seqs, dtype.itemsize), 0, 0)
                try:
                    memory.check_fits(self.s.name, need, self.s.memory_budget, self._make_room(need),
                                      f"timing its blocks at {max(seqs)} tokens")
                except DeviceOutOfMemory as e:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
                between = lambda done, total: _trim_heap()  # noqa: E731 - each job's peak, not the jobs' sum
            samples = time_blocks(cfg, seqs, repeats=max(1, min(request.repeats or 3, 20)), dtype=dtype,
                                  device=self.s.device, **({"progress": between} if between else {}))
            codecs = codec_seconds_per_byte(cols=cfg.hidden)
            # the CPU a ring collective costs this device whole, beyond its share of the GEMMs (collective_probe)
            rows = probe_rows(seqs)
            try:
                samples += probe_samples(rows, cfg.hidden, dtype)
            except (TransportError, OSError, threading.BrokenBarrierError) as e:  # a profile without it prices no
                # transport CPU (as before); a broken barrier: a probe rank timed out or failed first
                log.warning("%s: the %s probe failed: %s", self.s.name, PROBE_KIND, e)
            gc.collect()
            _trim_heap()  # the timing blocks are gone: give their memory back before anyone plans with it
        return pb.ProfileReply(
            samples=[pb.BlockSample(kind=x.kind, units=x.units, seq=x.seq, seconds=x.seconds) for x in samples],
            available_memory_bytes=psutil.virtual_memory().available, memory_budget_bytes=self.s.memory_budget,
            threads=self.s.threads, elapsed_s=time.perf_counter() - t0, codec_s_per_byte=codecs)

    def Ping(self, request, context):
        return pb.PingReply(payload=request.payload[:1024])

    def Sink(self, request_iterator, context):
        n = 0
        for blob in request_iterator:
            n += len(blob.data)
        return pb.SinkReply(bytes=n)

    def LinkTest(self, request, context):
        try:
            bw, lat, nbytes, secs = measure_link(request.peer, self.s.token, request.bytes, request.pings or 5,
                                                 self.s.tls)
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.s.name}: cannot reach peer {request.peer}: "
                          f"{e.details()}")
        return pb.LinkTestReply(bandwidth_bps=bw, latency_s=lat, bytes=nbytes, seconds=secs)

    # -- weight streaming --------------------------------------------------------------------
    def HaveShard(self, request, context):
        return pb.HaveShardReply(content_hash=self.shards.have(request.model_hash, request.spec_json))

    def PushShard(self, request_iterator, context):
        try:
            h, nbytes, cached = self.shards.receive(request_iterator, self._admit_push,
                                                    _trim_heap if self.s.memory_budget else None)
        except DeviceOutOfMemory as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.s.name}: out of memory receiving a shard: {e}")
        except (GalaxyError, TransportError) as e:
            context.abort(grpc.StatusCode.DATA_LOSS, f"{self.s.name}: shard refused: {e}")
        except MemoryError:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.s.name}: out of memory receiving a shard")
        return pb.ShardReceipt(content_hash=h, bytes=nbytes, cached=cached)

    def _admit_push(self, head: pb.ShardPart) -> int:
        """Before any tensor arrives: the shard its spec describes (as pushed: float32, or its linears in
        the header's compact weights format) and the chunks in flight must fit the budget; returns the
        bytes the push may bring."""
        try:
            cfg = ModelConfig.from_dict(json.loads(head.config_json))
            spec = spec_from_json(head.spec_json)
        except (ValueError, TypeError, ConfigError) as e:
            raise GalaxyError(f"a shard push with an unreadable header: {e}") from None
        try:
            pushed = memory.push_bytes(cfg, spec, head.weights_format or "fp32")
        except GalaxyError as e:
            raise GalaxyError(f"a shard push in an unknown weights format: {e}") from None
        if self.s.memory_budget:
            need = memory.ShardNeed(pushed, memory.PUSH_TRANSIENT, 0, 0)
            with self.lock:  # not while a load or a request measures the same memory
                resident = self._make_room(need)
            memory.check_fits(self.s.name, need, self.s.memory_budget, resident, "receiving its shard")
        return pushed

    # -- data plane ----------------------------------------------------------------------------
    def Exchange(self, request_iterator, context):
        md = dict(context.invocation_metadata())
        sess = self._session_or_abort(md.get(META_SESSION, ""), context)
        n = 0
        try:
            for frame in request_iterator:
                if isinstance(frame, _UnreadableFrame):
                    raise TransportError(f"unreadable frame: {frame.error}")
                if frame.session_id != sess.session_id:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "frame for another session")
                sess.transport.deliver(frame)
                n += 1
        except TransportError as e:
            log.warning("%s: rejected a frame: %s", self.s.name, e)
            sess.transport.abort(0, f"bad frame from a peer: {e}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ExchangeSummary(frames=n)


class _Authenticate(grpc.ServerInterceptor):
    """Refuses calls of another protocol version, or without the cluster token when one is set."""

    def __init__(self, token: str | None):
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        md = dict(handler_call_details.invocation_metadata)
        version = md.get(META_PROTOCOL)
        handler = continuation(handler_call_details)
        if version != str(PROTOCOL_VERSION):
            return _deny(handler, grpc.StatusCode.FAILED_PRECONDITION,
                         f"protocol version {version or 'missing'} refused: this worker speaks "
                         f"galaxy protocol {PROTOCOL_VERSION} (upgrade the older side)")
        if self.token and md.get(META_TOKEN) != self.token:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "wrong or missing cluster token")
        return handler


class _TensorReplies(grpc.ServerInterceptor):
    """Forward and Step return their output beside the reply message (protocol.TensorReply): their
    response serializer writes it into the wire bytes straight from the tensor's buffer, so the
    worker holds two copies of a reply at most (the tensor and those bytes, then those bytes and
    gRPC's), not three (memory.OUTPUT_COPIES)."""

    METHODS = frozenset({"/galaxy.v1.Worker/Forward", "/galaxy.v1.Worker/Step"})

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is not None and handler_call_details.method in self.METHODS:
            return handler._replace(response_serializer=serialize_tensor_reply)
        return handler


class _UnreadableFrame:
    """Bytes on an Exchange stream that are no Frame, handed to the handler, which refuses the call as it
    refuses a bad frame. A request deserializer that raises instead leaves gRPC's call unfinished
    (grpcio 1.85): the server's stop().wait() then never returns, so a worker sent garbage once could
    not be stopped (and every test stopping such a server waited out its 10 s timeout)."""

    def __init__(self, error: str):
        self.error = error


def _read_frame(data: bytes) -> pb.Frame | _UnreadableFrame:
    try:
        return pb.Frame.FromString(data)
    except DecodeError as e:
        return _UnreadableFrame(str(e) or "not a Frame message")


class _ReadFrames(grpc.ServerInterceptor):
    """Exchange reads its frames with _read_frame, which never raises (see _UnreadableFrame)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is not None and handler_call_details.method == "/galaxy.v1.Worker/Exchange":
            return handler._replace(request_deserializer=_read_frame)
        return handler


def _deny(handler, code, message):
    """A handler of the same shape as `handler` that refuses the call before reading it."""

    def refuse(request_or_iterator, context):
        context.abort(code, message)

    if handler is None:
        return None
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](refuse)



def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def start_server(listen: str, settings: WorkerSettings):
    """Bind and start a worker server; returns (server, bound address, service). Non-blocking."""
    try:  # ":PORT" listens on every interface, as gRPC reads it
        host, port = split_address("0.0.0.0" + listen if listen.startswith(":") else listen, "--listen",
                                   allow_port_zero=True)
    except AddressError as e:
        raise GalaxyError(str(e)) from None
    if not settings.token and settings.tls is None and not is_loopback(host):
        log.warning("no credentials: refusing to listen on %s; binding 127.0.0.1 only (pass --tls DIR "
                    "from `galaxy keys init`, or --token / GALAXY_TOKEN, to serve the LAN)", host or "all interfaces")
        host = "127.0.0.1"
    settings.name = settings.name or socket.gethostname()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="galaxy-rpc"),
                         options=server_options(settings.max_message_bytes),
                         interceptors=[_Authenticate(settings.token), _TensorReplies(), _ReadFrames()])
    service = WorkerService(settings)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    check_bindable(host, port)  # says why (in use, not this device's address) before gRPC logs its own line
    bound = add_port(server, join_address(host, port), settings.tls)
    if not bound:
        raise GalaxyError(f"could not listen on {host}:{port} (in use, or not an address of this device)")
    try:
        service.start_data_plane(host)
    except TransportError as e:
        server.stop(0)
        raise GalaxyError(f"{e} (choose another --data-port, or -1 to send tensors over gRPC)") from None
    server.start()
    return server, join_address(host, bound), service


def serve(listen: str, settings: WorkerSettings, ready=None, announce: str | None = None,
          announce_interfaces=None) -> None:
    """Serve until SIGTERM/SIGINT. `ready(address)` is called once the port is bound; with
    `announce` (a cluster name) the worker announces itself on its subnet (galaxy.transport.discovery)."""
    torch.set_num_threads(max(1, settings.threads))
    server, address, service = start_server(listen, settings)
    announcer = None
    if announce:
        announcer = start_announcer(settings, address, announce, interfaces=announce_interfaces)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s serving on %s (%d threads, %s)", settings.name, address, settings.threads, settings.device)
    if ready:
        ready(address)
    stop.wait()
    if announcer is not None:
        announcer.stop()
    service.close()
    server.stop(grace=1.0).wait()
