"""The lean small-message path of the TCP data plane: a decode step's collectives are written by
the compute thread and read by it straight from the socket, and still give every rank bit-identical,
exact sums; a frame that is malformed, of the wrong size or from an unauthenticated caller is
refused with a typed error, and every wait ends at its deadline."""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time

import pytest
import torch

from galaxy.errors import FrameRejected, TransportError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedBatch
from galaxy.parallel.collectives import Collectives
from galaxy.parallel.forward import Step
from galaxy.parallel.local_transport import LocalGroup
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import full_spec, load_shard, weighted_partition
from galaxy.transport import datalink
from galaxy.transport.client import Cluster, ModelRef
from galaxy.transport.datalink import DataServer, connect, encode_frame
from galaxy.transport.peers import PeerTransport

TOKEN, SESSION = "secret", "s1"


class _Ranks:
    """`world` ranks of one session in this process, each with its own data port and transport."""

    def __init__(self, world: int, recv_timeout: float = 10.0):
        self.world = world
        self.transports = [None] * world
        self.servers = [DataServer("127.0.0.1", 0, lambda sid, r=r: self.transports[r] if sid == SESSION else None,
                                   TOKEN, None, 1 << 20) for r in range(world)]
        ports = [f"127.0.0.1:{s.port}" for s in self.servers]
        for r in range(world):
            self.transports[r] = PeerTransport(r, [""] * world, SESSION, TOKEN, recv_timeout, data_peers=ports)
            self.transports[r].begin(1)

    def run(self, fn) -> list:
        """fn(Collectives) on every rank at once (a thread each); their results in rank order."""
        out, errors = [None] * self.world, []

        def one(r):
            try:
                out[r] = fn(Collectives(self.transports[r]))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return out

    def close(self):
        for t in self.transports:
            t.close()
        for s in self.servers:
            s.close()


def _local(world: int, fn) -> list:
    group, out = LocalGroup(world, timeout=10), [None] * world
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(Collectives(group.transport(r)))))
               for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def _collectives(comm: Collectives):
    """A decode row's all-reduce both ways, and an uneven ReduceScatter + AllGather."""
    r, sizes = comm.rank, [3, 1, 2]
    x = torch.randn(576, generator=torch.Generator().manual_seed(r))
    part = torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + r))
    direct = comm.all_reduce(x)
    comm.direct_max_bytes = 0
    ring = comm.all_reduce(x)
    mine = comm.reduce_scatter(sizes, lambda a, b: part[a:b], 5)
    return direct, ring, comm.all_gather(mine, sizes)


def test_small_collectives_over_tcp_are_bit_identical_to_in_process_ones_on_every_rank():
    ranks = _Ranks(3)
    try:
        got = ranks.run(_collectives)
        want = _local(3, _collectives)
        alive = [t.name for t in threading.enumerate() if t.name == "galaxy-data-recv"]
    finally:
        ranks.close()
    partials = [torch.randn(576, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    assert torch.equal(got[0][0], partials[0] + partials[1] + partials[2])  # direct: rank order, every rank
    for r in range(3):
        for g, w, first in zip(got[r], want[r], got[0]):
            assert torch.equal(g, w) and torch.equal(g, first)
    assert not alive  # each connection's reader thread ended after its handshake: the compute thread reads


def test_decode_steps_over_real_workers_with_an_uneven_split_match_one_device(servers):
    cfg = preset("tiny-llama")
    src = RandomWeights(cfg, seed=5, std=0.3)
    alone = load_shard(src, full_spec(cfg))
    tokens = [3, 14, 15, 9, 2, 6]
    with Cluster(servers.start(3)) as c:
        c.load_ref(ModelRef(cfg, random_init=True, seed=5, std=0.3), weighted_partition(cfg, [3, 1, 2]))
        pool, blocks, done, tags = KVPool(16, 4), tuple(range(8)), 0, set()
        for _ in range(5):  # a prefill, then one token at a time
            todo = tokens[done:]
            step = Step(torch.tensor(todo), PagedBatch(4, (len(todo),), (done,), (blocks,)), (len(todo) - 1,))
            res = c.step(step, pool)
            want = alone(torch.tensor(tokens), last_only=True)[0]
            assert (res.output[0] - want).abs().max() <= 1e-4, len(tokens)
            if len(todo) == 1:
                tags |= {op.tag.rsplit(".", 1)[-1] for d in res.devices for op in d.ops}
            done = len(tokens)
            tokens.append(int(res.output[0].argmax()))
    assert "direct" in tags  # the decode steps took the one-hop all-reduce


def test_several_decodes_in_one_step_over_real_workers_each_match_one_device(servers):
    """Decodes of mixed lengths, one sharing another's first block, in one step on every worker: each
    still gets its own sequence's logits."""
    cfg = preset("tiny-llama")
    src = RandomWeights(cfg, seed=5, std=0.3)
    alone = load_shard(src, full_spec(cfg))
    seqs = [[3, 14, 15, 9, 2], [3, 14, 15, 9, 7, 1, 8, 8], [4, 4, 2, 1], [5, 9, 11, 3, 6, 2, 7]]
    tables = [(0, 1, 2), (0, 3, 4), (5, 6), (7, 8, 9)]  # sequence 1 shares block 0 (positions 0-3) with 0
    with Cluster(servers.start(3)) as c:
        c.load_ref(ModelRef(cfg, random_init=True, seed=5, std=0.3), weighted_partition(cfg, [3, 1, 2]))
        pool = KVPool(16, 4)
        done = [0, 4, 0, 0]  # sequence 1's first block is sequence 0's, written by the first step
        for _ in range(4):  # the prompts (as chunks of one step), then decodes of every sequence at once
            todo = [t[d:] for t, d in zip(seqs, done)]
            ends = list(itertools.accumulate(len(t) for t in todo))
            step = Step(torch.tensor([x for t in todo for x in t]),
                        PagedBatch(4, tuple(map(len, todo)), tuple(done), tuple(tables)), tuple(e - 1 for e in ends))
            res = c.step(step, pool)
            for i, t in enumerate(seqs):
                want = alone(torch.tensor(t), last_only=True)[0]
                assert (res.output[i] - want).abs().max() <= 1e-4, (i, len(t))
            done = [len(t) for t in seqs]
            for i, row in enumerate(res.output):
                seqs[i].append(int(row.argmax()))
        assert step.batch.query_lens == (1, 1, 1, 1)  # the last step: four decodes at once


@pytest.fixture
def receiver():
    """Rank 0 of 3 with a data port and a 1 s receive timeout; a connection to it as rank 1; its port."""
    t = PeerTransport(0, ["127.0.0.1:1"] * 3, SESSION, TOKEN, recv_timeout=1.0)
    t.begin(1)
    srv = DataServer("127.0.0.1", 0, lambda sid: t if sid == SESSION else None, TOKEN, None, 1 << 20)
    sock = connect(f"127.0.0.1:{srv.port}", SESSION, 1, TOKEN, None)
    yield t, sock, srv.port
    sock.close()
    t.close()
    srv.close()


def _header(shape=(2, 3), nbytes=24, magic=b"GXF1", seq=0):
    dims = list(shape) + [0] * (datalink.MAX_DIMS - len(shape))
    return struct.pack(f"<4sQQBBBx{datalink.MAX_DIMS}qQQ", magic, 1, seq, 1, 1, len(shape), *dims, nbytes, 0)


@pytest.mark.parametrize("frame,match", [
    (_header(nbytes=20) + bytes(20), "expected 24"),  # data of another size than its shape
    (_header(magic=b"EVIL") + bytes(24), "not a galaxy frame"),  # tampered header
    (_header(shape=(3, 2)) + bytes(24), r"got \(3, 2\).*expected \(2, 3\)"),  # valid, but not what is expected
    (_header(seq=5) + bytes(24), "frame 5 from rank 1, expected frame 0"),
], ids=["wrong-size", "tampered-magic", "wrong-shape", "out-of-sequence"])
def test_a_bad_frame_is_refused_at_once_with_a_typed_error(receiver, frame, match):
    t, sock, _ = receiver
    sock.sendall(frame)
    t0 = time.monotonic()
    with pytest.raises(FrameRejected, match=match):
        t.recv(1, (2, 3), torch.float32)
    assert time.monotonic() - t0 < 0.9  # refused when it arrived, not at the deadline


def test_a_layout_checked_once_still_refuses_a_later_frame_that_differs(receiver):
    """The reader skips re-checking a header equal to the last one but for its sequence number."""
    t, sock, _ = receiver
    for seq in range(3):
        sock.sendall(_header(seq=seq) + struct.pack("<6f", *range(seq, seq + 6)))
        assert torch.equal(t.recv(1, (2, 3), torch.float32), torch.arange(seq, seq + 6.0).reshape(2, 3))
    sock.sendall(_header(seq=3, nbytes=28) + bytes(28))
    with pytest.raises(FrameRejected, match="expected 24"):
        t.recv(1, (2, 3), torch.float32)


def test_an_unauthenticated_sender_is_refused_and_the_receiver_times_out_naming_the_peer(receiver):
    t, _, port = receiver
    with pytest.raises(TransportError, match="does not hold the cluster token"):
        connect(f"127.0.0.1:{port}", SESSION, 2, "not-the-token", None)
    with socket.create_connection(("127.0.0.1", port)) as raw:  # a frame with no handshake at all
        raw.sendall(b"".join(bytes(p) for p in encode_frame(1, 0, torch.ones(2, 3))))
        with pytest.raises(TransportError, match="nothing from rank 2 .* within 1 s"):
            t.recv(2, (2, 3), torch.float32)


def test_an_abort_ends_a_wait_on_the_socket_at_once_and_a_frame_cut_short_ends_at_the_deadline(receiver):
    t, sock, _ = receiver
    threading.Timer(0.2, t.abort, args=(1, "device 2 failed")).start()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="aborted: device 2 failed"):
        t.recv(1, (2, 3), torch.float32)  # blocked on rank 1's idle connection
    assert time.monotonic() - t0 < 0.9
    t.begin(2)
    sock.sendall(_header() + bytes(10))  # 14 of its 24 data bytes never come
    with pytest.raises(TransportError, match="nothing from rank 1"):
        t.recv(1, (2, 3), torch.float32)
    with pytest.raises(TransportError, match="out of step"):  # the link stays refused after that
        t.recv(1, (2, 3), torch.float32)


def test_frames_keep_their_order_when_small_ones_skip_the_sender_thread():
    """Large frames queue for the sender thread; a small one written directly must not overtake them."""
    ranks = _Ranks(2)
    try:
        big, small = torch.randn(300, 100), torch.randn(4)
        for i in range(4):
            ranks.transports[1].send(0, big + i)
            ranks.transports[1].send(0, small + i)
        for i in range(4):
            assert torch.equal(ranks.transports[0].recv(1, (300, 100), torch.float32), big + i)
            assert torch.equal(ranks.transports[0].recv(1, (4,), torch.float32), small + i)
    finally:
        ranks.close()


def test_with_an_emulated_latency_a_frame_counts_from_its_arrival_not_from_when_it_was_read():
    """The delay is added from the kernel's receive stamp: a frame that waited in the socket while
    the compute thread read another one does not wait a second full latency."""
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    try:
        reader = datalink.FrameReader(b, 1 << 20, 0.05, stamp=True)
        assert reader.stamp
        for seq in range(2):  # the kernel turns stamping on in the background: the first may go unstamped
            datalink.send_frame(a, encode_frame(1, seq, torch.ones(3)))
            time.sleep(0.2)
            before = time.time()
            _, _, x = reader.read(time.monotonic() + 5, lambda: None)
            assert torch.equal(x, torch.ones(3))
        assert reader.arrived is not None and reader.arrived < before
    finally:
        for s in (a, b, srv):
            s.close()
