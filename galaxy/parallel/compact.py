"""One device's shard in a compact weight format: its linear layers as QuantLinear slices of the whole.

`sharding.load_shard` cuts a shard's float32 weights from the canonical tensors; `compact_shard`
then puts every linear of its blocks (fused Q|K|V, output, gate, up, down) into a
`model.quant.WeightFormat`, so the device holds (and streams per token) the compact bytes, while
the per-rank forwards (`forward.py`) run unchanged: they call the modules, not their weights.

What makes a shard equal to the slice of the single-device model in the same format (the
parallel path's exactness is stated against that model, `compact_shard` of the full spec):

- weights: every format quantizes row by row (column-parallel cuts are free) and, along a row,
  in groups (int4: `group` columns) or per whole row (int8). Row-parallel weights (output, down)
  are cut along their inputs, so a cut must fall on `quant.split_granules` (checked here, with the
  numbers), and an int8 shard takes its rows' scales from the whole rows (`QuantLinear.slice`),
  read from the source: quantizing its own columns would give other scales.
- arithmetic: a row-parallel shard's output is a partial sum the collectives add in float32. The
  formats whose kernels return float32 (fp32, fp16, int4-fp32) therefore match the single device
  to float32 rounding; the bf16-output kernels (bf16, int8, int4 with bf16 activations) round each
  partial sum to bf16 before the addition, so a split model differs from the single device by
  about bf16's step of the partial sums: measured and reported, not claimed exact
  (`galaxy bench decode`, docs/decode-formats.md).

The embedding and the LM head stay as loaded (float32): their rows are vocabulary-parallel and
read by `Embeddings.lookup` and `Transformer.head_logits` directly.
Shapes as in quant.py: W (N, K), x (t, K).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..model.checkpoints import WeightSource
from ..model.quant import FormatError, QuantLinear, WeightFormat, split_granules
from ..model.transformer import Transformer
from .sharding import Partition, ShardSpec, Strategy


class CompactLinear(nn.Module):
    """A QuantLinear and the bias nn.Linear had (column-parallel biases are per output row)."""

    def __init__(self, q: QuantLinear, bias: torch.Tensor | None):
        super().__init__()
        self.q = q
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight the kernel multiplies by (for code that inspects shapes or bytes)."""
        return self.q.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (t, K) -> (t, N)
        y = self.q(x)
        return y if self.bias is None else y + self.bias


def check_cuts(cfg, spec: ShardSpec, fmt: WeightFormat) -> None:
    """Refuse a shard whose row-parallel cuts do not fall on the format's granules (quant.split_granules):
    its weights would not be the slice of the whole model's in `fmt`."""
    g = split_granules(cfg, fmt)
    for what, (a, b), unit in (("heads", spec.heads, g["heads"]), ("cols", spec.cols, g["cols"])):
        whole = cfg.n_heads if what == "heads" else cfg.ffn
        for cut in (a, b):
            if cut % unit and cut != whole:
                raise FormatError(f"weights format {fmt}: the shard's {what} cut at {cut} is not a multiple of "
                                  f"{unit} (split_granules); split {what} in multiples of {unit}")


def align_partition(cfg, partition: Partition, fmt: WeightFormat) -> Partition:
    """`partition` with its heads and columns cut on the format's granules (quant.split_granules): each
    cut point moved to the nearest multiple, the last staying at the whole, so a split derived from
    device speeds or memory (weighted, even) holds in `fmt`. Shares change by less than one granule."""
    if fmt.name == "fp32" or partition.strategy in (Strategy.PIPELINE, Strategy.SEQPAR):
        return partition
    g = split_granules(cfg, fmt)

    def align(counts: tuple[int, ...], unit: int, whole: int) -> tuple[int, ...]:
        cuts, acc = [], 0
        for c in counts[:-1]:
            acc += c
            cuts.append(min(whole, max(cuts[-1] if cuts else 0, round(acc / unit) * unit)))
        edges = [0, *cuts, whole]
        return tuple(b - a for a, b in zip(edges, edges[1:]))

    return dataclasses.replace(partition, heads=align(partition.heads, g["heads"], cfg.n_heads),
                               cols=align(partition.cols, g["cols"], cfg.ffn)).validate(cfg)


def _compact(lin: nn.Linear, fmt: WeightFormat) -> nn.Module:
    if lin.weight.numel() == 0:  # a device with no heads or columns: nothing to multiply
        return lin
    return CompactLinear(QuantLinear.from_float(lin.weight, fmt), lin.bias)


def _row_parallel(lin: nn.Linear, source: WeightSource | None, name: str, start: int, end: int,
                  fmt: WeightFormat) -> nn.Module:
    """The output / down projection: columns [start, end) of the whole weight `name`. int8 keeps its
    whole rows' scales (quantize the whole, then cut); every other format's groups are the shard's own."""
    if lin.weight.numel() == 0:
        return lin
    if fmt.name == "int8":
        if source is None:
            raise FormatError(f"weights format {fmt}: a row-parallel shard takes its rows' scales from the whole "
                              f"weight {name!r}, and this device has no checkpoint (push the shard in {fmt})")
        q = QuantLinear.from_float(source.get(name), fmt).slice(1, start, end)
    else:
        q = QuantLinear.from_float(lin.weight, fmt)
    return CompactLinear(q, lin.bias)


@torch.no_grad()
def compact_shard(model: Transformer, source: WeightSource | None, fmt: WeightFormat) -> Transformer:
    """Put the linear layers of a float32 shard (`sharding.load_shard`) into `fmt`, in place; returns it.
    fp32 leaves the shard as it is (the exact reference path)."""
    if fmt.name == "fp32":
        return model
    cfg, spec = model.cfg, model.spec
    if model.dtype != torch.float32:
        raise FormatError(f"weights format {fmt} quantizes from float32 shards, not {model.dtype}")
    check_cuts(cfg, spec, fmt)
    hd = cfg.head_dim
    for i, blk in model.layers.items():
        a, m = blk.attn, blk.mlp
        a.qkv = _compact(a.qkv, fmt)
        a.out = _row_parallel(a.out, source, f"layers.{i}.attn.wo", a.h0 * hd, a.h1 * hd, fmt)
        m.up = _compact(m.up, fmt)
        if m.gate is not None:
            m.gate = _compact(m.gate, fmt)
        m.down = _row_parallel(m.down, source, f"layers.{i}.mlp.w_down", *spec.cols, fmt)
    return model


def held_bytes(model: Transformer) -> int:
    """Weight bytes a compact shard holds: each linear's kernel bytes (QuantLinear.nbytes) and every
    other tensor (embedding, norms, biases; a tied head once)."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.nbytes
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            key = None if t is None else (t.data_ptr(), t.numel())  # a tied head is another Parameter object
            if t is not None and key not in seen:  # over the embedding's storage: counted once by its memory
                seen.add(key)
                total += t.numel() * t.element_size()
    return total
