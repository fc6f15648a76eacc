"""The TCP tensor data plane: frames are bit-exact, malformed ones are refused before anything is
allocated, only holders of the cluster token (or TLS identity) for a loaded session get in, and a
cluster runs exactly whether its workers use it, gRPC, or a mix."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest
import torch

from galaxy.errors import GalaxyError, TransportError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import even_partition, full_spec, load_shard, weighted_partition
from galaxy.transport import datalink
from galaxy.transport.client import Cluster, ModelRef
from galaxy.transport.datalink import DataServer, connect, encode_frame, read_frame
from galaxy.transport.security import COORDINATOR, TlsFiles, init_keys

SRC = RandomWeights(preset("tiny-gpt2"), seed=9)
MAX = 1 << 20


def _send(tensor, fmt="fp32", request_id=3, seq=1):
    a, b = socket.socketpair()
    for part in encode_frame(request_id, seq, tensor, fmt):
        a.sendall(part)
    a.close()
    try:
        return read_frame(b, MAX), read_frame(b, MAX)
    finally:
        b.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8])
def test_frames_round_trip_bit_exact_and_end_cleanly(dtype):
    x = (torch.randn(5, 3, 7) * 100).to(dtype)
    (rid, seq, y), end = _send(x)
    assert (rid, seq) == (3, 1) and y.dtype == dtype and y.shape == x.shape and torch.equal(x, y)
    assert end is None  # the sender closed between frames: a clean end, not an error
    (_, _, e), _ = _send(torch.zeros(0, 4))
    assert e.shape == (0, 4)


@pytest.mark.parametrize("fmt,tol", [("bf16", 1e-2), ("fp16", 1e-3), ("int8", 2e-2)])
def test_lossy_wire_formats_decode_to_the_senders_dtype(fmt, tol):
    x = torch.randn(6, 300)
    (_, _, y), _ = _send(x, fmt)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert float((y - x).abs().max()) <= tol * float(x.abs().max())


def _header(**kw):
    f = dict(magic=b"GXF1", rid=1, seq=0, code=1, decoded=1, ndim=2, shape=(2, 3), nbytes=24, scales=0)
    f.update(kw)
    shape = list(f["shape"]) + [0] * (datalink.MAX_DIMS - len(f["shape"]))
    return struct.pack(f"<4sQQBBBx{datalink.MAX_DIMS}qQQ", f["magic"], f["rid"], f["seq"], f["code"], f["decoded"],
                       f["ndim"], *shape, f["nbytes"], f["scales"])


@pytest.mark.parametrize("fields,match", [
    (dict(magic=b"HTTP"), "not a galaxy frame"),
    (dict(code=99), "unknown dtype"),
    (dict(shape=(2, -3)), "malformed shape"),
    (dict(ndim=9), "malformed shape"),
    (dict(ndim=1), "malformed shape"),  # a dimension beyond ndim is set
    (dict(nbytes=25), "expected 24"),
    (dict(shape=(1 << 30, 1 << 10), nbytes=1 << 42), "exceeds the limit"),  # 4 TiB: refused, not allocated
    (dict(scales=8), "scales for"),
    (dict(code=6, decoded=1, shape=(0, 3), nbytes=0, scales=8), "8 bytes of float32 scales|2 scales for 0 rows"),
])
def test_malformed_frame_headers_are_refused_naming_the_problem(fields, match):
    a, b = socket.socketpair()
    a.sendall(_header(**fields) + bytes(64))
    with pytest.raises(TransportError, match=match):
        read_frame(b, MAX)
    a.close()
    b.close()


def test_a_frame_cut_short_is_an_error():
    a, b = socket.socketpair()
    a.sendall(_header() + bytes(10))
    a.close()
    with pytest.raises(TransportError, match="closed before the frame's data|middle of a frame"):
        read_frame(b, MAX)
    b.close()


@pytest.fixture
def data_server():
    """A data port with one loaded session "s1": rank 0 of 3, which reads its frames itself."""
    from galaxy.transport.peers import PeerTransport

    t = PeerTransport(0, ["127.0.0.1:1"] * 3, "s1", "secret", recv_timeout=5)
    t.begin(7)
    srv = DataServer("127.0.0.1", 0, lambda sid: t if sid == "s1" else None, "secret", None, MAX)
    yield srv, t
    t.close()
    srv.close()


def test_handshake_admits_the_token_holder_for_a_loaded_session_only(data_server):
    srv, t = data_server
    addr = f"127.0.0.1:{srv.port}"
    with pytest.raises(TransportError, match="does not hold the cluster token"):
        connect(addr, "s1", 1, "wrong", None)
    with pytest.raises(TransportError, match="no loaded session"):
        connect(addr, "s2", 1, "secret", None)
    with pytest.raises(TransportError, match="not a peer"):
        connect(addr, "s1", 0, "secret", None)  # the receiver's own rank
    with socket.create_connection(("127.0.0.1", srv.port)) as raw:  # garbage instead of a handshake
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
    sock = connect(addr, "s1", 2, "secret", None)
    for part in encode_frame(7, 0, torch.arange(6.0)):
        sock.sendall(part)
    assert torch.equal(t.recv(2, (6,), torch.float32), torch.arange(6.0))  # from rank 2: bound by the handshake
    sock.close()


def test_unreachable_data_port_is_a_transport_error_naming_it():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(TransportError, match=f"cannot reach the data port 127.0.0.1:{port}"):
        connect(f"127.0.0.1:{port}", "s1", 1, None, None, timeout=2)


def _links(servers_running) -> dict[int, str]:
    """Destination rank -> kind of every link the workers opened."""
    return {dst: type(link).__name__ for _, service in servers_running for sess in service.sessions.values()
            for dst, link in sess.transport.links.items()}


def test_cluster_is_exact_over_tcp_grpc_and_a_mix_of_both(servers):
    """Worker 1 offers no data port (-1): its peers reach it over gRPC, it sends to them over TCP."""
    addrs = servers.start(1) + servers.start(1, data_port=-1) + servers.start(1)
    ids = torch.arange(11)
    want = load_shard(SRC, full_spec(SRC.config))(ids)
    part = weighted_partition(SRC.config, [3, 2, 2])  # uneven heads, columns and tokens
    mixed, grpc_only = {0: "_TcpLink", 1: "_GrpcLink", 2: "_TcpLink"}, dict.fromkeys(range(3), "_GrpcLink")
    for plane, kinds in (("tcp", mixed), ("grpc", grpc_only)):
        with Cluster(addrs) as c:
            c.load_ref(ModelRef(SRC.config, random_init=True, seed=9), part, LoadOptions(data_plane=plane))
            assert (c.forward(Request(ids)).output - want).abs().max() < 1e-4
            assert _links(servers.running) == kinds
    with pytest.raises(GalaxyError, match="data_plane='udp' is not one of"):
        LoadOptions(data_plane="udp")


def test_tls_cluster_sends_tensors_over_mutually_authenticated_tls(servers, tmp_path):
    init_keys(tmp_path, ["w0", "w1"])
    addrs = [servers.start(1, tls=TlsFiles.load(tmp_path, f"w{i}"))[0] for i in range(2)]
    with Cluster(addrs, tls=TlsFiles.load(tmp_path, COORDINATOR)) as c:
        c.load_ref(ModelRef(SRC.config, random_init=True, seed=9), even_partition(SRC.config, 2))
        ids = torch.arange(9)
        assert (c.forward(Request(ids)).output - load_shard(SRC, full_spec(SRC.config))(ids)).abs().max() < 1e-4
        links = [k for _, svc in servers.running for s in svc.sessions.values() for k in s.transport.links.values()]
        assert len(links) == 2 and all(isinstance(k.sock, ssl.SSLSocket) for k in links)
        port = servers.running[0][1].data.port
        with pytest.raises(TransportError, match="handshake"):  # plaintext, no client certificate
            connect(f"127.0.0.1:{port}", c.session_id, 1, None, None, timeout=3)


def test_a_peer_whose_data_port_is_gone_fails_the_request_cleanly_naming_it(servers):
    addrs = servers.start(3)
    with Cluster(addrs, forward_timeout=30) as c:
        c.load_ref(ModelRef(SRC.config, random_init=True, seed=9), even_partition(SRC.config, 3), recv_timeout=20)
        servers.running[1][1].data.close()  # its gRPC port still answers, its data port does not
        port = addrs[1].rpartition(":")[0]
        with pytest.raises(GalaxyError, match=rf"link to rank 1 \({port}:\d+\) is down: cannot reach the data port"):
            c.forward(Request(torch.arange(7)))


def test_an_abort_that_arrives_before_its_request_begins_still_stops_it():
    """A fast failure elsewhere can reach a rank before its Forward starts; it must not wait out
    the receive timeout for tiles that will never come."""
    from galaxy.transport.peers import PeerTransport

    t = PeerTransport(0, ["127.0.0.1:1", "127.0.0.1:2"], "s", None, recv_timeout=30)
    t.begin(4)
    t.abort(5, "device 1 failed")
    t.begin(5)
    with pytest.raises(TransportError, match="request 5 aborted: device 1 failed"):
        t.recv(1, (2,), torch.float32)
    t.begin(6)  # the next request starts clean
    assert t.aborted is None
