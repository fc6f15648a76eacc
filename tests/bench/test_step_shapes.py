"""The step-shape bench (`galaxy bench steps`) runs every shape on the same sequences and checks each decode's
batched token against its own step's."""

from __future__ import annotations

import pytest

from galaxy.bench.step_shapes import StepShapes, _Sequences, marginal, run_step_shapes, table
from galaxy.errors import GalaxyError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster


def test_every_shape_is_timed_on_every_device_and_each_decode_gets_its_lone_token():
    cfg = preset("tiny-llama")
    src = RandomWeights(cfg, seed=1)
    sb = StepShapes(decodes=(1, 2, 3), chunk=5, context=9, reps=2, block_size=4)
    with InprocCluster(2) as ex:
        ex.load(src, even_partition(cfg, 2))
        report = run_step_shapes(ex, cfg.vocab_size, sb)
    shapes = [(r["decodes"], r["chunk"]) for r in report["rows"]]
    assert shapes == [(1, 0), (2, 0), (3, 0), (0, 5), (1, 5), (3, 5)]
    assert all(r["tokens_as_alone"] for r in report["rows"])
    assert all(len(r["forward_ms"]) == 2 and r["step_ms"] > 0 for r in report["rows"])
    assert set(report["marginal"]) == {"decode 1->2", "decode 2->3", "prompt token"}
    assert "| 3 | 5 |" in table(report)


def test_marginal_costs_are_slopes_between_the_shapes_medians():
    rows = [{"decodes": d, "chunk": c, "step_ms": ms, "cpu_ms": [cpu, cpu / 2]} for d, c, ms, cpu in
            ((1, 0, 10.0, 8.0), (2, 0, 16.0, 12.0), (8, 0, 22.0, 15.0), (0, 48, 57.0, 55.0))]
    m = marginal(rows)
    assert m["decode 1->2"] == {"step_ms": 6.0, "cpu_ms": 4.0}
    assert m["decode 2->8"] == {"step_ms": 1.0, "cpu_ms": 0.5}
    assert m["prompt token"] == {"step_ms": 1.0, "cpu_ms": 1.0}


def test_a_pool_too_small_for_the_shapes_is_refused_by_name():
    with pytest.raises(GalaxyError, match="need 10 blocks of 4; the pool holds 9"):
        _Sequences(StepShapes(decodes=(1, 2), chunk=4, context=9, block_size=4), 100, KVPool(9, 4))
    with pytest.raises(GalaxyError, match="reps=0"):
        StepShapes(reps=0)
