"""Measure a link with real transfers: ping round trips for latency, a stream for goodput."""

from __future__ import annotations

import statistics
import time

from ..v1 import worker_pb2 as pb
from ..v1 import worker_pb2_grpc as pb_grpc
from .channels import open_channel
from .protocol import metadata

CHUNK = 256 * 1024
TARGET_S = 0.5  # a bandwidth test lasts about this long
MIN_BYTES, MAX_BYTES = 1 << 20, 64 << 20


def _stream(stub, md, nbytes: int) -> float:
    blob = pb.Blob(data=bytes(CHUNK))
    count = max(1, nbytes // CHUNK)

    def blobs():
        for _ in range(count):
            yield blob

    t0 = time.perf_counter()
    stub.Sink(blobs(), metadata=md, timeout=120)
    return time.perf_counter() - t0


def measure_link(peer: str, token: str | None, nbytes: int = 0, pings: int = 5,
                 tls=None) -> tuple[float, float, int, float]:
    """(goodput bits/s, one-way latency s, bytes sent, seconds) from here to `peer`."""
    md = metadata(token)
    with open_channel(peer, tls) as ch:
        stub = pb_grpc.WorkerStub(ch)
        stub.Ping(pb.PingRequest(), metadata=md, timeout=10, wait_for_ready=True)  # connect first
        rtts = []
        for _ in range(max(1, pings)):
            t0 = time.perf_counter()
            stub.Ping(pb.PingRequest(payload=b"x"), metadata=md, timeout=10)
            rtts.append(time.perf_counter() - t0)
        if nbytes <= 0:  # probe, then size the real test to last about TARGET_S
            probe = _stream(stub, md, MIN_BYTES)
            nbytes = int(min(MAX_BYTES, max(MIN_BYTES, MIN_BYTES * TARGET_S / max(probe, 1e-6))))
        nbytes = max(CHUNK, nbytes // CHUNK * CHUNK)
        secs = _stream(stub, md, nbytes)
    return nbytes * 8 / secs, statistics.median(rtts) / 2, nbytes, secs
