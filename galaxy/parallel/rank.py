"""One device's side of a loaded model: its shard, its KV caches, and running its part of a request.

Transport-agnostic: the gRPC worker and the in-process executor both hold a `RankRuntime` and hand
it the `Collectives` of their transport.
"""

from __future__ import annotations

import torch

from ..model.kvcache import KVStore
from ..model.transformer import Transformer
from .collectives import Collectives
from .forward import Request, rank_forward
from .sharding import Partition

DEFAULT_KV_BYTES = 1 << 30  # per device; the coordinator evicts prefixes before this is reached


class RankRuntime:
    def __init__(self, model: Transformer, partition: Partition, rank: int, tiles: int = 1,
                 kv_max_bytes: int = DEFAULT_KV_BYTES, overlap: bool = True):
        self.model, self.partition, self.rank, self.tiles = model, partition, rank, max(1, tiles)
        self.overlap = overlap
        self.kv = KVStore(kv_max_bytes)

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

    def run(self, comm: Collectives, req: Request):
        """This rank's output piece for `req` (None on non-final pipeline stages)."""
        kv = self.kv.prepare(self.model, req.cache, req.fork_from, req.fork_len, req.drop)
        if kv is not None and kv.length != req.start_pos:
            raise ValueError(f"KV cache {req.cache!r} holds {kv.length} positions, the request starts at "
                             f"{req.start_pos}")
        try:
            out = rank_forward(self.model, comm, self.partition, req, kv)
        except BaseException:
            if req.cache:
                self.kv.caches.pop(req.cache, None)  # half-written: never reuse it
            raise
        self.kv.check_bound()
        return out

    def new_comm(self, transport, overlap: bool | None = None) -> Collectives:
        return Collectives(transport, self.tiles, overlap=self.overlap if overlap is None else overlap)
