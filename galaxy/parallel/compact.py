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

What a compact shard does beyond holding its weights in the format, for the step's cost at one
token (issue #20, "fast decode"; measured in docs/decode-formats.md):

- gate and up become one matrix [gate; up] (`MLP.gate_up`): one matmul per layer instead of two.
  Every format quantizes row by row, so the fused matrix's rows are exactly the two matrices' rows.
- the embedding and the LM head (vocabulary-parallel rows; 49152 x 576 in SmolLM2, the largest
  matrix, which every decode step streams whole) go into `fmt.head_format` (fp16 under int4 and int8,
  the format itself otherwise), as the compact decoder (model/decode.py) holds them: the LM head as
  `Transformer.head`, the embedding as `Embeddings.table` (its rows kept for lookups; a 4-bit head
  cannot give rows back, so an int4 head keeps its embedding in fp16 apart). Row slices of these
  formats are exact, so a vocabulary shard holds exactly its rows of the single device's head.
- a GGUF file's Q4_1 matrices go into int4 block for block on the shard's cuts (`_from_file`), the
  weights the compact decoder holds, rather than requantizing their float32 values.

Shapes as in quant.py: W (N, K), x (t, K).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..model.checkpoints import WeightSource
from ..model.checkpoints.gguf import GGUFCheckpoint
from ..model.checkpoints.gguf_blocks import read_blocked, tensor_type
from ..model.dense_rows import Scratch
from ..model.int4_expand import expander
from ..model.numerics import warn_unless_strict
from ..model.quant import Blocked, FormatError, QuantLinear, WeightFormat, split_granules
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
        # no hooks on it: skip nn.Module's call machinery, 120 times a decode step; a pass's prompt rows
        # may run dense (model/dense_rows.py)
        y = self.q.forward_rows(x)
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
    if fmt.act == "bf16":  # bf16 activations: a sequence's tokens in a batch are its bits alone (model/numerics.py)
        warn_unless_strict(f"weights format {fmt}")
    for i, blk in model.layers.items():
        a, m, p = blk.attn, blk.mlp, f"layers.{i}."
        cuts = linear_cuts(cfg, spec, p)
        a.qkv = _from_file(source, fmt, a.qkv, cuts["attn.qkv"]) or _compact(a.qkv, fmt)
        (wo, _, q0, q1), = cuts["attn.out"]
        a.out = _from_file(source, fmt, a.out, cuts["attn.out"]) or _row_parallel(a.out, source, wo, q0, q1, fmt)
        if m.gate is not None and m.up.weight.numel():
            gate_up = _stacked(m.gate, m.up)
            m.gate_up = _from_file(source, fmt, gate_up, cuts["mlp.gate_up"]) or _compact(gate_up, fmt)
            m.gate = m.up = None
        else:
            m.up = _from_file(source, fmt, m.up, cuts["mlp.up"]) or _compact(m.up, fmt)
        (wd, _, c0, c1), = cuts["mlp.down"]
        m.down = _from_file(source, fmt, m.down, cuts["mlp.down"]) or _row_parallel(m.down, source, wd, c0, c1, fmt)
    compact_vocab(model, fmt.head_format)
    attach_scratch(model, fmt)
    return model


def attach_scratch(model: Transformer, fmt: WeightFormat) -> None:
    """Give the blocks' int8 / int4 linears one `Scratch` sized to the largest (model/dense_rows.py), so a
    pass's prompt rows run dense; held as `model.dense_scratch` and counted in `held_bytes`. The LM head
    gets none: its rows are the logit rows, which run the kernel anyway. int4 builds (or finds in the
    cache) its native expansion now, not at the first prompt (model/int4_expand.py)."""
    qs = [mod.q for mod in model.modules() if isinstance(mod, CompactLinear)]
    if not QuantLinear.dense_capable(fmt) or not qs:
        return
    model.dense_scratch = Scratch.size_for([(q.n, q.k) for q in qs], QuantLinear.scratch_rows(fmt))
    if fmt.name == "int4":
        expander()
    for q in qs:
        q.scratch = model.dense_scratch


def linear_cuts(cfg, spec: ShardSpec, prefix: str) -> dict[str, list[tuple[str, int, int, int]]]:
    """Each compact linear of one layer of `spec` (module path in a Block, `prefix` "layers.{i}.") as the
    (canonical name, dim, start, end) cuts it is stacked from row-wise: fused Q|K|V (the KV heads its query
    heads read, as model.Attention takes them), the output projection, [gate; up] (or up), down. One
    truth for `compact_shard` and the wire (parallel/compact_wire.py), which must cut alike."""
    hd, g = cfg.head_dim, cfg.group
    h0, h1 = spec.heads
    kv0, kv1 = (h0 // g, -(-h1 // g)) if h1 > h0 else (0, 0)
    q, kv, c, p = (h0 * hd, h1 * hd), (kv0 * hd, kv1 * hd), spec.cols, prefix
    cuts = {"attn.qkv": [(p + "attn.wq", 0, *q), (p + "attn.wk", 0, *kv), (p + "attn.wv", 0, *kv)],
            "attn.out": [(p + "attn.wo", 1, *q)], "mlp.up": [(p + "mlp.w_up", 0, *c)],
            "mlp.down": [(p + "mlp.w_down", 1, *c)]}
    if cfg.gated_mlp:
        cuts["mlp.gate_up"] = [(p + "mlp.w_gate", 0, *c), (p + "mlp.w_up", 0, *c)]
    return cuts


def file_blocks(source: WeightSource | None, fmt: WeightFormat, parts) -> Blocked | None:
    """The shard's cuts `parts` ((name, dim, start, end) each) of canonical matrices, stacked row-wise,
    as a GGUF file's Q4_1 blocks that map block for block into int4 of `fmt` (group 32). None when the
    source, the format or a tensor's type do not map so: the float path then."""
    if not (isinstance(source, GGUFCheckpoint) and fmt.name == "int4"):
        return None
    if any(tensor_type(source, name) != "Q4_1" for name, *_ in parts):
        return None
    blocks = Blocked.cat([read_blocked(source, name, dim, a, b) for name, dim, a, b in parts])
    return blocks if blocks.block == fmt.group else None


def _from_file(source: WeightSource, fmt: WeightFormat, lin: nn.Linear, parts) -> CompactLinear | None:
    """`file_blocks` of the cuts straight into int4: the codes as stored (QuantLinear.from_blocked), as the
    compact decoder loads them, instead of requantizing their float32 values (another scale and zero
    wherever a block's codes miss 0 or 15). None when they do not map so."""
    blocks = file_blocks(source, fmt, parts) if lin.weight.numel() else None
    return None if blocks is None else CompactLinear(QuantLinear.from_blocked(blocks, fmt), lin.bias)


def _stacked(gate: nn.Linear, up: nn.Linear) -> nn.Linear:
    """[gate; up] as one linear (2c, H), biases stacked alike (MLP.gate_up)."""
    lin = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None, device="meta")
    lin.weight = nn.Parameter(torch.cat([gate.weight, up.weight]), requires_grad=False)
    if gate.bias is not None:
        lin.bias = nn.Parameter(torch.cat([gate.bias, up.bias]), requires_grad=False)
    return lin


def compact_vocab(model: Transformer, hf: WeightFormat) -> None:
    """The embedding rows and the LM head of a shard into `hf` (WeightFormat.head_format), in place: the
    head as `model.head`, the embedding as `model.embed.table` (one module for both when the head is tied
    and `hf` keeps rows; an int4 head gets an fp16 table apart). A shard without vocabulary rows keeps
    its empty tensors."""
    rows_fmt = hf.rows_format
    table = None
    if model.embed is not None and model.embed.tokens.numel():
        table = QuantLinear.from_float(model.embed.tokens, rows_fmt, keep_rows=True)
        model.embed.table, model.embed.tokens = table, None
    if model.lm_head is not None and model.lm_head.numel():
        tied = model.cfg.tie_embeddings and table is not None and rows_fmt == hf
        model.head = table if tied else QuantLinear.from_float(model.lm_head, hf)
        model.lm_head = None


def held_bytes(model: Transformer) -> int:
    """Weight bytes a compact shard holds: each linear's kernel bytes (QuantLinear.nbytes) and any row
    table it keeps for lookups, every other tensor (norms, biases; a tied head once), and the scratch its
    prompt rows dequantize into (`attach_scratch`)."""
    seen, total = set(), 0
    scratch = getattr(model, "dense_scratch", None)
    total += scratch.nbytes if scratch is not None else 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):  # an opaque kernel's kept row table is held beside its packed weight
            total += mod.nbytes + (sum(b.numel() * b.element_size() for b in mod.buffers())
                                   if mod.handle is not None else 0)
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            key = None if t is None else (t.data_ptr(), t.numel())  # a tied head is another Parameter object
            if t is not None and key not in seen:  # over the embedding's storage: counted once by its memory
                seen.add(key)
                total += t.numel() * t.element_size()
    return total
