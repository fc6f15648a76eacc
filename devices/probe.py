"""Measurement probes run inside an emulated device: `python -m devices.probe KIND ...`.

cpu    a fixed amount of fp32 GEMM work on N threads; prints its wall time
burst  short GEMM tasks (~20 ms at full speed) with idle gaps, like a forward pass that waits
       for its peers; prints the median task time. A CPU share enforced only on average over a
       long CFS period lets such bursts run at full speed; this shows whether it does.
sink   accept one TCP connection and count the bytes; prints goodput
source connect and send as fast as the link allows for a number of seconds

Each prints one JSON line on stdout. Only `cpu`/`burst` import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

from galaxy.addresses import split_address

GEMM = (256, 1024, 1024)  # (M, K, N): one fp32 GEMM = 2*M*K*N = 0.54 GFLOP
CHUNK = 1 << 20  # bytes per send


def _gemm(threads: int):
    import torch

    torch.set_num_threads(threads)
    m, k, n = GEMM
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    for _ in range(3):  # warm caches and the BLAS thread pool
        a @ b
    return lambda: a @ b


def cpu(work: int, threads: int) -> dict:
    step = _gemm(threads)
    s0, t0, c0 = _ticks(), time.perf_counter(), time.process_time()
    for _ in range(work):
        step()
    dt, cpu_s, s1 = time.perf_counter() - t0, time.process_time() - c0, _ticks()
    m, k, n = GEMM
    busy = (os.cpu_count() or 1) * (1 - (s1[1] - s0[1]) / max(1, s1[0] - s0[0]))
    return {"kind": "cpu", "seconds": dt, "cpu_s": cpu_s, "gflops": 2 * m * k * n * work / dt / 1e9, "work": work,
            "machine_busy_cores": busy}


def _ticks() -> tuple[int, int]:
    """(total, idle) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals[:8]), vals[3] + vals[4]


def burst(task: int, gap_s: float, reps: int, threads: int) -> dict:
    step = _gemm(threads)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(task):
            step()
        times.append(time.perf_counter() - t0)
        time.sleep(gap_s)
    return {"kind": "burst", "median_s": statistics.median(times), "task": task, "gap_s": gap_s}


def sink(listen: str, timeout: float) -> dict:
    srv = socket.create_server(split_address(listen, allow_port_zero=True))
    srv.settimeout(timeout)
    print("PROBE-READY", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(timeout)
    buf = bytearray(CHUNK)
    total, first, last = 0, None, None
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            now = time.perf_counter()
            if first is None:
                first = now
            total, last = total + n, now
    srv.close()
    secs = (last - first) if first is not None and last > first else 0.0
    return {"kind": "sink", "bytes": total, "seconds": secs, "bps": total * 8 / secs if secs else 0.0}


def source(connect: str, seconds: float) -> dict:
    host, port = split_address(connect)
    payload = b"\0" * CHUNK
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            s.sendall(payload)
            sent += len(payload)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the sink to close: every byte has arrived
    return {"kind": "source", "bytes": sent}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devices.probe")
    sub = ap.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--work", type=int, default=150, help="GEMMs to run")
    c.add_argument("--threads", type=int, default=1)
    b = sub.add_parser("burst")
    b.add_argument("--task", type=int, default=3, help="GEMMs per task")
    b.add_argument("--gap-ms", type=float, default=30.0)
    b.add_argument("--reps", type=int, default=25)
    b.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("sink")
    k.add_argument("--listen", required=True)
    k.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("source")
    s.add_argument("--connect", required=True)
    s.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    if args.kind == "cpu":
        out = cpu(args.work, args.threads)
    elif args.kind == "burst":
        out = burst(args.task, args.gap_ms / 1000, args.reps, args.threads)
    elif args.kind == "sink":
        out = sink(args.listen, args.timeout)
    else:
        out = source(args.connect, args.seconds)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
