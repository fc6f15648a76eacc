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

Every part is computed by the very quantizer `compact.compact_shard` runs (model/quant.py) on the
same float32 slice, and each scale and zero is exact in the dtype it travels in, so the shard built
from the parts is the one `compact_shard` builds on the device: pinned by the tests. The embedding,
LM head, norms and biases travel in float32, as compact shards hold them.
Shapes as in quant.py: W (N, K).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.quant import FormatError, QuantLinear, WeightFormat, quantize_int4_groups, quantize_int8_rows
from ..model.transformer import Transformer
from .compact import CompactLinear, check_cuts
from .sharding import ShardSpec, build_shard, meta_model

SEP = "#"  # never in a parameter name: marks a wire part of a linear
# a layer's linears (module path in a Block) -> the canonical tensor a row-parallel one is cut from
LINEARS = {"attn.qkv": "", "attn.out": "attn.wo", "mlp.up": "", "mlp.gate": "", "mlp.down": "mlp.w_down"}


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
    wire parts in `fmt` (one linear converted at a time; the coordinator holds no more than that)."""
    cfg = source.config
    check_cuts(cfg, spec, fmt)
    hd = cfg.head_dim
    for name, t, alias in items:
        lk = None if t is None or t.numel() == 0 else linear_key(name)
        if lk is None:
            yield name, t, alias
            continue
        idx, path = lk
        whole = None
        if fmt.name == "int8" and LINEARS[path]:  # row-parallel: the whole rows' scales
            start, end = (spec.heads[0] * hd, spec.heads[1] * hd) if path == "attn.out" else spec.cols
            whole = (source.get(f"layers.{idx}.{LINEARS[path]}"), start, end)
        for part, tensor in wire_parts(name, t, fmt, whole):
            yield part, tensor, ""


PARTS = {"bf16": 1, "fp16": 1, "int8": 2, "int4": 3}  # wire parts per linear


def wire_tensor_count(model: Transformer, fmt: WeightFormat) -> int:
    """Tensors a push of `model`'s shard (a meta model will do) announces in `fmt`: its state dict,
    each non-empty linear counted as its parts."""
    state = model.state_dict(keep_vars=True)
    extra = sum(PARTS[fmt.name] - 1 for k, v in state.items() if v.numel() and linear_key(k) is not None)
    return len(state) + extra


def is_compact_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a received shard holds wire parts (was pushed in a compact format)."""
    return any(SEP in k for k in state)


@torch.no_grad()
def build_compact(cfg, spec: ShardSpec, state: dict[str, torch.Tensor], fmt: WeightFormat,
                  device: str = "cpu") -> Transformer:
    """A device's compact shard from a pushed state: float32 tensors as `sharding.build_shard` takes
    them, and each linear as its wire parts. The linears' float32 weights never exist: the module
    tree is filled with a zero-stride placeholder for each, then each linear is replaced by the
    QuantLinear its parts make, one at a time, freeing the parts as it goes."""
    check_cuts(cfg, spec, fmt)
    parts = {k: state.pop(k) for k in list(state) if SEP in k}
    model = meta_model(cfg, spec)
    shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    keys = sorted({k.split(SEP)[0] for k in parts})
    for key in keys:
        if key not in shapes or linear_key(key) is None:
            raise FormatError(f"the pushed shard has wire parts for {key!r}, which is no linear of this shard")
        state[key] = torch.zeros((), dtype=torch.float32).expand(shapes[key])  # no storage behind it
    model = build_shard(model, state, torch.float32, device)
    for key in keys:
        idx, path = linear_key(key)
        owner, attr = path.split(".")
        block = getattr(model.layers[idx], owner)
        lin = getattr(block, attr)
        setattr(block, attr, CompactLinear(from_wire(parts, key, fmt), lin.bias))
    if parts:
        raise FormatError(f"the pushed shard has wire parts no linear took: {sorted(parts)[:4]}")
    return model
