"""Lossy activation codecs for slow links: bf16/fp16 casts and group-wise int8 (pure torch).

fp32 is exact and the default. int8 keeps one float32 scale per INT8_GROUP consecutive values of
a row (like GGUF's Q8_0): per-row scales drown in the outlier channels of LLM activations.

fp32 is also narrowed, losslessly: a float32 tensor whose every value is a bfloat16 value (its low 16
bits zero) travels as those bfloat16 values, half the bytes, and is widened back bit for bit (`exact16`).
Why: with int4 and int8 weights (bf16 activations) every linear's output is a bf16 value held in float32,
so a tensor-parallel step's all-reduce partials -- tokens x hidden x 4 bytes to every peer per layer, the
bulk of a prompt token's cost on a 1 Gbit/s link (docs/engine.md, session 8) -- carry 16 zero bits in every
value. Nothing is rounded: a tensor with any other value goes as float32, so an fp32 model's sums (and every
result) are unchanged; the check reads a few values first, so such a tensor pays a few microseconds. Frames
under EXACT16_MIN_BYTES go as they are: on the trio (1 Gbit/s links, far from full in a small step) checking
and widening frames of 2-55 KB cost a quota-capped device 4-5 ms of send time a step and saved nothing
measurable (docs/engine.md, session 8); past 64 KiB (a SmolLM2 step of more than 28 tokens) the halved
frames let int4 / int8 go direct where fp32 takes two shots (parallel/rank.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch

FORMATS = ("fp32", "bf16", "fp16", "int8")
INT8_GROUP = 64
BYTES_PER_VALUE = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0 + 4.0 / INT8_GROUP}
_FP16_MAX = 60000.0  # beyond this fp16 overflows: such tensors go as bf16
# What --check allows a run with a lossy wire: max |error| / max |reference| (measured over 3 devices:
# fp16 0.2%, bf16 0.9%, int8 8.7% on SmolLM2's logits; 0.05%, 0.4%, 1.4% on a random GPT2-Large shape).
LOSSY_REL_BOUND = {"fp16": 0.01, "bf16": 0.03, "int8": 0.15}


def _rows_cols(t: torch.Tensor) -> tuple[int, int]:
    rows = t.shape[0] if t.dim() else 1
    return rows, t.numel() // max(rows, 1) if rows else 0


def _groups(t: torch.Tensor) -> torch.Tensor:
    """(rows, n_groups, INT8_GROUP) float32 view of t, zero-padded at the end of each row."""
    rows, _ = _rows_cols(t)
    flat = t.reshape(rows, -1).float()
    pad = (-flat.shape[1]) % INT8_GROUP
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(rows, -1, INT8_GROUP)


EXACT16_PROBE = 256  # values checked before the whole tensor: a float32 activation fails within them
EXACT16_MIN_BYTES = 64 * 1024  # smaller frames go as they are: on the trio checking cost more than the bytes saved


def exact16(t: torch.Tensor) -> torch.Tensor | None:
    """t (float32) as bfloat16 with the same values, bit for bit, if every value is one (the low 16 bits of
    each are zero; NaNs and infinities included); else None. Widening the result (`decode`: bf16 -> fp32
    shifts the bits back) gives t's bits. In numpy: a third of torch's per-call cost, which a
    quota-capped device pays on every frame (measured: 11 against 28 us for a 2.3 KB frame)."""
    if t.dtype != torch.float32 or t.numel() == 0:
        return None
    bits = t.detach().contiguous().numpy().reshape(-1).view(np.uint32)
    if (bits[:EXACT16_PROBE] & 0xFFFF).any() or (bits & 0xFFFF).any():
        return None
    return torch.from_numpy((bits >> 16).astype(np.uint16)).view(torch.bfloat16).reshape(t.shape)


def encode(t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data, int8 group scales or None) to send for a float tensor; fp32 goes as bf16 where that is lossless."""
    if fmt not in FORMATS:
        raise ValueError(f"wire format {fmt!r} is not one of {FORMATS}")
    if fmt == "fp32" or not t.is_floating_point() or t.numel() == 0:
        big = t.numel() * t.element_size() >= EXACT16_MIN_BYTES
        narrow = exact16(t) if fmt == "fp32" and big and t.is_floating_point() else None
        return (t, None) if narrow is None else (narrow, None)
    if fmt == "fp16" and float(t.abs().max()) > _FP16_MAX:
        fmt = "bf16"
    if fmt == "bf16":
        return t.to(torch.bfloat16), None
    if fmt == "fp16":
        return t.to(torch.float16), None
    g = _groups(t)
    scale = g.abs().amax(dim=-1).clamp_min(1e-30) / 127.0  # (rows, n_groups)
    q = torch.round(g / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(q.shape[0], -1)[:, : _rows_cols(t)[1]].reshape(t.shape), scale


def decode(data: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The sender's tensor (approximately) from what was sent; raises ValueError on bad scales."""
    if data.dtype == dtype:
        return data
    if data.dtype == torch.int8:
        rows, cols = _rows_cols(data)
        want = (rows, -(-cols // INT8_GROUP))
        if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != want:
            raise ValueError(f"int8 data of shape {tuple(data.shape)} needs {want} float32 group scales")
        g = _groups(data) * scales[..., None]
        return g.reshape(rows, -1)[:, :cols].reshape(data.shape).to(dtype)
    if data.dtype in (torch.bfloat16, torch.float16):
        return data.to(dtype)
    raise ValueError(f"cannot decode {data.dtype} into {dtype}")


def codec_seconds_per_byte(rows: int = 128, cols: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Measured encode + decode time per byte of float32 activations, per format, on this device."""
    x = torch.randn(rows, cols)
    out = {"fp32": 0.0}
    for fmt in FORMATS[1:]:
        decode(*encode(x, fmt), torch.float32)  # warm-up
    for fmt in FORMATS[1:]:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode(*encode(x, fmt), torch.float32)
            best = min(best, time.perf_counter() - t0)
        out[fmt] = best / (x.numel() * 4)
    return out
