"""Every collective Galaxy uses, written once as ring algorithms over point-to-point sends.

A `Transport` moves tensors between ranks (in-process queues, or gRPC streams between devices);
`Collectives` builds ReduceScatter, AllGather and AllReduce on top of it with *uneven* row
splits. The two tile-fused forms are Galaxy's overlap of communication and computation:

- `all_gather(x, sizes, fn)`: AllGather -> column-parallel GEMM. Each arriving tile is
  forwarded to the next rank first, then multiplied while it travels.
- `reduce_scatter(sizes, fn)`: row-parallel GEMM -> ReduceScatter. The partial sum destined
  for the neighbour is computed tile by tile; each is sent as soon as it is ready, and the next
  tile is computed while the previous one is on the wire.

Sends are non-blocking (the transport queues them), receives block with a timeout, and every
received tensor is checked against the shape and dtype the algorithm expects.
At world size 1 every collective is a local no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .sharding import split_even

Fn = Callable[[torch.Tensor], torch.Tensor]
RowFn = Callable[[int, int], torch.Tensor]
DIRECT_MAX_BYTES = 64 * 1024  # all-reduces up to this size skip the two shots (docs/collectives.md)


class Transport(Protocol):
    """Point-to-point tensor delivery between ranks; FIFO per (sender, receiver) pair."""

    rank: int
    world: int

    def send(self, dst: int, tensor: torch.Tensor, tag: str = "") -> None:
        """Queue `tensor` for `dst` and return at once; the caller must not modify it afterwards.
        `tag` names the collective, for the transport's own timing."""

    def recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next tensor from `src`; raises if it is late or not of `shape` and `dtype`."""


@dataclass(frozen=True)
class OpStat:
    """Where one collective's time went on one rank (seconds): what the overlap report reads."""

    tag: str  # e.g. "L3.attn.ag": layer 3, attention AllGather
    wall_s: float  # the whole collective, fused GEMM tiles included
    wait_s: float  # blocked waiting for a peer: communication that compute did not hide
    compute_s: float  # inside the fused GEMM tiles
    bytes: int  # bytes this rank sent
    send_s: float = 0.0  # time its sender spent pushing those bytes into the link (known to the transport)


@dataclass
class CommStats:
    """Where a rank's time went inside collectives (seconds), for the overlap report."""

    wait_s: float = 0.0  # blocked in recv: communication that compute did not hide
    compute_s: float = 0.0  # inside the fused GEMM tiles
    bytes_sent: int = 0
    messages: int = 0
    ops: list[OpStat] = field(default_factory=list)  # one per collective, in order


def pieces(n: int, tiles: int) -> list[int]:
    """Sub-tile sizes of a chunk of n rows (never empty pieces; no pieces for an empty chunk)."""
    return split_even(n, min(tiles, n)) if n > 0 else []


class Collectives:
    """Ring collectives for one rank. `tiles` sub-divides each device's chunk for finer overlap."""

    def __init__(self, transport: Transport, tiles: int = 1, direct_max_bytes: int = DIRECT_MAX_BYTES,
                 overlap: bool = True):
        self.t = transport
        self.rank, self.world = transport.rank, transport.world
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        self.tiles = max(1, tiles)
        self.direct_max_bytes = direct_max_bytes  # all-reduces up to this size go direct
        # overlap=False runs each fused collective as "all communication, then one GEMM" (or the
        # reverse): the no-overlap baseline that shows what tile overlap buys.
        self.overlap = overlap
        self.stats = CommStats()
        self._tag = ""  # the collective in progress, passed to the transport with each send

    # -- instrumentation -------------------------------------------------------------------
    def _send(self, dst: int, x: torch.Tensor) -> None:
        self.stats.bytes_sent += x.numel() * x.element_size()
        self.stats.messages += 1
        self.t.send(dst, x, self._tag)

    def _recv(self, src: int, shape, dtype) -> torch.Tensor:
        t0 = time.perf_counter()
        x = self.t.recv(src, tuple(shape), dtype)
        self.stats.wait_s += time.perf_counter() - t0
        return x

    def _compute(self, fn, *args) -> torch.Tensor:
        t0 = time.perf_counter()
        y = fn(*args)
        self.stats.compute_s += time.perf_counter() - t0
        return y

    def _record(self, tag: str, t0: float, before: CommStats) -> None:
        s = self.stats
        s.ops.append(OpStat(tag, time.perf_counter() - t0, s.wait_s - before[0], s.compute_s - before[1],
                            s.bytes_sent - before[2]))

    def _mark(self, tag: str):
        self._tag = tag
        return time.perf_counter(), (self.stats.wait_s, self.stats.compute_s, self.stats.bytes_sent)

    # -- collectives -----------------------------------------------------------------------
    def all_gather(self, local: torch.Tensor, sizes: list[int], fn: Fn | None = None, tag: str = "ag",
                   at_rows: bool = False):
        """Concatenate every rank's rows (rank r holds sizes[r] of them), applying fn per tile.

        Returns cat_r fn(rows of rank r) along dim 0, in rank order. With `at_rows`, fn is called as
        fn(tile, start): start is the tile's first row among all ranks' rows.
        """
        if fn is not None and not self.overlap:
            whole = self.all_gather(local, sizes, None, tag)
            return self._compute(fn, whole, 0) if at_rows else self._compute(fn, whole)
        fn = fn or (lambda x, *_: x)

        def tile(x: torch.Tensor, start: int) -> torch.Tensor:
            return self._compute(fn, x, start) if at_rows else self._compute(fn, x)

        n, r = self.world, self.rank
        if local.shape[0] != sizes[r]:
            raise ValueError(f"all_gather: rank {r} holds {local.shape[0]} rows, sizes says {sizes[r]}")
        t0, before = self._mark(tag)
        tail = tuple(local.shape[1:])
        first = [sum(sizes[:i]) for i in range(n)]  # each rank's first row among all ranks' rows
        out: list[list[torch.Tensor]] = [[] for _ in range(n)]
        own = list(local.split(pieces(sizes[r], self.tiles))) if sizes[r] else []
        for piece in own:  # step 0: our chunk goes out first ...
            if n > 1:
                self._send(self.next, piece)
        start = first[r]
        for piece in own:  # ... and is multiplied while it travels
            out[r].append(tile(piece, start))
            start += piece.shape[0]
        for step in range(1, n):
            idx = (r - step) % n
            start = first[idx]
            for p in pieces(sizes[idx], self.tiles):
                x = self._recv(self.prev, (p, *tail), local.dtype)
                if step < n - 1:
                    self._send(self.next, x)  # forward before computing: keeps the ring busy
                out[idx].append(tile(x, start))
                start += p
        if any(out):
            result = torch.cat([t for chunk in out for t in chunk], 0)
        else:  # no rows anywhere
            result = fn(local, 0) if at_rows else fn(local)
        self._record(tag, t0, before)
        return result

    def reduce_scatter(self, sizes: list[int], fn: RowFn, width: int, dtype=torch.float32, tag: str = "rs"):
        """Sum over ranks of fn(start, end) -- each rank's partial rows -- keeping our own rows.

        fn(start, end) returns this rank's partial result for global rows [start, end), shape
        (end - start, width). Returns the fully reduced rows of this rank, (sizes[rank], width).
        """
        if not self.overlap and self.world > 1:
            full = self._compute(fn, 0, sum(sizes))  # the whole partial first, then the ring
            return self._ring_reduce_scatter(sizes, lambda a, b: full[a:b], width, dtype, tag)
        return self._ring_reduce_scatter(sizes, fn, width, dtype, tag)

    def _ring_reduce_scatter(self, sizes, fn, width, dtype, tag):
        n, r = self.world, self.rank
        t0, before = self._mark(tag)
        offsets = [sum(sizes[:i]) for i in range(n)]

        def tiles_of(chunk: int) -> list[tuple[int, int]]:
            start, spans = offsets[chunk], []
            for p in pieces(sizes[chunk], self.tiles):
                spans.append((start, start + p))
                start += p
            return spans

        if n == 1:
            res = self._compute(fn, 0, sizes[0])
            self._record(tag, t0, before)
            return res
        mine: list[torch.Tensor] = []
        first = (r - 1) % n
        for a, b in tiles_of(first):  # step 0: the neighbour's partial, sent tile by tile
            self._send(self.next, self._compute(fn, a, b))
        for step in range(1, n):
            chunk = (r - 1 - step) % n
            for a, b in tiles_of(chunk):
                part = self._compute(fn, a, b)  # computed while the previous tile is in flight
                acc = part + self._recv(self.prev, (b - a, width), dtype)
                if step < n - 1:
                    self._send(self.next, acc)
                else:
                    mine.append(acc)
        res = torch.cat(mine, 0) if mine else torch.zeros(0, width, dtype=dtype)
        self._record(tag, t0, before)
        return res

    def all_reduce(self, x: torch.Tensor, tag: str = "ar") -> torch.Tensor:
        """Sum of x over ranks, bit-identical on every rank, and each element summed in rank order
        ((x_0 + x_1) + x_2 ...) whatever x's size: a row gets the same bits in a step of one token as
        in a step of sixty (int4 and int8 promise each sequence the bits it gets alone, and with three
        ranks or more a sum's grouping changes its bits).

        Small payloads (decode steps) go direct: every rank sends x to every other and sums in
        rank order -- one link latency. Larger ones go in two shots: each rank sends every other
        rank that rank's rows of x, each sums its rows in rank order, then sends the sums to every
        other (a ring's bytes, 2(N-1)/N of x per rank, in two link latencies instead of its 2(N-1);
        the ring's running sums grouped a row's terms by where its rows fell).
        """
        if self.world == 1:
            return x
        if x.numel() * x.element_size() <= self.direct_max_bytes:
            return self._all_reduce_direct(x, tag + ".direct")
        return self._all_reduce_two_shot(x, tag + ".2shot")

    def _all_reduce_direct(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        t0, before = self._mark(tag)
        for dst in range(self.world):
            if dst != self.rank:
                self._send(dst, x)
        acc = None
        for src in range(self.world):  # same order everywhere: identical sums on every rank
            part = x if src == self.rank else self._recv(src, x.shape, x.dtype)
            acc = part.clone() if acc is None else acc.add_(part)
        self._record(tag, t0, before)
        return acc

    def _all_reduce_two_shot(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        n, r = self.world, self.rank
        t0, before = self._mark(tag)
        rows = x.shape[0]
        flat = x.reshape(rows, -1)  # (rows, width)
        sizes = split_even(rows, n)
        first = [sum(sizes[:i]) for i in range(n)]
        mine = slice(first[r], first[r] + sizes[r])
        for dst in range(n):  # shot 1: every rank its rows of our partial
            if dst != r and sizes[dst]:
                self._send(dst, flat[first[dst]: first[dst] + sizes[dst]])
        acc = None
        if sizes[r]:
            for src in range(n):  # rank order, as the direct exchange sums
                part = flat[mine] if src == r else self._recv(src, (sizes[r], flat.shape[1]), flat.dtype)
                acc = part.clone() if acc is None else acc.add_(part)
            for dst in range(n):  # shot 2: our summed rows to every rank
                if dst != r:
                    self._send(dst, acc)
        out = [acc if src == r else self._recv(src, (sizes[src], flat.shape[1]), flat.dtype)
               for src in range(n) if sizes[src]]
        self._record(tag, t0, before)
        return torch.cat(out, 0).reshape(x.shape)

    def send_next(self, x: torch.Tensor, tag: str = "pipe") -> None:
        """Pipeline hand-off to the next stage."""
        self._tag = tag
        self._send(self.next, x)

    def recv_prev(self, shape, dtype=torch.float32) -> torch.Tensor:
        return self._recv(self.prev, shape, dtype)
