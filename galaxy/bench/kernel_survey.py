"""Which packed matmul runs each weight format fastest, measured over a whole model's weights.

Decode is bound by reading the weights, so a kernel's speed on one cache-warm matrix says little:
this survey builds every linear weight of a model (SmolLM2-135M by default: 30 layers of fused
Q|K|V, output, fused gate|up and down, plus the LM head) in each candidate kernel's packed form
and times passes over *all* of them, in layer order, so each matrix comes from memory as it would
in a forward. Shapes: one row (a decode step) and 64-512 rows (prefill chunks; the LM head then
runs on the last row only, as generation does). Reported per kernel, rows and thread count: the
median pass time, and the weight bytes streamed per second.

Candidates (x @ W^T, x (M, K), W (N, K)):
  fp32            F.linear, fp32 weights and activations: the exact reference
  bf16            F.linear, bf16 weights and activations (oneDNN)
  bf16-onednn     mkldnn._linear_pointwise on a weight reordered once for oneDNN (what inductor's
                  freezing does), bf16 activations
  fp16-fbgemm     quantized.linear_dynamic_fp16: fp16 packed weights, fp32 activations
  int8-bf16       aten._weight_int8pack_mm, int8 per-row weights, bf16 activations and scales
  int8-fp32       the same with fp32 activations (a slow path in this build)
  int8-fbgemm     quantized.linear_dynamic: int8 per-row weights, activations quantized per call
  int4-bf16       aten._weight_int4pack_mm_for_cpu, 4-bit groups of 32, bf16 activations
  int4-fp32       the same with fp32 activations, scales and zeros

Run: `galaxy bench --kernel-survey [--threads N] [--reps R]` (under the CPU lock); a survey, not a test.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig

KERNELS = ("fp32", "bf16", "bf16-onednn", "fp16-fbgemm", "int8-bf16", "int8-fp32", "int8-fbgemm", "int4-bf16",
           "int4-fp32")
SLOW_PASS_S = 4.0  # a kernel whose first pass takes longer is not repeated at larger row counts


def model_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of every linear a decode step reads, in order: per layer fused QKV, out, gate|up, down."""
    hd = cfg.head_dim
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    ffn_in = cfg.ffn * (2 if cfg.gated_mlp else 1)
    layer = [(qkv, cfg.hidden), (cfg.hidden, cfg.n_heads * hd), (ffn_in, cfg.hidden), (cfg.hidden, cfg.ffn)]
    return layer * cfg.n_layers + [(cfg.vocab_size, cfg.hidden)]


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp_min(1e-8) / 127  # (N,)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)  # (N, K/g)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()  # (K/g, N, 2)
    return packed, sz


def make_kernel(kind: str, w: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, int]:
    """(x -> x @ w^T in this kernel's packed form, the activation dtype it takes, weight bytes)."""
    if kind == "fp32":
        return (lambda x: F.linear(x, w)), torch.float32, w.numel() * 4
    if kind == "bf16":
        wb = w.to(torch.bfloat16)
        return (lambda x: F.linear(x, wb)), torch.bfloat16, wb.numel() * 2
    if kind == "bf16-onednn":
        wb = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 1)
        fn = lambda x: torch.ops.mkldnn._linear_pointwise(x, wb, None, "none", [], "")  # noqa: E731
        return fn, torch.bfloat16, w.numel() * 2
    if kind == "fp16-fbgemm":
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        return (lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)), torch.float32, w.numel() * 2
    if kind in ("int8-bf16", "int8-fp32"):
        q, scale = _int8_rows(w)
        dt = torch.bfloat16 if kind == "int8-bf16" else torch.float32
        s = scale.to(dt)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s)), dt, q.numel() + s.numel() * s.element_size()
    if kind == "int8-fbgemm":
        q, scale = _int8_rows(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated, the op is what is surveyed
            zeros = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        fn = lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)  # noqa: E731
        return fn, torch.float32, q.numel() + 8 * w.shape[0]
    if kind in ("int4-bf16", "int4-fp32"):
        packed, sz = _int4_groups(w, 32)
        dt = torch.bfloat16 if kind == "int4-bf16" else torch.float32
        sz = sz.to(dt)
        nbytes = packed.numel() + sz.numel() * sz.element_size()
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)), dt, nbytes
    raise ValueError(f"kernel={kind!r} is not one of {KERNELS}")


def _one_pass(fns, shapes, xs: dict, x1: torch.Tensor) -> None:
    """Every linear once, in layer order; the LM head (last) on one row, as generation runs it."""
    for f, (_, k) in zip(fns[:-1], shapes[:-1]):
        f(xs[k])
    fns[-1](x1)


def survey(cfg: ModelConfig, kinds=KERNELS, rows=(1, 64, 256, 512), threads=(1, 2), reps: int = 5,
           seed: int = 0) -> list[dict]:
    """Median pass time of each kernel over every linear of `cfg`, one row of results per case."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model_shapes(cfg)
    out = []
    for kind in kinds:
        built = [make_kernel(kind, torch.randn(n, k, generator=gen) * k**-0.5) for n, k in shapes]
        fns, dt, nbytes = [b[0] for b in built], built[0][1], sum(b[2] for b in built)
        slow = False
        for m in rows:
            for t in threads if not slow else ():
                torch.set_num_threads(t)
                xs = {k: torch.randn(m, k, generator=gen).to(dt) for k in {k for _, k in shapes}}
                args = (fns, shapes, xs, xs[cfg.hidden][-1:])
                t0 = time.perf_counter()
                _one_pass(*args)  # warm-up (first-call packing, page faults)
                first = time.perf_counter() - t0
                times = []
                for _ in range(1 if first > SLOW_PASS_S else reps):
                    t0 = time.perf_counter()
                    _one_pass(*args)
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                slow = slow or first > SLOW_PASS_S
                out.append({"kernel": kind, "rows": m, "threads": t, "ms": round(med * 1e3, 2),
                            "weight_MB": round(nbytes / 1e6, 1), "GB_per_s": round(nbytes / med / 1e9, 1)})
                print(json.dumps(out[-1]), flush=True)
    return out
