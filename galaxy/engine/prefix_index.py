"""Prefix K/V across placements: which pool holds which prefix, where a request goes, what need not move.

Within one engine the block manager already shares a prompt's leading blocks between requests
(block_manager.py: a full block is named by the hash of its parent's name and its tokens, so a
name stands for the whole chain up to it). Phase-separated serving (disagg.py) has two pools --
the prefill group's and the decode group's, each with its own block manager on the coordinator --
and without this module the decode group re-imported every sequence's whole K/V, a 2,000-token
document's 92 MB for every question asked about it. Here:

- `lease`: before a sequence's K/V move, the decode pool looks its hash chain up and takes a
  reference on every block it already holds for the leading positions (imported for an earlier
  request with the same prefix, or computed there). Only positions past them move
  (`KVMover.pull/push(skip=)`), written into fresh blocks behind the leased ones
  (`Scheduler.adopt(prefix=)`); once written, those are named too, so the next request finds them.
  A lease is a reference: eviction (least recently released, of unreferenced blocks only) never
  takes a leased block, and a handoff that never arrives gives its lease back.
- `PrefixIndex`: the coordinator's view over every pool's names. `route` sends a request to the
  usable pool that holds the longest part of its prompt (ties: the first, the prefill group), so a
  prompt whose prefix survives only on the decode group runs its rest there, with nothing moved.
  The index holds no copy of the names: it asks each block manager (under its engine's lock), so
  it is never stale -- an evicted block, or a pool that dropped out (`usable` false, its engine's
  blocks lost), simply stops matching. A pool is cache: losing one loses no result, the request
  is prefilled again where it lands.

The two pools' block sizes may differ: a lease covers a whole number of blocks on both sides
(their least common multiple), so a box never starts inside a block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import GalaxyError
from .block_manager import BlockManager


@dataclass(frozen=True)
class Lease:
    """Blocks a receiving pool already holds for a sequence's leading positions, referenced for it."""

    blocks: tuple[int, ...] = ()  # block ids in the receiving pool, in position order
    skip: int = 0  # positions they cover: a whole number of blocks in both pools
    owner: BlockManager | None = None  # the manager they were taken from (a pool reset replaces it)

    def valid_in(self, blocks: BlockManager) -> bool:
        """Whether the blocks are still `blocks`' (not those of a manager a lost pool replaced)."""
        return not self.blocks or self.owner is blocks


def give_back(blocks: BlockManager, held: Lease) -> None:
    """Release a lease whose handoff will not come; nothing if its pool was reset meanwhile."""
    if held.valid_in(blocks):
        blocks.release(held.blocks)


def lease(blocks: BlockManager, token_ids, tokens: int, src_block_size: int, kernel_from: int | None = None) -> Lease:
    """Lease what `blocks` holds of the first `tokens` positions of `token_ids`, in whole units
    of both block sizes (the sender's is `src_block_size`); under roles (int8 / int4) only below the
    sequence's `kernel_from` (block_manager.py: dense-role K/V alone are shared). Caller holds the pool's
    engine lock."""
    unit = math.lcm(blocks.block_size, src_block_size) // blocks.block_size  # receiver blocks per unit
    got = tuple(blocks.lease(token_ids, tokens, unit, kernel_from))
    return Lease(got, len(got) * blocks.block_size, blocks)


def tail(block_table, skip: int, pool) -> tuple[int, ...]:
    """The block table of positions [skip, ...) of a sequence in `pool` (skip: whole blocks)."""
    if skip % pool.block_size:
        raise GalaxyError(f"a K/V move that skips {skip} positions starts inside a block of {pool.block_size}")
    return tuple(block_table)[skip // pool.block_size :]


@dataclass(frozen=True)
class PoolView:
    """One KV pool the index knows: its name, its engine (whose block manager holds the names),
    and whether requests may go there now."""

    name: str
    engine: object  # an engine.Engine: cached_prefix(token_ids)
    usable: Callable[[], bool] = lambda: True


class PrefixIndex:
    """Which pool holds how much of a prompt, and where to send it."""

    def __init__(self, pools: list[PoolView]):
        if not pools:
            raise GalaxyError("a prefix index needs at least one pool")
        self.pools = tuple(pools)
        self.routed = {p.name: 0 for p in pools}  # requests sent to each pool

    def match(self, token_ids) -> dict[str, int]:
        """Leading tokens of the prompt whose K/V each usable pool holds."""
        return {p.name: p.engine.cached_prefix(token_ids) for p in self.pools if p.usable()}

    def route(self, token_ids) -> PoolView:
        """The usable pool holding the longest part of the prompt; on a tie the first of them
        (the prefill group: prefill there is the default path)."""
        held = self.match(token_ids)
        usable = [p for p in self.pools if p.name in held]
        if not usable:
            raise GalaxyError(f"no pool of {[p.name for p in self.pools]} can take a request now")
        return max(usable, key=lambda p: held[p.name])  # max keeps the first of equals
