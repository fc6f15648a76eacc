"""One rank's forward pass under each strategy, with collectives between the block steps.

- galaxy (HMP): attention and MLP tensor-parallel over heads / columns, connective blocks
  (residual, norm, embedding finish) sequence-parallel over each device's tokens; joined by
  AllGather before and ReduceScatter after every tensor-parallel block, fused tile by tile with
  the adjacent GEMM (collectives.py). Embedding and LM head are vocabulary-parallel.
- megatron: the same tensor-parallel blocks, every token on every device, AllReduce after each
  row-parallel GEMM, no overlap -- the baseline Galaxy improves on.
- pipeline: contiguous layers per device, hidden states handed down the ring (exo/PipeEdge).
- seqpar: the whole model everywhere, tokens split, K/V all-gathered (a baseline for the bench).

Everything here is pure compute plus `Collectives` calls: the same code runs over in-process
queues and over gRPC between devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.transformer import Block, Transformer
from .collectives import Collectives
from .sharding import Partition, Strategy, last_token_rank


@dataclass(frozen=True)
class Request:
    """One forward pass: token ids, what to return, and which KV cache to use.

    Caches live on the devices, named by the coordinator: `cache` is read and extended (created
    when new); `fork_from`/`fork_len` first make it a copy of another cache's first positions (a
    reused prefix); `drop` names caches to free first.
    """

    ids: torch.Tensor  # (S,) int64
    types: torch.Tensor | None = None  # (S,) segment ids (BERT), default zeros
    start_pos: int = 0  # position of ids[0]; with a cache, the positions already cached
    last_only: bool = False  # causal LMs: logits of the last token only (generation)
    cache: str = ""
    fork_from: str = ""
    fork_len: int = 0
    drop: tuple[str, ...] = ()


def decodes_tensor_parallel(partition: Partition, seq: int) -> bool:
    """Too few tokens to split (decode steps): run Galaxy's shards Megatron-style instead, with
    latency-optimal all-reduces, since sequence parallelism has nothing to share out."""
    return partition.strategy == Strategy.GALAXY and seq < 2 * partition.world


def _positions(req: Request, a: int, b: int) -> torch.Tensor:
    return torch.arange(req.start_pos + a, req.start_pos + b)


def _types(req: Request, a: int, b: int):
    return None if req.types is None else req.types[a:b]


def _layer_cache(kv, idx: str):
    return None if kv is None else kv.layers[idx]


def galaxy_layer(blk: Block, comm: Collectives, x: torch.Tensor, sizes: list[int], start_pos: int,
                 tag: str, cache=None) -> torch.Tensor:
    """HMP layer on this rank's token rows x: (sizes[rank], H) -> (sizes[rank], H)."""
    attn, mlp, width = blk.attn, blk.mlp, x.shape[1]
    qkv = comm.all_gather(blk.attn_input(x), sizes, attn.project, tag=f"{tag}.attn.ag")  # (S, qkv)
    ctx = attn.attend(qkv, start_pos, cache)  # (S, nq hd): this rank's heads over every token
    a = comm.reduce_scatter(sizes, lambda i, j: attn.project_out(ctx[i:j]), width, x.dtype, f"{tag}.attn.rs")
    x = blk.after_attn(x, a)
    inner = comm.all_gather(blk.mlp_input(x), sizes, mlp.expand, tag=f"{tag}.mlp.ag")  # (S, c)
    m = comm.reduce_scatter(sizes, lambda i, j: mlp.contract(inner[i:j]), width, x.dtype, f"{tag}.mlp.rs")
    return blk.after_mlp(x, m)


def galaxy_forward(model: Transformer, comm: Collectives, sizes: list[int], req: Request, kv=None):
    """Returns logits (S or 1, this rank's vocab rows) or this rank's hidden rows (s_r, H)."""
    cfg, r = model.cfg, comm.rank
    a = sum(sizes[:r])
    b = a + sizes[r]
    x = comm.reduce_scatter(sizes, lambda i, j: model.embed.lookup(req.ids[i:j]), cfg.hidden, model.dtype,
                            "embed.rs")
    x = model.embed.finish(x, _positions(req, a, b), _types(req, a, b))
    for idx, blk in model.layers.items():
        x = galaxy_layer(blk, comm, x, sizes, req.start_pos, f"L{idx}", _layer_cache(kv, idx))
    if not cfg.causal:
        return x
    h = model.final_norm(x) if model.final_norm is not None else x
    if req.last_only:  # only the owner of the last token contributes a row
        owner = last_token_rank(sizes)
        sizes = [1 if i == owner else 0 for i in range(len(sizes))]
        h = h[-1:] if r == owner else h[:0]
    return comm.all_gather(h, sizes, model.head_logits, tag="head.ag")


def megatron_forward(model: Transformer, comm: Collectives, req: Request, kv=None):
    """Returns logits (S or 1, this rank's vocab rows) or the full hidden states (S, H).

    Also Galaxy's decode path: with one token per step every all-reduce is tiny, and
    Collectives.all_reduce switches to a one-hop direct exchange."""
    cfg, s = model.cfg, req.ids.shape[0]
    x = comm.all_reduce(model.embed.lookup(req.ids), tag="embed.ar")
    x = model.embed.finish(x, _positions(req, 0, s), req.types)
    for idx, blk in model.layers.items():
        attn, mlp = blk.attn, blk.mlp
        a = attn.project_out(attn.attend(attn.project(blk.attn_input(x)), req.start_pos, _layer_cache(kv, idx)))
        x = blk.after_attn(x, comm.all_reduce(a, tag=f"L{idx}.attn.ar"))
        m = mlp.contract(mlp.expand(blk.mlp_input(x)))
        x = blk.after_mlp(x, comm.all_reduce(m, tag=f"L{idx}.mlp.ar"))
    if not cfg.causal:
        return x
    h = model.final_norm(x) if model.final_norm is not None else x
    return model.head_logits(h[-1:] if req.last_only else h)


def pipeline_forward(model: Transformer, comm: Collectives, req: Request, kv=None):
    """Returns the model output on the last stage, None on the others."""
    cfg, spec, s = model.cfg, model.spec, req.ids.shape[0]
    if spec.embed:
        x = model.embed.finish(model.embed.lookup(req.ids), _positions(req, 0, s), req.types)
    else:
        x = comm.recv_prev((s, cfg.hidden), model.dtype)
    for idx, blk in model.layers.items():
        x = blk(x, req.start_pos, _layer_cache(kv, idx))
    if not spec.head:
        comm.send_next(x)
        return None
    if not cfg.causal:
        return x
    h = model.final_norm(x) if model.final_norm is not None else x
    return model.head_logits(h[-1:] if req.last_only else h)


def seqpar_forward(model: Transformer, comm: Collectives, sizes: list[int], req: Request):
    """Sequence parallelism only: every device holds the whole model and runs every block on its
    own tokens; attention all-gathers K and V so each device's queries see every key."""
    cfg, r = model.cfg, comm.rank
    a = sum(sizes[:r])
    b = a + sizes[r]
    x = model.embed.finish(model.embed.lookup(req.ids[a:b]), _positions(req, a, b), _types(req, a, b))
    for idx, blk in model.layers.items():
        attn = blk.attn
        q, k, v = attn.split_heads(attn.project(blk.attn_input(x)), req.start_pos + a)  # own tokens, all heads
        kv = torch.cat((k, v), 0).transpose(0, 1).reshape(b - a, 2 * attn.nkv * cfg.head_dim)  # (s_r, 2 nkv hd)
        kv = comm.all_gather(kv, sizes, tag=f"L{idx}.kv.ag").reshape(sum(sizes), 2 * attn.nkv, cfg.head_dim)
        k_all, v_all = kv.transpose(0, 1).split(attn.nkv, 0)
        x = blk.after_attn(x, attn.project_out(attn.attend_heads(q, k_all, v_all, req.start_pos + a)))
        x = blk.after_mlp(x, blk.mlp.contract(blk.mlp.expand(blk.mlp_input(x))))
    if not cfg.causal:
        return x
    h = model.final_norm(x) if model.final_norm is not None else x
    if req.last_only:  # only the owner of the last token returns a row
        owner = last_token_rank(sizes)
        h = h[-1:] if r == owner else h[:0]
    return model.head_logits(h)


@torch.inference_mode()
def rank_forward(model: Transformer, comm: Collectives, partition: Partition, req: Request, kv=None):
    """This rank's part of one forward pass under the partition's strategy (kv: its KVCache)."""
    seq = req.ids.shape[0]
    if partition.strategy == Strategy.GALAXY and not decodes_tensor_parallel(partition, seq):
        return galaxy_forward(model, comm, partition.tokens(seq), req, kv)
    if partition.strategy in (Strategy.GALAXY, Strategy.MEGATRON):
        return megatron_forward(model, comm, req, kv)
    if partition.strategy == Strategy.SEQPAR:
        if kv is not None:
            raise ValueError("the seqpar strategy has no KV cache; generate with galaxy, megatron or pipeline")
        return seqpar_forward(model, comm, partition.tokens(seq), req)
    return pipeline_forward(model, comm, req, kv)


def assemble(cfg, partition: Partition, outputs: list, seq: int) -> torch.Tensor:
    """Join the ranks' pieces into the model output: logits (S, V) or hidden states (S, H)."""
    if partition.strategy == Strategy.PIPELINE:
        return outputs[-1]
    if partition.strategy == Strategy.SEQPAR:
        return torch.cat(outputs, dim=0)  # each device's own token rows (logits or hidden states)
    if cfg.causal:
        return torch.cat(outputs, dim=1)  # vocabulary-parallel logits
    if partition.strategy == Strategy.GALAXY and not decodes_tensor_parallel(partition, seq):
        return torch.cat(outputs, dim=0)  # each rank's own token rows
    return outputs[0]  # megatron: replicated
