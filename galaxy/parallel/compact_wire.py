"""A compact shard on the wire: pushed in its weights format, built on the device from those parts.

A shard streamed from the coordinator (`LoadOptions.stream`, transport/shardstore.py) used to travel
as float32 and be put in its format on the device, so an int4 shard crossed the link at 6.4x the
bytes it is held in, and the device held the float32 shard while converting it. Here the coordinator
puts every linear of the shard in the format before it sends it, as plain tensors the push already
carries (so it is still received in bounded chunks straight into its final tensors, hashed and
cached like any shard), and the device builds its `QuantLinear`s from them:

  format   parts of a linear `key` (N, K), sent instead of its float32 weight
  bf16     key#w16    (N, K) bfloat16
  fp16     key#w16    (N, K) float16
  int8     key#codes  (N, K) int8,  key#scale (N,) float32 (the whole row's, for a row-parallel cut)
  int4     key#codes  (N, K/2) uint8, two 4-bit codes a byte (column 2j low, 2j+1 high),
           key#scale, key#zero (N, K/group) in the activation dtype (bf16; fp32 for int4-fp32)

The parts of a linear are those of the matrix `compact.compact_shard` holds: gate and up go as one
stacked linear `layers.{i}.mlp.gate_up` ([gate; up], MLP.gate_up), and a GGUF file's Q4_1 blocks go
into int4 as their own codes, scales and zeros (`compact.file_blocks`, the file-loaded shard's path).
Every other part is computed by the very quantizer `compact_shard` runs (model/quant.py) on the same
float32 slice, and each scale and zero is exact in the dtype it travels in, so the shard built from
the parts is, bit for bit, the one `compact_shard` builds on a device with the file: pinned by the
tests. The embedding, LM head, norms and biases travel in float32; the device puts the embedding and
head in the format's head format with `compact.compact_vocab`, as `compact_shard` does.
Shapes as in quant.py: W (N, K).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.quant import Blocked, FormatError, QuantLinear, WeightFormat, quantize_int4_groups, quantize_int8_rows
from ..model.transformer import Transformer
from .compact import CompactLinear, attach_scratch, check_cuts, compact_vocab, file_blocks, linear_cuts
from .sharding import ShardSpec, build_shard, meta_model

SEP = "#"  # never in a parameter name: marks a wire part of a linear
# The layout's version, in the key a worker caches a pushed compact shard under (transport/client.push_shards):
# a shard an older Galaxy pushed in another layout (gate and up apart, before gate_up) is then not found and
# pushed again, where it was taken from the cache and refused at load ("wire parts for ...mlp.gate...")
LAYOUT_VERSION = 2
# a layer's linears (module path in a Block) -> the canonical tensor a row-parallel one is cut from: those of
# a float32 shard (gate and up apart) and the stacked gate_up a compact shard holds and a push carries
LINEARS = {"attn.qkv": "", "attn.out": "attn.wo", "mlp.up": "", "mlp.gate": "", "mlp.gate_up": "",
           "mlp.down": "mlp.w_down"}


def linear_key(key: str) -> tuple[str, str] | None:
    """(layer index, module path) of a state-dict key that is a linear's weight, else None."""
    if not key.startswith("layers.") or not key.endswith(".weight"):
        return None
    _, idx, rest = key.split(".", 2)
    path = rest[: -len(".weight")]
    return (idx, path) if path in LINEARS else None


def _int8_dtype(fmt: WeightFormat) -> torch.dtype:
    """The dtype int8 scales are exact in: the kernel's (bf16 for int8pack, float32 for fbgemm)."""
    return torch.float32 if fmt.act == "int8" else fmt.act_dtype


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8, column 2j in the low nibble and 2j+1 in the high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) int32 codes (pack_nibbles' inverse)."""
    return torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).to(torch.int32)


def wire_parts(key: str, w: torch.Tensor, fmt: WeightFormat, whole: tuple[torch.Tensor, int, int] | None = None
               ) -> list[tuple[str, torch.Tensor]]:
    """The parts a float32 (N, K) linear weight `key` travels as in `fmt`. `whole`: for an int8
    row-parallel weight, (the whole weight, first column, end column) of the shard's cut, whose rows'
    scales it keeps (compact._row_parallel)."""
    if fmt.name in ("bf16", "fp16"):
        return [(key + SEP + "w16", w.to(torch.bfloat16 if fmt.name == "bf16" else torch.float16))]
    if fmt.name == "int8":
        if whole is not None:
            full, start, end = whole
            codes, scale = quantize_int8_rows(full.to(torch.float32), _int8_dtype(fmt))
            codes = codes[:, start:end].contiguous()
        else:
            codes, scale = quantize_int8_rows(w, _int8_dtype(fmt))
        return [(key + SEP + "codes", codes), (key + SEP + "scale", scale)]
    if fmt.name == "int4":
        codes, scale, zero = quantize_int4_groups(w, fmt.group, fmt.act_dtype)
        return [(key + SEP + "codes", pack_nibbles(codes)), (key + SEP + "scale", scale.to(fmt.act_dtype)),
                (key + SEP + "zero", zero.to(fmt.act_dtype))]
    raise FormatError(f"weights format {fmt} has no wire form: fp32 shards travel as they are")


def blocked_parts(key: str, b: Blocked, fmt: WeightFormat) -> list[tuple[str, torch.Tensor]]:
    """The int4 parts of a GGUF file's Q4_1 blocks, as QuantLinear.from_blocked maps them: the codes as
    stored, scale d and zero m + 8d (w = (q - 8) d + (m + 8d)) rounded to the activation dtype."""
    return [(key + SEP + "codes", pack_nibbles(b.codes)), (key + SEP + "scale", b.scale.to(fmt.act_dtype)),
            (key + SEP + "zero", (b.offset + 8 * b.scale).to(fmt.act_dtype))]


def from_wire(parts: dict[str, torch.Tensor], key: str, fmt: WeightFormat) -> QuantLinear:
    """The QuantLinear of `key` from its wire parts (taken out of `parts`, so each is freed once used)."""
    try:
        if fmt.name in ("bf16", "fp16"):
            w16 = parts.pop(key + SEP + "w16")
            return QuantLinear.from_float(w16.to(torch.float32), fmt)
        if fmt.name == "int8":
            codes, scale = parts.pop(key + SEP + "codes"), parts.pop(key + SEP + "scale")
            return QuantLinear._int8(fmt, codes, scale.to(torch.float32), False)
        codes = unpack_nibbles(parts.pop(key + SEP + "codes"))
        scale, zero = parts.pop(key + SEP + "scale"), parts.pop(key + SEP + "zero")
        return QuantLinear._int4(fmt, codes, scale.to(torch.float32), zero.to(torch.float32))
    except KeyError as e:
        raise FormatError(f"the pushed shard has no {fmt} part {e.args[0]!r}: it was pushed in another "
                          "weights format") from None


def compact_items(items: Iterator, source, spec: ShardSpec, fmt: WeightFormat) -> Iterator:
    """A shard's (name, tensor | None, alias) push items with every non-empty linear replaced by its
    wire parts in `fmt`, gate and up as one stacked `mlp.gate_up` (one linear converted at a time; the
    coordinator holds no more than that and a layer's gate or up waiting for the other)."""
    cfg = source.config
    check_cuts(cfg, spec, fmt)
    waiting: dict[tuple[str, str], torch.Tensor] = {}  # (layer, path): a layer's gate or up, until the other comes
    for name, t, alias in items:
        lk = None if t is None or t.numel() == 0 else linear_key(name)
        if lk is None:
            yield name, t, alias
            continue
        idx, path = lk
        if cfg.gated_mlp and path in ("mlp.gate", "mlp.up"):
            waiting[idx, path] = t
            if (idx, "mlp.gate") not in waiting or (idx, "mlp.up") not in waiting:
                continue
            t = torch.cat([waiting.pop((idx, "mlp.gate")), waiting.pop((idx, "mlp.up"))])  # (2c, H)
            path = "mlp.gate_up"
            name = f"layers.{idx}.{path}.weight"
        cuts = linear_cuts(cfg, spec, f"layers.{idx}.")[path]
        blocks = file_blocks(source, fmt, cuts)
        if blocks is not None:
            yield from ((part, tensor, "") for part, tensor in blocked_parts(name, blocks, fmt))
            continue
        whole = None
        if fmt.name == "int8" and LINEARS[path]:  # row-parallel: the whole rows' scales
            (_, _, start, end), = cuts
            whole = (source.get(f"layers.{idx}.{LINEARS[path]}"), start, end)
        for part, tensor in wire_parts(name, t, fmt, whole):
            yield part, tensor, ""
    if waiting:
        raise FormatError(f"the shard's items have {sorted(waiting)} without its pair: gate and up go together")


PARTS = {"bf16": 1, "fp16": 1, "int8": 2, "int4": 3}  # wire parts per linear


def wire_tensor_count(model: Transformer, fmt: WeightFormat) -> int:
    """Tensors a push of `model`'s shard (a meta model will do) announces in `fmt`: its state dict,
    each non-empty linear counted as its parts, a layer's gate and up as the parts of one gate_up."""
    state = model.state_dict(keep_vars=True)
    linears = [linear_key(k)[1] for k, v in state.items() if v.numel() and linear_key(k) is not None]
    return len(state) + sum(-1 if path == "mlp.gate" else PARTS[fmt.name] - 1 for path in linears)


def is_compact_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a received shard holds wire parts (was pushed in a compact format)."""
    return any(SEP in k for k in state)


@torch.no_grad()
def build_compact(cfg, spec: ShardSpec, state: dict[str, torch.Tensor], fmt: WeightFormat,
                  device: str = "cpu") -> Transformer:
    """A device's compact shard from a pushed state: float32 tensors as `sharding.build_shard` takes
    them, and each linear as its wire parts (gate and up as one gate_up). The linears' float32 weights
    never exist: the module tree is filled with a zero-stride placeholder for each, then each linear is
    replaced by the QuantLinear its parts make, one at a time, freeing the parts as it goes; last, the
    embedding and LM head go into the head format (`compact.compact_vocab`), as `compact_shard` puts them."""
    check_cuts(cfg, spec, fmt)
    parts = {k: state.pop(k) for k in list(state) if SEP in k}
    model = meta_model(cfg, spec)
    shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    keys = sorted({k.split(SEP)[0] for k in parts})
    for key in keys:
        lk = linear_key(key)
        held = [key]  # the float32 shard's weights the parts stand for: a gate_up's gate and up
        if lk and lk[1] == "mlp.gate_up":
            held = [key.replace("gate_up", "gate"), key.replace("gate_up", "up")]
        if lk is None or lk[1] == "mlp.gate" or any(k not in shapes for k in held):
            raise FormatError(f"the pushed shard has wire parts for {key!r}, which is no linear of this shard")
        for k in held:
            state[k] = torch.zeros((), dtype=torch.float32).expand(shapes[k])  # no storage behind it
    model = build_shard(model, state, torch.float32, device)
    for key in keys:
        idx, path = linear_key(key)
        owner, attr = path.split(".")
        block = getattr(model.layers[idx], owner)
        q = from_wire(parts, key, fmt)
        if attr == "gate_up":  # [gate; up] (2c, H), biases stacked alike
            bias = None if block.gate.bias is None else torch.cat([block.gate.bias, block.up.bias])
            block.gate_up, block.gate, block.up = CompactLinear(q, bias), None, None
        else:
            setattr(block, attr, CompactLinear(q, getattr(block, attr).bias))
    if parts:
        raise FormatError(f"the pushed shard has wire parts no linear took: {sorted(parts)[:4]}")
    compact_vocab(model, fmt.head_format)
    attach_scratch(model, fmt)
    return model
