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

- gather (the default): per sequence, gather its context K/V (or view it: consecutive blocks) and
  attend its new rows block by block (`block_attention`, `PagedBatch.row_blocks`): the rows that
  fall in one KV block attend together over the keys up to that block's end, the rest of the block
  masked. Never far from the best: where padded wins, padded takes 0.57-0.95 of its time; on every
  batch holding a prefill chunk, padded takes 1.7-8.3x its time (measured before the block form).
  **Why by blocks** (session 7): the serving engine promises a sequence the tokens it gets alone,
  and formats with bf16 activations (int4, int8, bf16) make that a promise of bits -- a 1e-7
  difference in attention becomes 1e-2 in the logits a few layers on, and another greedy token
  some dozens of tokens later. SDPA's CPU kernel gives a query row bits that depend on the call's
  key extent, its mask and the size of the row's block of queries, so one SDPA per chunk gave a
  prompt's rows other bits when the engine cut it into other chunks (it does, beside running
  decodes), and a decode other bits than the same position in a prompt. In the block form a row's
  call depends only on its position and its own block: a decode, a prompt in one chunk or in
  five, alone or beside others, give each row the same bits (tests/engine/test_int4_batched.py).
  Each decode attends on its own: grouping a step's decodes into one masked SDPA over contexts
  padded to the longest (session 5, measured neutral, 0.96-1.04x at batch 1-8) gave a row other
  bits than alone, and is gone;
- padded: gather every context padded to the longest and run one masked SDPA for the batch.
  It saves the per-sequence calls, so it wins only on decode-only batches of several short
  contexts (64-256 positions), and pays for the padding everywhere else.

GQA: query head j reads local KV head kv_map[j] (model.Attention.kv_map; None: the identity).
When the local heads form whole groups, each group's query heads attend as extra query rows
of their one KV head (`group_size`), so K/V are gathered once per KV head, never per query head.

Contract for the integrating code, per step: `copy_blocks(plan.copies)` first; then, per layer,
`write(layer, k, v, batch.slot_mapping)` with the new tokens' K/V (RoPE applied at
`batch.positions`), then `paged_attention(q, layer, batch, kv_map)`. Writing before attending
is what lets a chunk attend to itself. `paged_attention` zeroes each sequence's last block past its
new tokens (`PagedBatch.tail_slots`, its future positions) before the block form reads them masked:
the pool is not zero-filled, and a masked key whose K or V is NaN garbage would still give NaN.
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
    def block_ends(self) -> list[int]:
        """Per sequence, the end of the block holding its last position: the key extent its rows attend over."""
        bs = self.block_size
        return [-(-c // bs) * bs for c in self.context_lens]

    @cached_property
    def tail_slots(self) -> torch.Tensor:
        """(N,) slots of every sequence's positions [start + query_len, block end): its last block's future
        positions, read (masked) by block attention, so zeroed before it (`PagedKVCache.paged_attention`)."""
        return self._runs(self.context_lens, [e - c for e, c in zip(self.block_ends, self.context_lens)])[1]

    @cached_property
    def block_slots(self) -> list[torch.Tensor]:
        """Per sequence, (E_i,) slots of positions [0, block end)."""
        return list(self._runs([0] * len(self.starts), self.block_ends)[1].split(self.block_ends))

    @cached_property
    def row_blocks(self) -> list[list[tuple[int, int, int]]]:
        """Per sequence, its new rows cut at block boundaries: (first packed row, rows m, key extent e). A
        row's attention is computed with the rows of its own block only, over the keys up to that block's
        end (`block_attention`): the same call whatever other rows of its sequence, or other sequences,
        the step carries."""
        bs, out, a = self.block_size, [], 0
        for start, n in zip(self.starts, self.query_lens):
            cuts, p = [], start
            while p < start + n:
                e = (p // bs + 1) * bs  # p's block ends here; its rows in this step end at min(e, start + n)
                cuts.append((a + p - start, min(start + n, e) - p, e))
                p = min(start + n, e)
            out.append(cuts)
            a += n
        return out

    def block_masks(self, g: int) -> list[list[torch.Tensor]]:
        """Per sequence and row block, the additive mask (n, e) of `block_attention` for g query heads per
        KV head: 0 where a row attends, -inf elsewhere, rows as g copies of the block's m, padded to
        `padded_rows` with copies of the last. Built at a step's first layer, read by every other."""
        masks = self._masks.get(g)
        if masks is None:
            masks = []
            for (start, _), cuts in zip(zip(self.starts, self.query_lens), self.row_blocks):
                seq = []
                for a, m, e in cuts:
                    p = start + a - cuts[0][0]  # the block's first row's position
                    attend = (torch.arange(e)[None, :] <= torch.arange(p, p + m)[:, None]).repeat(g, 1)  # (g m, e)
                    n = padded_rows(g * m)
                    attend = torch.cat((attend, attend[-1:].expand(n - g * m, e)))
                    seq.append(torch.zeros(n, e).masked_fill_(~attend, float("-inf")))
                masks.append(seq)
            self._masks[g] = masks
        return masks

    @cached_property
    def _masks(self) -> dict:
        return {}

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


# SDPA's CPU kernel (torch 2.13) works in blocks of 32 query rows (64 from 192 rows, 256 from 768); a
# block of 1 to 3 rows gives its rows other bits than a block of 4 or more (MKL's small-matrix kernels),
# and every block of 4 or more the same bits (measured over 1-800 rows; pinned in tests/model/test_paged_kv.py)
_Q_BLOCK_MIN = 4


def _q_block(rows: int) -> int:
    return 256 if rows >= 768 else 64 if rows >= 192 else 32


def padded_rows(rows: int) -> int:
    """The fewest query rows >= `rows` whose every SDPA block holds at least 4 rows."""
    r = max(rows, _Q_BLOCK_MIN)
    while 0 < r % _q_block(r) < _Q_BLOCK_MIN:
        r += 1
    return r


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (h, r, hd): the rows of one KV block (g query heads per KV head as g x its m rows), over k, v
    (h, e, hd), e that block's end, with `mask` (n, e) from `PagedBatch.block_masks` -> (h, r, hd).

    The form every row's attention takes, so that a token gets the same bits whatever shares its step:
    a decode, a prompt's row in a chunk of any size, beside any other sequences. The key extent is the
    row's block end (never the chunk's or the batch's), the mask explicit, and the query rows padded to
    the mask's n (copies of the last, dropped after) so that no SDPA block holds fewer than 4 rows."""
    h, rows, hd = q.shape
    n = mask.shape[0]
    if n > rows:
        q = torch.cat((q, q[:, -1:].expand(h, n - rows, hd)), 1)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0, :, :rows]


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
        if method == "gather" and batch.tail_slots.numel():  # masked keys must be finite: 0 x NaN is NaN
            kc.index_fill_(1, batch.tail_slots, 0.0)
            vc.index_fill_(1, batch.tail_slots, 0.0)
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
        blocks, masks = batch.row_blocks, batch.block_masks(1 if g is None else g)
        one = len(blocks) == 1 and len(blocks[0]) == 1  # one block of rows: its attention is the output
        out = None if one else torch.empty_like(q)
        for i, cuts in enumerate(blocks):
            first, length = batch.context_runs[i], batch.block_ends[i]
            if first is not None:  # consecutive blocks: the context is a view of the pool
                k, v = kc[:, first : first + length], vc[:, first : first + length]  # (nkv, E, hd)
            else:
                slots = batch.block_slots[i]
                k, v = kc.index_select(1, slots), vc.index_select(1, slots)
            if g is None:  # part of a group: K/V per query head
                k, v = k.index_select(0, heads), v.index_select(0, heads)  # (nq, E, hd)
            for (a, m, e), mask in zip(cuts, masks[i]):
                if g is None:
                    ctx = block_attention(q[:, a : a + m], k[:, :e], v[:, :e], mask)
                else:
                    qg = q[:, a : a + m].reshape(nq // g, g * m, hd)  # a group's heads as extra rows
                    ctx = block_attention(qg, k[:, :e], v[:, :e], mask).reshape(nq, m, hd)
                if one:
                    return ctx
                out[:, a : a + m] = ctx
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
