"""Paged K/V of one device's shard, and causal attention over it for a packed batch of sequences.

The coordinator's block manager (galaxy/engine/block_manager.py) hands out block ids; every
device keeps, in the block with that id, the K/V of its *own* KV heads. A block is
`block_size` positions; slot `b * block_size + o` is offset o of block b. Per layer, K and V
are each (nkv, num_blocks * block_size, hd): head-major, positions in slot order. Then one
head's block is a contiguous (block_size, hd) run, a token's K/V is written by its slot, and a
sequence's context is gathered with one index_select straight into the (heads, L, hd) shape
SDPA reads. A block-major (num_blocks, nkv, block_size, hd) layout needs a permute copy after
its gather (1.4-2.7x slower at 3 KV heads, no faster at 20), and indexing heads and slots at
once is 2-18x slower than index_select. The gather is a copy of the context per layer, and it is what
paging costs on CPU: decodes take 1.6-2.5x contiguous attention at SmolLM2's shapes and 2-7x at
GPT-2 Large's 20 KV heads, where the copy costs 2.5x the attention itself. So a sequence whose
blocks are consecutive ids (`PagedBatch.context_runs`: a sequence alone in a fresh pool gets them)
reads its context as a view of the pool, slots [first, first + L), and skips that copy.

A step's batch packs the tokens of several sequences, decodes (1 token) and prefill chunks
(n tokens at any start position), in plan order: q, k, v are (heads, T, hd) with T the total.
`PagedBatch` says where each sequence sits; it is built once per step and shared by all layers.
Two ways to attend are kept, measured by galaxy/bench/paged_kv.py (docs/paged_attention_cpu.md):

- gather (the default): per sequence, gather its context K/V and run one SDPA with its causal
  offset. Never far from the best: where padded wins, padded takes 0.57-0.95 of its time; on
  every batch holding a prefill chunk, padded takes 1.7-8.3x its time. A decode (one query token)
  attends on its own too, over exactly its context, unmasked: the very call it makes in a step
  alone, so a sequence gets the same bits whatever decodes share its step. Grouping a step's
  decodes into one masked SDPA over contexts padded to the longest (tried, session 5: measured
  neutral, 0.96-1.04x at batch 1-8) gave a row other bits than alone -- SDPA's sums depend on the
  padded length and the mask -- which bf16-activation formats (int4, int8, bf16) amplify from
  1e-7 into 1e-2 logit differences and, some dozens of tokens later, other greedy tokens;
- padded: gather every context padded to the longest and run one masked SDPA for the batch.
  It saves the per-sequence calls, so it wins only on decode-only batches of several short
  contexts (64-256 positions), and pays for the padding everywhere else.

GQA: query head j reads local KV head kv_map[j] (model.Attention.kv_map; None: the identity).
When the local heads form whole groups, each group's query heads attend as extra query rows
of their one KV head (`group_size`), so K/V are gathered once per KV head, never per query head.

Contract for the integrating code, per step: `copy_blocks(plan.copies)` first; then, per layer,
`write(layer, k, v, batch.slot_mapping)` with the new tokens' K/V (RoPE applied at
`batch.positions`), then `paged_attention(q, layer, batch, kv_map)`. Writing before attending
is what lets a chunk attend to itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from ..errors import GalaxyError

METHODS = ("gather", "padded")


@dataclass(frozen=True)
class PagedBatch:
    """Where each sequence of a packed batch sits: what every rank derives from the step's plan."""

    block_size: int
    query_lens: tuple[int, ...]  # tokens each sequence runs this step
    starts: tuple[int, ...]  # position of each sequence's first token = its tokens already cached
    block_tables: tuple[tuple[int, ...], ...]  # block ids per sequence

    def __post_init__(self):
        n = len(self.query_lens)
        if n == 0:
            raise GalaxyError("paged batch: no sequences; a plan without items runs nothing")
        if len(self.starts) != n or len(self.block_tables) != n:
            raise GalaxyError(f"paged batch: {n} query lengths, {len(self.starts)} starts, "
                              f"{len(self.block_tables)} block tables")
        for i, (q, s, table) in enumerate(zip(self.query_lens, self.starts, self.block_tables)):
            if q < 1 or s < 0:
                raise GalaxyError(f"paged batch: sequence {i} has query_len={q}, start={s}")
            if len(table) * self.block_size < s + q:
                raise GalaxyError(f"paged batch: sequence {i} needs {s + q} positions, its {len(table)} blocks "
                                  f"of {self.block_size} hold {len(table) * self.block_size}")

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @cached_property
    def context_lens(self) -> list[int]:
        return [s + q for s, q in zip(self.starts, self.query_lens)]

    @cached_property
    def _tables(self) -> torch.Tensor:
        """(B, most blocks) every sequence's block table, padded with block 0 (never indexed)."""
        width = max(len(t) for t in self.block_tables)
        return torch.tensor([list(t) + [0] * (width - len(t)) for t in self.block_tables], dtype=torch.long)

    def _runs(self, firsts: list[int], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For runs of positions [firsts[i], firsts[i] + lens[i]) of every sequence i, packed: each
        position's sequence and its slot, (N,) each -- one index over the block tables for the
        whole batch instead of a tensor per sequence."""
        n = torch.tensor(lens, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(lens)), n)  # (N,)
        ends = torch.cumsum(n, 0)
        pos = torch.arange(int(ends[-1])) - torch.repeat_interleave(ends - n, n) \
            + torch.repeat_interleave(torch.tensor(firsts, dtype=torch.long), n)  # (N,)
        return pos, self._tables[seq, pos // self.block_size] * self.block_size + pos % self.block_size

    @cached_property
    def _new(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._runs(list(self.starts), list(self.query_lens))

    @cached_property
    def slot_mapping(self) -> torch.Tensor:
        """(T,) slot of every packed token's K/V."""
        return self._new[1]

    @cached_property
    def positions(self) -> torch.Tensor:
        """(T,) position of every packed token (for RoPE and learned position embeddings)."""
        return self._new[0]

    @cached_property
    def all_context_slots(self) -> torch.Tensor:
        """(sum L_i,) slots of every sequence's positions [0, start + query_len), packed in order."""
        return self._runs([0] * len(self.starts), self.context_lens)[1]

    @cached_property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, (L_i,) slots of positions [0, start + query_len) (views of all_context_slots)."""
        return list(self.all_context_slots.split(self.context_lens))

    @cached_property
    def context_runs(self) -> list[int | None]:
        """Per sequence, the first slot of its context when its blocks are consecutive ids (the context
        is then one run of slots, read as a view instead of gathered), else None."""
        runs = []
        for table, c in zip(self.block_tables, self.context_lens):
            used = table[: -(-c // self.block_size)]
            whole = all(b + 1 == nxt for b, nxt in zip(used, used[1:]))
            runs.append(used[0] * self.block_size if whole else None)
        return runs

    @cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For one masked SDPA over the batch: slots (B, Lmax) (padding repeats each sequence's first
        slot, written like all its context: the pool is not zero-filled, and a masked key whose V is
        NaN garbage would still put NaN in the output, 0 x NaN), the mask
        (B, 1, Nmax, Lmax) (True = attend), and each packed token's row in the (B * Nmax) queries."""
        b, nmax, lmax = len(self.query_lens), max(self.query_lens), max(self.context_lens)
        slots = torch.empty(b, lmax, dtype=torch.long)
        mask = torch.zeros(b, 1, nmax, lmax, dtype=torch.bool)
        rows = []
        keys = torch.arange(lmax)
        for i, (s, q) in enumerate(zip(self.starts, self.query_lens)):
            slots[i, : s + q] = self.context_slots[i]
            slots[i, s + q :] = self.context_slots[i][0]
            qpos = torch.arange(s, s + q)[:, None]
            mask[i, 0, :q] = keys[None, :] <= qpos
            mask[i, 0, q:, 0] = True  # padded query rows attend to something (no NaN); dropped after
            rows.append(torch.arange(i * nmax, i * nmax + q))
        return slots, mask, torch.cat(rows)


def group_size(kv_map, nq: int, nkv: int) -> int | None:
    """g when query head j reads KV head j // g (whole groups, in order), else None.

    The g query heads of a group then attend as g x more query rows of their KV head, so K/V
    are never copied per query head: 1.6-1.7x faster than that copy for SmolLM2's decodes at 2048
    positions, and as fast as SDPA's enable_gqa with 4-D inputs (galaxy bench --attention-kernels),
    which a partial group could not use either. A shard holding part of a group falls back to
    copying K/V per query head."""
    if kv_map is None:
        return 1
    g = nq // nkv
    return g if g * nkv == nq and list(kv_map) == [j // g for j in range(nq)] else None


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, g: int = 1) -> torch.Tensor:
    """q (h, g*n, hd): g query heads per KV head, each n tokens at positions [start, start + n),
    over k, v (h, start + n, hd) -> (h, g*n, hd).

    SDPA gets a leading batch dimension: on CPU, 4-D inputs take the flash kernel and 3-D ones
    the math kernel, 1.5-2.7x slower for the same work (galaxy bench --attention-kernels)."""
    n = q.shape[1] // g
    q, k, v = q[None], k[None], v[None]
    if n == 1:  # a decode sees every cached position: no mask
        return F.scaled_dot_product_attention(q, k, v)[0]
    if start == 0 and g == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]
    mask = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]  # (n, start + n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(g, 1))[0]


class PagedKVCache:
    """K and V blocks of one device's KV heads, for the layers it holds, within a fixed pool."""

    def __init__(self, layers, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device=None):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (n_kv_heads, num_blocks * block_size, head_dim)
        # Not zero-filled: a slot is read only after a step wrote it (a sequence attends to positions
        # [0, start + n), every one of them written by this or an earlier step, or copied from a block
        # that was), and `padded` pads with each sequence's own first slot. Zeroing a 256 MiB pool
        # touched every page at the engine's first step (+0.1-0.2 s on that request's TTFT); untouched,
        # the pages of a fresh allocation are mapped only as blocks are written.
        self.k = {str(i): torch.empty(shape, dtype=dtype, device=device) for i in layers}
        self.v = {str(i): torch.empty(shape, dtype=dtype, device=device) for i in layers}

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> PagedKVCache:
        """The pool for a shard (model.Transformer): its layers, its KV heads, its dtype. A pipeline
        stage without layers holds none."""
        blk = next(iter(model.layers.values()), None)
        if blk is None:
            return cls((), 0, model.cfg.head_dim, num_blocks, block_size, model.dtype)
        # the device of the block's first tensor: a compact linear's `.weight` is its float32 weight rebuilt
        # (0.3 s for SmolLM2 in int4, on the first request's TTFT), only to be asked where it lives
        device = next(itertools.chain(blk.parameters(), blk.buffers())).device
        return cls(model.layers.keys(), blk.attn.nkv, model.cfg.head_dim, num_blocks, block_size,
                   model.dtype, device)

    @staticmethod
    def bytes_per_block(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype = torch.float32) -> int:
        """What one block id costs a device: K and V of its heads, for every layer it holds."""
        return 2 * n_layers * n_kv_heads * block_size * head_dim * dtype.itemsize

    @staticmethod
    def blocks_for_budget(max_bytes: int, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int,
                          dtype: torch.dtype = torch.float32) -> int:
        """Blocks a device can hold within its KV budget; the cluster uses the smallest count."""
        return max_bytes // PagedKVCache.bytes_per_block(n_layers, n_kv_heads, head_dim, block_size, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def write(self, layer: str, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new tokens' k, v (nkv, T, hd) at their slots (T,)."""
        self.k[layer].index_copy_(1, slot_mapping, k)
        self.v[layer].index_copy_(1, slot_mapping, v)

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write: block dst takes block src's K/V, in every layer."""
        if not pairs:
            return
        bs = self.block_size
        offs = torch.arange(bs)
        src = torch.cat([s * bs + offs for s, _ in pairs])
        dst = torch.cat([d * bs + offs for _, d in pairs])
        for cache in (*self.k.values(), *self.v.values()):
            cache.index_copy_(1, dst, cache.index_select(1, src))

    def paged_attention(self, q: torch.Tensor, layer: str, batch: PagedBatch, kv_map=None,
                        method: str = "gather") -> torch.Tensor:
        """Causal attention of packed queries q (nq, T, hd) over their sequences' cached K/V
        (written already for this step's tokens) -> (nq, T, hd)."""
        kc, vc = self.k[layer], self.v[layer]
        g = group_size(kv_map, q.shape[0], kc.shape[0])
        heads = None if g is not None else torch.as_tensor(kv_map, dtype=torch.long)
        if method == "gather":
            return self._gather(q, kc, vc, batch, g, heads)
        if method == "padded":
            return self._padded(q, kc, vc, batch, g, heads)
        raise GalaxyError(f"paged attention method={method!r} is not one of {METHODS}")

    @staticmethod
    def _gather(q, kc, vc, batch: PagedBatch, g, heads) -> torch.Tensor:
        nq, _, hd = q.shape
        one = len(batch.query_lens) == 1  # one sequence: its attention is the output, no copy into place
        out = None if one else torch.empty_like(q)
        a = 0
        for i, (start, n) in enumerate(zip(batch.starts, batch.query_lens)):
            first, length = batch.context_runs[i], start + n
            if first is not None:  # consecutive blocks: the context is a view of the pool
                k, v = kc[:, first : first + length], vc[:, first : first + length]  # (nkv, L, hd)
            else:
                slots = batch.context_slots[i]
                k, v = kc.index_select(1, slots), vc.index_select(1, slots)
            if g is None:  # part of a group: K/V per query head
                k, v = k.index_select(0, heads), v.index_select(0, heads)  # (nq, L, hd)
                ctx = causal_sdpa(q[:, a : a + n], k, v, start)
            else:
                qg = q[:, a : a + n].reshape(nq // g, g * n, hd)  # a group's heads as extra rows
                ctx = causal_sdpa(qg, k, v, start, g).view(nq, n, hd)
            if one:
                return ctx
            out[:, a : a + n] = ctx
            a += n
        return out

    @staticmethod
    def _padded(q, kc, vc, batch: PagedBatch, g, heads) -> torch.Tensor:
        slots, mask, rows = batch.padded  # (B, Lmax), (B, 1, Nmax, Lmax), (T,)
        b, nmax, lmax = mask.shape[0], mask.shape[2], mask.shape[3]
        nq, _, hd = q.shape
        nkv = kc.shape[0]
        k = kc.index_select(1, slots.flatten()).view(nkv, b, lmax, hd).transpose(0, 1)  # (B, nkv, Lmax, hd)
        v = vc.index_select(1, slots.flatten()).view(nkv, b, lmax, hd).transpose(0, 1)
        if g is None:
            k, v, h, g = k.index_select(1, heads), v.index_select(1, heads), nq, 1  # (B, nq, Lmax, hd)
        else:
            h = nkv
        qp = q.new_zeros(b * nmax, nq, hd)
        qp[rows] = q.transpose(0, 1)
        qp = qp.view(b, nmax, h, g, hd).permute(0, 2, 3, 1, 4).reshape(b, h, g * nmax, hd)  # group rows
        if g > 1:
            mask = mask.repeat(1, 1, g, 1)  # (B, 1, g Nmax, Lmax)
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask)  # (B, h, g Nmax, hd)
        out = out.view(b, h, g, nmax, hd).permute(0, 3, 1, 2, 4).reshape(b * nmax, nq, hd)
        return out[rows].transpose(0, 1)  # (nq, T, hd)
