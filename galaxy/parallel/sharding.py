"""Sharding rules: who holds which heads, MLP columns, vocabulary rows, layers and tokens.

`Partition` is a cluster-wide layout for one strategy; `ShardSpec` is one device's part of it.
`load_shard` builds a device's `Transformer` and fills it from a `WeightSource` through one
style table (torchtitan/gpt-fast style): every parameter of a block is either column-split
by heads or columns, row-split, vocabulary-split or replicated. Nothing here talks to a network.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..errors import GalaxyError
from ..model.config import ModelConfig
from ..model.transformer import Transformer


class Strategy(str, Enum):
    """How a model is split over devices; a `Partition` holds one (its docstring says what each does).

    A str enum: it compares equal to its name ("galaxy"), which is what plans, JSON and the CLI write.
    """

    GALAXY = "galaxy"  # HMP: attention/MLP tensor-parallel, connective blocks sequence-parallel
    MEGATRON = "megatron"  # tensor parallelism, every token on every device, AllReduce joins
    PIPELINE = "pipeline"  # contiguous layers per device
    SEQPAR = "seqpar"  # the whole model everywhere, tokens split

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def splits_tokens(self) -> bool:
        """Whether the connective blocks (and so `Partition.tokens`) split the sequence."""
        return self in (Strategy.GALAXY, Strategy.SEQPAR)


STRATEGIES = tuple(s.value for s in Strategy)

# A device with no heads or columns builds zero-size weights, and torch's initialisers warn about
# each. The filter is installed once, here, because `warnings.catch_warnings` is not thread-safe:
# around every build it raced with the in-process workers' threads and let the warning through.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors")


class PartitionError(GalaxyError, ValueError):
    """A layout that does not fit the model; the message names the field and both numbers."""


@dataclass(frozen=True)
class ShardSpec:
    """One device's part of the model; all ranges half-open [start, end)."""

    heads: tuple[int, int]  # query heads
    cols: tuple[int, int]  # MLP intermediate columns
    vocab: tuple[int, int]  # embedding / LM-head rows
    layers: tuple[int, int]  # transformer layers held (all of them, except for pipeline stages)
    embed: bool = True  # holds (its rows of) the embedding tables
    head: bool = True  # holds the final norm and (its rows of) the LM head

    def is_full(self, cfg: ModelConfig) -> bool:
        return self == full_spec(cfg)


def full_spec(cfg: ModelConfig) -> ShardSpec:
    return ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (0, cfg.n_layers))


def last_token_rank(tokens) -> int:
    """The device whose token rows end the sequence (the last with any): it alone computes the
    prefill's last-token logits."""
    return max((r for r, x in enumerate(tokens) if x > 0), default=len(tokens) - 1)


def split_even(total: int, n: int) -> list[int]:
    """total split into n integers differing by at most one, larger ones first."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def split_weighted(total: int, weights) -> list[int]:
    """total split in proportion to weights (largest remainder); zero weight gets zero."""
    w = [float(x) for x in weights]
    if not w or min(w) < 0 or sum(w) <= 0:
        raise PartitionError(f"weights {w} must be non-negative with a positive sum")
    exact = [total * x / sum(w) for x in w]
    out = [int(e) for e in exact]
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - out[i]), -w[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def ranges(counts) -> list[tuple[int, int]]:
    """Counts -> contiguous half-open ranges in device order."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def _whole(x) -> int:
    """A count read from a plan file: an integer, or a float with no fraction (3.0), never rounded."""
    n = int(x)  # ValueError / OverflowError / TypeError for text, inf, nan, None: a malformed partition
    if n != x and not isinstance(x, str):
        raise ValueError(f"{x!r} is not a whole number")
    return n


@dataclass(frozen=True)
class Partition:
    """A whole cluster's layout for one strategy. Lists are per device, in ring order.

    galaxy:   heads/cols/vocab split (unevenly), tokens split by seq_weights, all layers everywhere.
    megatron: heads/cols/vocab split, every device sees every token (AllReduce joins).
    pipeline: whole layers per device (layers counts); device 0 embeds, the last one decodes.
    seqpar:   the whole model on every device, tokens split by seq_weights (K/V all-gathered).
    """

    strategy: Strategy
    heads: tuple[int, ...]
    cols: tuple[int, ...]
    vocab: tuple[int, ...]
    layers: tuple[int, ...]
    seq_weights: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        except ValueError:
            raise PartitionError(f"strategy={self.strategy!r} is not one of {STRATEGIES}") from None

    @property
    def world(self) -> int:
        return len(self.heads)

    def validate(self, cfg: ModelConfig) -> Partition:
        n = self.world

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PartitionError(f"partition ({self.strategy}, {n} devices): {msg}")

        need(n >= 1, "needs at least one device")
        for name in ("cols", "vocab", "layers"):
            need(len(getattr(self, name)) == n, f"{name} has {len(getattr(self, name))} entries, heads has {n}")
        for name in ("heads", "cols", "vocab", "layers"):
            need(min(getattr(self, name)) >= 0, f"{name}={list(getattr(self, name))} has a negative entry")
        if self.strategy == Strategy.PIPELINE:
            need(sum(self.layers) == cfg.n_layers, f"layers sum to {sum(self.layers)}, model has {cfg.n_layers}")
            return self
        if self.strategy == Strategy.SEQPAR:
            need(len(self.seq_weights) == n and min(self.seq_weights) >= 0 and sum(self.seq_weights) > 0,
                 f"seq_weights={list(self.seq_weights)} needs one non-negative weight per device, positive sum")
            return self
        need(sum(self.heads) == cfg.n_heads, f"heads sum to {sum(self.heads)}, model has {cfg.n_heads}")
        need(sum(self.cols) == cfg.ffn, f"cols sum to {sum(self.cols)}, model has ffn={cfg.ffn}")
        need(sum(self.vocab) == cfg.vocab_size, f"vocab sums to {sum(self.vocab)}, model has {cfg.vocab_size}")
        if self.strategy == Strategy.GALAXY:
            need(len(self.seq_weights) == n, f"seq_weights has {len(self.seq_weights)} entries, need {n}")
            need(min(self.seq_weights) >= 0 and sum(self.seq_weights) > 0,
                 f"seq_weights={list(self.seq_weights)} must be non-negative with a positive sum")
        return self

    def to_dict(self) -> dict:
        return {"strategy": self.strategy.value, "heads": list(self.heads), "cols": list(self.cols),
                "vocab": list(self.vocab), "layers": list(self.layers), "seq_weights": list(self.seq_weights)}

    @classmethod
    def from_dict(cls, d: dict) -> Partition:
        try:
            counts = (tuple(_whole(x) for x in d[k]) for k in ("heads", "cols", "vocab", "layers"))
            return cls(str(d["strategy"]), *counts, tuple(float(x) for x in d.get("seq_weights", ())))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise PartitionError(f"malformed partition {d!r}: {e}") from None

    def spec(self, rank: int, cfg: ModelConfig) -> ShardSpec:
        if self.strategy == Strategy.SEQPAR:
            return full_spec(cfg)
        if self.strategy == Strategy.PIPELINE:
            lo, hi = ranges(self.layers)[rank]
            return ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size), (lo, hi),
                             embed=rank == 0, head=rank == self.world - 1)
        return ShardSpec(ranges(self.heads)[rank], ranges(self.cols)[rank], ranges(self.vocab)[rank],
                         (0, cfg.n_layers))

    def work_shares(self, cfg: ModelConfig) -> list[float]:
        """Each device's fraction of a layer's GEMM work, what its measured time is compared with
        when the split is re-balanced: heads and MLP columns weighted by their flops (layers for a
        pipeline, tokens for seqpar). seq_weights alone would not do: the planner's are token counts."""
        if self.strategy == Strategy.PIPELINE:
            return [x / cfg.n_layers for x in self.layers]
        if self.strategy == Strategy.SEQPAR:
            return [w / sum(self.seq_weights) for w in self.seq_weights]
        per_head = (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * cfg.hidden / cfg.n_heads  # q,k,v,out
        per_col = (3 if cfg.gated_mlp else 2) * cfg.hidden
        total = per_head * cfg.n_heads + per_col * cfg.ffn
        return [(per_head * h + per_col * c) / total for h, c in zip(self.heads, self.cols)]

    def tokens(self, seq_len: int) -> list[int]:
        """Rows of a seq_len sequence owned by each device in the connective blocks."""
        if not self.strategy.splits_tokens:
            raise PartitionError(f"{self.strategy} does not split the sequence")
        return split_weighted(seq_len, self.seq_weights)


def seqpar_partition(cfg: ModelConfig, weights) -> Partition:
    """The whole model on every device; tokens in proportion to the weights."""
    n = len(weights)
    return Partition(Strategy.SEQPAR, (cfg.n_heads,) * n, (cfg.ffn,) * n, (cfg.vocab_size,) * n, (cfg.n_layers,) * n,
                     tuple(float(w) for w in weights)).validate(cfg)


def even_partition(cfg: ModelConfig, n: int, strategy: Strategy | str = Strategy.GALAXY) -> Partition:
    """The trivial plan: everything split as evenly as integers allow."""
    strategy = Strategy(strategy)
    if strategy == Strategy.SEQPAR:
        return seqpar_partition(cfg, [1.0] * n)
    if strategy == Strategy.PIPELINE:
        return Partition(Strategy.PIPELINE, (cfg.n_heads,) * n, (cfg.ffn,) * n, (cfg.vocab_size,) * n,
                         tuple(split_even(cfg.n_layers, n))).validate(cfg)
    return weighted_partition(cfg, [1.0] * n, strategy)


def weighted_partition(cfg: ModelConfig, weights, strategy: Strategy | str = Strategy.GALAXY) -> Partition:
    """Heads, columns, vocabulary rows and tokens in proportion to per-device weights."""
    w = list(weights)
    return Partition(
        strategy,
        tuple(split_weighted(cfg.n_heads, w)),
        tuple(split_weighted(cfg.ffn, w)),
        tuple(split_weighted(cfg.vocab_size, w)),
        (cfg.n_layers,) * len(w),
        tuple(float(x) for x in w) if strategy == Strategy.GALAXY else (),
    ).validate(cfg)


# Style table: how each parameter of a shard is cut from canonical tensors.
#   q_rows/kv_rows/f_rows: column-parallel (rows of the [out, in] weight)
#   q_cols/f_cols: row-parallel (columns)      vocab: vocabulary rows      None: replicated
_LAYER_STYLE = {
    "attn.qkv.weight": (("attn.wq", "q_rows"), ("attn.wk", "kv_rows"), ("attn.wv", "kv_rows")),
    "attn.qkv.bias": (("attn.bq", "q_rows"), ("attn.bk", "kv_rows"), ("attn.bv", "kv_rows")),
    "attn.out.weight": (("attn.wo", "q_cols"),),
    "attn.out_bias": (("attn.bo", None),),
    "mlp.up.weight": (("mlp.w_up", "f_rows"),),
    "mlp.up.bias": (("mlp.b_up", "f_rows"),),
    "mlp.gate.weight": (("mlp.w_gate", "f_rows"),),
    "mlp.gate.bias": (("mlp.b_gate", "f_rows"),),
    "mlp.down.weight": (("mlp.w_down", "f_cols"),),
    "mlp.down_bias": (("mlp.b_down", None),),
    "norm1.weight": (("norm1.weight", None),),
    "norm1.bias": (("norm1.bias", None),),
    "norm2.weight": (("norm2.weight", None),),
    "norm2.bias": (("norm2.bias", None),),
}
_TOP_STYLE = {
    "embed.tokens": ("embed.tokens", "vocab"),
    "embed.positions": ("embed.positions", None),
    "embed.types": ("embed.types", None),
    "embed.norm.weight": ("embed.norm.weight", None),
    "embed.norm.bias": ("embed.norm.bias", None),
    "final_norm.weight": ("final_norm.weight", None),
    "final_norm.bias": ("final_norm.bias", None),
}


def _cuts(cfg: ModelConfig, spec: ShardSpec, block: torch.nn.Module | None) -> dict:
    hd = cfg.head_dim
    cuts = {"vocab": (0, *spec.vocab), None: None}
    if block is not None:
        a = block.attn
        cuts.update(
            q_rows=(0, a.h0 * hd, a.h1 * hd), kv_rows=(0, a.kv0 * hd, a.kv1 * hd),
            q_cols=(1, a.h0 * hd, a.h1 * hd), f_rows=(0, *spec.cols), f_cols=(1, *spec.cols),
        )
    return cuts


def _read(source, name: str, cut) -> torch.Tensor:
    return source.get(name) if cut is None else source.get(name, *cut)


def iter_shard_state(source, spec: ShardSpec, model: Transformer):
    """(key, tensor) for every entry of `model`'s state dict (built for `spec`), one at a time,
    cut from the source's canonical tensors. A tied LM head yields (key, None): it is the
    embedding's tensor, held once."""
    cfg = source.config
    top_cuts = _cuts(cfg, spec, None)
    # the module lists its own parameter (lm_head) before its children's (embed.tokens): whether the
    # head is the embedding's tensor is the spec's to say, not the order the keys come in
    has_embed = spec.embed and "embed.tokens" in model.state_dict(keep_vars=True)
    for key in model.state_dict(keep_vars=True):
        if key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            cuts = _cuts(cfg, spec, model.layers[idx])
            parts = [_read(source, f"layers.{idx}.{name}", cuts[style]) for name, style in _LAYER_STYLE[rest]]
            yield key, parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        elif key == "lm_head":
            if cfg.tie_embeddings and has_embed:
                yield key, None
            else:
                yield key, _read(source, "embed.tokens" if cfg.tie_embeddings else "lm_head", top_cuts["vocab"])
        else:
            name, style = _TOP_STYLE[key]
            yield key, _read(source, name, top_cuts[style])


def shard_state(source, spec: ShardSpec, model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict of `model` (built for `spec`), cut from the source's canonical tensors."""
    state = dict(iter_shard_state(source, spec, model))
    if state.get("lm_head", 0) is None:
        state["lm_head"] = state["embed.tokens"]  # tied: one tensor, held once
    return state


def load_shard(source, spec: ShardSpec, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """Build one device's model for `spec` and load only its slice of the weights."""
    model = meta_model(source.config, spec)
    return build_shard(model, shard_state(source, spec, model), dtype, device)


def build_shard(model: Transformer, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> Transformer:
    """Fill a meta-device `model` with `state` (its exact state dict), moved to dtype and device.

    Tensors are moved one at a time and taken out of `state` as they go, so a conversion (float32
    received, bfloat16 held) holds the rest of the received shard and one converted tensor, never
    two whole shards (galaxy.parallel.memory.load_transient_bytes counts it)."""
    model.dtype = dtype
    moved: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # id of a source tensor -> its move (a tied head is moved once)
    for k in list(state):
        v = state.pop(k)
        if id(v) not in done:
            done[id(v)] = v.to(device=device, dtype=dtype)
        moved[k] = done[id(v)]
        del v
    if model.cfg.tie_embeddings and "lm_head" in moved and "embed.tokens" in moved:
        moved["lm_head"] = moved["embed.tokens"]  # one tensor, however the state held it
    model.load_state_dict(moved, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def meta_model(cfg: ModelConfig, spec: ShardSpec) -> Transformer:
    """The module tree for `spec` with no storage behind it (zero-size shards allowed)."""
    with torch.device("meta"):
        return Transformer(cfg, spec)


def shard_bytes(cfg: ModelConfig, spec: ShardSpec, dtype: torch.dtype = torch.float32) -> int:
    """Weight bytes a device holds for `spec` (tied head counted once)."""
    model = meta_model(cfg, spec)
    n = sum(p.numel() for p in model.parameters())
    if model.lm_head is not None and model.embed is not None and cfg.tie_embeddings:
        n -= model.lm_head.numel()
    return n * torch.empty((), dtype=dtype).element_size()
