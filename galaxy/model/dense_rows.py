"""Prompt rows of int4 / int8 linears through a dense bf16 GEMM; decode rows through the format's kernel.

torch's weight-only kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are built for a few
rows: they dequantize the weight again for every 4 rows, so a 256-token prompt ran slower in int4 than in
fp32. oneDNN's bf16 GEMM is 2.3x faster than fp32's on a CPU with avx512_bf16, and a prompt pays the
weight's dequantization once per pass, not once per 4 rows. So a pass's *prompt rows* run
x @ W^T with W dequantized to bf16 for that one call, into a per-thread buffer sized to the largest
linear it has met (`Scratch`; counted in a shard's memory: `scratch_bytes`).

Which rows go where is decided by what a row *is*, never by how many rows a step carries: the serving
engine mixes decode rows and prompt chunks in one step, and chunk sizes follow the token budget, so a
rule on the step's row count would give a token other numerics when other sequences share its step.
The rule (`kernel_rows`): a row runs the format's kernel iff it is the last row of its sequence in the
pass *and* its logits come back -- a decode token, or a prompt's last token; every other row (a prompt
token whose logits are not taken) runs dense. That is a property of the token alone: the same whether
its prompt is cut into chunks of 1 or of 512, with or without other sequences beside it, and whether a
cached prefix left only its last token to compute. (A token recomputed after preemption, or read from a
prefix another request cached, was computed in the role it had there.)

It relies on the dense GEMM giving a row the same bits whatever the other rows of the call: measured
for oneDNN's bf16 GEMM at the shapes of the tests and SmolLM2, 1 and 2 threads, from 2 rows up (a
single row takes a GEMV path with another summation order, so a lone dense row is padded to two), and
pinned in tests/model/test_dense_rows.py.

The rows a pass holds are given once per pass (`pass_rows`, set by parallel/forward.py's rank_forward),
and each linear call says where its rows start (`rows_from`: the per-rank forwards call the linears on
the pass's rows, on a device's chunk of them, or on a tile of one). Without a pass (a module called
directly, the compact decoder) every row runs the kernel, as before.

Shapes: x (M, K), W (N, K), W^T (K, N), S rows in a pass.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_local = threading.local()
_passes = itertools.count(1)


def kernel_rows(seq_lens: list[int], logit_rows: tuple[int, ...] | None) -> torch.Tensor | None:
    """(S,) bool: the rows that run the format's kernel -- the last row of each sequence whose logits
    come back (`logit_rows` None: every row's do); the other rows run dense. None when every row runs
    the kernel (a step of decodes), so such a pass pays nothing for the routing."""
    s, ends = sum(seq_lens), list(itertools.accumulate(seq_lens))
    wanted = None if logit_rows is None else set(logit_rows)
    kernel = [e - 1 for e in ends if wanted is None or e - 1 in wanted]
    if len(kernel) == s:
        return None
    mask = torch.zeros(s, dtype=torch.bool)
    mask[kernel] = True
    return mask


@contextmanager
def pass_rows(kernel: torch.Tensor):
    """Within: this thread's linears route their rows by `kernel` ((S,) bool over the pass's rows)."""
    prev = getattr(_local, "kernel", None), getattr(_local, "start", 0), getattr(_local, "pass_id", 0)
    _local.kernel, _local.start, _local.pass_id = kernel, 0, next(_passes)
    try:
        yield
    finally:
        _local.kernel, _local.start, _local.pass_id = prev


@contextmanager
def rows_from(start: int):
    """Within: this thread's linear calls take rows starting at pass row `start`."""
    prev = getattr(_local, "start", 0)
    _local.start = start
    try:
        yield
    finally:
        _local.start = prev


def dense_mask(m: int) -> torch.Tensor | None:
    """(m,) bool: which of a linear call's m rows run dense; None outside a pass (all run the kernel)."""
    kernel = getattr(_local, "kernel", None)
    if kernel is None:
        return None
    start = _local.start
    if start + m > kernel.shape[0]:  # rows beyond the pass's: not a call of this pass's rows
        return None
    return ~kernel[start: start + m]


class Scratch:
    """A shard's buffers for dequantizing one weight at a time, sized once at load to its largest linear
    (`size_for`) and reused by every call (a fresh tensor per call cost more than the arithmetic): the
    unpacked nibbles (1 byte a weight), the float32 weight (4) and the bf16 weight the GEMM reads (2).
    Allocated with the shard, so they are in its held bytes (`nbytes`, `scratch_bytes`): a device's
    memory admission and KV pool see them before the first prompt runs."""

    def __init__(self, weights: int = 0):
        self.size = weights
        self.nibbles = torch.empty(weights, dtype=torch.uint8)
        self.w32 = torch.empty(weights)
        self.weight = torch.empty(weights, dtype=torch.bfloat16)
        self.key = None  # (pass, linear) whose weight `weight` holds: a device's chunks and tiles of one pass reuse it

    @classmethod
    def size_for(cls, linears: list[tuple[int, int]]) -> Scratch:
        """Buffers for the largest of `linears` (N, K), int4's rows padded to 16."""
        return cls(max((_padded(n) * k for n, k in linears), default=0))

    @property
    def nbytes(self) -> int:
        return SCRATCH_BYTES_PER_WEIGHT * self.size

    def take(self, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K N,) uint8, (K, N) float32 and (K, N) bf16 views of the buffers."""
        if self.size < k * n:
            raise ValueError(f"dense rows: a {n} x {k} weight is larger than the scratch sized at load ({self.size})")
        return self.nibbles[: k * n], self.w32[: k * n].view(k, n), self.weight[: k * n].view(k, n)


def _padded(n: int) -> int:
    return -(-n // 16) * 16  # int4pack's rows come in multiples of 16 (quant.INT4_ROWS)


SCRATCH_BYTES_PER_WEIGHT = 7  # Scratch: nibbles 1, float32 weight 4, bf16 W^T 2


def scratch_bytes(linears: list[tuple[int, int]]) -> int:
    """Bytes a shard's `Scratch` holds for linears of (N, K): its buffers sized to the largest."""
    return Scratch(0).nbytes if not linears else SCRATCH_BYTES_PER_WEIGHT * max(_padded(n) * k for n, k in linears)


INT4_BLOCK_N = 64  # int4pack's CPU layout (avx512): blocks of 64 rows, as (K, 32) bytes


def int4_weight_t(packed: torch.Tensor, scale_zero: torch.Tensor, k: int, group: int, buf: Scratch,
                  key=None) -> torch.Tensor:
    """(K, Npad) bf16: the int4pack weight dequantized as the kernel does, w = (q - 8) * scale + zero in
    float32 (one rounding), then rounded once to bf16, transposed (the layout the packed codes unpack into).

    int4pack's CPU layout (torch 2.13, read from aten's weight_to_int4pack_kernel and pinned by the tests
    against the kernel): every full block of 64 rows is (K, 32) bytes whose low nibbles are rows 0-31 and
    high nibbles rows 32-63; a tail of 16, 32 or 48 rows is (K, tail / 2) bytes of row pairs (low nibble
    the even row). Each step is one pass over contiguous memory: strided or broadcast-by-view operands
    made the same arithmetic 5x slower (measured, docs/decode-formats.md)."""
    npad = packed.shape[0]
    key = None if key is None else (getattr(_local, "pass_id", 0), key)
    nib, w32, out = buf.take(k, npad)  # (K N,), (K, Npad), (K, Npad)
    if key is not None and buf.key == key:
        return out
    buf.key = None
    full = npad // INT4_BLOCK_N * INT4_BLOCK_N
    if full:
        nb = full // INT4_BLOCK_N
        b = packed[:full].reshape(nb, k, 32)  # (blocks, K, 32) bytes
        lo, hi = nib[: nb * k * 32].view(nb, k, 32), nib[nb * k * 32: full * k].view(nb, k, 32)
        torch.bitwise_and(b, 15, out=lo)
        torch.bitwise_right_shift(b, 4, out=hi)
        wv = w32[:, :full].view(k, nb, INT4_BLOCK_N)
        wv[..., :32].copy_(lo.permute(1, 0, 2))  # rows 0-31 of each block
        wv[..., 32:].copy_(hi.permute(1, 0, 2))  # rows 32-63
    if npad > full:
        t = packed[full:].reshape(k, (npad - full) // 2)  # (K, tail / 2) row pairs
        pair = w32[:, full:].view(k, (npad - full) // 2, 2)
        pair[..., 0].copy_(torch.bitwise_and(t, 15))
        pair[..., 1].copy_(torch.bitwise_right_shift(t, 4))
    g = k // group
    scale = scale_zero[..., 0].to(torch.float32)  # (G, Npad), contiguous
    zero = scale_zero[..., 1].to(torch.float32) - 8 * scale  # exact while their exponents are within 16
    # q * scale is exact in float32 (4 + 8 bits), so zero' + q * scale is the kernel's one rounding of
    # (q - 8) * scale + zero: the float32 weight the kernel multiplies by (bit for bit while zero' is exact)
    w = w32.view(g, group, npad)
    torch.addcmul(zero[:, None], w, scale[:, None], out=w)
    out.copy_(w32)
    buf.key = key
    return out


def dense_linear(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ W^T (K, N) bf16 -> (M, N) bf16 through oneDNN's GEMM. A single row is padded to
    two: M = 1 takes a GEMV path whose summation order differs from the GEMM's (measured)."""
    if x.shape[0] == 1:
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).matmul(weight_t)[:1]
    return x.matmul(weight_t)


def int8_dense(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, buf: Scratch) -> torch.Tensor:
    """x (M, K) bf16 through int8 codes (N, K) and per-row scales (N,) bf16: the codes are exact in bf16
    (|q| <= 127 < 2^8), so the GEMM runs on them and the scale multiplies its output, as int8pack does."""
    n, k = codes.shape
    w = buf.take(k, n)[2].view(-1)[: n * k].view(n, k).copy_(codes)  # (N, K) bf16
    y = F.linear(torch.cat([x, x.new_zeros(1, k)]) if x.shape[0] == 1 else x, w)[: x.shape[0]]
    return y * scale
