"""A low-overhead single-device forward for the Llama family, on compact weights: the decode prototype.

The reference `Transformer` is written for clarity and for the parallel forwards (a Python call
per block step, a paged KV cache); at one token per step that overhead, not arithmetic, was most
of its time. The engine path has since taken over most of what this prototype showed (compact
shards fuse gate|up and hold a compact head, RoPE is computed once per pass: docs/decode-formats.md,
"The engine path's decode step"). `LlamaDecoder` runs the same model with:

- weights in a `WeightFormat` (quant.py), fused: one Q|K|V matrix and one gate|up matrix per
  layer, so a layer is four matmuls;
- a KV cache preallocated at a fixed capacity, (nkv, capacity, hd) per layer, written in place;
- RoPE cos/sin read from a table built once for the capacity;
- GQA attention by grouping query heads onto their KV head (a view, no index_select copy);
- optionally the whole step compiled with torch.compile (dynamic sequence length, so one
  graph serves every position), falling back to eager when compilation is not possible.

It is a prototype for one device: a paged KV store and the sharded path are separate work.
Shapes: S tokens, H hidden, nq/nkv heads, g = nq / nkv, hd head_dim, F ffn, V vocab, C capacity.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GalaxyError
from .checkpoints import WeightSource
from .checkpoints.gguf import GGUFCheckpoint
from .checkpoints.gguf_blocks import read_blocked, tensor_type
from .config import ModelConfig
from .quant import Blocked, QuantLinear, WeightFormat, parse_format

log = logging.getLogger(__name__)


def rope_table(cfg: ModelConfig, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (C, hd) for positions [0, C), computed as model.rope computes them (same floats)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    angles = torch.arange(capacity).float()[:, None] * inv_freq[None, :]  # (C, hd/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, one fused op (model.Norm's arithmetic, the same floats measured)."""
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class DecoderLayer(nn.Module):
    """One Llama layer's weights: norms, fused Q|K|V, output, fused gate|up, down."""

    def __init__(self, norm1: torch.Tensor, qkv: QuantLinear, out: QuantLinear, norm2: torch.Tensor,
                 gate_up: QuantLinear, down: QuantLinear):
        super().__init__()
        self.register_buffer("norm1", norm1)
        self.register_buffer("norm2", norm2)
        self.qkv, self.out, self.gate_up, self.down = qkv, out, gate_up, down


class LlamaDecoder(nn.Module):
    """A whole Llama-family model on one device, with its KV cache, for prefill and decode."""

    def __init__(self, cfg: ModelConfig, fmt: WeightFormat, layers: list[DecoderLayer], embed: QuantLinear,
                 head: QuantLinear, final_norm: torch.Tensor, capacity: int):
        super().__init__()
        if cfg.family != "llama":
            raise GalaxyError(f"the decode prototype runs the llama family, not {cfg.family}")
        self.cfg, self.fmt, self.capacity = cfg, fmt, capacity
        self.layers = nn.ModuleList(layers)
        self.embed, self.head = embed, head  # the same module when the head is tied
        self.register_buffer("final_norm", final_norm)
        cos, sin = rope_table(cfg, capacity)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        # One K and one V buffer per layer, (nkv, C, hd): under torch.compile a write into a buffer that
        # later layers also write would be functionalized into a copy of the whole buffer per layer.
        shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k_cache = [torch.zeros(shape) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(shape) for _ in range(cfg.n_layers)]
        self.length = 0  # positions held in the cache
        self._compiled = None  # the compiled one-token step, once compile() succeeded
        self.use_compiled = False  # decode steps run it when set (compile() sets it)
        self.compile_seconds = 0.0

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held (the tied head once): what one decode step streams."""
        mods = {id(m): m for m in self.modules() if isinstance(m, QuantLinear)}
        return sum(m.nbytes for m in mods.values())

    # ---- the forward ----

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE. x (n, S, hd), cos/sin (S, hd)."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _attend(self, i: int, q: torch.Tensor, start: int, s: int) -> torch.Tensor:
        """Layer i's attention of q (nq, S, hd) over cached positions [0, start + S) -> (S, nq hd)."""
        cfg = self.cfg
        nkv, g, hd = cfg.n_kv_heads, cfg.group, cfg.head_dim
        k = self.k_cache[i][:, : start + s]  # (nkv, L, hd), a view
        v = self.v_cache[i][:, : start + s]
        if s == 1:  # decode: query heads grouped onto their KV head, no copies
            qg = q.view(nkv, g, hd)  # (nkv, g, hd)
            att = torch.softmax((qg @ k.transpose(1, 2)) * (1.0 / math.sqrt(hd)), dim=-1)  # (nkv, g, L)
            return (att @ v).view(1, cfg.n_heads * hd)
        mask = None
        if start:  # a chunk after cached positions: query j sees keys [0, start + j]
            mask = torch.arange(start + s)[None, :] <= torch.arange(start, start + s)[:, None]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not start, enable_gqa=g > 1)
        return ctx.transpose(0, 1).reshape(s, cfg.n_heads * hd)  # (S, nq hd)

    def _forward(self, ids: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """ids (S,) at positions [start, start + S) -> logits (S or 1, V); K/V written to the cache."""
        cfg = self.cfg
        s, nq, nkv, hd, eps = ids.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        cos, sin = self.cos[start : start + s], self.sin[start : start + s]  # (S, hd)
        x = self.embed.rows(ids)  # (S, H)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.norm1, eps))  # (S, (nq + 2 nkv) hd)
            qk, v = qkv.split([(nq + nkv) * hd, nkv * hd], dim=-1)
            qk = self._rope(qk.view(s, nq + nkv, hd).transpose(0, 1), cos, sin)  # (nq + nkv, S, hd): one rotation
            self.k_cache[i][:, start : start + s] = qk[nq:]
            self.v_cache[i][:, start : start + s] = v.view(s, nkv, hd).transpose(0, 1)
            x = x + layer.out(self._attend(i, qk[:nq], start, s))
            gu = layer.gate_up(rms_norm(x, layer.norm2, eps))  # (S, 2F)
            gate, up = gu.chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        h = rms_norm(x if all_logits else x[-1:], self.final_norm, eps)
        return self.head(h)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int | None = None, all_logits: bool = False) -> torch.Tensor:
        """Run tokens `ids` (S,) after the cached ones; returns the last token's logits (V,), or
        every token's (S, V) with all_logits. Decode steps (S = 1) use the compiled step if any."""
        start = self.length if start is None else start
        s = ids.shape[0]
        if start != self.length:
            raise GalaxyError(f"the cache holds {self.length} positions, the tokens start at {start}")
        if start + s > self.capacity:
            raise GalaxyError(f"{start} cached + {s} new positions exceed the cache capacity {self.capacity}")
        step = self._compiled if (self.use_compiled and s == 1 and not all_logits) else self._forward
        out = step(ids, start, all_logits)
        self.length = start + s
        return out if all_logits else out[-1]

    def reset(self) -> None:
        """Forget the cached positions (the buffers stay allocated)."""
        self.length = 0

    # ---- compilation ----

    def compile(self, warmup_positions: int = 2) -> bool:
        """Compile the one-token step with torch.compile (dynamic length: one graph for every
        position). Returns whether it compiled; on failure the eager step stays, and the reason is
        logged. Warm-up steps run on a scratch position and leave the cache as it was."""
        # Dynamo keys its graphs on the code object, which every decoder shares: each one compiled adds
        # its own (two: the first position's, then the symbolic-length one) to the shared budget.
        torch._dynamo.config.recompile_limit += warmup_positions + 1
        try:
            step = torch.compile(self._forward, dynamic=True, fullgraph=True)
            t0 = time.perf_counter()
            ids = torch.zeros(1, dtype=torch.long)  # an ordinary tensor, as callers pass (not an inference one)
            with torch.inference_mode():
                for p in range(warmup_positions):  # two lengths: the symbolic-shape graph
                    step(ids, self.capacity - warmup_positions + p)
            self.compile_seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - no compiler, an unsupported op: eager still works
            log.warning("torch.compile of the decode step failed, running eagerly: %s", str(e).splitlines()[0])
            return False
        self._compiled, self.use_compiled = step, True
        return True


# ---- loading: canonical weights (float or a GGUF file's blocks) -> fused compact modules ----

def _read(source: WeightSource, name: str) -> Blocked | torch.Tensor:
    """A whole canonical matrix as the file's blocks when it has them, else as float32."""
    if isinstance(source, GGUFCheckpoint):
        b = read_blocked(source, name)
        if b is not None:
            return b
    return source.get(name)


# A GGUF's layer type -> the format it runs in by default (as llama.cpp would run the file: compact).
# Q4_1 maps onto int4 block for block; Q8_0 goes to fp16, which holds its values to 2^-12 and ran faster
# than int8pack here (int8 would requantize per row); 16-bit files keep their type; other quantizations
# are dequantized once into fp16.
_NATIVE = {"Q4_1": "int4", "Q8_0": "fp16", "F16": "fp16", "BF16": "bf16", "F32": "fp32"}


def native_format(source: WeightSource) -> WeightFormat:
    """The format a source runs in when none is asked for: a quantized GGUF in its compact counterpart,
    anything else (HF checkpoints, random init) in fp32, the exact reference."""
    if not isinstance(source, GGUFCheckpoint):
        return WeightFormat("fp32")
    kind = tensor_type(source, "layers.0.mlp.w_up")
    return parse_format(_NATIVE.get(kind, "fp16"))


def fused_linear(source: WeightSource, names: list[str], fmt: WeightFormat, keep_rows: bool = False) -> QuantLinear:
    """Matrices `names` stacked row-wise (fused Q|K|V, gate|up) into one compact linear."""
    parts = [_read(source, n) for n in names]
    if all(isinstance(p, Blocked) for p in parts) and len({p.kind for p in parts}) == 1:
        return QuantLinear.from_blocked(Blocked.cat(parts), fmt, keep_rows)
    dense = [p.dequantize() if isinstance(p, Blocked) else p for p in parts]
    return QuantLinear.from_float(torch.cat(dense), fmt, keep_rows)


def load_decoder(source: WeightSource, fmt: WeightFormat, capacity: int = 2048) -> LlamaDecoder:
    """Build the decode prototype from any weight source in `fmt` (the fp32 path is the reference)."""
    cfg = source.config
    if cfg.family != "llama" or cfg.attn_bias or cfg.mlp_bias:
        raise GalaxyError(f"the decode prototype runs bias-free llama models, not {cfg.name or cfg.family}")
    capacity = min(capacity, cfg.max_positions)
    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        layers.append(DecoderLayer(
            source.get(p + "norm1.weight"),
            fused_linear(source, [p + "attn.wq", p + "attn.wk", p + "attn.wv"], fmt),
            fused_linear(source, [p + "attn.wo"], fmt),
            source.get(p + "norm2.weight"),
            fused_linear(source, [p + "mlp.w_gate", p + "mlp.w_up"], fmt),
            fused_linear(source, [p + "mlp.w_down"], fmt),
        ))
    hf = fmt.head_format
    ef = hf.rows_format
    embed = fused_linear(source, ["embed.tokens"], ef, keep_rows=True)
    if cfg.tie_embeddings and ef == hf:
        head = embed
    else:
        head = fused_linear(source, ["embed.tokens" if cfg.tie_embeddings else "lm_head"], hf)
    return LlamaDecoder(cfg, fmt, layers, embed, head, source.get("final_norm.weight"), capacity).eval()
