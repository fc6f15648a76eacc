"""Moving one sequence's K/V between two partitions of the same model: which device sends which
layers and KV heads to which, and reading / writing such a box of K/V in a device's paged pool.

Phase-separated serving (galaxy/engine/disagg.py) prefills a sequence on one partition (HMP over
a group of devices, each holding the K/V of its own KV heads) and decodes it on another, with
another head split. The decode devices must end up holding exactly what they would hold had they
prefilled the sequence themselves: for every layer they keep, the K/V of their KV heads at every
position. Nothing is recomputed, so K/V are copied bit for bit and the decode's tokens are the
single-device reference's.

Three things make the mapping more than "rank i to rank i":
- the splits differ (3 prefill devices with 5/2/2 query heads, 2 decode devices with 4/5), so a
  sender's heads go in parts to several receivers and a receiver gathers from several senders;
- with grouped-query attention a device holding part of a group holds that KV head too
  (model.Attention), so a KV head may be held by two senders: it is taken from one only;
- a pipeline stage holds some layers and every head.

A `KVHolding` is what one device keeps (its layers x its KV heads, global ids); `transfer_plan`
covers every receiver's holding with `KVPiece`s (sender, receiver, layers, heads), each box from
the lowest-ranked sender that holds it. A box of K/V travels as one tensor (layers, 2, heads,
tokens, head_dim): K then V, positions [0, tokens) of the sequence. `read_box` gathers it from a
device's paged pool by the sequence's block table there, `write_box` scatters it into the
receiver's pool by its own block table (the two pools' block sizes may differ). `reshard` applies a
plan to whole per-device tensors, for the coordinator (or a test) that holds them all.

Pure torch: the executors (runtime.inproc, transport.client) move the boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVTransferError
from ..model.config import ModelConfig
from ..model.paged_kv import PagedKVCache
from .rank import KVPool, RankRuntime
from .sharding import Partition

Range = tuple[int, int]  # half-open [start, end)


@dataclass(frozen=True)
class KVHolding:
    """The K/V one device keeps: layers [layers) x KV heads [heads) (global ids)."""

    layers: Range
    heads: Range

    @property
    def empty(self) -> bool:
        return self.layers[1] <= self.layers[0] or self.heads[1] <= self.heads[0]


@dataclass(frozen=True)
class KVPiece:
    """One box of K/V one sender gives one receiver: layers [layers) x KV heads [heads) (global)."""

    src: int
    dst: int
    layers: Range
    heads: Range

    def nbytes(self, cfg: ModelConfig, tokens: int, itemsize: int = 4) -> int:
        return box_bytes(cfg, self.layers, self.heads, tokens, itemsize)


def box_bytes(cfg: ModelConfig, layers: Range, heads: Range, tokens: int, itemsize: int = 4) -> int:
    """Bytes of a K/V box: (layers, 2, heads, tokens, head_dim) elements of `itemsize`."""
    return (layers[1] - layers[0]) * 2 * (heads[1] - heads[0]) * tokens * cfg.head_dim * itemsize


def kv_heads_of(cfg: ModelConfig, q_heads: Range) -> Range:
    """KV heads a device with query heads [q_heads) computes and keeps (model.Attention's rule: a
    part of a group brings its whole KV head)."""
    h0, h1 = q_heads
    g = cfg.group
    return (h0 // g, -(-h1 // g)) if h1 > h0 else (0, 0)


def holdings(partition: Partition, cfg: ModelConfig) -> list[KVHolding]:
    """What each device of `partition` keeps of a sequence's K/V."""
    out = []
    for r in range(partition.world):
        spec = partition.spec(r, cfg)
        out.append(KVHolding(spec.layers, kv_heads_of(cfg, spec.heads)))
    return out


def _cuts(ranges: list[Range], lo: int, hi: int) -> list[int]:
    """Sorted breakpoints within [lo, hi) of every range's ends: the cells no range straddles."""
    return sorted({lo, hi} | {x for r in ranges for x in r if lo < x < hi})


def transfer_plan(src: list[KVHolding], dst: list[KVHolding]) -> tuple[KVPiece, ...]:
    """Pieces that give every receiver exactly its holding, each box from the lowest-ranked sender
    holding it; raises KVTransferError if some box is held by no sender (not the same model)."""
    pieces = []
    for d, want in enumerate(dst):
        if want.empty:
            continue
        lcuts = _cuts([s.layers for s in src], *want.layers)
        hcuts = _cuts([s.heads for s in src], *want.heads)
        for l0, l1 in zip(lcuts, lcuts[1:]):
            run: list[KVPiece] = []  # cells along the heads, merged while one sender gives them
            for h0, h1 in zip(hcuts, hcuts[1:]):
                s = next((i for i, x in enumerate(src) if not x.empty and x.layers[0] <= l0 and l1 <= x.layers[1]
                          and x.heads[0] <= h0 and h1 <= x.heads[1]), None)
                if s is None:
                    raise KVTransferError(f"no sender holds layers {l0}..{l1} x KV heads {h0}..{h1} that receiver "
                                          f"{d} needs: the two partitions are not of the same model")
                if run and run[-1].src == s and run[-1].heads[1] == h0:
                    run[-1] = KVPiece(s, d, (l0, l1), (run[-1].heads[0], h1))
                else:
                    run.append(KVPiece(s, d, (l0, l1), (h0, h1)))
            pieces += run
    return tuple(pieces)


def plan_between(prefill: Partition, decode: Partition, cfg: ModelConfig) -> tuple[KVPiece, ...]:
    """The transfer plan from a prefill partition's devices to a decode partition's."""
    return transfer_plan(holdings(prefill, cfg), holdings(decode, cfg))


# -- a box in a device's paged pool ----------------------------------------------------------------
def _slots(block_table, tokens: int, block_size: int, start: int = 0) -> torch.Tensor:
    pos = torch.arange(start, tokens)
    table = torch.as_tensor(list(block_table), dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def check_box(holding: KVHolding, layers: Range, heads: Range, tokens: int, block_table, num_blocks: int,
              block_size: int, who: str = "device", start: int = 0) -> None:
    """Refuse a box this device does not hold, positions [start, tokens) that are no range, or a
    block table that cannot hold `tokens` positions inside its pool, before touching the pool."""
    if not 0 <= start < tokens:
        raise KVTransferError(f"{who}: positions {start}..{tokens} are no range of a sequence")
    if not (holding.layers[0] <= layers[0] < layers[1] <= holding.layers[1]):
        raise KVTransferError(f"{who}: layers {layers[0]}..{layers[1]} are not within its layers "
                              f"{holding.layers[0]}..{holding.layers[1]}")
    if not (holding.heads[0] <= heads[0] < heads[1] <= holding.heads[1]):
        raise KVTransferError(f"{who}: KV heads {heads[0]}..{heads[1]} are not within its KV heads "
                              f"{holding.heads[0]}..{holding.heads[1]}")
    table = list(block_table)
    if tokens < 1 or len(table) * block_size < tokens:
        raise KVTransferError(f"{who}: {tokens} positions in {len(table)} blocks of {block_size}")
    if table and not 0 <= min(table) <= max(table) < num_blocks:
        raise KVTransferError(f"{who}: block ids {min(table)}..{max(table)} outside the pool of {num_blocks}")


def read_box(cache: PagedKVCache, holding: KVHolding, block_table, tokens: int, layers: Range,
             heads: Range, who: str = "device", start: int = 0) -> torch.Tensor:
    """K/V of positions [start, tokens) of the sequence in `block_table`, layers x KV heads (global
    ids) -> (layers, 2, heads, tokens - start, hd), a copy. A range > 0 is a chunk of a prompt
    streamed while the rest of it runs (engine/kv_stream.py)."""
    check_box(holding, layers, heads, tokens, block_table, cache.num_blocks, cache.block_size, who, start)
    slots = _slots(block_table, tokens, cache.block_size, start)
    a, b = heads[0] - holding.heads[0], heads[1] - holding.heads[0]
    out = [torch.stack((cache.k[str(i)][a:b].index_select(1, slots), cache.v[str(i)][a:b].index_select(1, slots)))
           for i in range(*layers)]
    return torch.stack(out)


def write_box(cache: PagedKVCache, holding: KVHolding, block_table, box: torch.Tensor, layers: Range,
              heads: Range, who: str = "device", start: int = 0) -> None:
    """Store a box (layers, 2, heads, n, hd) at positions [start, start + n) of the sequence in
    `block_table`. Its shape and dtype are checked against what the box must be first: a wrong
    one is refused (KVTransferError) with the pool untouched."""
    if box.dim() != 5:
        raise KVTransferError(f"{who}: a K/V box has 5 dimensions (layers, 2, heads, tokens, head_dim), "
                              f"got shape {tuple(box.shape)}")
    tokens = start + box.shape[3]
    some = next(iter(cache.k.values()), None)
    hd = some.shape[2] if some is not None else box.shape[4]
    want = (layers[1] - layers[0], 2, heads[1] - heads[0], box.shape[3], hd)
    if tuple(box.shape) != want:
        raise KVTransferError(f"{who}: K/V box of shape {tuple(box.shape)}, expected {want} (layers {layers[0]}.."
                              f"{layers[1]}, KV heads {heads[0]}..{heads[1]}, positions {start}..{tokens})")
    if some is not None and box.dtype != some.dtype:
        raise KVTransferError(f"{who}: K/V box of {box.dtype}, this device keeps {some.dtype}")
    check_box(holding, layers, heads, tokens, block_table, cache.num_blocks, cache.block_size, who, start)
    slots = _slots(block_table, tokens, cache.block_size, start)
    a, b = heads[0] - holding.heads[0], heads[1] - holding.heads[0]
    for j, i in enumerate(range(*layers)):
        cache.k[str(i)][a:b].index_copy_(1, slots, box[j, 0])
        cache.v[str(i)][a:b].index_copy_(1, slots, box[j, 1])


# -- whole devices at once -------------------------------------------------------------------------
def piece_of(box: torch.Tensor, holding: KVHolding, layers: Range, heads: Range) -> torch.Tensor:
    """The part `layers` x `heads` (global) of a box a device holds whole (its holding)."""
    return box[layers[0] - holding.layers[0]: layers[1] - holding.layers[0], :,
               heads[0] - holding.heads[0]: heads[1] - holding.heads[0]]


def reshard(plan: tuple[KVPiece, ...], src: list[KVHolding], dst: list[KVHolding],
            held: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Each receiver's whole box from each sender's whole box (its holding, all positions):
    held[i] is (layers_i, 2, heads_i, tokens, hd) or None for a sender holding nothing; returns the
    same per receiver."""
    boxes = [h for h in held if h is not None]
    if not boxes:
        raise KVTransferError("no sender holds any K/V")
    like = boxes[0]
    out: list[torch.Tensor | None] = []
    for d, want in enumerate(dst):
        if want.empty:
            out.append(None)
            continue
        box = like.new_empty(want.layers[1] - want.layers[0], 2, want.heads[1] - want.heads[0], *like.shape[3:])
        covered = 0
        for p in plan:
            if p.dst != d:
                continue
            if held[p.src] is None:
                raise KVTransferError(f"sender {p.src} holds nothing, the plan has it send {p}")
            box[p.layers[0] - want.layers[0]: p.layers[1] - want.layers[0], :,
                p.heads[0] - want.heads[0]: p.heads[1] - want.heads[0]] = piece_of(held[p.src], src[p.src],
                                                                                  p.layers, p.heads)
            covered += (p.layers[1] - p.layers[0]) * (p.heads[1] - p.heads[0])
        need = (want.layers[1] - want.layers[0]) * (want.heads[1] - want.heads[0])
        if covered != need:
            raise KVTransferError(f"receiver {d}: the plan covers {covered} of its {need} (layer, KV head) cells")
        out.append(box)
    return out


# -- one rank's side -------------------------------------------------------------------------------
def rank_holding(rt: RankRuntime) -> KVHolding:
    """What the rank `rt` keeps of every sequence's K/V."""
    return holdings(rt.partition, rt.model.cfg)[rt.rank]


def export_box(rt: RankRuntime, pool: KVPool, block_table, tokens: int, layers: Range, heads: Range,
               who: str = "device", start: int = 0) -> torch.Tensor:
    """A box of one sequence's K/V from this rank's paged pool (the prefill side): refused unless
    the pool the engine sized is the one allocated here and holds the box."""
    if not rt.holds_pool(pool):
        raise KVTransferError(f"{who}: no KV pool of {pool.num_blocks} blocks x {pool.block_size} here to export "
                              "from (no step ran on it yet, or it was re-sized)")
    return read_box(rt.paged, rank_holding(rt), block_table, tokens, layers, heads, who, start)


def import_box(rt: RankRuntime, pool: KVPool, block_table, box: torch.Tensor, layers: Range, heads: Range,
               who: str = "device", start: int = 0) -> None:
    """Write a box into this rank's paged pool (the decode side), allocating the pool first if no
    step has yet (within this device's KV budget, RankRuntime.paged_cache)."""
    write_box(rt.paged_cache(pool), rank_holding(rt), block_table, box, layers, heads, who, start)
