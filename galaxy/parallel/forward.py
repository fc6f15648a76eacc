"""One rank's forward pass under each strategy, with collectives between the block steps.

- galaxy (HMP): attention and MLP tensor-parallel over heads / columns, connective blocks
  (residual, norm, embedding finish) sequence-parallel over each device's tokens; joined by
  AllGather before and ReduceScatter after every tensor-parallel block, fused tile by tile with
  the adjacent GEMM (collectives.py). Embedding and LM head are vocabulary-parallel.
- megatron: the same tensor-parallel blocks, every token on every device, AllReduce after each
  row-parallel GEMM, no overlap -- the baseline Galaxy improves on.
- pipeline: contiguous layers per device, hidden states handed down the ring (exo/PipeEdge).
- seqpar: the whole model everywhere, tokens split, K/V all-gathered (a baseline for the bench).

Two things ask for a pass: a `Request` (one sequence, no KV cache: a prompt's logits, an
encoder's hidden states) and a `Step` of the serving engine (the packed tokens of several sequences over the paged
KV cache, galaxy/model/paged_kv.py). Both become a `Pass` -- token ids, their positions, how
attention reaches K/V, and which rows' logits come back -- and the strategies below run a Pass.
The connective blocks work per token, so sequence parallelism splits a packed batch as it
splits one sequence; only attention needs to know which tokens belong together.

Everything here is pure compute plus `Collectives` calls: the same code runs over in-process
queues and over gRPC between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..model.dense_rows import kernel_rows, pass_rows, roles_of_logits, rows_from
from ..model.paged_kv import PagedBatch, PagedKVCache
from ..model.transformer import Attention, Block, Transformer
from .collectives import Collectives
from .decode_graph import DecodeGraphs, GraphFailed
from .sharding import Partition, Strategy


@dataclass(frozen=True)
class Request:
    """One forward pass of one sequence, with no KV cache: a prompt's logits or an encoder's hidden
    states (generation runs engine Steps over the paged cache instead)."""

    ids: torch.Tensor  # (S,) int64
    types: torch.Tensor | None = None  # (S,) segment ids (BERT), default zeros
    start_pos: int = 0  # position of ids[0]
    last_only: bool = False  # causal LMs: logits of the last token only


@dataclass(frozen=True)
class Step:
    """One iteration of the serving engine, identical on every rank: the tokens of several
    sequences packed in plan order (decodes first, then prefill chunks), over the paged KV cache.

    Before it runs, each rank copies the blocks in `copies` (copy on write) in its own cache."""

    ids: torch.Tensor  # (T,) int64, packed
    batch: PagedBatch  # where each sequence sits: query lengths, start positions, block tables
    logit_rows: tuple[int, ...]  # packed rows whose logits come back (the last token of a finished chunk)
    copies: tuple[tuple[int, int], ...] = ()  # (src, dst) blocks
    # of logit_rows, those (ascending) whose argmax alone comes back, computed on the devices (greedy
    # sampling: parallel/top1.py); the others' logits come back whole
    top1_rows: tuple[int, ...] = ()
    # per sequence, in plan order: its first position whose rows run an int8 / int4 linear's own kernel, its
    # original prompt length - 1 (model/dense_rows.py); () for the roles an uninterrupted run has
    kernel_from: tuple[int, ...] = ()


# (layer index, attention block, Q|K|V of every token (S, cols)) -> context (S, nq hd)
Attend = Callable[[str, Attention, torch.Tensor], torch.Tensor]
# the same from the heads, RoPE applied: (layer index, block, q (nq, S, hd), k, v (nkv, S, hd)) -> (S, nq hd)
AttendHeads = Callable[[str, Attention, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pass:
    """What every rank computes, whoever asked: the common form of a Request and a Step."""

    ids: torch.Tensor  # (S,) int64
    positions: torch.Tensor  # (S,) position of every token in its sequence
    types: torch.Tensor | None  # (S,) segment ids (BERT), or None
    attend: Attend
    logit_rows: tuple[int, ...] | None  # causal LMs: rows whose logits come back (None: every row)
    contiguous_from: int | None = None  # one sequence at positions start.. (seqpar needs it), else None
    # (S,) bool: rows that run an int8 / int4 linear's own kernel (decode rows, a prompt's last row); the others
    # run dense (model/dense_rows.py). None: every row runs the kernel
    kernel_rows: torch.Tensor | None = None
    # engine steps: attention from rotated heads, and the pass's rotation (the compiled decode halves)
    attend_heads: AttendHeads | None = None
    rotation: _Rotation | None = None


class _Rotation:
    """A pass's RoPE cos / sin at its positions: computed at the first layer, read by every other
    (model.transformer.rotation), instead of ten small ops per layer."""

    def __init__(self, positions: torch.Tensor):
        self.positions, self.rot, self.dtype = positions, None, None

    def of(self, attn: Attention, dtype: torch.dtype):
        if self.rot is None or self.dtype != dtype:
            self.rot, self.dtype = attn.rotation(self.positions, dtype), dtype
        return self.rot


def request_pass(req: Request) -> Pass:
    """A Request as a Pass: attention over its own tokens."""
    s = req.ids.shape[0]
    positions = torch.arange(req.start_pos, req.start_pos + s)
    rot = _Rotation(positions)

    def attend(idx: str, attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
        return attn.attend(qkv, req.start_pos, rot.of(attn, qkv.dtype))

    logit_rows = (s - 1,) if req.last_only else None
    roles = kernel_rows([req.start_pos], [s], roles_of_logits([req.start_pos], [s], logit_rows))
    return Pass(req.ids, positions, req.types, attend, logit_rows, req.start_pos, roles)


def step_pass(step: Step, kv: PagedKVCache) -> Pass:
    """An engine Step as a Pass over this rank's paged KV cache."""

    rot = _Rotation(step.batch.positions)

    def attend(idx: str, attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
        return attn.attend_paged(qkv, kv, idx, step.batch, rot.of(attn, qkv.dtype))

    def attend_heads(idx: str, attn: Attention, q, k, v) -> torch.Tensor:
        return attn.attend_paged_heads(q, k, v, kv, idx, step.batch)

    b = step.batch
    starts, lens = list(b.starts), list(b.query_lens)
    kernel_from = list(step.kernel_from) if step.kernel_from else roles_of_logits(starts, lens, step.logit_rows)
    return Pass(step.ids, step.batch.positions, None, attend, step.logit_rows,
                kernel_rows=kernel_rows(starts, lens, kernel_from),
                attend_heads=attend_heads, rotation=rot)


# Passes of fewer tokens run Galaxy's shards tensor-parallel (below). Sequence parallelism pays four
# ring collectives per layer, each world - 1 hops, where tensor parallelism pays two one-hop
# all-reduces; for a few dozen tokens the hops, not the bytes, are the cost. Measured on three
# loopback workers (SmolLM2-135M, 2 shared cores, medians of runs side by side): a decode step of 8
# sequences took 0.18-0.33 s tensor-parallel against 0.32-0.58 s under HMP; the line fitted to steps
# of 4 decodes beside a prompt chunk had a per-step floor of 0.10-0.26 s tensor-parallel against
# 0.27-0.46 s under HMP -- the floor that made every step carrying a chunk stall the running streams
# (docs/engine.md).
TENSOR_PARALLEL_MAX_TOKENS = 64


def decodes_tensor_parallel(partition: Partition, seq: int) -> bool:
    """Too few tokens to split well (decode steps, and the serving engine's steps of decodes beside a
    small prompt chunk): run Galaxy's shards Megatron-style instead, with latency-optimal
    all-reduces, since sequence parallelism's ring hops cost more than it shares out."""
    return partition.strategy == Strategy.GALAXY and seq < max(TENSOR_PARALLEL_MAX_TOKENS, 2 * partition.world)


def _types(p: Pass, a: int, b: int):
    return None if p.types is None else p.types[a:b]


def _final(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    return model.final_norm(h) if model.final_norm is not None else h


def _logit_rows(p: Pass, a: int, b: int) -> torch.Tensor:
    """Of rows [a, b) held here, the ones whose logits come back, as indices into them."""
    rows = range(a, b) if p.logit_rows is None else [r for r in p.logit_rows if a <= r < b]
    return torch.tensor([r - a for r in rows], dtype=torch.long)


def galaxy_layer(blk: Block, comm: Collectives, x: torch.Tensor, sizes: list[int], tag: str,
                 attend: Callable[[Attention, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """HMP layer on this rank's token rows x: (sizes[rank], H) -> (sizes[rank], H)."""
    attn, mlp, width = blk.attn, blk.mlp, x.shape[1]
    qkv = comm.all_gather(blk.attn_input(x), sizes, _at(attn.project), tag=f"{tag}.attn.ag", at_rows=True)  # (S, qkv)
    ctx = attend(attn, qkv)  # (S, nq hd): this rank's heads over every token
    a = comm.reduce_scatter(sizes, lambda i, j: _at(attn.project_out)(ctx[i:j], i), width, x.dtype, f"{tag}.attn.rs")
    x = blk.after_attn(x, a)
    inner = comm.all_gather(blk.mlp_input(x), sizes, _at(mlp.expand), tag=f"{tag}.mlp.ag", at_rows=True)  # (S, c)
    m = comm.reduce_scatter(sizes, lambda i, j: _at(mlp.contract)(inner[i:j], i), width, x.dtype, f"{tag}.mlp.rs")
    return blk.after_mlp(x, m)


def _at(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """fn on rows that start at pass row `start` (so an int8 / int4 linear routes each row by what it is,
    model/dense_rows.py)."""
    def at(x: torch.Tensor, start: int) -> torch.Tensor:
        with rows_from(start):
            return fn(x)
    return at


def galaxy_forward(model: Transformer, comm: Collectives, sizes: list[int], p: Pass):
    """Returns the logits of every logit row over this rank's vocabulary rows, or this rank's
    hidden rows (s_r, H) of an encoder."""
    cfg, r = model.cfg, comm.rank
    a = sum(sizes[:r])
    b = a + sizes[r]
    x = comm.reduce_scatter(sizes, lambda i, j: model.embed.lookup(p.ids[i:j]), cfg.hidden, model.dtype,
                            "embed.rs")
    x = model.embed.finish(x, p.positions[a:b], _types(p, a, b))
    for idx, blk in model.layers.items():
        x = galaxy_layer(blk, comm, x, sizes, f"L{idx}", lambda attn, qkv, idx=idx: p.attend(idx, attn, qkv))
    if not cfg.causal:
        return x
    # each rank holds the logit rows among its own tokens; every rank gets all of them, its vocab rows
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    counts = [len(_logit_rows(p, e - n, e)) for e, n in zip(ends, sizes)]
    h = _final(model, x)[_logit_rows(p, a, b)]
    return comm.all_gather(h, counts, model.head_logits, tag="head.ag")


def megatron_forward(model: Transformer, comm: Collectives, p: Pass, graphs: DecodeGraphs | None = None):
    """Returns logits (logit rows, this rank's vocab rows) or the full hidden states (S, H).

    Also Galaxy's decode path: with a few tokens per step every all-reduce is tiny, and
    Collectives.all_reduce switches to a one-hop direct exchange. With `graphs`, a step of one token
    runs each layer's two halves compiled (parallel/decode_graph.py)."""
    x = comm.all_reduce(model.embed.lookup(p.ids), tag="embed.ar")
    x = model.embed.finish(x, p.positions, p.types)
    if graphs is not None and p.attend_heads is not None and graphs.fits(x):
        try:
            return _head(model, p, _compiled_layers(model, comm, p, graphs, x))
        except GraphFailed as e:  # the graph itself: it would fail every step, so the next ones run eagerly
            graphs.fail(e.__cause__)
            if comm.world > 1:  # peers are mid-step: the error ends the step on every rank
                raise e.__cause__ from None
        except Exception as e:
            if comm.world > 1:  # a collective's error (a peer gone, the step aborted): the graphs are not at fault
                raise
            graphs.fail(e)  # alone: the K/V written so far are rewritten alike by the eager layers
    for idx, blk in model.layers.items():
        attn, mlp = blk.attn, blk.mlp
        a = attn.project_out(p.attend(idx, attn, attn.project(blk.attn_input(x))))
        x = blk.after_attn(x, comm.all_reduce(a, tag=f"L{idx}.attn.ar"))
        m = mlp.contract(mlp.expand(blk.mlp_input(x)))
        x = blk.after_mlp(x, comm.all_reduce(m, tag=f"L{idx}.mlp.ar"))
    return _head(model, p, x)


def _head(model: Transformer, p: Pass, x: torch.Tensor):
    if not model.cfg.causal:
        return x
    return model.head_logits(_final(model, x)[_logit_rows(p, 0, x.shape[0])])


def _compiled_layers(model: Transformer, comm: Collectives, p: Pass, g: DecodeGraphs, x: torch.Tensor):
    """megatron_forward's layers for one token through the compiled halves: the same ops and collectives."""
    alone = comm.world == 1
    for idx, blk in model.layers.items():
        attn = blk.attn
        q, k, v = g.pre(blk, x, *p.rotation.of(attn, x.dtype))
        ctx = p.attend_heads(idx, attn, q, k, v).contiguous()  # (1, nq hd)
        if alone:  # nothing between the output projection and the residual
            x, m = g.post(blk, ctx, x)
        else:
            x, m = g.mlp(blk, x, comm.all_reduce(attn.project_out(ctx), tag=f"L{idx}.attn.ar"))
        x = blk.after_mlp(x, comm.all_reduce(m, tag=f"L{idx}.mlp.ar"))
    return x


def pipeline_forward(model: Transformer, comm: Collectives, p: Pass):
    """Returns the model output on the last stage, None on the others."""
    cfg, spec, s = model.cfg, model.spec, p.ids.shape[0]
    if spec.embed:
        x = model.embed.finish(model.embed.lookup(p.ids), p.positions, p.types)
    else:
        x = comm.recv_prev((s, cfg.hidden), model.dtype)
    for idx, blk in model.layers.items():
        attn = blk.attn
        x = blk.after_attn(x, attn.project_out(p.attend(idx, attn, attn.project(blk.attn_input(x)))))
        x = blk.after_mlp(x, blk.mlp.contract(blk.mlp.expand(blk.mlp_input(x))))
    if not spec.head:
        comm.send_next(x)
        return None
    if not cfg.causal:
        return x
    return model.head_logits(_final(model, x)[_logit_rows(p, 0, s)])


def seqpar_forward(model: Transformer, comm: Collectives, sizes: list[int], p: Pass):
    """Sequence parallelism only: every device holds the whole model and runs every block on its
    own tokens; attention all-gathers K and V so each device's queries see every key. One sequence,
    no KV cache (a benchmark baseline)."""
    cfg, r = model.cfg, comm.rank
    a = sum(sizes[:r])
    b = a + sizes[r]
    start = p.contiguous_from
    x = model.embed.finish(model.embed.lookup(p.ids[a:b]), p.positions[a:b], _types(p, a, b))
    with rows_from(a):  # this device's linears run its own rows [a, b)
        x = _seqpar_layers(model, comm, sizes, x, start, a, b)
    if not cfg.causal:
        return x
    return model.head_logits(_final(model, x)[_logit_rows(p, a, b)])


def _seqpar_layers(model: Transformer, comm: Collectives, sizes: list[int], x: torch.Tensor, start: int, a: int,
                   b: int) -> torch.Tensor:
    """seqpar's layers on this device's rows [a, b) of one sequence starting at position `start`."""
    cfg = model.cfg
    for idx, blk in model.layers.items():
        attn = blk.attn
        q, k, v = attn.split_heads(attn.project(blk.attn_input(x)), start + a)  # own tokens, all heads
        kv = torch.cat((k, v), 0).transpose(0, 1).reshape(b - a, 2 * attn.nkv * cfg.head_dim)  # (s_r, 2 nkv hd)
        kv = comm.all_gather(kv, sizes, tag=f"L{idx}.kv.ag").reshape(sum(sizes), 2 * attn.nkv, cfg.head_dim)
        k_all, v_all = kv.transpose(0, 1).split(attn.nkv, 0)
        x = blk.after_attn(x, attn.project_out(attn.attend_heads(q, k_all, v_all, start + a)))
        x = blk.after_mlp(x, blk.mlp.contract(blk.mlp.expand(blk.mlp_input(x))))
    return x


@torch.inference_mode()
def rank_forward(model: Transformer, comm: Collectives, partition: Partition, p: Pass,
                 graphs: DecodeGraphs | None = None):
    """This rank's part of one pass under the partition's strategy (`graphs`: the shard's compiled decode
    halves, used by a one-token step of the tensor-parallel path)."""
    with nullcontext() if p.kernel_rows is None else pass_rows(p.kernel_rows):
        return _strategy_forward(model, comm, partition, p, graphs)


def _strategy_forward(model: Transformer, comm: Collectives, partition: Partition, p: Pass,
                      graphs: DecodeGraphs | None = None):
    seq = p.ids.shape[0]
    if partition.strategy == Strategy.GALAXY and not decodes_tensor_parallel(partition, seq):
        return galaxy_forward(model, comm, partition.tokens(seq), p)
    if partition.strategy in (Strategy.GALAXY, Strategy.MEGATRON):
        # the graphs run a row on its format's kernel: a lone prompt row that runs dense takes the eager path
        lone_kernel_row = seq == 1 and (p.kernel_rows is None or bool(p.kernel_rows[0]))
        return megatron_forward(model, comm, p, graphs if lone_kernel_row else None)
    if partition.strategy == Strategy.SEQPAR:
        if p.contiguous_from is None:
            raise ValueError("the seqpar strategy has no KV cache; serve with galaxy, megatron or pipeline")
        return seqpar_forward(model, comm, partition.tokens(seq), p)
    return pipeline_forward(model, comm, p)


def assemble(cfg, partition: Partition, outputs: list, seq: int) -> torch.Tensor:
    """Join the ranks' pieces into the model output: logits (rows, V) or hidden states (S, H)."""
    if partition.strategy == Strategy.PIPELINE:
        return outputs[-1]
    if partition.strategy == Strategy.SEQPAR:
        return torch.cat(outputs, dim=0)  # each device's own token rows (logits or hidden states)
    if cfg.causal:
        return torch.cat(outputs, dim=1)  # vocabulary-parallel logits
    if partition.strategy == Strategy.GALAXY and not decodes_tensor_parallel(partition, seq):
        return torch.cat(outputs, dim=0)  # each rank's own token rows
    return outputs[0]  # megatron: replicated
