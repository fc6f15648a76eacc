"""Run every rank of a partition as a thread of this process (no network).

The test bed for the parallel forwards, and `galaxy run --transport inproc`. Ranks exchange
tensors through `LocalGroup` mailboxes; the first rank to fail aborts the others.
"""

from __future__ import annotations

import threading

from .collectives import Collectives
from .local_transport import LocalGroup
from .parallel import Request, assemble, rank_forward
from .sharding import Partition


def run_inprocess(models: list, partition: Partition, req: Request, tiles: int = 1,
                  timeout: float = 120.0):
    """Forward `req` through one model shard per rank; returns (output, per-rank Collectives)."""
    n = partition.world
    if len(models) != n:
        raise ValueError(f"{len(models)} model shards for a {n}-device partition")
    group = LocalGroup(n, timeout)
    comms = [Collectives(group.transport(r), tiles) for r in range(n)]
    outputs: list = [None] * n
    errors: list = [None] * n

    def work(r: int) -> None:
        try:
            outputs[r] = rank_forward(models[r], comms[r], partition, req)
        except BaseException as e:  # noqa: BLE001 - reported below, after every rank stopped
            errors[r] = e
            group.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"galaxy-rank{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not _is_abort(e)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return assemble(models[0].cfg, partition, outputs), comms


def _is_abort(e: BaseException) -> bool:
    return "group aborted" in str(e)
