"""--backend auto: the profiler times blocks under ONNX Runtime, and the faster backend is chosen."""

from __future__ import annotations

import pytest

from galaxy.backends.profiling import Sample, time_blocks
from galaxy.backends.select import choose_backend
from galaxy.model.config import preset


def samples(seconds):
    return [Sample("attention", 4, 128, seconds[0]), Sample("mlp", 100, 128, seconds[1])]


def test_choose_backend_compares_totals_with_a_margin():
    assert choose_backend(samples([1.0, 2.0]), samples([0.9, 1.5])) == "onnx"
    assert choose_backend(samples([1.0, 2.0]), samples([0.5, 2.6])) == "torch"  # totals: 3.0 vs 3.1
    assert choose_backend(samples([1.0, 2.0]), samples([1.0, 1.95])) == "torch"  # within the 3% margin
    assert choose_backend(samples([1.0, 2.0]), samples([1.0, 1.95]), margin=0.0) == "onnx"


def test_choose_backend_needs_common_samples():
    with pytest.raises(ValueError, match="both backends"):
        choose_backend(samples([1.0, 2.0]), [Sample("head", 5, 1, 0.1)])


def test_profiler_times_onnx_blocks(xdg_cache):
    cfg = preset("tiny-llama")
    t = time_blocks(cfg, [8], repeats=1, backend="torch")
    o = time_blocks(cfg, [8], repeats=1, backend="onnx")
    assert [(s.kind, s.units, s.seq) for s in t] == [(s.kind, s.units, s.seq) for s in o]
    assert all(s.seconds > 0 for s in o)
    assert any(xdg_cache.glob("attn.attend-*.onnx"))
    assert choose_backend(t, o) in ("torch", "onnx")
    with pytest.raises(ValueError, match="backend"):
        time_blocks(cfg, [8], repeats=1, backend="tvm")
