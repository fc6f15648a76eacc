"""Prompt rows of int8 and int4 linears through a dense bf16 GEMM; decode rows through the format's kernel.

torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, bf16 activations) are
built for a few rows: a 256-token prompt ran slower in int8 and int4 than in fp32. oneDNN's bf16 GEMM is
2.1x faster than fp32's on a CPU with avx512_bf16, so a pass's *prompt rows* run a GEMM on the weight in
bf16, made once per linear per pass into a buffer the shard holds, sized to its largest linear
(`Scratch`; counted in its held bytes, `scratch_bytes`):

  int8  (x @ Q^T) * scale, the codes Q copied to bf16 (exact: |q| <= 127 < 2^8), the scale on the output;
  int4  x @ W^T, W^T expanded from int4pack's packed codes, scales and zeros by one native pass
        (model/int4_expand.py: the kernel's float32 weight rounded once to bf16). Where that native
        function is unavailable int4 keeps its kernel for every row (QuantLinear.routes_rows): the
        expansion in torch ops cost ~95 ms a pass for SmolLM2, 3.6x an 8-token prompt.

Which rows go where is decided by what a row *is*, never by how many rows a step carries: the serving
engine mixes decode rows and prompt chunks in one step, and chunk sizes follow the token budget, so a
rule on the step's row count would give a token other numerics when other sequences share its step.
The rule (`kernel_rows`) is a function of a token's *position in its request*: a row runs the format's
kernel iff its position >= the request's `kernel_from` = its original prompt length - 1 (the prompt's
last token, and every generated token after it); every earlier row runs dense. In an uninterrupted run
that is "the last row of its sequence whose logits come back" (a decode token, or a prompt's last
token), the same whether its prompt is cut into chunks of 1 or of 512, with or without other sequences
beside it, and whether a cached prefix left only its last token to compute. And it stays the same when
a token is computed again: a sequence preempted (recompute), or resumed after a device dropped out,
runs its prompt and generated tokens once more as one prompt, and its generated tokens keep the kernel
(a mixed call: quant.QuantLinear.forward_rows). The engine carries each sequence's `kernel_from` in the step
(parallel/forward.Step.kernel_from, over gRPC StepRequest.kernel_from); a step without it (built by a
caller that knows no prompt lengths) gets the uninterrupted run's roles (`roles_of_logits`).

K/V computed in one role are not those of the other, so in these formats the prefix cache shares only
blocks whose every position ran dense for the request that computed them (engine/block_manager.py:
a block holding a position >= `kernel_from` is never named, and a sequence takes a named block only where it
would run it dense too): any request computes those positions identically, so whoever filled the cache
first changes no bit. The cost: a prompt's last block, and a multi-turn follow-up's copy of the previous
answer, are computed again instead of shared (fp32 and bf16 route no rows and share every full block).

It relies on the dense GEMM giving a row the same bits whatever the other rows of the call: measured
for oneDNN's bf16 GEMM at the shapes of the tests and SmolLM2, 1 and 2 threads, from 2 rows up (a
single row takes a GEMV path with another summation order, so a lone dense row is padded to two), and
pinned in tests/model/test_dense_rows.py. A recompute relies as well on the kernel giving a row the same
bits whatever rows share its call (a resumed sequence's generated rows go through it together, where
each ran alone as a decode), pinned by the recompute tests there and in tests/engine/test_kernel_roles.py.

The rows a pass holds are given once per pass (`pass_rows`, set by parallel/forward.py's rank_forward),
and each linear call says where its rows start (`rows_from`: the per-rank forwards call the linears on
the pass's rows, on a device's chunk of them, or on a tile of one). Without a pass (a module called
directly, the compact decoder) every row runs the kernel, as before.

Shapes: x (M, K), Q (N, K) int8 codes, scale (N,), W^T (K, Npad) int4's weight expanded, S rows in a pass.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import RowsOutsidePass
from .int4_expand import expander

_local = threading.local()
_passes = itertools.count(1)


def kernel_rows(starts: list[int], seq_lens: list[int], kernel_from: list[int]) -> torch.Tensor | None:
    """(S,) bool over a pass's rows, sequence i's `seq_lens[i]` rows at positions starts[i], ..: the rows that
    run the format's kernel -- those at a position >= the sequence's `kernel_from[i]` (its original prompt
    length - 1); the other rows run dense. None when every row runs the kernel (a step of decodes), so such
    a pass pays nothing for the routing."""
    if not len(starts) == len(seq_lens) == len(kernel_from):
        raise ValueError(f"dense rows: {len(starts)} starts, {len(seq_lens)} sequence lengths, "
                         f"{len(kernel_from)} kernel_from")
    if all(s >= k for s, k in zip(starts, kernel_from)):
        return None
    mask = torch.cat([torch.arange(s, s + n) >= k for s, n, k in zip(starts, seq_lens, kernel_from)])
    return None if bool(mask.all()) else mask


def roles_of_logits(starts: list[int], seq_lens: list[int], logit_rows: tuple[int, ...] | None) -> list[int]:
    """Each sequence's `kernel_from` as an uninterrupted run has it, from what a pass shows: the position
    of its last row if that row's logits come back (`logit_rows` None: every row's do), else past its
    rows (all dense). For a pass whose caller knows no prompt lengths (a Request; a Step without
    kernel_from). Wrong for a recomputed sequence, whose generated tokens would run dense: the engine
    always says."""
    ends = list(itertools.accumulate(seq_lens))
    wanted = None if logit_rows is None else set(logit_rows)
    return [s + n - 1 if wanted is None or e - 1 in wanted else s + n for s, n, e in zip(starts, seq_lens, ends)]


@contextmanager
def pass_rows(kernel: torch.Tensor):
    """Within: this thread's linears route their rows by `kernel` ((S,) bool over the pass's rows)."""
    prev = (getattr(_local, "kernel", None), getattr(_local, "start", 0), getattr(_local, "pass_id", 0),
            getattr(_local, "memo", None))
    _local.kernel, _local.start, _local.pass_id, _local.memo = kernel, 0, next(_passes), {}
    try:
        yield
    finally:
        _local.kernel, _local.start, _local.pass_id, _local.memo = prev


@contextmanager
def rows_from(start: int):
    """Within: this thread's linear calls take rows starting at pass row `start`."""
    prev = getattr(_local, "start", 0)
    _local.start = start
    try:
        yield
    finally:
        _local.start = prev


ALL = object()  # kernel_index: every row of the call keeps the kernel


def kernel_index(m: int):
    """Which of a linear call's m rows keep the kernel: `ALL` (outside a pass, or no row of the call runs
    dense), None (every row runs dense), or their indices in the call ((r,) int64). Worked out once
    per pass for each (first row, rows) the pass's calls take, not on each of its ~200 linears."""
    kernel = getattr(_local, "kernel", None)
    if kernel is None:
        return ALL
    start = _local.start
    if start + m > kernel.shape[0]:  # a silent guess at those rows' numerics: refuse by name
        raise RowsOutsidePass(f"dense rows: a linear called on pass rows {start}..{start + m - 1}, but the pass holds "
                              f"rows 0..{kernel.shape[0] - 1}")
    memo = _local.memo
    if (start, m) not in memo:
        rows = kernel[start: start + m]
        n = int(rows.sum())
        memo[start, m] = ALL if n == m else None if n == 0 else rows.nonzero()[:, 0]
    return memo[start, m]


class Scratch:
    """A shard's buffer for one linear's weight in bf16 at a time, sized once at load to its largest linear
    (`size_for`; int4's rows padded as int4pack pads them) and reused by every call (a fresh tensor per
    call cost more than the copy). Allocated with the shard, so it is in its held bytes (`nbytes`,
    `scratch_bytes`): a device's memory admission and KV pool see it before the first prompt runs."""

    def __init__(self, weights: int = 0):
        self.size = weights
        self.weight = torch.empty(weights, dtype=torch.bfloat16)
        self.key = None  # (pass, linear) whose codes `weight` holds: a device's chunks and tiles of one pass reuse it

    @classmethod
    def size_for(cls, linears: list[tuple[int, int]], row_multiple: int = 1) -> Scratch:
        """A buffer for the largest of `linears` (N, K), N rounded up to `row_multiple`."""
        return cls(_largest(linears, row_multiple))

    @property
    def nbytes(self) -> int:
        return SCRATCH_BYTES_PER_WEIGHT * self.size

    def filled(self, shape: tuple[int, int], fill: Callable[[torch.Tensor], object], key) -> torch.Tensor:
        """`shape` bf16, a view of the buffer that `fill` wrote, unless this pass already filled it for `key`
        (a device's chunks and tiles of one pass then reuse it)."""
        a, b = shape
        if self.size < a * b:
            raise ValueError(f"dense rows: a {a} x {b} weight is larger than the scratch sized at load ({self.size})")
        w = self.weight[: a * b].view(a, b)
        key = (getattr(_local, "pass_id", 0), key)
        if self.key != key:
            self.key = None  # a fill that raises leaves nothing claimed
            fill(w)
            self.key = key
        return w

    def codes(self, codes: torch.Tensor, key) -> torch.Tensor:
        """(N, K) bf16: `codes` (N, K) int8 copied into the buffer, unless this pass already did (`key`)."""
        return self.filled(tuple(codes.shape), lambda w: w.copy_(codes), key)


SCRATCH_BYTES_PER_WEIGHT = 2  # Scratch: the weight in bf16


def _largest(linears: list[tuple[int, int]], row_multiple: int = 1) -> int:
    """Weights of the largest of `linears` (N, K), N rounded up to `row_multiple`: what a Scratch holds."""
    return max((-(-n // row_multiple) * row_multiple * k for n, k in linears), default=0)


def scratch_bytes(linears: list[tuple[int, int]], row_multiple: int = 1) -> int:
    """Bytes a shard's `Scratch` holds for linears of (N, K), before it is allocated (memory planning)."""
    return SCRATCH_BYTES_PER_WEIGHT * _largest(linears, row_multiple)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ W^T, W (N, K) bf16 (or the transposed view of a contiguous W^T) -> (M, N) bf16 through
    oneDNN's GEMM. A single row is padded to two: M = 1 takes a GEMV path whose summation order differs
    from the GEMM's (measured)."""
    if x.shape[0] == 1:
        return F.linear(torch.cat([x, x.new_zeros(1, x.shape[1])]), weight)[:1]
    return F.linear(x, weight)


def int8_dense(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, buf: Scratch, key) -> torch.Tensor:
    """x (M, K) bf16 through int8 codes (N, K) and per-row scales (N,) bf16 -> (M, N) bf16: the GEMM runs on
    the codes (exact in bf16) and the scale multiplies its output, as int8pack does."""
    return dense_linear(x, buf.codes(codes, key)) * scale


def int4_dense(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, k: int, group: int, buf: Scratch,
               key) -> torch.Tensor:
    """x (M, K) bf16 through an int4pack weight (`packed` (Npad, K/2), `scale_zero` (K/group, Npad, 2) bf16)
    -> (M, Npad) bf16: the GEMM runs on W^T (K, Npad) expanded into the buffer by the native pass
    (model/int4_expand.py; the caller checked `expander()` is not None)."""
    exp = expander()
    wt = buf.filled((k, packed.shape[0]), lambda w: exp(packed, scale_zero, k, group, w), key)  # (K, Npad)
    return dense_linear(x, wt.T)
