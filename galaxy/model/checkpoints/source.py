"""The interface every weight source offers: canonical names, shapes and slices.

Every source speaks *canonical* tensor names and layouts, so sharding never needs to know the
file format. A source hands out slices (`get(name, dim, start, end)`), which lets a device read
only its own shard of a large checkpoint.

Canonical names and shapes (H hidden, F ffn, V vocab, P positions, hd head_dim,
nh query heads, nkv key/value heads); weights are [out, in] like torch.nn.Linear:

    embed.tokens            [V, H]
    embed.positions         [P + position_offset, H]       learned positions only
    embed.types             [type_vocab_size, H]          BERT segments only
    embed.norm.weight/bias  [H]                           embed_norm only
    layers.{i}.attn.wq      [nh*hd, H]    attn.bq   [nh*hd]     (bq/bk/bv: attn_bias only)
    layers.{i}.attn.wk      [nkv*hd, H]   attn.bk   [nkv*hd]
    layers.{i}.attn.wv      [nkv*hd, H]   attn.bv   [nkv*hd]
    layers.{i}.attn.wo      [H, nh*hd]    attn.bo   [H]         (bo: out_bias only)
    layers.{i}.mlp.w_up     [F, H]        mlp.b_up  [F]         (biases: mlp_bias only)
    layers.{i}.mlp.w_gate   [F, H]        mlp.b_gate [F]        gated_mlp only
    layers.{i}.mlp.w_down   [H, F]        mlp.b_down [H]
    layers.{i}.norm1.weight/bias  [H]     norm before attention (pre-norm) or after its residual
    layers.{i}.norm2.weight/bias  [H]     the same around the MLP; RMSNorm has no bias
    final_norm.weight/bias  [H]                           final_norm only
    lm_head                 [V, H]                        causal and not tie_embeddings

Q and K rows follow Hugging Face's rotate-half RoPE layout (GGUF files are un-permuted on load).
All tensors are returned as float32 torch tensors that own their storage (a slice holds only its
bytes, never the whole tensor it was cut from).
"""

from __future__ import annotations

import abc

import torch

from ...errors import GalaxyError
from ..config import ModelConfig


class CheckpointError(GalaxyError, ValueError):
    """A checkpoint that is missing, malformed or of an unsupported kind; names the file."""


class WeightSource(abc.ABC):
    """Lazy access to a model's canonical tensors, sliced on request."""

    config: ModelConfig
    path: str  # where the weights come from ("random:PRESET" for random init)

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Canonical names this source provides."""

    @abc.abstractmethod
    def _load(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """Tensor `name` sliced to [start, end) along `dim` (already bounds-checked)."""

    def shape(self, name: str) -> tuple[int, ...]:
        return expected_shapes(self.config)[name]

    def get(self, name: str, dim: int = 0, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Canonical tensor `name` as float32, optionally sliced to [start, end) along `dim`."""
        shapes = expected_shapes(self.config)
        if name not in shapes:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in a {self.config.family} model")
        full = shapes[name]
        s = 0 if start is None else start
        e = full[dim] if end is None else end
        if not 0 <= s <= e <= full[dim]:
            raise CheckpointError(f"{self.path}: slice [{s}, {e}) of {name} dim {dim} is out of 0..{full[dim]}")
        t = self._load(name, dim, s, e)
        want = full[:dim] + (e - s,) + full[dim + 1 :]
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{self.path}: tensor {name} has shape {tuple(t.shape)}, expected {want} for this config"
            )
        t = t.to(torch.float32)
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            # a slice that is a view of the whole tensor (a column cut read as whole rows) would keep
            # the whole tensor alive in the shard: a GGUF device held 234 MiB for a 128 MiB shard
            t = t.clone(memory_format=torch.contiguous_format)
        return t

    def tokenizer(self):
        """The model's `galaxy.model.tokenizer.Tokenizer`, or None when the source has none."""
        return None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor this config needs, with its full shape."""
    H, F, V, hd = cfg.hidden, cfg.ffn, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    s: dict[str, tuple[int, ...]] = {"embed.tokens": (V, H)}
    if cfg.position == "learned":
        s["embed.positions"] = (cfg.max_positions + cfg.position_offset, H)
    if cfg.type_vocab_size:
        s["embed.types"] = (cfg.type_vocab_size, H)
    norm_names = ["norm1", "norm2"]

    def norm(prefix: str) -> None:
        s[f"{prefix}.weight"] = (H,)
        if cfg.norm == "layernorm":
            s[f"{prefix}.bias"] = (H,)

    if cfg.embed_norm:
        norm("embed.norm")
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        s[p + "attn.wq"], s[p + "attn.wk"], s[p + "attn.wv"] = (q, H), (kv, H), (kv, H)
        if cfg.attn_bias:
            s[p + "attn.bq"], s[p + "attn.bk"], s[p + "attn.bv"] = (q,), (kv,), (kv,)
        s[p + "attn.wo"] = (H, q)
        if cfg.out_bias:
            s[p + "attn.bo"] = (H,)
        s[p + "mlp.w_up"], s[p + "mlp.w_down"] = (F, H), (H, F)
        if cfg.gated_mlp:
            s[p + "mlp.w_gate"] = (F, H)
        if cfg.mlp_bias:
            s[p + "mlp.b_up"], s[p + "mlp.b_down"] = (F,), (H,)
            if cfg.gated_mlp:
                s[p + "mlp.b_gate"] = (F,)
        for n in norm_names:
            norm(p + n)
    if cfg.final_norm:
        norm("final_norm")
    if cfg.causal and not cfg.tie_embeddings:
        s["lm_head"] = (V, H)
    return s
