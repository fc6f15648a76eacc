"""Transformer blocks for every family, and the single-device reference forward.

The blocks are built for a *range* of heads, MLP columns and vocabulary rows: the full ranges
give the reference model, smaller ones give one device's shard (see sharding.py). Each block
exposes its steps separately -- project / attend / project_out for attention, expand / contract
for the MLP -- because the parallel forwards (parallel/forward.py) put collectives between those steps.
Row-parallel linears carry no bias: a bias belongs to the summed output and is added once, by
whoever owns the tokens after the reduction.

Shapes: S sequence, t a tile of tokens, H hidden, hd head_dim, nq/nkv this block's heads,
c this block's MLP columns, v this block's vocabulary rows. Batch size is 1 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .paged_kv import PagedBatch, PagedKVCache

# Compute dtypes by the names configs, plans and the wire use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim (never sharded: connective blocks own whole rows)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.empty(cfg.hidden))
        self.bias = nn.Parameter(torch.empty(cfg.hidden)) if cfg.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if x.dtype == torch.float32:  # one call instead of eight (61 a decode step); the same float32 arithmetic
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return F.silu(x)


def rotation(positions: torch.Tensor, hd: int, theta: float, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin (S, hd) at `positions` (S,). A pass computes them once and every layer reads
    them (apply_rope): per layer they were ten small ops, 60 per decode step of a 30-layer model."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (S, hd/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (n, S, hd) by `rotation`'s cos, sin (S, hd)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, Hugging Face's rotate-half layout. x: (n, S, hd), positions: (S,)."""
    return apply_rope(x, *rotation(positions, x.shape[-1], theta, x.dtype))


def attention_core(q, k, v, causal: bool, q_start: int = 0) -> torch.Tensor:
    """Softmax attention. q: (nq, Sq, hd); k, v: (nq, Skv, hd); query i sits at position q_start+i.

    The inputs get a batch dimension because torch's CPU flash kernel only takes 4-D tensors: on
    3-D ones it falls back to the math path, which materialises the (nq, Sq, Skv) scores and
    their softmax. Measured for 5 heads of 64 at 4,096 tokens: 801 MiB of transient memory and
    1.53 s on the math path, 9 MiB and 0.23 s on the flash kernel (same result within 1e-6)."""
    sq, skv = q.shape[1], k.shape[1]
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    q, k, v = q[None], k[None], v[None]  # (1, n, S, hd)
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)[0]
    if q_start == 0 and sq == skv:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]
    qpos = torch.arange(q_start, q_start + sq)[:, None]
    mask = torch.arange(skv)[None, :] <= qpos  # (Sq, Skv), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0]


class Attention(nn.Module):
    """Self-attention over query heads [h0, h1) and the KV heads they read.

    With grouped-query attention a device may hold part of a KV group: it then computes that
    KV head too (a replicated K/V projection), so any integer split of query heads works and
    the planner is not forced to split on group boundaries. The cost is at most two extra KV
    heads per device, which the planner's cost model counts.
    """

    def __init__(self, cfg: ModelConfig, h0: int, h1: int):
        super().__init__()
        self.cfg = cfg
        g, hd = cfg.group, cfg.head_dim
        self.h0, self.h1 = h0, h1
        self.kv0, self.kv1 = (h0 // g, -(-h1 // g)) if h1 > h0 else (0, 0)
        self.nq, self.nkv = h1 - h0, self.kv1 - self.kv0
        width = (self.nq + 2 * self.nkv) * hd
        self.qkv = nn.Linear(cfg.hidden, width, bias=cfg.attn_bias)
        self.out = nn.Linear(self.nq * hd, cfg.hidden, bias=False)  # row-parallel: no bias here
        self.out_bias = nn.Parameter(torch.empty(cfg.hidden)) if cfg.out_bias else None
        # local KV head read by each local query head; None when it is the identity (no GQA)
        kv_map = [(h0 + j) // g - self.kv0 for j in range(self.nq)]
        self.kv_map = None if kv_map == list(range(self.nkv)) else kv_map

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Column-parallel Q|K|V projection of a tile: (t, H) -> (t, (nq + 2 nkv) hd)."""
        return self.qkv(x)

    def rotation(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """RoPE's (cos, sin) at `positions` for split_heads, or None for a model without RoPE."""
        if self.cfg.position != "rope":
            return None
        return rotation(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def split_heads(self, qkv: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None,
                    rot: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(S, (nq+2nkv) hd) -> q (nq, S, hd), k and v (nkv, S, hd), RoPE applied at `positions`
        (S,) -- tokens of several sequences packed in one batch -- or at start_pos, start_pos + 1, ...;
        `rot`: the rotation at those positions, computed once for every layer of a pass."""
        hd, s = self.cfg.head_dim, qkv.shape[0]
        q, k, v = qkv.split([self.nq * hd, self.nkv * hd, self.nkv * hd], dim=-1)
        if self.cfg.position == "rope":
            if rot is None:
                pos = positions if positions is not None else torch.arange(start_pos, start_pos + s)
                rot = self.rotation(pos, qkv.dtype)
            # Q and K rotated as one tensor: (nq + nkv, S, hd), then split (views)
            qk = apply_rope(qkv[:, : (self.nq + self.nkv) * hd].view(s, self.nq + self.nkv, hd).transpose(0, 1), *rot)
            q, k = qk[: self.nq], qk[self.nq :]
        else:
            q = q.view(s, self.nq, hd).transpose(0, 1)
            k = k.view(s, self.nkv, hd).transpose(0, 1)
        v = v.view(s, self.nkv, hd).transpose(0, 1)
        return q, k, v

    def attend_heads(self, q, k, v, q_start: int = 0) -> torch.Tensor:
        """q (nq, Sq, hd) over k, v (nkv, Skv, hd) -> context (Sq, nq hd)."""
        if self.kv_map is not None:
            idx = torch.tensor(self.kv_map, dtype=torch.long, device=k.device)
            k, v = k.index_select(0, idx), v.index_select(0, idx)
        ctx = attention_core(q, k, v, self.cfg.causal, q_start)  # (nq, Sq, hd)
        return ctx.transpose(0, 1).reshape(q.shape[1], self.nq * self.cfg.head_dim)

    def attend(self, qkv: torch.Tensor, start_pos: int = 0, rot=None) -> torch.Tensor:
        """Attention of this device's heads over the pass's own tokens (a whole prompt, no cache):
        (S, qkv cols) -> (S, nq hd). Generation attends over the paged cache (attend_paged)."""
        q, k, v = self.split_heads(qkv, start_pos, rot=rot)
        return self.attend_heads(q, k, v, start_pos)

    def attend_paged(self, qkv: torch.Tensor, kv: PagedKVCache, layer: str, batch: PagedBatch,
                     rot=None) -> torch.Tensor:
        """The same for a packed batch of several sequences over a paged KV cache (the serving
        engine's step): the new K/V are written at their slots first, so a prefill chunk attends to
        itself, then each token attends to its own sequence's positions. (T, qkv cols) -> (T, nq hd)."""
        q, k, v = self.split_heads(qkv, positions=batch.positions, rot=rot)
        return self.attend_paged_heads(q, k, v, kv, layer, batch)

    def attend_paged_heads(self, q, k, v, kv: PagedKVCache, layer: str, batch: PagedBatch) -> torch.Tensor:
        """attend_paged from the heads, RoPE applied (split_heads): q (nq, T, hd), k, v (nkv, T, hd) -> (T, nq hd)."""
        kv.write(layer, k, v, batch.slot_mapping)
        ctx = kv.paged_attention(q, layer, batch, self.kv_map)  # (nq, T, hd)
        return ctx.transpose(0, 1).reshape(q.shape[1], self.nq * self.cfg.head_dim)

    def project_out(self, ctx: torch.Tensor) -> torch.Tensor:
        """Row-parallel output projection of a tile: (t, nq hd) -> partial sum (t, H), no bias."""
        return self.out(ctx)


class MLP(nn.Module):
    """Feed-forward over intermediate columns [c0, c1): up (and gate) column-split, down row-split."""

    def __init__(self, cfg: ModelConfig, c0: int, c1: int):
        super().__init__()
        self.act, self.gated = cfg.activation, cfg.gated_mlp
        c = c1 - c0
        self.up = nn.Linear(cfg.hidden, c, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.hidden, c, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.down = nn.Linear(c, cfg.hidden, bias=False)  # row-parallel: no bias here
        self.down_bias = nn.Parameter(torch.empty(cfg.hidden)) if cfg.mlp_bias else None
        # gate and up as one matrix [gate; up] (2c, H): one matmul instead of two. Set by whoever fuses
        # a loaded shard (parallel.compact), which then drops gate and up.
        self.gate_up: nn.Module | None = None

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(t, H) -> activated intermediate (t, c)."""
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)  # (t, c) each, views
            return activation(self.act, gate) * up
        if self.gated:
            return activation(self.act, self.gate(x)) * self.up(x)
        return activation(self.act, self.up(x))

    def contract(self, a: torch.Tensor) -> torch.Tensor:
        """(t, c) -> partial sum (t, H), no bias."""
        return self.down(a)


def add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


class Block(nn.Module):
    """One transformer layer: ATT -> CON1 -> MLP -> CON2 (connective = residual + norm)."""

    def __init__(self, cfg: ModelConfig, heads: tuple[int, int], cols: tuple[int, int]):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1, self.norm2 = Norm(cfg), Norm(cfg)
        self.attn = Attention(cfg, *heads)
        self.mlp = MLP(cfg, *cols)

    # Connective blocks, written once for pre- and post-norm layers. x is the residual stream.
    def attn_input(self, x):
        return self.norm1(x) if self.pre_norm else x

    def after_attn(self, x, attn_sum):
        y = add_bias(attn_sum, self.attn.out_bias)
        return x + y if self.pre_norm else self.norm1(x + y)

    def mlp_input(self, x):
        return self.norm2(x) if self.pre_norm else x

    def after_mlp(self, x, mlp_sum):
        y = add_bias(mlp_sum, self.mlp.down_bias)
        return x + y if self.pre_norm else self.norm2(x + y)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Unsharded layer (all heads, all columns) over all tokens: (S, H) -> (S, H)."""
        a = self.attn.project_out(self.attn.attend(self.attn.project(self.attn_input(x)), start_pos))
        x = self.after_attn(x, a)
        m = self.mlp.contract(self.mlp.expand(self.mlp_input(x)))
        return self.after_mlp(x, m)


class Embeddings(nn.Module):
    """Token rows [v0, v1) (vocab-parallel), plus replicated position/segment tables and norm."""

    def __init__(self, cfg: ModelConfig, v0: int, v1: int):
        super().__init__()
        self.cfg, self.v0, self.v1 = cfg, v0, v1
        self.tokens = nn.Parameter(torch.empty(v1 - v0, cfg.hidden))
        self.positions = (
            nn.Parameter(torch.empty(cfg.max_positions + cfg.position_offset, cfg.hidden))
            if cfg.position == "learned"
            else None
        )
        self.types = nn.Parameter(torch.empty(cfg.type_vocab_size, cfg.hidden)) if cfg.type_vocab_size else None
        self.norm = Norm(cfg) if cfg.embed_norm else None
        # the token rows in a compact format (a module with rows(ids) -> (t, H) float32, quant.QuantLinear
        # built with keep_rows), set by parallel.compact in place of `tokens`; None: `tokens` as loaded
        self.table: nn.Module | None = None

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings from this shard's rows: (t,) -> (t, H), zero rows for other shards' ids."""
        if self.v1 == self.v0:
            return self.tokens.new_zeros(ids.shape[0], self.cfg.hidden)  # no rows here (never compacted)
        inside = (ids >= self.v0) & (ids < self.v1)
        local = (ids - self.v0).clamp(0, self.v1 - self.v0 - 1)
        rows = self.table.rows(local) if self.table is not None else F.embedding(local, self.tokens)
        if self.v0 == 0 and self.v1 == self.cfg.vocab_size:  # the whole vocabulary: every id is inside
            return rows
        return rows * inside[:, None].to(rows.dtype)

    def finish(self, x: torch.Tensor, positions: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        """Add position and segment embeddings and normalise: a connective step on owned rows."""
        if self.positions is not None:
            x = x + self.positions[positions + self.cfg.position_offset]
        if self.types is not None:
            t = types if types is not None else torch.zeros_like(positions)
            x = x + self.types[t]
        return self.norm(x) if self.norm is not None else x


class Transformer(nn.Module):
    """A model or one device's shard of it, as described by a ShardSpec (sharding.py).

    `layers` is keyed by global layer index so a pipeline stage keeps the names it would have
    in the whole model. Built on the meta device; `sharding.load_shard` fills the weights.
    """

    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.dtype = torch.float32  # compute dtype, set by sharding.load_shard
        self.embed = Embeddings(cfg, *spec.vocab) if spec.embed else None
        self.layers = nn.ModuleDict(
            {str(i): Block(cfg, spec.heads, spec.cols) for i in range(*spec.layers)}
        )
        self.final_norm = Norm(cfg) if (spec.head and cfg.final_norm) else None
        self.lm_head = (
            nn.Parameter(torch.empty(spec.vocab[1] - spec.vocab[0], cfg.hidden))
            if (spec.head and cfg.causal)
            else None
        )
        # the LM head in a compact format (a module (t, H) -> (t, v) float32), set by parallel.compact in
        # place of `lm_head`; None: `lm_head` as loaded
        self.head: nn.Module | None = None

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden (t, H) -> logits over this shard's vocab rows (t, v)."""
        if self.head is not None:
            return self.head(h)
        return h @ self.lm_head.T

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, types: torch.Tensor | None = None, start_pos: int = 0,
                last_only: bool = False):
        """Reference forward of a whole model. Returns logits (S, V) -- (1, V) with last_only --
        or hidden states (S, H)."""
        if not self.spec.is_full(self.cfg):
            raise RuntimeError("the reference forward needs the whole model (a full ShardSpec)")
        pos = torch.arange(start_pos, start_pos + ids.shape[0])
        x = self.embed.finish(self.embed.lookup(ids), pos, types)
        for blk in self.layers.values():
            x = blk(x, start_pos)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if not self.cfg.causal:
            return x
        return self.head_logits(x[-1:] if last_only else x)


def mean_pool(hidden: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it: mean over tokens, L2-normalised."""
    return F.normalize(hidden.mean(0), dim=-1)

