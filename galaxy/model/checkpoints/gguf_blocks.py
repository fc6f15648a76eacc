"""GGUF tensors as their quantized blocks: a shard's rows of Q4_1 / Q8_0 codes and scales, never fp32.

`GGUFCheckpoint.get` dequantizes to float32 (what the fp32 reference needs). A device that runs a
compact weight format wants the file's own blocks instead, so that a Q4_1 matrix becomes a 4-bit
packed weight with the very same values, without a 540 MB float32 detour. This module reads the
bytes of a row range from the memory-mapped file and splits them into a `quant.Blocked`:

  Q4_1 (20 bytes per 32 values): fp16 d, fp16 m, 16 bytes of nibbles -- element j in the low
       nibble of byte j, element j+16 in the high nibble; w = q * d + m, q in [0, 15].
  Q8_0 (34 bytes per 32 values): fp16 d, 32 int8; w = q * d.

Blocks run along a row (the K, input, dimension), so a row range is a byte range and column
ranges must start and end on a block boundary. Q/K rows are un-permuted here as in gguf.py: the
permutation moves whole rows, and every row is quantized on its own, so permuting codes and
scales row-wise gives exactly the blocks of the un-permuted matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..quant import Blocked
from .gguf import _PERMUTED, GGUFCheckpoint, unpermute_rows
from .source import CheckpointError

BLOCK = 32
# type -> (bytes per block, has a per-block minimum)
_LAYOUT = {GGMLQuantizationType.Q4_1: (20, True), GGMLQuantizationType.Q8_0: (34, False)}


def blocked_types() -> tuple[str, ...]:
    """GGML type names this module reads as blocks (others load through the float path)."""
    return tuple(t.name for t in _LAYOUT)


def _parse(raw: np.ndarray, ttype: GGMLQuantizationType, cols: int) -> Blocked:
    """raw: (n, K/32 * bytes) uint8 rows of one tensor -> Blocked (codes (n, K), scales (n, K/32))."""
    size, has_min = _LAYOUT[ttype]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, cols // BLOCK, size)  # (n, K/32, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (n, K/32)
    if has_min:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]  # (n, K/32, 16)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)  # (n, K) in [0, 15]
        return Blocked(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m), BLOCK, "q4_1")
    codes = blocks[..., 2:].copy().view(np.int8).reshape(n, -1)  # (n, K) in [-127, 127]
    return Blocked(torch.from_numpy(codes), torch.from_numpy(d), None, BLOCK, "q8_0")


def tensor_type(ckpt: GGUFCheckpoint, name: str) -> str:
    """The GGML type name of canonical tensor `name` in the file (F32, Q4_1, Q8_0, ...)."""
    return ckpt._tensors[ckpt._gguf_names[name]].tensor_type.name


def read_blocked(ckpt: GGUFCheckpoint, name: str, dim: int = 0, start: int | None = None,
                 end: int | None = None) -> Blocked | None:
    """Canonical tensor `name` sliced to [start, end) along `dim`, as the file's blocks.

    None when the tensor is not stored in a blocked type this module reads (F32 norms, or a
    type to load through the float path). Column slices (dim 1) must fall on block boundaries.
    """
    t = ckpt._tensors[ckpt._gguf_names[name]]
    if t.tensor_type not in _LAYOUT or len(t.shape) != 2:
        return None
    rows, cols = t.shape
    s = 0 if start is None else start
    e = (rows if dim == 0 else cols) if end is None else end
    if not 0 <= s <= e <= (rows if dim == 0 else cols):
        raise CheckpointError(f"{ckpt.path}: slice [{s}, {e}) of {name} dim {dim} is out of range")
    if dim == 1 and (s % BLOCK or e % BLOCK):
        raise CheckpointError(
            f"{ckpt.path}: columns [{s}, {e}) of {name} ({t.tensor_type.name}) do not fall on its "
            f"{BLOCK}-element blocks; a row-parallel split of a GGUF matrix must cut at multiples of {BLOCK}"
        )
    r0, r1 = (s, e) if dim == 0 else (0, rows)
    permuted = name.endswith(_PERMUTED)
    if permuted:  # whole heads of rows, un-permuted, then the slice
        hd = ckpt.config.head_dim
        h0, h1 = r0 // hd, -(-r1 // hd)
        b = _parse(t.data[h0 * hd : h1 * hd], t.tensor_type, cols)
        order = unpermute_rows(torch.arange(h1 * hd - h0 * hd), hd)  # new row i = old row order[i]
        b = b.take_rows(order).slice(0, r0 - h0 * hd, r1 - h0 * hd)
    else:
        b = _parse(t.data[r0:r1], t.tensor_type, cols)
    return b.slice(1, s, e) if dim == 1 else b
