"""The CPU one rank spends on a ring collective beyond its share of the GEMMs, measured on the device.

A device of an HMP split runs 4 ring collectives a layer (docs/planner.md, section 1). Besides its
share of the blocks, each costs every device the same work whatever its share: the collective's
Python, the hand-off of a large chunk to the link's sender thread and back, the socket's system
calls and the frame's header, the small ops on the chunk (the sum of a reduce-scatter step). The cost
model divides a block's time among the devices by flops; this part it must charge to each device
whole, and on a device capped by a CPU quota (the emulated Jetsons: 0.45-0.9 of a core) each CPU
second of it costs 1 / quota of wall. Measured on the emulated trio: 75-165 ms of CPU a pass beyond
the profiled blocks on each device of a two-way split, 0.6-1.35 ms per collective (docs/planner.md,
"The split prefill on quota-capped devices").

`collective_cpu_s` runs the real data plane (two PeerTransports over TCP on the device's loopback,
each with its own DataServer, as two workers' ranks) through the ring all-gather and reduce-scatter of
`collectives.Collectives` on chunks of the shape a prefill sends, with trivial GEMM stand-ins, in the
worker's own process (under its CPU quota), and returns the process's CPU time per collective per rank.
Both ranks run in this one process, so the figure includes both ends of every message: what a device
of a real two-way ring pays per collective (it sends one chunk and receives one).
"""

from __future__ import annotations

import secrets
import threading
import time

import torch

from ..backends.profiling import Sample
from ..parallel.collectives import Collectives
from .datalink import DataServer
from .peers import PeerTransport

PROBE_ROUNDS = 16  # each round: one all-gather and one reduce-scatter per rank
PROBE_REPEATS = 3  # probes per profile, the median kept (a profile's samples are medians too)
PROBE_TIMEOUT_S = 30.0
PROBE_KIND = "collective"  # the profile sample's kind: units = chunk rows, seq = chunk width, seconds = CPU
MAX_PROBE_ROWS = 512


def probe_rows(seq_lens) -> int:
    """Rows of the probe's chunk: a two-way split's share of the longest profiled prompt (capped)."""
    return max(1, min(MAX_PROBE_ROWS, max(seq_lens) // 2))


def probe_samples(rows: int, width: int, dtype=torch.float32, repeats: int = PROBE_REPEATS) -> list:
    """The profile's `collective` sample (backends.profiling.Sample): the median CPU of `repeats` probes."""
    cpus = sorted(collective_cpu_s(rows, width, dtype=dtype)[0] for _ in range(repeats))
    return [Sample(PROBE_KIND, rows, width, cpus[len(cpus) // 2])]


def collective_cpu_s(rows: int, width: int, rounds: int = PROBE_ROUNDS, dtype=torch.float32) -> tuple[float, float]:
    """(CPU seconds, wall seconds) one rank of a two-rank ring spends per collective whose chunks are
    `rows` x `width` values of `dtype`, GEMMs aside (module docstring). The CPU is the process's (every
    thread: the ranks' compute threads and the links' sender threads), divided by the two ranks."""
    if rows < 1 or width < 1 or rounds < 1:
        raise ValueError(f"collective probe: rows={rows}, width={width}, rounds={rounds} must be >= 1")
    transports: dict[int, PeerTransport] = {}
    # a one-off token and session: the probe's loopback servers take frames only from its own two ranks, as a
    # worker's data plane takes them only from its session's peers
    session, token = f"probe-{secrets.token_hex(6)}", secrets.token_hex(16)
    servers = [DataServer("127.0.0.1", 0, lambda sid, r=r: transports.get(r) if sid == session else None, token,
                          None, max_bytes=64 * rows * width * 8 + (1 << 20)) for r in range(2)]
    addresses = [f"127.0.0.1:{s.port}" for s in servers]
    try:
        for r in range(2):
            transports[r] = PeerTransport(r, addresses, session, token, PROBE_TIMEOUT_S, data_peers=addresses)
        sizes = [rows, rows]
        errors: list[BaseException] = []
        go = [threading.Barrier(3) for _ in range(2)]  # start, end of the warm-up round

        def rank(r: int) -> None:
            t = transports[r]
            t.begin(1)
            coll = Collectives(t)
            local = torch.ones(rows, width, dtype=dtype)  # (rows, width): this rank's chunk
            partial = torch.ones(rows, width, dtype=dtype)  # (rows, width): a partial sum the GEMM would give

            def one_round() -> None:
                coll.all_gather(local, sizes, lambda x: x, tag="probe.ag")
                coll.reduce_scatter(sizes, lambda a, b: partial[: b - a], width, dtype, tag="probe.rs")

            try:
                one_round()  # warm-up: the links connect, the readers are handed over
                go[0].wait(PROBE_TIMEOUT_S)
                go[1].wait(PROBE_TIMEOUT_S)
                for _ in range(rounds):
                    one_round()
            except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
                errors.append(e)
                for b in go:
                    b.abort()

        threads = [threading.Thread(target=rank, args=(r,), name=f"galaxy-probe-{r}", daemon=True) for r in range(2)]
        for th in threads:
            th.start()
        cpu0 = wall0 = 0.0
        try:
            go[0].wait(PROBE_TIMEOUT_S)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            go[1].wait(PROBE_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass  # a rank failed: its error is raised below
        for th in threads:
            th.join(PROBE_TIMEOUT_S)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if errors:
            raise errors[0]
        per = 2 * 2 * rounds  # ranks x collectives a round x rounds
        return cpu / per, 2 * wall / per
    finally:
        for t in transports.values():
            t.close()
        for s in servers:
            s.close()
