"""One device's side of a loaded model: its shard, its KV caches, and running its part of a request.

Transport-agnostic: the gRPC worker and the in-process executor both hold a `RankRuntime` and hand
it the `Collectives` of their transport. It checks everything it is asked to run against the
model and its cache before any peer waits on it: a bad request fails here, by name, on every rank.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import DeviceOutOfMemory
from ..model.paged_kv import PagedKVCache
from ..model.quant import QuantLinear
from ..model.transformer import Transformer
from .collectives import DIRECT_MAX_BYTES, Collectives
from .decode_graph import DecodeGraphs
from .forward import Request, Step, rank_forward, request_pass, step_pass
from .sharding import Partition
from .threads import StepThreads, intra_op_threads
from .top1 import check_top1_rows, step_piece

DEFAULT_KV_BYTES = 256 << 20  # per device: the paged pool is allocated whole at the engine's first step


@dataclass(frozen=True)
class KVPool:
    """The serving engine's paged KV pool: the same block ids on every device (each holding its own
    heads and layers in them), sized by the coordinator to what the smallest device can hold."""

    num_blocks: int
    block_size: int

    def __post_init__(self):
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"KV pool of {self.num_blocks} blocks of {self.block_size} positions")


class RankRuntime:
    def __init__(self, model: Transformer, partition: Partition, rank: int, tiles: int = 1,
                 kv_max_bytes: int = DEFAULT_KV_BYTES, overlap: bool = True, threads: StepThreads | None = None):
        self.model, self.partition, self.rank, self.tiles = model, partition, rank, max(1, tiles)
        self.overlap = overlap
        # intra-op threads per step by its token count (parallel/threads.py), set on the thread that runs
        # the step; None: the calling thread's count, whatever it is
        self.threads = threads
        self.kv_max_bytes = kv_max_bytes
        self.paged: PagedKVCache | None = None  # allocated by the engine's first step
        self.stash = None  # the device-local K/V pool's store (parallel/kv_stash.KVStash), opened by the engine
        self.graphs: DecodeGraphs | None = None  # the compiled one-token decode halves (prepare_decode)
        # an all-reduce's partials travel as bf16 (parallel/codec.py exact16): the direct exchange moves the
        # two-shot's bytes up to twice the float32 size, in one hop; from the format, alike on every rank
        self.direct_max_bytes = DIRECT_MAX_BYTES * (2 if bf16_partials(model) else 1)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one position, for this shard's KV heads and layers: what a block costs / its size."""
        if not len(self.model.layers):
            return 0
        blk = next(iter(self.model.layers.values()))
        return PagedKVCache.bytes_per_block(len(self.model.layers), blk.attn.nkv, self.model.cfg.head_dim, 1,
                                            self.model.dtype)

    def validate(self, req: Request) -> None:
        """Refuse a request the model cannot take, before any peer waits on this rank."""
        cfg, ids = self.model.cfg, req.ids
        if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0:
            raise ValueError(f"input ids must be a non-empty int64 vector, got {tuple(ids.shape)} {ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"input ids outside the vocabulary [0, {cfg.vocab_size})")
        if req.start_pos < 0 or req.start_pos + ids.numel() > cfg.max_positions:
            raise ValueError(f"positions {req.start_pos}..{req.start_pos + ids.numel()} exceed the model's "
                             f"{cfg.max_positions}")
        t = req.types
        types_ok = t is None or (
            t.shape == ids.shape and 0 <= int(t.min()) and int(t.max()) < max(1, cfg.type_vocab_size))
        if not types_ok:
            raise ValueError("token types must match the ids and the model's segment vocabulary")

    @property
    def kv_bytes(self) -> int:
        """Memory the KV pool holds on this device (0 until the engine's first step)."""
        return self.paged.nbytes if self.paged is not None else 0

    def run(self, comm: Collectives, req: Request):
        """This rank's output piece for `req` (None on non-final pipeline stages)."""
        with self._threads_for(req.ids.numel()):
            return rank_forward(self.model, comm, self.partition, request_pass(req))

    def validate_step(self, step: Step, pool: KVPool) -> None:
        """Refuse a step this rank cannot run, before any peer waits on it: every rank checks the
        same plan, so every rank refuses it alike."""
        cfg, ids, b = self.model.cfg, step.ids, step.batch
        if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() != b.num_tokens:
            raise ValueError(f"step ids must be an int64 vector of the batch's {b.num_tokens} tokens, got "
                             f"{tuple(ids.shape)} {ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"step ids outside the vocabulary [0, {cfg.vocab_size})")
        if b.block_size != pool.block_size:
            raise ValueError(f"the batch's blocks hold {b.block_size} positions, the pool's {pool.block_size}")
        if max(b.context_lens) > cfg.max_positions:
            raise ValueError(f"a sequence reaches position {max(b.context_lens)}, beyond the model's "
                             f"{cfg.max_positions}")
        used = [x for table in b.block_tables for x in table] + [x for pair in step.copies for x in pair]
        if used and not 0 <= min(used) <= max(used) < pool.num_blocks:
            raise ValueError(f"block ids {min(used)}..{max(used)} outside the pool of {pool.num_blocks}")
        rows = step.logit_rows
        if list(rows) != sorted(set(rows)) or (rows and not 0 <= rows[0] <= rows[-1] < ids.numel()):
            raise ValueError(f"logit rows {list(rows)[:8]} are not ascending rows of the {ids.numel()} tokens")
        check_top1_rows(rows, step.top1_rows)
        k = step.kernel_from
        if k and (len(k) != len(b.query_lens) or min(k) < 0):
            raise ValueError(f"kernel_from {list(k)[:8]} is not one position >= 0 for each of the step's "
                             f"{len(b.query_lens)} sequences")

    def holds_pool(self, pool: KVPool) -> bool:
        """Whether the pool the engine sized is the one allocated here (no step named it yet, or the
        coordinator re-sized it: False)."""
        have = self.paged
        return have is not None and (have.num_blocks, have.block_size) == (pool.num_blocks, pool.block_size)

    def pool_bytes(self, pool: KVPool) -> int:
        """What allocating `pool` takes on this device (its share of the KV heads)."""
        return pool.num_blocks * pool.block_size * self.kv_bytes_per_token

    def paged_cache(self, pool: KVPool) -> PagedKVCache:
        """The engine's KV pool on this device, allocated at the first step that names it (and
        again if the coordinator re-sizes it), or refused before allocating if over this device's
        KV budget."""
        if not self.holds_pool(pool):
            need = self.pool_bytes(pool)
            if need > self.kv_max_bytes:
                raise DeviceOutOfMemory(f"a KV pool of {pool.num_blocks} blocks x {pool.block_size} positions needs "
                                        f"{need / 2**20:.1f} MiB here, over this device's KV budget of "
                                        f"{self.kv_max_bytes / 2**20:.1f} MiB; serve with fewer blocks")
            self.paged = None  # the old pool goes before the new one is allocated
            self.paged = PagedKVCache.for_model(self.model, pool.num_blocks, pool.block_size)
        return self.paged

    def run_step(self, comm: Collectives, step: Step, pool: KVPool):
        """This rank's output piece for one engine step: the logit rows' logits over its vocabulary
        rows (None on non-final pipeline stages); with top-1 rows, a StepPiece: the other rows' logits
        and the top-1 rows' largest logit and its global id (parallel/top1.py)."""
        kv = self.paged_cache(pool)
        kv.copy_blocks(step.copies)
        tokens = step.ids.numel()
        count = None if self.threads is None else self.threads.for_tokens(tokens)
        t0 = time.perf_counter()
        with nullcontext() if count is None else intra_op_threads(count):
            out = rank_forward(self.model, comm, self.partition, step_pass(step, kv), self.graphs)
        if count is not None:  # the decode count is confirmed on real steps (threads.DecodeTuner)
            self.threads.observe(tokens, count, time.perf_counter() - t0)
        return step_piece(out, step.logit_rows, step.top1_rows, self.model.spec.vocab[0])

    def prepare_decode(self) -> None:
        """Compile the shard's one-token decode halves where it pays (decode_graph.policy), at load: the
        compile then never lands on a request's first token. Eager when not compiled."""
        self.graphs = DecodeGraphs.build(self.model, self.partition.world)

    def _threads_for(self, tokens: int):
        """The step's intra-op thread count on this thread (decode or prefill, by its tokens)."""
        return nullcontext() if self.threads is None else intra_op_threads(self.threads.for_tokens(tokens))

    def new_comm(self, transport, overlap: bool | None = None) -> Collectives:
        return Collectives(transport, self.tiles, direct_max_bytes=self.direct_max_bytes,
                           overlap=self.overlap if overlap is None else overlap)


def bf16_partials(model: Transformer) -> bool:
    """Whether every block linear of `model` gives bf16 values (int4 and int8 with bf16 activations: the
    kernel's and the dense rows' outputs are bf16, widened), so a tensor-parallel all-reduce's partials go
    on the wire in half the bytes (parallel/codec.py exact16)."""
    lins = [m for m in model.layers.modules() if isinstance(m, QuantLinear)]
    return bool(lins) and all(m.fmt.name in ("int4", "int8") and m.fmt.act == "bf16" for m in lins)
