"""The peer data plane: a `Transport` over long-lived links between workers.

Each worker keeps one link open to every peer it sends to -- in a ring, just its successor. A
link is a TCP connection to the peer's data port (datalink.py: raw bytes, a fraction of gRPC's
CPU) or, for a peer that offers none, a gRPC `Exchange` stream. Large tiles go through the link's
sender thread, so a send returns at once and the GEMM of the next tile runs while bytes are on
the wire; small frames (a decode step's all-reduce) are written by the compute thread itself.
On the receiving side the compute thread reads each peer's TCP connection itself when it needs
that peer's next frame (datalink.FrameReader): no reader thread, no queue, no second wake-up per
message (docs/collectives.md measures what that saves). gRPC frames land in one mailbox per sender.

A link belongs to one session (bound by its TCP handshake or stream metadata); frames carry the
request id and a per-pair sequence number: frames of an aborted older request are dropped, a
gap or reordering is an error, and `recv` checks shape and dtype against what the collective
expects.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import defaultdict

import grpc
import torch

from ..errors import FrameRejected, TransportError
from ..v1 import worker_pb2 as pb
from ..v1 import worker_pb2_grpc as pb_grpc
from .channels import open_channel
from .datalink import FrameReader, connect, encode_frame, send_frame
from .protocol import compress, decompress, metadata, to_proto_dtype

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a blocked recv looks at the abort flag
DIRECT_SEND_BYTES = 64 * 1024  # frames up to this size are written by the compute thread itself


class _Link:
    """One outgoing link to a peer, fed from a queue by its own thread: a send returns at once."""

    def __init__(self, owner: PeerTransport, dst: int, address: str):
        self.owner, self.dst, self.address = owner, dst, address
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"galaxy-send-{self.dst}", daemon=True)
        self.thread.start()

    def _items(self):
        """(request id, seq, tensor, wire format) to send, until close(); times each send."""
        while True:
            item = self.q.get()
            if item is None:
                return
            request_id, seq, tensor, tag = item
            t0 = time.perf_counter()
            yield request_id, seq, tensor, self.owner.wire_format(self.dst)
            self.owner.add_send_time(tag, time.perf_counter() - t0)

    def _run(self) -> None:
        raise NotImplementedError

    def _detail(self) -> str:
        return str(self.error)

    def put(self, item) -> None:
        if self.error is not None:
            raise TransportError(f"link to rank {self.dst} ({self.address}) is down: {self._detail()}")
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=5)


class _TcpLink(_Link):
    """To the peer's data port (datalink.py): raw frames, a fraction of gRPC's CPU per byte.

    A small frame (a decode step's all-reduce, at most DIRECT_SEND_BYTES) is written by the
    calling compute thread itself, in one system call, when nothing is queued before it: no hop
    to the sender thread and back through the scheduler. Larger frames go through the sender
    thread as before, so the GEMM of the next tile runs while they are on the wire. Frames keep
    their order either way: a direct write happens only when the queue is empty and no write is
    in progress (`pending` counts frames queued and not yet written)."""

    def __init__(self, owner: PeerTransport, dst: int, address: str):
        super().__init__(owner, dst, address)
        self.sock = connect(address, owner.session_id, owner.rank, owner.token, owner.tls)
        self.sock.settimeout(owner.recv_timeout)  # a peer that stops reading fails the link, not a hang
        self.state = threading.Lock()  # guards pending
        self.writing = threading.Lock()  # held while one frame goes into the socket
        self.pending = 0
        self._start()

    def _write(self, request_id: int, seq: int, tensor: torch.Tensor, tag: str) -> None:
        """One frame into the socket; the caller holds `writing`."""
        t0 = time.perf_counter()
        send_frame(self.sock, encode_frame(request_id, seq, tensor, self.owner.wire_format(self.dst)))
        self.owner.add_send_time(tag, time.perf_counter() - t0)

    def put(self, item) -> None:
        if self.error is not None:
            raise TransportError(f"link to rank {self.dst} ({self.address}) is down: {self._detail()}")
        tensor = item[2]
        with self.state:
            direct = self.pending == 0 and tensor.numel() * tensor.element_size() <= DIRECT_SEND_BYTES
            if direct:
                self.writing.acquire()  # before releasing state: no queued frame can overtake this one
            else:
                self.pending += 1
                self.q.put(item)
        if not direct:
            return
        try:
            self._write(*item)
        except (OSError, ssl.SSLError, ValueError, TypeError) as e:
            self.error = e
            raise TransportError(f"link to rank {self.dst} ({self.address}) is down: {e}") from None
        finally:
            self.writing.release()

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                try:
                    with self.writing:
                        self._write(*item)
                finally:
                    with self.state:
                        self.pending -= 1
        except (OSError, ssl.SSLError, ValueError, TypeError) as e:
            self.error = e
            log.warning("data link to rank %d (%s) closed: %s", self.dst, self.address, e)
        finally:
            self.sock.close()


class _GrpcLink(_Link):
    """An `Exchange` stream, for a peer that offers no data port."""

    def __init__(self, owner: PeerTransport, dst: int, address: str):
        super().__init__(owner, dst, address)
        self.channel = owner.channel_factory(address)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self._start()

    def _frames(self):
        for request_id, seq, tensor, fmt in self._items():
            data, scales = compress(tensor, fmt)
            # the yield returns when gRPC asks for the next frame: the previous write completed
            yield pb.Frame(session_id=self.owner.session_id, request_id=request_id, src_rank=self.owner.rank,
                           seq=seq, tensor=data, decoded_dtype=to_proto_dtype(tensor.dtype), scales=scales)

    def _run(self) -> None:
        md = metadata(self.owner.token, self.owner.session_id)
        try:
            self.stub.Exchange(self._frames(), metadata=md)
        except grpc.RpcError as e:
            self.error = e
            log.warning("link to rank %d (%s) closed: %s", self.dst, self.address, e.details())
        except BaseException as e:  # noqa: BLE001 - kept and reported by the next send
            self.error = e

    def _detail(self) -> str:
        return self.error.details() if isinstance(self.error, grpc.RpcError) else str(self.error)

    def close(self) -> None:
        super().close()
        self.channel.close()


class PeerTransport:
    """Transport for one rank of a loaded session; see collectives.Transport."""

    def __init__(self, rank: int, peers: list[str], session_id: str, token: str | None,
                 recv_timeout: float, channel_factory=None, link_delay_s: float = 0.0,
                 wire_formats: list[str] | None = None, data_peers: list[str] | None = None, tls=None):
        self.rank, self.world, self.peers = rank, len(peers), list(peers)
        self.data_peers = list(data_peers or [])  # per rank: host:port of its data port, "" = use gRPC
        self.tls = tls
        self.session_id, self.token, self.recv_timeout = session_id, token, recv_timeout
        self.channel_factory = channel_factory or open_channel
        self.boxes = {src: queue.Queue() for src in range(self.world)}
        self.links: dict[int, _Link] = {}
        self.incoming_socks: list[FrameReader] = []  # accepted data connections, closed with the session
        self.readers: dict[int, FrameReader] = {}  # per source rank, once its connection is handed over
        self.closed = False
        self.lock = threading.Lock()
        self.request_id = 0
        self.aborted: str | None = None
        self.early_abort: tuple[int, str] | None = None  # an abort that came before its request began
        self.seq_out: dict[int, int] = defaultdict(int)
        self.seq_in: dict[int, int] = defaultdict(int)
        self.send_s: dict[str, float] = defaultdict(float)
        # Emulated one-way propagation delay: a frame becomes visible link_delay_s after it
        # arrived. tbf shapes bandwidth but adds no delay, and netem is not available.
        self.link_delay_s = link_delay_s
        self.wire_formats = list(wire_formats or [])  # per destination rank; missing: fp32 (exact)
        self.request_wire: list[str] | None = None  # the current request's override

    # -- request scope -----------------------------------------------------------------------
    def begin(self, request_id: int, wire_formats: list[str] | None = None) -> None:
        """Start a request: fresh sequence numbers, no abort, no send timings; `wire_formats`
        overrides the session's formats for this request only."""
        with self.lock:
            early = self.early_abort
            self.request_id, self.aborted = request_id, early[1] if early and early[0] == request_id else None
            self.early_abort = None
            self.request_wire = list(wire_formats) if wire_formats else None
            self.seq_out.clear()
            self.seq_in.clear()
            self.send_s.clear()

    def abort(self, request_id: int, reason: str) -> None:
        reason = reason or "aborted by the coordinator"
        with self.lock:
            if request_id in (0, self.request_id):
                self.aborted = reason
            elif request_id > self.request_id:  # arrived before this rank began the request
                self.early_abort = (request_id, reason)

    def wire_format(self, dst: int) -> str:
        formats = self.request_wire or self.wire_formats
        return formats[dst] if dst < len(formats) and formats[dst] else "fp32"

    def add_send_time(self, tag: str, seconds: float) -> None:
        with self.lock:
            self.send_s[tag] += seconds

    # -- sending -------------------------------------------------------------------------------
    def send(self, dst: int, tensor: torch.Tensor, tag: str = "") -> None:
        with self.lock:
            link = self.links.get(dst)
            if link is None:
                link = self.links[dst] = self._open_link(dst)
            seq = self.seq_out[dst]
            self.seq_out[dst] = seq + 1
        link.put((self.request_id, seq, tensor, tag))

    def _open_link(self, dst: int):
        address = self.data_peers[dst] if dst < len(self.data_peers) else ""
        if address:
            try:
                return _TcpLink(self, dst, address)
            except TransportError as e:  # worded like a broken link: the coordinator looks for the cause
                raise TransportError(f"link to rank {dst} ({address}) is down: {e}") from None
        return _GrpcLink(self, dst, self.peers[dst])

    # -- receiving -----------------------------------------------------------------------------
    def deliver(self, frame: pb.Frame) -> None:
        """Called by the Exchange handler for every frame from a peer."""
        src = frame.src_rank
        if not 0 <= src < self.world or src == self.rank:
            raise TransportError(f"frame claims sender rank {src}, not a peer of rank {self.rank}")
        tensor = decompress(frame.tensor, frame.decoded_dtype, frame.scales if frame.HasField("scales") else None,
                            f"frame {frame.seq} from rank {src}")
        self.deliver_tensor(src, frame.request_id, frame.seq, tensor)

    def deliver_tensor(self, src: int, request_id: int, seq: int, tensor: torch.Tensor) -> None:
        """A decoded frame from rank `src` (authenticated by its link) into its mailbox."""
        self.boxes[src].put((request_id, seq, tensor, time.monotonic()))

    def incoming(self, sock, src: int, max_bytes: int) -> None:
        """An authenticated data connection from rank `src` (datalink.DataServer): from now on the
        compute thread reads src's frames from it directly (recv). Its mailbox hands it over, so a
        recv already waiting there wakes at once; it is closed with the session."""
        reader = FrameReader(sock, max_bytes, _POLL_S, stamp=self.link_delay_s > 0)
        with self.lock:
            if self.closed:
                reader.close()
                return
            self.incoming_socks.append(reader)
        self.boxes[src].put(reader)

    def _check_abort(self) -> None:
        if self.aborted:
            raise TransportError(f"rank {self.rank}: request {self.request_id} aborted: {self.aborted}")

    def _next(self, src: int, deadline: float) -> tuple[int, int, torch.Tensor, float]:
        """(request id, seq, tensor, arrival time) of src's next frame: read from its data
        connection on this thread, or taken from its mailbox (gRPC frames)."""
        while True:
            self._check_abort()
            reader = self.readers.get(src)
            if reader is not None:
                try:
                    frame = reader.read(deadline, self._check_abort)
                    now = time.monotonic()
                    waited = max(0.0, time.time() - reader.arrived) if reader.arrived is not None else 0.0
                    return (*frame, now - waited)
                except FrameRejected as e:
                    raise FrameRejected(f"rank {self.rank}: bad frame from rank {src}: {e}") from None
                except TransportError as e:
                    if self.aborted:
                        raise
                    if time.monotonic() > deadline:
                        raise self._late(src) from None
                    raise TransportError(f"rank {self.rank}: link from rank {src} is down: {e}") from None
            try:
                item = self.boxes[src].get(timeout=_POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise self._late(src) from None
                continue
            if isinstance(item, FrameReader):
                self.readers[src] = item
                continue
            return item

    def _late(self, src: int) -> TransportError:
        return TransportError(f"rank {self.rank}: nothing from rank {src} ({self.peers[src]}) within "
                              f"{self.recv_timeout:.0f} s")

    def recv(self, src: int, shape, dtype) -> torch.Tensor:
        deadline = time.monotonic() + self.recv_timeout
        while True:
            request_id, seq, x, arrived = self._next(src, deadline)
            if request_id < self.request_id:
                continue  # left over from an aborted request
            if request_id > self.request_id:
                raise TransportError(f"rank {self.rank}: rank {src} is on request {request_id}, "
                                     f"this rank on {self.request_id}")
            break
        if self.link_delay_s:
            time.sleep(max(0.0, arrived + self.link_delay_s - time.monotonic()))
        want = self.seq_in[src]
        if seq != want:
            raise FrameRejected(f"rank {self.rank}: frame {seq} from rank {src}, expected frame {want}")
        self.seq_in[src] = want + 1
        if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
            raise FrameRejected(
                f"rank {self.rank}: from rank {src} got {tuple(x.shape)} {x.dtype}, expected {tuple(shape)} {dtype}"
            )
        return x

    def close(self) -> None:
        with self.lock:
            self.closed = True
            links, self.links = list(self.links.values()), {}
            socks, self.incoming_socks = self.incoming_socks, []
        for link in links:
            link.close()
        for reader in socks:  # wakes a recv blocked on one
            reader.close()
