"""KV block ids: a free pool, reference counts, and the prefix cache that shares blocks.

The KV cache of every device is cut into `num_blocks` blocks of `block_size` positions. This
module only hands out block *ids*; each device keeps, in the block with that id, the K/V of its
own heads (galaxy/model/paged_kv.py). One manager on the coordinator therefore serves the whole
cluster, and `num_blocks` is the smallest count any device's KV budget allows.

Prefix caching (vLLM's automatic prefix caching): a *full* block whose K/V are computed is
named by a hash of its parent's name and its own token ids, so the name stands for the whole
prefix up to the block's end. A new sequence takes the blocks named by its leading full token
blocks instead of computing them, and shares them (reference counts). A freed block keeps its
name and stays reusable until the pool runs short; then the least recently released is
evicted. Free blocks holding nothing reusable are always handed out first.

Divergence: only full, computed blocks are ever shared. A sequence writes only at positions
>= num_computed, and the block holding such a position is not full-and-computed, so it is the
sequence's own: two sequences that diverge inside a block each fill their own copy of it.
The one exception is a prompt whose every token is cached: its last token must run again to
give logits, and its K/V would land in a shared block. That block is copied (copy on write):
the sequence gets a fresh block, the plan asks every device to copy the K/V over before the
step, and only the last token is recomputed -- one block copy instead of a block_size-token
forward (vLLM recomputes the whole block). Partial blocks are never named: sharing them would
need a copy on every divergence and the name of a partial block changes with every token.

Roles (`roles`: int8 / int4 weights, which run a token's rows dense or on the format's kernel by its
position, model/dense_rows.py): a block is shared only where every position in it ran dense, i.e. below
the request's `kernel_from` (its original prompt length - 1), for the request that computed it and for
the one that takes it -- a block holding kernel-role positions (a prompt's last token, generated tokens)
is never named, and a resumed sequence takes no named block over its own kernel-role positions. So the
cache hands out only K/V every request computes alike, and no request's bits depend on who filled it.
`shared_until` is that predicate; fp32 / bf16 (no roles) share every full block.

Hit accounting counts only tokens whose K/V were reused: the recomputed last token of a full
hit is not a hit, and the blocks a preempted sequence gets back on resuming are counted apart
(`resumed_tokens`), not as prefix hits (vLLM #25780: preemption inflated the hit rate).

Spill tier (kv_spill.py): with a `store` attached (anything that answers `name in store`), an
evicted named block is listed (`take_spill`) so the engine can read its K/V out before the next step
writes into it, and a sequence's hash chain goes on past the blocks cached here into names the store
holds: each gets a fresh block, listed to be restored (written back) before the step, and counts as
computed. A restored block is named by `commit` after the step, as a computed one: if its write fails
the step fails and the block never carries the name. Restores are written before the step, whose copies
come first on the devices: so a full hit's copy source stays held until `take_spill`, never handed to a
restore that would overwrite it before it is copied.

Contract for the integrating code: the manager is single-threaded (the scheduler's thread);
block ids in a block table are valid until the sequence is freed; a copy (src, dst) returned
by `allocate` must be done on every device before any K/V of the step is written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from ..errors import GalaxyError
from .sequence import Sequence

ROOT = b""  # the parent name of a sequence's first block


def block_hash(parent: bytes, token_ids) -> bytes:
    """Name of a full block: 128-bit BLAKE2b of its parent's name and its token ids. Collisions
    are out of reach, so a name can be trusted across requests (and tenants) without comparing
    the tokens of every ancestor."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def chain(token_ids, num_blocks: int, block_size: int) -> list[bytes]:
    """The names of the first `num_blocks` full blocks of `token_ids` (what `_names` gives a
    sequence), for a lookup that has no Sequence: a K/V handoff (engine/disagg.py) and the
    coordinator's prefix index (engine/prefix_index.py)."""
    names: list[bytes] = []
    for i in range(num_blocks):
        names.append(block_hash(names[-1] if names else ROOT, token_ids[i * block_size : (i + 1) * block_size]))
    return names


class OutOfBlocks(GalaxyError):
    """The pool has no free block; callers check `can_allocate` / `can_append` first."""


@dataclass
class CacheStats:
    queried_tokens: int = 0  # prompt tokens of first admissions, looked up in the prefix cache
    hit_tokens: int = 0  # of those, tokens whose K/V were reused rather than computed
    resumed_tokens: int = 0  # tokens a preempted sequence got back from the cache on resuming
    copied_blocks: int = 0  # copy-on-write copies asked of the devices
    evicted_blocks: int = 0  # named blocks whose name was dropped to reuse them
    leased_tokens: int = 0  # tokens of K/V computed elsewhere that a lease found here (not imported again)
    restored_tokens: int = 0  # of the hit and resumed tokens, those written back from the spill store

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, roles: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.roles = roles  # tokens run by their role (model/dense_rows.py): share dense-role blocks only
        self.ref = [0] * num_blocks  # sequences holding each block
        self.name: list[bytes | None] = [None] * num_blocks  # its prefix-cache name, if any
        self._empty: deque[int] = deque(range(num_blocks))  # free, nothing reusable: handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but named: least recently released first
        self._cached: dict[bytes, int] = {}  # name -> block
        self.stats = CacheStats()
        self.store = None  # a spill store (kv_spill.SpillStore: `name in store`), or None: evicted names are gone
        self._evicted: list[tuple[bytes, int]] = []  # (name, block) evicted since take_spill: K/V still in place
        self._restores: list[tuple[bytes, int]] = []  # (name, block) to write back from the store before the step
        # with a store: the sources of this schedule's full-hit copies, held until take_spill -- the step copies
        # them, but restores are written before the step, and one given such a block would overwrite it first
        self._copied: list[int] = []

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now, counting named ones that would be evicted."""
        return len(self._empty) + len(self._evictable)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # -- admission -------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `seq` (holding no blocks) can get blocks for all its tokens now."""
        hits = self._prefix_hits(seq)
        cached = [b for b in hits if b is not None]  # the rest (None) are restored into fresh blocks
        fresh = self.blocks_for(seq.num_tokens) - len(cached) + (self._full_hit(seq, hits) and hits[-1] is not None)
        taken_from_pool = sum(self.ref[b] == 0 for b in cached)  # reused free blocks leave the pool
        return self.num_free - taken_from_pool >= fresh

    def allocate(self, seq: Sequence) -> list[tuple[int, int]]:
        """Give `seq` its cached prefix and fresh blocks for the rest of its tokens; set
        `num_computed` to the reused tokens. Returns the (src, dst) block copies to make first.

        Blocks for every token are reserved at admission, so an admitted prompt never waits
        for blocks between its chunks; only decodes ask for more."""
        if seq.block_table:
            raise GalaxyError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        if not self.can_allocate(seq):
            raise OutOfBlocks(f"sequence {seq.seq_id} needs more than the {self.num_free} free blocks")
        hits = self._prefix_hits(seq)
        copies = []
        for b in hits:
            if b is not None:
                self._take(b)  # every cached hit first: no fresh block below may evict one of them
        names = self._names(seq)
        table = list(hits)
        for i, b in enumerate(hits):
            if b is None:  # in the spill store: a fresh block, its K/V written back before the step
                table[i] = self._pop_free()
                self._restores.append((names[i], table[i]))
                self.stats.restored_tokens += self.block_size
        seq.block_table = table
        seq.num_named = next((i for i, b in enumerate(hits) if b is None), len(hits))  # commit names the rest
        seq.num_computed = len(hits) * self.block_size
        if self._full_hit(seq, hits):  # the last token runs again for its logits
            if hits[-1] is not None:  # in a shared block: copy its block (a restored one is the sequence's own)
                src, dst = hits[-1], self._pop_free()
                seq.block_table[-1] = dst
                if self.store is None:
                    self._release(src)
                else:  # no restore may be written into it before the step has copied it
                    self._copied.append(src)
                seq.num_named = min(seq.num_named, len(hits) - 1)
                copies.append((src, dst))
                self.stats.copied_blocks += 1
            else:  # restored: its last position is written back but runs again, as a hit does not count it
                self.stats.restored_tokens -= 1
            seq.num_computed -= 1
        if seq.num_preemptions:
            self.stats.resumed_tokens += seq.num_computed
        else:
            self.stats.queried_tokens += seq.num_tokens
            self.stats.hit_tokens += seq.num_computed
        self.append(seq, seq.num_uncomputed)
        return copies

    def cached_tokens(self, token_ids, limit: int | None = None) -> int:
        """Leading tokens of `token_ids` (at most `limit`) whose K/V sit here in named blocks:
        what a request would reuse here (the coordinator's prefix index asks it of every pool)."""
        return len(self._leading(token_ids, len(token_ids) if limit is None else limit)) * self.block_size

    def lease(self, token_ids, n_tokens: int, multiple: int = 1, kernel_from: int | None = None) -> list[int]:
        """The named blocks holding the K/V of the leading positions of `token_ids` within
        [0, n_tokens), as many as are cached but a multiple of `multiple` blocks, each taken (a
        reference, so no eviction reuses it) for a sequence whose K/V arrive from elsewhere
        (Scheduler.adopt); give them back with `release` if it never comes. `kernel_from`: the
        sequence's (Sequence.kernel_from), which caps the lease under `roles`."""
        if kernel_from is not None:
            n_tokens = min(n_tokens, self.shared_until(kernel_from))
        hits = self._leading(token_ids, n_tokens)
        hits = hits[: len(hits) // multiple * multiple]
        for b in hits:
            self._take(b)
        self.stats.leased_tokens += len(hits) * self.block_size
        return hits

    def unstored(self, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` (name, block) of the free named blocks whose names the store lacks, the next to be
        evicted first: what the spill tier may read out while the devices idle (KVSpill.pre_read)."""
        if self.store is None:
            return []
        out = []
        for b in self._evictable:
            if len(out) >= limit:
                break
            if self.name[b] not in self.store:
                out.append((self.name[b], b))
        return out

    def take_spill(self) -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]:
        """What the spill tier must do before the next step, and forget it here: the (name, block) pairs
        evicted since the last call (read their K/V out first) and those to restore (then write them in). The
        blocks full hits copy from go back to the pool now: nothing more is allocated before the step copies them."""
        out = (self._evicted, self._restores)
        self._evicted, self._restores = [], []
        for b in self._copied:
            self._release(b)
        self._copied = []
        return out

    def release(self, blocks) -> None:
        """Give back blocks taken by `lease` (last first, as `free`)."""
        for b in reversed(blocks):
            self._release(b)

    # -- growth and release ----------------------------------------------------------------
    def can_append(self, seq: Sequence, n: int) -> bool:
        """Whether the blocks of `seq` can be made to cover its next n tokens."""
        return self.num_free >= self._missing(seq, n)

    def append(self, seq: Sequence, n: int) -> None:
        """Extend the block table of `seq` to cover positions [0, num_computed + n)."""
        for _ in range(self._missing(seq, n)):
            seq.block_table.append(self._pop_free())

    def commit(self, seq: Sequence) -> None:
        """Name the blocks that a step has just filled, so later requests can share them.

        Called after the K/V of `seq.num_computed` tokens are written: a block is named only
        once its K/V exist, and under `roles` only below the sequence's kernel_from. If another block
        already has the name (two requests computed the same prefix at once), this one stays unnamed
        and is freed as a plain block."""
        if not self.prefix_caching:
            return
        names, upto = self._names(seq), min(seq.num_computed, self.shared_until(seq.kernel_from)) // self.block_size
        for i in range(seq.num_named, upto):
            b, h = seq.block_table[i], names[i]
            if h not in self._cached:
                self._cached[h], self.name[b] = b, h
        seq.num_named = max(seq.num_named, upto)

    def free(self, seq: Sequence) -> None:
        """Release the blocks of `seq`, last first: a prefix's tail is worth less than its head,
        so the tail is evicted first."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table, seq.num_named, seq.num_computed = [], 0, 0

    # -- checks ----------------------------------------------------------------------------
    def audit(self, seqs) -> None:
        """Raise unless the pool is consistent with the block tables of the live `seqs`:
        reference counts equal holders, free blocks are exactly those held by none (each once),
        and every name points at the block that carries it."""
        holders = [0] * self.num_blocks
        for s in seqs:
            for b in s.block_table:
                holders[b] += 1
        for b in self._copied:  # a full hit's copy source, held until take_spill
            holders[b] += 1
        free = list(self._empty) + list(self._evictable)
        problems = []
        if holders != self.ref:
            problems.append(f"reference counts {self.ref} != holders {holders}")
        if sorted(free) != [b for b in range(self.num_blocks) if holders[b] == 0]:
            problems.append(f"free blocks {sorted(free)} are not the unheld ones")
        if any(self.name[b] is not None for b in self._empty):
            problems.append("a named block sits among the empty ones")
        if any(self.name[b] is None for b in self._evictable):
            problems.append("an unnamed block sits among the evictable ones")
        if {b: h for h, b in self._cached.items()} != {b: h for b, h in enumerate(self.name) if h is not None}:
            problems.append("the name index and the block names disagree")
        if problems:
            raise GalaxyError("block manager inconsistent: " + "; ".join(problems))

    def shared_until(self, kernel_from: int, last_recomputed: bool = False) -> int:
        """Positions [0, n) whose blocks may be shared for a request whose rows run the kernel from
        `kernel_from` on: under `roles` only its dense-role positions, and its position kernel_from too where
        that one is computed again anyway (`last_recomputed`: a prompt's last token, copied on a full hit)."""
        if not self.roles:
            return 1 << 62
        return kernel_from + 1 if last_recomputed else kernel_from

    # -- internals -------------------------------------------------------------------------
    def _names(self, seq: Sequence) -> list[bytes]:
        """The hash chain over the full token blocks of `seq`, extended as tokens arrive."""
        bs, names = self.block_size, seq.block_hashes
        for i in range(len(names), seq.num_tokens // bs):
            names.append(block_hash(names[-1] if names else ROOT, seq.token_ids[i * bs : (i + 1) * bs]))
        return names

    def _prefix_hits(self, seq: Sequence) -> list[int | None]:
        """The blocks of the leading full token blocks of `seq` whose K/V exist: cached here (a block id), or
        in the spill store (None: to restore)."""
        if not self.prefix_caching:
            return []
        hits: list[int | None] = []
        n = self.shared_until(seq.kernel_from, seq.kernel_from == seq.num_tokens - 1)
        for h in self._names(seq)[: n // self.block_size]:
            b = self._cached.get(h)
            if b is None and (self.store is None or h not in self.store):
                break
            hits.append(b)
        return hits

    def _leading(self, token_ids, n_tokens: int) -> list[int]:
        """Cached blocks for the full blocks of `token_ids` within positions [0, n_tokens)."""
        if not self.prefix_caching:
            return []
        hits = []
        for h in chain(token_ids, min(n_tokens, len(token_ids)) // self.block_size, self.block_size):
            b = self._cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _full_hit(self, seq: Sequence, hits: list[int]) -> bool:
        return bool(hits) and len(hits) * self.block_size == seq.num_tokens

    def _missing(self, seq: Sequence, n: int) -> int:
        return max(0, self.blocks_for(seq.num_computed + n) - len(seq.block_table))

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            del self._evictable[b]
        self.ref[b] += 1

    def _release(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise GalaxyError(f"block {b} released more often than taken")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.name[b] is None:
                self._empty.append(b)
            else:
                self._evictable[b] = None

    def _pop_free(self) -> int:
        if self._empty:
            b = self._empty.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self.name[b]]
            if self.store is not None:
                self._evicted.append((self.name[b], b))
            self.name[b] = None
            self.stats.evicted_blocks += 1
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.ref[b] = 1
        return b
