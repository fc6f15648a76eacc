"""The coordinator's side: a `Cluster` of workers driven over gRPC.

The coordinator sends control messages only (load a shard, run a request, abort, release); the
activations travel between workers directly. Every call has a deadline, and every gRPC failure
becomes a typed error that names the device and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from ..addresses import join_address, split_address
from ..errors import (
    AuthError,
    DeviceOutOfMemory,
    GalaxyError,
    KVDirectFailed,
    KVTransferError,
    PeerUnreachable,
    PlanMismatch,
    ProtocolMismatch,
    TransportError,
    WorkerError,
)
from ..model.checkpoints.random import RandomWeights
from ..model.config import ModelConfig
from ..model.quant import parse_format
from ..parallel.collectives import OpStat
from ..parallel.compact import check_cuts
from ..parallel.compact_wire import LAYOUT_VERSION, compact_items, wire_tensor_count
from ..parallel.executor import DeviceInfo, DeviceStats, ForwardResult, LoadedMemory, LoadOptions, pool_blocks
from ..parallel.forward import Request, Step, assemble
from ..parallel.kv_stash import StashCall, StashResult
from ..parallel.kv_transfer import box_bytes
from ..parallel.memory import (
    DEFAULT_SEQ_LEN,
    check_fits,
    load_transient_bytes,
    push_bytes,
    shard_need,
)
from ..parallel.rank import KVPool
from ..parallel.sharding import Partition, Strategy, meta_model
from ..parallel.top1 import Top1, join_top1
from ..v1 import worker_pb2 as pb
from ..v1 import worker_pb2_grpc as pb_grpc
from . import kv_ticket
from .channels import open_channel
from .probe import REFUSED, UNREACHABLE, explain, not_a_worker, probe, reach
from .protocol import from_proto, kv_box_to_proto, metadata, step_to_proto, to_proto
from .shardstore import digest, iter_shard, model_hash, source_file_bytes, spec_json, tensor_parts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """What the workers load: a path on their disks, or random init of a config."""

    config: ModelConfig
    path: str = ""
    random_init: bool = False
    seed: int = 0
    std: float = 0.02

    def to_proto(self) -> pb.ModelRef:
        return pb.ModelRef(path=self.path, random_init=self.random_init, seed=self.seed, random_std=self.std,
                           config_json=json.dumps(self.config.to_dict()))


@dataclass(frozen=True)
class KVDestination:
    """Where a direct K/V move goes (Cluster.kv_destination, for another Cluster's send_kv): the receiving
    worker's address, the coordinator's ticket for that one box, its name for errors, `gone()`, a
    heartbeat of it (True once it missed enough pings to be declared gone), and `receipt_ok(bytes)`: whether
    the sender forwarded the receiver's own proof of the import (kv_ticket.receipt), which the sender cannot
    make -- the receiving session's key stays with that session's cluster."""

    address: str
    ticket: pb.KVTicket
    name: str
    gone: Callable[[], bool]
    receipt_ok: Callable[[bytes], bool]


def model_ref(source) -> ModelRef:
    """How workers find the same weights as `source`: the checkpoint path, or the random-init recipe."""
    if isinstance(source, RandomWeights):
        return ModelRef(source.config, random_init=True, seed=source.seed, std=source.std)
    return ModelRef(source.config, path=str(Path(source.path).resolve()))

def _error(e: grpc.RpcError, device: str, action: str, address: str | None = None, tls=None) -> GalaxyError:
    """Translate a gRPC failure into the typed error a user can act on. A Hello that found nobody is
    diagnosed by looking at what is at the address (probe.py): refused, silent, a web server, TLS on
    one side only, another CA."""
    code, detail = e.code(), e.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "busy" not in detail:
        if action == "hello" and address:
            finding = probe(address, ca=tls.ca if tls is not None else None)
            return explain(finding, device, address, tls is not None, f"{code.name}: {detail}")
        return PeerUnreachable(f"{device}: unreachable during {action} ({code.name}: {detail}); is "
                               "`galaxy worker` running there and the address right?")
    if code == grpc.StatusCode.FAILED_PRECONDITION and "protocol" in detail:
        return ProtocolMismatch(f"{device}: {detail}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(f"{device}: {detail}; use the cluster's token (--token / GALAXY_TOKEN)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return DeviceOutOfMemory(f"{device}: {detail}")
    if code == grpc.StatusCode.INVALID_ARGUMENT and action == "load":
        return PlanMismatch(f"{device}: {detail}")
    return WorkerError(f"{device}: {action} failed ({code.name}): {detail}")


@dataclass
class _AloneCall:
    """A one-worker call in flight (Cluster._call_alone), as its watchdog sees it."""

    request_id: int
    since: float  # time.monotonic() when it was sent
    missed: list[int] = field(default_factory=lambda: [0])  # heartbeat pings missed in a row (_heartbeat's list)
    dead: bool = False  # declared gone: its channel was closed to end the call


FIRST_HELLO_S = 1.0  # a Hello unanswered after this long looks at what is at the address (hello)


class Cluster:
    """Workers at `addresses`, in ring order. Use as a context manager to release them."""

    def __init__(self, addresses: list[str], token: str | None = None, connect_timeout: float = 10.0,
                 forward_timeout: float = 600.0, tls=None):
        if not addresses:
            raise GalaxyError("a cluster needs at least one worker address")
        self.addresses = list(addresses)
        self.token = token
        self.connect_timeout, self.forward_timeout = connect_timeout, forward_timeout
        self.heartbeat_s, self.heartbeat_misses = 1.0, 3  # a silent device is declared gone after ~3-6 s
        self.kv_timeout = 60.0  # longest one K/V box export or import may take (phase-separated serving)
        self.options: LoadOptions | None = None  # what the model is loaded with, once it is
        self.tls = tls
        self.channels = [open_channel(a, tls) for a in self.addresses]
        self.stubs = [pb_grpc.WorkerStub(c) for c in self.channels]
        self.pool = ThreadPoolExecutor(max_workers=max(4, len(addresses)), thread_name_prefix="galaxy-coord")
        self.session_id = ""
        self._ticket_key = b""
        self.kv_dtype = torch.float32
        self.partition: Partition | None = None
        self.config: ModelConfig | None = None
        self.names = [f"device {i} ({a})" for i, a in enumerate(self.addresses)]
        self.backends: list[str] = []
        self.kv_capacity: list[tuple[int, int]] = []  # per rank, from its load: (KV bytes per token, KV budget)
        self.loaded_memory: list[LoadedMemory] = []
        self.decode_threads: list[int] = []
        self._request_id = 0
        self._alone: _AloneCall | None = None  # the one-worker step in flight (_call_alone), watched
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def world(self) -> int:
        return len(self.addresses)

    def _md(self):
        return metadata(self.token, self.session_id or None)

    def _all(self, action: str, call):
        """Run call(rank, stub) on every worker at once; raise the first failure, typed."""
        futs = [self.pool.submit(call, r, s) for r, s in enumerate(self.stubs)]
        results, first = [], None
        for r, f in enumerate(futs):
            try:
                results.append(f.result())
            except grpc.RpcError as e:
                results.append(None)
                first = first or _error(e, self.names[r], action, self.addresses[r], self.tls)
        if first:
            raise first
        return results

    def hello(self) -> list[DeviceInfo]:
        # a refused connection is final: say so now, not after wait_for_ready's deadline (a port where
        # nothing answers yet is left to that deadline: a device may be slow to come up)
        found = list(self.pool.map(lambda a: reach(a, min(1.0, self.connect_timeout)), self.addresses))
        for r, f in enumerate(found):
            if f is not None and f.kind in (REFUSED, UNREACHABLE):
                raise explain(f, self.names[r], self.addresses[r], self.tls is not None, "")

        def call(r, stub):
            deadline = time.monotonic() + self.connect_timeout
            first = min(FIRST_HELLO_S, self.connect_timeout)
            try:
                rep = stub.Hello(pb.HelloRequest(), timeout=first, metadata=self._md(), wait_for_ready=True)
            except grpc.RpcError as e:
                # something opened the port but no Hello came back yet: a worker busy or still coming up
                # gets the rest of the deadline; one that is surely no worker of ours (a web server, TLS
                # on one side only, another CA) is reported now, not after connect_timeout (was 10 s)
                if (e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                        or first >= self.connect_timeout or not_a_worker(
                            probe(self.addresses[r], ca=self.tls.ca if self.tls is not None else None),
                            self.tls is not None)):
                    raise
                rep = stub.Hello(pb.HelloRequest(), timeout=max(0.0, deadline - time.monotonic()),
                                 metadata=self._md(), wait_for_ready=True)
            return self._info(r, rep)

        infos = self._all("hello", call)
        self.names = [f"device {i} '{d.name}' ({d.address})" for i, d in enumerate(infos)]
        return infos

    def _info(self, r: int, rep: pb.HelloReply) -> DeviceInfo:
        return DeviceInfo(self.addresses[r], rep.device_name, rep.cpu_count, rep.threads, rep.compute_device,
                          rep.total_memory_bytes, rep.available_memory_bytes, rep.memory_budget_bytes, rep.state,
                          rep.rss_bytes, rep.data_port, rep.cpu_limit, rep.host_id, rep.host_cpus,
                          rep.droppable_bytes)

    def hello_each(self, timeout: float = 1.0) -> list[DeviceInfo | GalaxyError]:
        """Each device's hello, or the error it answered with, within `timeout` seconds: a liveness
        poll (the dashboard's). Unlike hello() it never raises, never waits for a connection to come
        up, renames nothing and uses none of the pool's threads, so it neither stalls on a dead device
        nor delays a step."""
        futs = [stub.Hello.future(pb.HelloRequest(), timeout=timeout, metadata=self._md()) for stub in self.stubs]
        out: list[DeviceInfo | GalaxyError] = []
        for r, f in enumerate(futs):
            try:
                out.append(self._info(r, f.result()))
            except grpc.RpcError as e:
                out.append(_error(e, self.names[r], "poll"))
        return out

    def profile(self, config: ModelConfig, seq_lens: list[int], dtype: str = "float32", repeats: int = 3,
                ranks: list[int] | None = None, timeout: float = 900.0) -> dict[int, pb.ProfileReply]:
        """Every (or the given) worker times its blocks for this model shape, all at once."""
        ranks = list(range(self.world)) if ranks is None else ranks
        msg = pb.ProfileRequest(config_json=json.dumps(config.to_dict()), seq_lens=seq_lens, dtype=dtype,
                                repeats=repeats)
        futs = {r: self.pool.submit(self.stubs[r].Profile, msg, timeout=timeout, metadata=self._md()) for r in ranks}
        out = {}
        for r, f in futs.items():
            try:
                out[r] = f.result()
            except grpc.RpcError as e:
                raise _error(e, self.names[r], "profile") from None
        return out

    def link_test(self, src: int, dst: int, nbytes: int = 0, timeout: float = 300.0) -> pb.LinkTestReply:
        """Worker `src` measures its link to worker `dst` with real transfers."""
        try:
            return self.stubs[src].LinkTest(pb.LinkTestRequest(peer=self.addresses[dst], bytes=nbytes, pings=5),
                                            timeout=timeout, metadata=self._md())
        except grpc.RpcError as e:
            raise _error(e, self.names[src], f"link test to {self.names[dst]}") from None

    def load(self, source, partition: Partition, options: LoadOptions = LoadOptions()) -> list[int]:
        """Load a WeightSource (the Executor interface). Workers read the same checkpoint path or
        random-init recipe, or, with options.stream, receive exactly their shards from here (they
        need no model file). Every device's memory is checked first (galaxy.parallel.memory): a
        split that does not fit is refused before any weight moves. Returns each rank's weight bytes."""
        if partition.world != self.world:
            raise PlanMismatch(f"the partition has {partition.world} devices, the cluster {self.world}")
        partition.validate(source.config)
        check_format_cuts(source.config, partition, options)
        self.release()  # what this coordinator had loaded is not in the way of the check or the push
        check_memory(self.hello(), self.names, source.config, partition, options,
                     None if options.stream else source_file_bytes(source))
        hashes = self.push_shards(source, partition, options.weights_format) if options.stream else None
        replies = self.load_ref(model_ref(source), partition, options, shard_hashes=hashes)
        return [r.weight_bytes for r in replies]

    def load_ref(self, model: ModelRef, partition: Partition, options: LoadOptions = LoadOptions(),
                 shard_hashes: list[str] | None = None, recv_timeout: float = 60.0,
                 load_timeout: float = 600.0) -> list[pb.LoadReply]:
        """Every worker loads its shard of `model` under `partition` and joins the ring: from the
        path or random-init recipe in `model`, or from the shards pushed with these content hashes."""
        if partition.world != self.world:
            raise PlanMismatch(f"the partition has {partition.world} devices, the cluster {self.world}")
        options.check_world(self.world)
        partition.validate(model.config)
        check_format_cuts(model.config, partition, options)
        # names, so every later error can name them, and data ports (a restarted worker has a new one)
        infos = self.hello()
        tcp = options.data_plane == "tcp"
        data_peers = [join_address(split_address(a)[0], d.data_port) if d.data_port and tcp else ""
                      for a, d in zip(self.addresses, infos)]
        self.release()
        self.session_id = secrets.token_hex(8)
        self._ticket_key = kv_ticket.new_key()  # signs direct K/V moves into this load's pools (kv_ticket.py)
        ref, pjson = model.to_proto(), json.dumps(partition.to_dict())

        def call(r, stub):
            mref = ref
            if shard_hashes is not None:  # pushed shards: no path, just the hash of this rank's shard
                mref = pb.ModelRef(config_json=ref.config_json, shard_hash=shard_hashes[r])
            req = pb.LoadRequest(session_id=self.session_id, model=mref, partition_json=pjson, rank=r,
                                 peers=self.addresses, dtype=options.dtype, tiles=options.tiles,
                                 recv_timeout_s=recv_timeout, wire_formats=options.wire[r] if options.wire else [],
                                 no_overlap=not options.overlap, backend=options.backend, data_peers=data_peers,
                                 seq_len=options.seq_len, weights_format=options.weights_format,
                                 decode_threads=options.decode_threads, kv_ticket_key=self._ticket_key)
            return stub.Load(req, timeout=load_timeout, metadata=self._md())

        replies = self._all("load", call)
        self.partition, self.config = partition, model.config
        self.backends = [r.backend for r in replies]
        self.kv_capacity = [(r.kv_bytes_per_token, r.kv_budget_bytes) for r in replies]
        act = options.torch_dtype.itemsize
        self.kv_dtype = options.torch_dtype  # the K/V's dtype in every pool here (direct moves' tickets name it)
        self.loaded_memory = [LoadedMemory(r.memory_budget_bytes, r.rss_bytes, act, r.kv_budget_bytes) for r in replies]
        self.decode_threads = [r.decode_threads for r in replies]  # each device's count on a decode step
        self.options = options  # what the model is loaded with (the engine reads its format)
        return replies

    def push_shards(self, source, partition: Partition, weights_format: str = "fp32") -> list[str]:
        """Stream each worker its shard unless its cache has it; returns the content hashes. In a compact
        weights format the linears travel in it (parallel/compact_wire.py), and the shard is cached under
        the model and the format."""
        fmt = parse_format(weights_format)
        mh, cfg = model_hash(source), source.config
        if fmt.name != "fp32":
            mh = f"{mh}:{fmt}:wire{LAYOUT_VERSION}"  # another shard than the float32 one, in this wire layout

        def push(r, stub):
            sj = spec_json(partition.spec(r, cfg))
            have = stub.HaveShard(pb.HaveShardRequest(model_hash=mh, spec_json=sj), timeout=30,
                                  metadata=self._md()).content_hash
            if have:
                return have
            sent = {}
            receipt = stub.PushShard(_shard_parts(source, partition.spec(r, cfg), mh, sj, sent, str(fmt)),
                                     timeout=3600, metadata=self._md())
            if receipt.content_hash != sent.get("hash"):
                raise GalaxyError(f"{self.names[r]}: shard hash mismatch after push")
            return receipt.content_hash

        return self._all("weight push", push)

    def forward(self, req: Request, overlap: bool = True, measure_memory: bool = False,
                wire: list[list[str]] | None = None) -> ForwardResult:
        """One forward pass across the cluster; on any failure every worker aborts the request.
        overlap=False runs this request without tile overlap (a benchmark baseline)."""
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        rid = self._next_request()
        msg = pb.ForwardRequest(session_id=self.session_id, request_id=rid, input_ids=to_proto(req.ids.cpu()),
                                start_pos=req.start_pos, last_only=req.last_only, no_overlap=not overlap,
                                measure_memory=measure_memory)
        if req.types is not None:
            msg.token_types.CopyFrom(to_proto(req.types.cpu()))
        msgs = [msg] * self.world
        if wire is not None:  # per-rank messages: each carries the formats that rank sends with
            msgs = [pb.ForwardRequest() for _ in range(self.world)]
            for r, m in enumerate(msgs):
                m.CopyFrom(msg)
                m.wire_formats.extend(wire[r])
        return self._on_every_worker("Forward", "forward", rid, msgs, req.ids.shape[0])

    def kv_blocks(self, block_size: int) -> int:
        return pool_blocks(self.kv_capacity, block_size)

    def step(self, step: Step, pool: KVPool) -> ForwardResult:
        """One serving-engine iteration on every worker (the Executor interface)."""
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        rid = self._next_request()
        msg = step_to_proto(step, pool, self.session_id, rid)
        return self._on_every_worker("Step", "step", rid, [msg] * self.world, step.ids.shape[0],
                                     top1=len(step.top1_rows))

    def export_kv(self, rank: int, block_table, tokens: int, layers, heads, pool: KVPool, start: int = 0,
                  while_stepping: bool = False) -> torch.Tensor:
        """A box of one sequence's K/V from worker `rank` (the Executor interface), its shape checked."""
        msg = kv_box_to_proto(self.session_id, block_table, tokens, layers, heads, pool, start=start,
                              while_stepping=while_stepping)
        rep = self._kv_call(rank, "ExportKV", msg, "K/V export")
        box = from_proto(rep.kv, f"K/V box from {self.names[rank]}")
        want = (layers[1] - layers[0], 2, heads[1] - heads[0], tokens - start, self.config.head_dim)
        if tuple(box.shape) != want:
            raise KVTransferError(f"{self.names[rank]}: sent a K/V box of shape {tuple(box.shape)}, expected {want}")
        return box

    def import_kv(self, rank: int, block_table, box: torch.Tensor, layers, heads, pool: KVPool, start: int = 0) -> None:
        """Write a box into worker `rank`'s pool (the Executor interface); the worker checks it first."""
        self._kv_call(rank, "ImportKV", kv_box_to_proto(self.session_id, block_table, start + box.shape[3], layers,
                                                        heads, pool, box, start=start), "K/V import")

    def kv_stash(self, rank: int, call: StashCall, pool: KVPool) -> StashResult:
        """The device-local K/V pool on worker `rank` (the Executor interface): one StashKV call; only names and
        block ids travel. The worker checks the call and refuses an open that does not fit (DeviceOutOfMemory)."""
        msg = pb.KVStashRequest(session_id=self.session_id, num_blocks=pool.num_blocks, block_size=pool.block_size,
                                open_bytes=call.open_bytes, close=call.close, drop=list(call.drop),
                                put_names=[n for n, _ in call.put], put_blocks=[b for _, b in call.put],
                                restore_names=[n for n, _ in call.restore],
                                restore_blocks=[b for _, b in call.restore])
        rep = self._kv_call(rank, "StashKV", msg, "K/V store call", missing="has no device-local K/V pool (an older "
                            "galaxy): upgrade it or run without --kv-pool-mib")
        return StashResult(tuple(rep.stored), tuple(rep.missing), rep.held_bytes, rep.max_bytes, rep.seconds)

    def kv_destination(self, rank: int, block_table, tokens: int, layers, heads, pool: KVPool, start: int,
                       src_session: str, src_rank: int) -> KVDestination:
        """Where a direct K/V move of that box goes and the ticket that lets it in (kv_ticket.py): signed
        here with this load's key, which only this session's workers hold. `tokens`, `start`, `block_table`
        and `pool` are the receiver's (positions [start, tokens) of the sequence there)."""
        self._check_rank(rank)
        code = to_proto(torch.empty(0, dtype=self.kv_dtype)).dtype
        nbytes = box_bytes(self.config, layers, heads, tokens - start, self.kv_dtype.itemsize)
        ticket = kv_ticket.issue(self.token, self._ticket_key, src_session=src_session, src_rank=src_rank,
                                 dst_session=self.session_id, dst_rank=rank, block_table=list(block_table),
                                 num_blocks=pool.num_blocks, block_size=pool.block_size, start=start,
                                 num_tokens=tokens, layer_lo=layers[0], layer_hi=layers[1], head_lo=heads[0],
                                 head_hi=heads[1], dtype=code, nbytes=nbytes)
        missed, token, key = [0] * self.world, self.token, self._ticket_key
        return KVDestination(self.addresses[rank], ticket, self.names[rank],
                             lambda: self._heartbeat([rank], missed) is not None,
                             lambda got: kv_ticket.receipt_ok(token, key, ticket, got))

    def revoke_kv(self, rank: int, nonces: list[bytes]) -> None:
        """Worker `rank` counts these tickets (kv_destination's) as spent: a direct move into it that was given up
        on cannot land after this returns (the worker answers once no import of them is running), so its blocks
        may be reused at once. Raises as an import would (PeerUnreachable: then the blocks stay reserved)."""
        self._kv_call(rank, "ImportKV", pb.KVBox(session_id=self.session_id, revoke_nonces=list(nonces)),
                      "K/V ticket revocation")

    def send_kv(self, rank: int, block_table, tokens: int, layers, heads, pool: KVPool, dest: KVDestination,
                start: int = 0, while_stepping: bool = False, on_read=None) -> tuple[int, float]:
        """A direct K/V move (the sender's side): worker `rank` reads the box and imports it into the
        worker `dest` names, with its ticket; `on_read()` is called once the box is read (its blocks here
        may then be freed). Returns (bytes, seconds of the receiver's import as the sender timed it).
        Watched by heartbeat: the sender gone before the read raises PeerUnreachable naming it (as a
        failed pull); after the read, or the receiver gone, refusing, or past the timeout, KVDirectFailed
        (`receiver_silent`: the receiver missed its pings, so it cannot be asked to revoke the ticket now). A
        send the sender says is done without the receiver's receipt is a KVDirectFailed too: the box may not
        be in, and may land later, until the ticket is revoked."""
        self._check_rank(rank)
        msg = pb.KVSend(box=kv_box_to_proto(self.session_id, block_table, tokens, layers, heads, pool, start=start,
                                            while_stepping=while_stepping), dst_address=dest.address,
                        ticket=dest.ticket)
        call = self.stubs[rank].SendKV(msg, timeout=self.kv_timeout, metadata=self._md())
        replies: queue.Queue = queue.Queue()

        def drain():
            try:
                for r in call:
                    replies.put(r)
                replies.put(None)
            except grpc.RpcError as e:
                replies.put(e)

        threading.Thread(target=drain, name="galaxy-kv-send", daemon=True).start()
        missed, got = [0] * self.world, []
        secs = self.heartbeat_s * self.heartbeat_misses
        while True:
            try:
                item = replies.get(timeout=self.heartbeat_s)
            except queue.Empty:
                gone = self._heartbeat([rank], missed) is not None
                if gone and not got:
                    call.cancel()
                    raise PeerUnreachable(f"{self.names[rank]}: no heartbeat for {secs:.0f} s during a direct K/V "
                                          "move; the device dropped out") from None
                if gone or (got and dest.gone()):
                    call.cancel()
                    who = self.names[rank] if gone else dest.name
                    err = KVDirectFailed(f"{who}: no heartbeat for {secs:.0f} s during a direct K/V move from "
                                         f"{self.names[rank]} to {dest.name}")
                    err.receiver_silent = not gone  # then it cannot be asked to refuse it (revoke_kv) now
                    raise err from None
                continue
            if item is None:
                last = got[-1] if got else pb.KVReply()
                if len(got) < 2 or not dest.receipt_ok(last.receipt):
                    raise KVDirectFailed(f"{self.names[rank]} -> {dest.name}: the sender ended the direct K/V move "
                                         "without the receiver's receipt of the import")
                return last.bytes, last.send_s
            if isinstance(item, grpc.RpcError):
                code = item.code()
                if code in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED) or (got and code not in (
                        grpc.StatusCode.INVALID_ARGUMENT,)):
                    raise KVDirectFailed(f"{self.names[rank]} -> {dest.name}: {item.details()}") from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise KVTransferError(f"{self.names[rank]}: {item.details()}") from None
                raise _error(item, self.names[rank], "direct K/V move") from None
            got.append(item)
            if len(got) == 1 and on_read is not None:
                on_read()

    def _check_rank(self, rank: int) -> None:
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        if not 0 <= rank < self.world:
            raise GalaxyError(f"rank {rank} outside 0..{self.world - 1}")

    def _kv_call(self, rank: int, rpc: str, msg, action: str, missing: str | None = None):
        """`missing`: what to tell the user when the worker has no such call (an older galaxy; UNIMPLEMENTED):
        a ProtocolMismatch, not a WorkerError, so a ResilientCluster does not re-plan around a device that works."""
        if self.partition is None:
            raise GalaxyError("nothing loaded: call load() first")
        if not 0 <= rank < self.world:
            raise GalaxyError(f"rank {rank} outside 0..{self.world - 1}")
        fut = getattr(self.stubs[rank], rpc).future(msg, timeout=self.kv_timeout, metadata=self._md())
        missed = [0] * self.world
        while True:  # a device that stops answering is declared gone by its heartbeat, as in a step,
            try:  # not after kv_timeout (which bounds a slow link's box)
                return fut.result(timeout=self.heartbeat_s)
            except grpc.FutureTimeoutError:
                if self._heartbeat([rank], missed) is not None:
                    fut.cancel()
                    raise PeerUnreachable(
                        f"{self.names[rank]}: no heartbeat for {self.heartbeat_s * self.heartbeat_misses:.0f} s "
                        f"during a {action}; the device dropped out (crashed, powered off, or its link is down)"
                    ) from None
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise KVTransferError(f"{self.names[rank]}: {e.details()}") from None
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    why = missing or f"has no {rpc} call (an older galaxy): upgrade it"
                    raise ProtocolMismatch(f"{self.names[rank]} {why}") from None
                raise _error(e, self.names[rank], action) from None

    def _next_request(self) -> int:
        self._request_id += 1
        return self._request_id

    def _on_every_worker(self, rpc: str, action: str, rid: int, msgs: list, seq: int, top1: int = 0) -> ForwardResult:
        """Send each worker its message at once and collect the pieces. Replies are taken in
        completion order, so the first failure aborts the others at once; a worker that stops
        answering heartbeats is declared gone. `top1`: the step's top-1 rows, joined from the replies."""
        t0 = time.perf_counter()
        if rpc == "Step" and self.world == 1:  # a one-device decode group: every token's call (see _call_alone)
            replies, errors = self._call_alone(rpc, rid, msgs[0])
            return self._result(replies, errors, action, time.perf_counter() - t0, seq, top1)
        futs = [getattr(stub, rpc).future(m, timeout=self.forward_timeout, metadata=self._md())
                for stub, m in zip(self.stubs, msgs)]
        finished: queue.Queue = queue.Queue()
        for r, f in enumerate(futs):
            f.add_done_callback(lambda _f, r=r: finished.put(r))
        try:
            replies, errors = self._gather(rid, futs, finished)
        except KeyboardInterrupt:  # Ctrl-C (a chat reply stopped): the devices drop this request, too
            self._abort(rid, "interrupted by the user")
            for f in futs:
                f.cancel()
            raise
        return self._result(replies, errors, action, time.perf_counter() - t0, seq, top1)

    def _result(self, replies, errors, action: str, seconds: float, seq: int, top1: int) -> ForwardResult:
        """The pass's result from every rank's reply, or the root cause of its errors."""
        if errors:
            raise self._root_cause(errors, action)
        outs = [from_proto(rep.output, f"output of {self.names[r]}") if rep.HasField("output") else None
                for r, rep in enumerate(replies)]
        devices = [DeviceStats(r, rep.forward_s, tuple(OpStat(o.tag, o.wall_s, o.wait_s, o.compute_s, o.bytes, o.send_s)
                                                       for o in rep.ops),
                               peak_rss_bytes=rep.peak_rss_bytes, rss_before_bytes=rep.rss_before_bytes,
                               kv_cache_bytes=rep.kv_cache_bytes, cpu_s=rep.cpu_s)  # cpu_s: 0.0 from older workers
                   for r, rep in enumerate(replies)]
        for r, rep in enumerate(replies):  # the count each device settled on its decode steps (threads.DecodeTuner)
            if rep.decode_threads and r < len(self.decode_threads):
                self.decode_threads[r] = rep.decode_threads
        res = ForwardResult(assemble(self.config, self.partition, outs, seq), seconds, devices)
        if top1:
            res.top1 = self._join_top1(replies, top1)
        return res

    def _join_top1(self, replies, rows: int) -> torch.Tensor:
        """The step's top-1 tokens from each worker's slice maxima (parallel/top1.py); a worker that
        answered another number of rows is a TransportError naming it."""
        pieces = []
        for r, rep in enumerate(replies):
            n, k = len(rep.top1_values), len(rep.top1_ids)
            if (n, k) == (0, 0):
                pieces.append(None)  # no vocabulary rows there (or a pipeline stage before the last)
                continue
            if n != rows or k != rows:
                raise TransportError(f"{self.names[r]}: answered {n} top-1 values and {k} ids for {rows} rows")
            pieces.append(Top1(torch.tensor(rep.top1_values, dtype=torch.float32),
                               torch.tensor(rep.top1_ids, dtype=torch.long)))
        if not any(pieces):
            raise TransportError(f"no worker answered the step's {rows} top-1 rows")
        return join_top1(pieces, rows)

    def _call_alone(self, rpc: str, rid: int, msg) -> tuple[list, list]:
        """The one worker's reply as a blocking call on this thread. A future's reply comes through a
        thread that gRPC starts for the channel whenever no call is in flight -- a thread start and a
        hand-off on every token of a one-device decode group (measured: 0.44 against 0.62 ms a ping
        round trip here) -- where a blocking call reads it on the calling thread. The heartbeat still
        watches it: a watchdog (one thread per cluster, waking every heartbeat_s) pings the worker once
        its call has run for heartbeat_s, and one silent for heartbeat_misses pings has its channel closed,
        which ends the call, and opened again for what comes next."""
        watched = self._alone = _AloneCall(rid, time.monotonic())
        self._watch()
        try:
            return [getattr(self.stubs[0], rpc)(msg, timeout=self.forward_timeout, metadata=self._md())], []
        except grpc.RpcError as e:
            if not watched.dead:
                self._abort(rid, f"{self.names[0]} failed")
                return [None], [(0, e)]
            self._abort(rid, f"{self.names[0]} stopped answering")
            raise self._no_heartbeat(0) from None
        finally:
            self._alone = None

    def _watch(self) -> None:
        """Start the watchdog of one-worker calls (once)."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watchdog_loop, name="galaxy-heartbeat", daemon=True)
            self._watchdog.start()

    def _watchdog_loop(self) -> None:
        while not self._closed.wait(self.heartbeat_s):
            call = self._alone
            if call is None or time.monotonic() - call.since < self.heartbeat_s:
                continue
            if self._heartbeat([0], call.missed) is not None and self._alone is call:
                call.dead = True
                silent = self.channels[0]
                self._reopen(0)  # what comes next (the abort, later steps) goes on a fresh channel
                silent.close()  # and this ends the blocking call at once (grpc: every RPC on the channel)

    def _reopen(self, rank: int) -> None:
        """A fresh channel to a worker whose channel is closed to end a call it never answered."""
        self.channels[rank] = open_channel(self.addresses[rank], self.tls)
        self.stubs[rank] = pb_grpc.WorkerStub(self.channels[rank])

    def _no_heartbeat(self, rank: int) -> PeerUnreachable:
        return PeerUnreachable(
            f"{self.names[rank]}: no heartbeat for {self.heartbeat_s * self.heartbeat_misses:.0f} s during a request; "
            "the device dropped out (crashed, powered off, or its link is down)")

    def _gather(self, rid: int, futs, finished: queue.Queue):
        """Every rank's reply in completion order (the first failure aborts the others at once);
        a rank silent for `heartbeat_misses` pings is declared gone."""
        replies, errors = [None] * self.world, []
        pending, missed = set(range(self.world)), [0] * self.world
        while pending:
            try:
                r = finished.get(timeout=self.heartbeat_s)
            except queue.Empty:
                dead = self._heartbeat(pending, missed)
                if dead is not None:
                    self._abort(rid, f"{self.names[dead]} stopped answering")
                    for f in futs:
                        f.cancel()
                    raise self._no_heartbeat(dead) from None
                continue
            pending.discard(r)
            try:
                replies[r] = futs[r].result()
            except grpc.RpcError as e:
                errors.append((r, e))
                if len(errors) == 1:
                    self._abort(rid, f"{self.names[r]} failed")
        return replies, errors

    def _heartbeat(self, ranks, missed: list[int]) -> int | None:
        """Ping the workers still computing; a rank that missed `heartbeat_misses` in a row is dead."""
        futs = {r: self.stubs[r].Ping.future(pb.PingRequest(), timeout=self.heartbeat_s, metadata=self._md())
                for r in ranks}
        for r, f in futs.items():
            try:
                f.result()
                missed[r] = 0
            except grpc.RpcError:
                missed[r] += 1
                if missed[r] >= self.heartbeat_misses:
                    return r
        return None

    def _abort(self, rid: int, reason: str) -> None:
        msg = pb.AbortRequest(session_id=self.session_id, request_id=rid, reason=reason)
        futs = [stub.Abort.future(msg, timeout=2.0, metadata=self._md()) for stub in self.stubs]
        for f in futs:
            try:
                f.result()
            except grpc.RpcError:
                pass  # a dead worker cannot be aborted; its peers time out or see the abort

    def _root_cause(self, errors, action: str) -> GalaxyError:
        """The failure that started it: not a rank that merely saw the abort or a broken link."""
        def secondary(e):
            d = e.details() or ""
            return "aborted" in d or "is down" in d

        primary = [(r, e) for r, e in errors if not secondary(e)] or errors
        r, e = primary[0]
        err = _error(e, self.names[r], action)
        others = [self.names[x] for x, _ in errors if x != r]
        if others:
            err.args = (f"{err.args[0]} (then aborted on: {', '.join(others)})",)
        return err

    def release(self) -> None:
        if not self.session_id:
            return
        for stub in self.stubs:
            try:
                stub.Release(pb.ReleaseRequest(session_id=self.session_id), timeout=5.0, metadata=self._md())
            except grpc.RpcError:
                pass
        self.session_id, self.partition, self.loaded_memory = "", None, []

    def close(self) -> None:
        self._closed.set()
        self.release()
        for c in self.channels:
            c.close()
        self.pool.shutdown(wait=False)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_memory(infos: list[DeviceInfo], names: list[str], cfg: ModelConfig, partition: Partition,
                 options: LoadOptions, file_bytes: int | None = None) -> None:
    """Refuse a split that some device cannot hold, before anything is pushed or loaded: the
    worker's own admission (galaxy.parallel.memory.shard_need within its budget, beside what it
    holds less what its other sessions would give up), for every device at once.

    file_bytes: the checkpoint's size when devices read it themselves (None: pushed)."""
    params = options.memory_params
    seq = options.seq_len or min(DEFAULT_SEQ_LEN, cfg.max_positions)
    tokens = partition.tokens(seq) if partition.strategy.splits_tokens else [seq] * partition.world
    problems = []
    for r, info in enumerate(infos):
        if not info.memory_budget:
            continue
        spec = partition.spec(r, cfg)
        transient = load_transient_bytes(cfg, spec, params, file_bytes, compact_push=file_bytes is None)
        need = shard_need(cfg, spec, params, seq, tokens[r], transient, seqpar=partition.strategy == Strategy.SEQPAR)
        try:
            check_fits(names[r], need, info.memory_budget, info.rss - info.droppable)
        except DeviceOutOfMemory as e:
            problems.append(str(e))
    if problems:
        raise DeviceOutOfMemory("the split does not fit (nothing was pushed or loaded): " + "; ".join(problems))


def check_format_cuts(cfg: ModelConfig, partition: Partition, options: LoadOptions) -> None:
    """Refuse a split whose cuts a compact weights format cannot hold (compact.check_cuts), before any
    worker builds or is pushed anything."""
    fmt = options.weight_format
    if fmt.name != "fp32":
        for r in range(partition.world):
            check_cuts(cfg, partition.spec(r, cfg), fmt)


def _shard_parts(source, spec, mh: str, sj: str, out: dict, weights_format: str = "fp32"):
    """The PushShard stream: header, each tensor announced and sent in chunks, then the content hash.
    In a compact weights format every linear goes as its wire parts (parallel/compact_wire.py)."""
    fmt = parse_format(weights_format)
    items = iter_shard(source, spec)  # float32
    n = len(meta_model(source.config, spec).state_dict(keep_vars=True))
    if fmt.name != "fp32":
        items = compact_items(items, source, spec, fmt)
        n = wire_tensor_count(meta_model(source.config, spec), fmt)
    yield pb.ShardPart(model_hash=mh, spec_json=sj, config_json=json.dumps(source.config.to_dict()), n_tensors=n,
                       shard_bytes=push_bytes(source.config, spec, str(fmt)),
                       weights_format="" if fmt.name == "fp32" else str(fmt))
    h = hashlib.sha256()
    for name, t, alias in items:
        digest(h, name, t, alias)
        if t is None:
            yield pb.ShardPart(name=name, alias_of=alias)
        else:
            yield from tensor_parts(name, t)
    out["hash"] = h.hexdigest()
    yield pb.ShardPart(content_hash=out["hash"])

