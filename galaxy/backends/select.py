"""Which backend runs a device's shard: torch, ONNX Runtime, or the faster of the two measured here.

`use_backend` puts a loaded shard on its backend; `choose_backend` picks, per device, the faster of
the two from the profiler's timings of both (`--backend auto`). onnxruntime and the exporter are
imported only when the ONNX backend is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..parallel.executor import BACKENDS
from .onnx import apply_onnx, default_cache_dir
from .profiling import time_blocks


def choose_backend(samples_torch: Iterable, samples_onnx: Iterable, margin: float = 0.03) -> str:
    """"onnx" when ONNX Runtime's total time over the samples timed under both backends (same kind,
    units and seq; profiling.Sample) is below torch's by more than `margin`, else "torch".

    Totals, not per-sample wins: the big blocks dominate a forward pass, and so they should
    dominate the choice. The margin keeps torch (fewer moving parts) when the two are level.
    """
    t = {(s.kind, s.units, s.seq): s.seconds for s in samples_torch}
    o = {(s.kind, s.units, s.seq): s.seconds for s in samples_onnx}
    common = sorted(t.keys() & o.keys())
    if not common:
        raise ValueError(f"no block timed under both backends ({len(t)} torch samples, {len(o)} onnx samples)")
    total_t, total_o = sum(t[k] for k in common), sum(o[k] for k in common)
    return "onnx" if total_o < (1.0 - margin) * total_t else "torch"


def use_backend(model, backend: str, threads: int, cache_dir: Path | None = None) -> str:
    """Put a loaded shard on `backend` ("torch", "onnx", or "auto": time one layer's blocks of this
    shape under both, here on this device, and keep the faster). Returns the backend in use."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = _faster_here(model.cfg, threads, cache_dir)
    if backend == "onnx" and len(model.layers):
        apply_onnx(model, cache_dir or default_cache_dir(), threads)
    return backend


def _faster_here(cfg, threads: int, cache_dir: Path | None) -> str:
    seq = [min(128, cfg.max_positions)]
    torch_s = time_blocks(cfg, seq, repeats=2, backend="torch")
    onnx_s = time_blocks(cfg, seq, repeats=2, backend="onnx")
    return choose_backend(torch_s, onnx_s)
