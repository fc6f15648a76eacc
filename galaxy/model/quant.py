"""Compact weight formats: how a device keeps a linear's weight in memory and multiplies by it.

Decode is bound by reading the weights (one token touches every weight once), so a device that
keeps them in fewer bytes decodes proportionally faster. A `WeightFormat` names one of:

  fp32  float32, F.linear: the exact reference path.
  bf16  bfloat16 weights and activations, oneDNN's GEMM on a weight reordered once.
  fp16  float16 weights, float32 activations: fbgemm's packed fp16 GEMM.
  int8  int8 codes with one scale per output row, aten._weight_int8pack_mm, bf16 activations.
  int4  4-bit codes with a scale and zero per group of `group` inputs of each row, packed for
        aten._weight_int4pack_mm_for_cpu; activations in `act` (fp32 keeps a GGUF Q4_1 file exact).

The formats and kernels were chosen by measurement (galaxy/kernel_survey.py, whole-model
streaming); the report of issue #20 holds the figures.

Two ways in: `QuantLinear.from_float` quantizes a float32 weight at load (HF checkpoints, random
init), `QuantLinear.from_blocked` takes a GGUF file's own blocks (`Blocked`, see
checkpoints/gguf_blocks.py). int4pack dequantizes as w = (q - 8) * scale + zero per group, so a
Q4_1 block (w = q * d + m) maps onto it exactly with scale = d, zero = m + 8 d.

Split constraints (what a partitioner must respect for a shard to equal the slice of the
single-device weight in the same format, see `WeightFormat.alignment`):
  fp32, bf16, fp16  any row (N) and column (K) ranges.
  int8              any rows; with bf16 activations (int8pack) every shard's K a multiple of 16 (the
                    kernel reads K in vectors of 16 unchecked: other K give garbage or a segfault), so
                    columns cut at multiples of 16; the scale is per whole row: a column slice keeps
                    the whole row's scale (quantize the whole row, then cut: QuantLinear.slice).
  int4              columns cut at multiples of `group` (the groups are fixed on the whole
                    matrix); the packed layout is not sliceable, so a shard repacks its rows at
                    load, and a row count that is not a multiple of 16 is padded with zero rows.
  GGUF blocks       columns cut at multiples of 32 (Q4_1 / Q8_0 blocks) whatever the format.

Shapes: x (M, K) activations, W (N, K) as torch.nn.Linear, G = K / group.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GalaxyError
from .config import ModelConfig
from .dense_rows import ALL, int4_dense, int8_dense, kernel_index
from .int4_expand import expander

FORMAT_NAMES = ("fp32", "bf16", "fp16", "int8", "int4")
# Activations each format's kernels take: the first is the default. bf16: oneDNN's prepacked bf16 GEMM;
# fp16: fbgemm's packed fp16 GEMM (fp16 weights, float32 activations and accumulation);
# int8 + bf16: aten._weight_int8pack_mm (weight-only); int8 + int8: fbgemm's dynamic quantized linear
# (activations quantized per call, W8A8); int4 + bf16: aten._weight_int4pack_mm_for_cpu; int4 + fp32: the
# same kernel's exact but slow float32 path.
ACTIVATIONS = {"fp32": ("fp32",), "bf16": ("bf16",), "fp16": ("fp32",), "int8": ("bf16", "int8"),
               "int4": ("bf16", "fp32")}
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu accepts
INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs rows in multiples of 16
# aten._weight_int8pack_mm reads K in vectors of 16 without checking: with K = 24, 40 or 100 it returned inf /
# nan for one row and crashed the process for 5 rows (torch 2.13, measured), so K must be a multiple of this.
INT8PACK_K = 16
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


class FormatError(GalaxyError):
    """A weight format that cannot hold this weight or this slice; the message names both numbers."""


@dataclass(frozen=True)
class SplitAlignment:
    """Multiples a shard's cut points must fall on: rows (N, column-parallel) and columns (K, row-parallel)."""

    rows: int
    cols: int


@dataclass(frozen=True)
class WeightFormat:
    """How a device holds its linear weights, and which kernel multiplies by them.

    `act` is what the kernel computes with ("" = the format's default, ACTIVATIONS); `group` the
    inputs per scale of int4; `head` the spec (parse_format) of the embedding / LM-head matrix
    ("" = the default rule, `head_format`)."""

    name: str = "fp32"
    act: str = ""
    group: int = 32
    head: str = ""

    def __post_init__(self) -> None:
        if self.name not in FORMAT_NAMES:
            raise FormatError(f"weight format name={self.name!r} is not one of {FORMAT_NAMES}")
        if self.act == "":
            object.__setattr__(self, "act", ACTIVATIONS[self.name][0])
        if self.act not in ACTIVATIONS[self.name]:
            raise FormatError(f"weight format {self.name}: act={self.act!r} is not one of {ACTIVATIONS[self.name]}")
        if self.name == "int4" and self.group not in INT4_GROUPS:
            raise FormatError(f"weight format int4: group={self.group} is not one of {INT4_GROUPS}")
        if self.head:
            if ":" in self.head:
                raise FormatError(f"weight format {self.name}: head={self.head!r} cannot name a head of its own")
            parse_format(self.head)  # validated now, not mid-load

    @property
    def head_format(self) -> WeightFormat:
        """The embedding / LM head's format. By default int4 and int8 keep it in fp16: a vocabulary
        row's error shows directly in the logits, and on the measured machine fbgemm's fp16 kernel ran
        the 49152 x 576 head faster than int8pack or int4pack (see the report of issue #20)."""
        if self.head:
            return parse_format(self.head)
        return WeightFormat("fp16") if self.name in ("int4", "int8") else self

    @property
    def rows_format(self) -> WeightFormat:
        """The format an embedding's lookup table takes beside a head in this format: lookups read rows,
        which int4's packed weights do not give back, so under an int4 head the table is fp16 apart."""
        return WeightFormat("fp16") if self.name == "int4" else self

    @property
    def act_dtype(self) -> torch.dtype:
        """The dtype activations are handed to the kernel in (fbgemm's int8 kernel takes float32)."""
        return _DTYPES[self.act]

    def alignment(self) -> SplitAlignment:
        """Cut multiples for a shard to equal the slice of the whole weight in this format."""
        if self.name == "int4":
            return SplitAlignment(rows=1, cols=self.group)  # rows: any (padded to 16 inside)
        if self.name == "int8" and self.act == "bf16":
            return SplitAlignment(rows=1, cols=INT8PACK_K)
        return SplitAlignment(rows=1, cols=1)

    def bytes_per_weight(self, k: int) -> float:
        """Bytes streamed per weight of a row of k inputs, scales included (the planner's bytes/s model)."""
        if self.name in ("fp32", "bf16", "fp16"):
            return {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[self.name]
        if self.name == "int8":
            return 1.0 + (2.0 if self.act == "bf16" else 4.0) / k
        return 0.5 + 2 * (4 if self.act == "fp32" else 2) / self.group

    def __str__(self) -> str:
        parts = [self.name] + ([self.act] if self.act != ACTIVATIONS[self.name][0] else [])
        parts += [f"g{self.group}"] if self.name == "int4" and self.group != 32 else []
        return "-".join(parts) + (f":{self.head}" if self.head else "")


def split_granules(cfg: ModelConfig, fmt: WeightFormat, file_block: int = 1) -> dict[str, int]:
    """The unit each tensor-parallel split must be a multiple of, for every shard to hold exactly its slice
    of the single-device weights in `fmt` (and to read them from a file quantized in blocks of
    `file_block` inputs, 32 for GGUF's Q4_1 / Q8_0; 1 for float files):

      heads  query heads per device: the output projection is cut along its inputs at h * head_dim;
      cols   MLP columns per device: the down projection is cut along its inputs at these columns;
      vocab  vocabulary rows per device (the head is cut along its outputs: no constraint).

    Row (output) cuts never constrain: every format is row-local, and int4 pads its rows to 16. int8's
    scale is per whole row, so a column (input) shard needs the scale of the whole row: cut it from the
    quantized whole (QuantLinear.slice), not by quantizing its own columns."""
    unit = math.lcm(fmt.alignment().cols, file_block)
    return {"heads": unit // math.gcd(unit, cfg.head_dim), "cols": unit, "vocab": 1}


def decode_bytes(cfg: ModelConfig, fmt: WeightFormat) -> int:
    """Weight bytes one decode step of the whole model streams in `fmt` (the head once, tied or not):
    the planner's decode cost is this over the device's measured bytes/s."""
    hd, h = cfg.head_dim, cfg.hidden
    per_layer = [((cfg.n_heads + 2 * cfg.n_kv_heads) * hd, h), (h, cfg.n_heads * hd),
                 (cfg.ffn * (2 if cfg.gated_mlp else 1), h), (h, cfg.ffn)]
    layers = sum(n * k * fmt.bytes_per_weight(k) for n, k in per_layer) * cfg.n_layers
    return int(layers + cfg.vocab_size * h * fmt.head_format.bytes_per_weight(h))


def parse_format(spec: str) -> WeightFormat:
    """A `--weights-format` value -> WeightFormat: NAME[-ACT][-gGROUP][:HEAD], e.g. fp32, bf16, int8,
    int8-int8, int4, int4-fp32, int4-g64, int4:int8-int8 (HEAD: the embedding / LM head's format)."""
    body, _, head = spec.partition(":")
    name, *rest = body.split("-")
    kw: dict = {"head": head}
    for p in rest:
        if p in _DTYPES:
            kw["act"] = p
        elif p.startswith("g") and p[1:].isdigit():
            kw["group"] = int(p[1:])
        else:
            raise FormatError(f"weight format {spec!r}: unknown option {p!r} (an activation fp32 | bf16 | int8, "
                              "or gGROUP)")
    return WeightFormat(name, **kw)


@dataclass(frozen=True)
class Blocked:
    """A matrix kept as block-quantized codes: w[n, k] = codes[n, k] * scale[n, k // block] (+ offset[n, k // block]).

    The form llama.cpp's Q4_1 (codes 0..15, offset = min) and Q8_0 (signed codes, no offset)
    blocks take once split out of their bytes; slicing and row permutations act on codes and
    scales alike, so a shard is cut before anything is dequantized.
    """

    codes: torch.Tensor  # (N, K) uint8 or int8
    scale: torch.Tensor  # (N, K / block) float32
    offset: torch.Tensor | None  # (N, K / block) float32, or None
    block: int
    kind: str  # where the blocks came from, e.g. "q4_1", "q8_0"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32, computed as ggml does (q * d, then + m), so it equals gguf's dequantization."""
        n, k = self.codes.shape
        w = self.codes.to(torch.float32).view(n, k // self.block, self.block) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k)

    def slice(self, dim: int, start: int, end: int) -> Blocked:
        """Rows (dim 0) or columns (dim 1, on block boundaries) [start, end)."""
        if dim == 0:
            return Blocked(self.codes[start:end], self.scale[start:end],
                           None if self.offset is None else self.offset[start:end], self.block, self.kind)
        if start % self.block or end % self.block:
            raise FormatError(f"{self.kind} columns [{start}, {end}) do not fall on its {self.block}-column blocks")
        b0, b1 = start // self.block, end // self.block
        return Blocked(self.codes[:, start:end], self.scale[:, b0:b1],
                       None if self.offset is None else self.offset[:, b0:b1], self.block, self.kind)

    def take_rows(self, index: torch.Tensor) -> Blocked:
        """Rows in the order of `index` (a row permutation, such as the Q/K RoPE un-permutation)."""
        return Blocked(self.codes[index], self.scale[index],
                       None if self.offset is None else self.offset[index], self.block, self.kind)

    @staticmethod
    def cat(parts: list[Blocked]) -> Blocked:
        """Row-wise concatenation (fused Q|K|V, gate|up) of blocks of one kind."""
        first = parts[0]
        if any(p.kind != first.kind or p.block != first.block for p in parts):
            raise FormatError(f"cannot fuse blocks of kinds {[p.kind for p in parts]}")
        off = None if first.offset is None else torch.cat([p.offset for p in parts])
        return Blocked(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), off,
                       first.block, first.kind)


# ---- quantizers: float32 -> codes and scales, the same rules whichever device runs them ----

def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive x rounded up to the nearest value of `dtype` (a scale the kernel holds exactly and
    that still covers the range it was computed for), returned as float32."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    low = y.to(torch.float32) < x
    bumped = (y.view(torch.int16) + 1).view(dtype)  # next value up, for positive finite y
    return torch.where(low, bumped, y).to(torch.float32)


def quantize_int8_rows(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (N, K) -> codes (N, K) int8 in [-127, 127], scale (N,) float32 exact in
    `dtype` (the kernel's scale dtype), so every weight is within half a step of its code."""
    scale = round_up_to(w.abs().amax(1).clamp_min(1e-30) / 127, dtype)  # (N,)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4_groups(w: torch.Tensor, group: int, dtype: torch.dtype = torch.float32
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group (Q4_1's rule, in int4pack's terms): (N, K) -> codes (N, K) int32 in
    [0, 15], scale and zero (N, K/group) float32 exact in `dtype`, with w ~ (codes - 8) * scale + zero."""
    n, k = w.shape
    if k % group:
        raise FormatError(f"int4: K={k} is not a multiple of group={group}")
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = round_up_to(((hi - lo) / 15).clamp_min(1e-30), dtype)
    zero = (lo + 8 * scale).to(dtype).to(torch.float32)
    codes = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), scale, zero


# ---- kernels whose weights are opaque objects (oneDNN's prepacked bf16, fbgemm's int8) ----
# torch.compile cannot trace a call that takes such an object, so under compilation they run through one
# custom op that takes a handle to the object instead: opaque to the compiler, a direct call otherwise.
_OPAQUE: dict[int, tuple[str, object]] = {}
_handles = itertools.count()


def _run_opaque(kind: str, w, x: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 through an opaque packed weight."""
    if kind == "bf16":
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, None, "none", [], "").to(torch.float32)
    if kind == "fp16":
        return torch.ops.quantized.linear_dynamic_fp16(x.contiguous(), w)
    return torch.ops.quantized.linear_dynamic(x.contiguous(), w, True)  # reduce_range: safe without VNNI


@torch.library.custom_op("galaxy::opaque_linear", mutates_args=())
def opaque_linear(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    """x @ W^T for the opaque weight registered under `handle` (N = n)."""
    kind, w = _OPAQUE[handle]
    return _run_opaque(kind, w, x)


@opaque_linear.register_fake
def _(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


class QuantLinear(nn.Module):
    """y = x @ W^T with W (N, K) held in a compact format; x and y float32 (M, K) -> (M, N).

    No bias: the Llama family has none, and a row-parallel linear adds its bias after the
    reduction anyway (model.py). `dequantized()` gives the float32 weight the kernel multiplies
    by, which is what the format's exactness is measured against. Opaque kernels (bf16 and int8
    with int8 activations) hold only their packed object unless built with keep_rows=True, which
    also keeps the plain weight for row lookups (a tied embedding).
    """

    def __init__(self, fmt: WeightFormat, n: int, k: int, tensors: dict[str, torch.Tensor], packed=None):
        super().__init__()
        self.fmt, self.n, self.k = fmt, n, k
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=True)
        self.packed_obj, self.handle = packed, None
        self.scratch = None  # a Scratch (model/dense_rows.py) once a shard routes this linear's prompt rows dense
        if packed is not None:
            self.handle = next(_handles)
            _OPAQUE[self.handle] = (fmt.name, packed)
            weakref.finalize(self, _OPAQUE.pop, self.handle, None)

    # ---- construction ----

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: WeightFormat, keep_rows: bool = False) -> QuantLinear:
        """Quantize a float32 (N, K) weight at load."""
        w = w.detach().to(torch.float32)
        n, k = w.shape
        if fmt.name == "fp32":
            return cls(fmt, n, k, {"weight": w.contiguous()})
        if fmt.name == "bf16":
            wb = w.to(torch.bfloat16).contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(wb, 1)
            return cls(fmt, n, k, {"weight": wb} if keep_rows else {}, packed)
        if fmt.name == "fp16":
            wh = w.to(torch.float16).contiguous()
            packed = torch.ops.quantized.linear_prepack_fp16(wh.to(torch.float32), None)
            return cls(fmt, n, k, {"weight": wh} if keep_rows else {}, packed)
        if fmt.name == "int8":
            return cls._int8(fmt, *quantize_int8_rows(w, torch.float32 if fmt.act == "int8" else fmt.act_dtype),
                             keep_rows)
        return cls._int4(fmt, *quantize_int4_groups(w, fmt.group, fmt.act_dtype))

    @classmethod
    def from_blocked(cls, b: Blocked, fmt: WeightFormat, keep_rows: bool = False) -> QuantLinear:
        """From a GGUF file's blocks. Q4_1 into int4 (group 32) maps block for block (exact with fp32
        activations; with bf16 ones d and m + 8d are rounded to bf16); any other pair goes through the
        float32 values (exact for fp32, one rounding otherwise)."""
        if fmt.name == "int4" and b.kind == "q4_1" and fmt.group == b.block:
            scale = b.scale.to(fmt.act_dtype).to(torch.float32)
            zero = (b.offset + 8 * b.scale).to(fmt.act_dtype).to(torch.float32)  # w = (q - 8) d + (m + 8d)
            return cls._int4(fmt, b.codes.to(torch.int32), scale, zero)
        return cls.from_float(b.dequantize(), fmt, keep_rows)

    @classmethod
    def _int8(cls, fmt: WeightFormat, codes: torch.Tensor, scale: torch.Tensor, keep_rows: bool) -> QuantLinear:
        """codes (N, K) int8, scale (N,) float32 -> int8pack's plain tensors, or fbgemm's packed weight."""
        n, k = codes.shape
        if fmt.act == "bf16":
            if k % INT8PACK_K:
                raise FormatError(f"int8: K={k} is not a multiple of {INT8PACK_K} (int8pack's vector width); "
                                  "use int8-int8, bf16 or fp16 for this weight")
            return cls(fmt, n, k, {"codes": codes.contiguous(), "scale": scale.to(torch.bfloat16)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated; fbgemm's kernel still takes one
            qw = torch._make_per_channel_quantized_tensor(codes.contiguous(), scale.double(),
                                                          torch.zeros(n, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return cls(fmt, n, k, {"codes": codes, "scale": scale} if keep_rows else {}, packed)

    @classmethod
    def _int4(cls, fmt: WeightFormat, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QuantLinear:
        """codes (N, K) int32 in [0, 15], scale and zero (N, K/group) float32 -> packed module."""
        n, k = codes.shape
        if k % fmt.group:
            raise FormatError(f"int4: K={k} is not a multiple of group={fmt.group}")
        pad = -n % INT4_ROWS
        if pad:  # zero rows (scale 0, zero 0) make zero outputs, cut off after the matmul
            codes = torch.cat([codes, codes.new_full((pad, k), 8)])
            scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)  # (N+pad, K/2) uint8
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(fmt.act_dtype)  # (G, N+pad, 2)
        return cls(fmt, n, k, {"packed": packed, "scale_zero": sz})

    # ---- use ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.fmt.name
        if self.handle is not None:
            if torch.compiler.is_compiling():
                return torch.ops.galaxy.opaque_linear(x, self.handle, self.n)
            return _run_opaque(name, self.packed_obj, x)
        if name == "fp32":
            return F.linear(x, self.weight)
        if name == "int8":
            x = x.to(torch.bfloat16).contiguous()
            return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scale).to(torch.float32)
        x = x.to(self.fmt.act_dtype).contiguous()  # the kernel reads rows of x as one block
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.fmt.group, self.scale_zero)
        return (y if y.shape[1] == self.n else y[:, : self.n]).to(torch.float32)

    def routes_rows(self) -> bool:
        """Whether a pass's prompt rows run dense (model/dense_rows.py): int8 and int4 with bf16 activations
        (int8pack and int4pack are built for a few rows), once a shard gave it a `Scratch`
        (parallel/compact.py: a block's linears; not the LM head, whose rows are the logit rows); int4 only
        where its native expansion loaded (model/int4_expand.py), else every row keeps the kernel."""
        return self.scratch is not None and (self.fmt.name == "int8" or expander() is not None)

    @staticmethod
    def dense_capable(fmt: WeightFormat) -> bool:
        """Formats whose shards hold a `Scratch` for their prompt rows: int8 and int4 with bf16 activations.
        A property of the format, not of the machine, so the memory model counts the same bytes on the
        planner's host and on the device (an int4 device without the native expansion holds it unused)."""
        return fmt.name in ("int8", "int4") and fmt.act == "bf16"

    @staticmethod
    def scratch_rows(fmt: WeightFormat) -> int:
        """The multiple a linear's rows are padded to in its `Scratch`: int4pack's 16, else 1."""
        return INT4_ROWS if fmt.name == "int4" else 1

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for a block's linear within a pass: its prompt rows (model/dense_rows.py's rule) run a
        dense bf16 GEMM on its weight in bf16, its other rows the kernel. The GEMM takes the call's every
        row and the kernel's rows are then written over: a row's dense result does not depend on the rows
        beside it (model/dense_rows.py), and one GEMM on a few extra rows cost less than gathering the
        dense rows out and scattering them back (~100 us a linear, profiled in an 8-token pass)."""
        kernel = kernel_index(x.shape[0])  # first: a step of decodes (no pass to route) returns at once
        if kernel is ALL or not self.routes_rows():
            return self.forward(x)
        y = self._dense(x)
        if kernel is not None:
            y.index_copy_(0, kernel, self.forward(x.index_select(0, kernel)))
        return y

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, N) float32 through a dense bf16 GEMM on this weight: int8's codes, or
        int4's weight expanded (the kernel's float32 weight rounded once to bf16)."""
        x = x.to(torch.bfloat16)
        if self.fmt.name == "int8":
            return int8_dense(x, self.codes, self.scale, self.scratch, id(self)).to(torch.float32)
        y = int4_dense(x, self.packed, self.scale_zero, self.k, self.fmt.group, self.scratch, id(self))  # (M, Npad)
        return (y if y.shape[1] == self.n else y[:, : self.n]).to(torch.float32)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W as float32 (an embedding lookup from a tied LM head): (t,) -> (t, K)."""
        if hasattr(self, "weight"):
            return self.weight[ids].to(torch.float32)
        if hasattr(self, "codes"):
            return self.codes[ids].to(torch.float32) * self.scale[ids].to(torch.float32)[:, None]
        raise FormatError(f"this {self.fmt} weight holds no row table (int4, or an opaque kernel built without "
                          "keep_rows); keep the embedding in an int8, bf16 or fp32 head format")

    # ---- the weight back, whole or in part ----

    def _int8_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (N, K) int8 and scale (N,) float32 of an int8 weight."""
        if hasattr(self, "codes"):
            return self.codes, self.scale.to(torch.float32)
        qw, _ = torch.ops.quantized.linear_unpack(self.packed_obj)
        return qw.int_repr(), qw.q_per_channel_scales().to(torch.float32)

    def _int4_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (N, K) int32, scale and zero (N, K/group) float32 of an int4 weight, unpadded. The
        packed layout is the kernel's own, so the kernel unpacks it: on the identity, with scale 1
        and zero 8, it returns the codes (as torch's inductor does to repack these weights)."""
        k, g, npad = self.k, self.fmt.group, self.packed.shape[0]
        ones = torch.tensor([1.0, 8.0]).expand(k // g, npad, 2).contiguous()
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), self.packed, g, ones)  # (K, N+pad)
        sz = self.scale_zero.to(torch.float32)  # (K/g, N+pad, 2)
        return (codes.T[: self.n].round().to(torch.int32), sz[:, : self.n, 0].T.contiguous(),
                sz[:, : self.n, 1].T.contiguous())

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight this kernel multiplies by (its rounding of scales included)."""
        name = self.fmt.name
        if name == "fp32":
            return self.weight
        if name == "bf16":
            return (self.weight if hasattr(self, "weight") else self.packed_obj.to_dense()).to(torch.float32)
        if name == "fp16":
            if hasattr(self, "weight"):
                return self.weight.to(torch.float32)
            return torch.ops.quantized.linear_unpack_fp16(self.packed_obj)[0].to(torch.float32)
        if name == "int8":
            codes, scale = self._int8_parts()
            return codes.to(torch.float32) * scale[:, None]
        codes, scale, zero = self._int4_parts()
        g = self.fmt.group
        return (codes - 8).to(torch.float32) * scale.repeat_interleave(g, 1) + zero.repeat_interleave(g, 1)

    def slice(self, dim: int, start: int, end: int) -> QuantLinear:
        """Rows (dim 0, a column-parallel shard) or columns (dim 1, a row-parallel shard) [start, end) of
        this quantized weight, keeping its codes and scales: equal to slicing the dequantized weight.
        int4 columns must fall on groups; packed layouts are rebuilt (they cannot be cut)."""
        if not (0 <= start <= end <= (self.n, self.k)[dim]):
            raise FormatError(f"slice [{start}, {end}) of dim {dim} is out of 0..{(self.n, self.k)[dim]}")
        cut = (slice(start, end),) if dim == 0 else (slice(None), slice(start, end))
        name, keep = self.fmt.name, hasattr(self, "weight") or hasattr(self, "codes")
        if name in ("fp32", "bf16", "fp16"):  # 16-bit values are exact in float32, so this rounds nothing
            return QuantLinear.from_float(self.dequantized()[cut], self.fmt, keep)
        if name == "int8":  # the per-row scale belongs to every column of its row
            codes, scale = self._int8_parts()
            return QuantLinear._int8(self.fmt, codes[cut], scale[start:end] if dim == 0 else scale, keep)
        g = self.fmt.group
        if dim == 1 and (start % g or end % g):
            raise FormatError(f"int4 columns [{start}, {end}) do not fall on its groups of {g}")
        codes, scale, zero = self._int4_parts()
        gcut = cut if dim == 0 else (slice(None), slice(start // g, end // g))
        return QuantLinear._int4(self.fmt, codes[cut], scale[gcut], zero[gcut])

    @property
    def nbytes(self) -> int:
        """Bytes a matmul streams from memory: the kernel's weight and scales (not a kept row table)."""
        if self.handle is None:
            return sum(b.numel() * b.element_size() for b in self.buffers())
        if self.fmt.name in ("bf16", "fp16"):
            return self.n * self.k * 2
        return self.n * (self.k + 8)  # fbgemm int8: codes, + a scale and a column offset per row

    def extra_repr(self) -> str:
        return f"{self.k} -> {self.n}, {self.fmt}, {self.nbytes / 1e6:.2f} MB"
