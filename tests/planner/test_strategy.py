"""planner/strategy.py is the one place that says what each planned strategy holds per device and how a
plan becomes the runtime's Partition; these pin its table against the runtime's own strategies."""

from __future__ import annotations

import pytest

from galaxy.model.config import preset
from galaxy.parallel.sharding import PartitionError, Strategy
from planner.strategy import PLANNED, RUNNABLE, PlanStrategy


def test_local_and_no_overlap_run_as_galaxy_and_only_no_overlap_is_never_picked():
    assert PlanStrategy.LOCAL.runs_as is Strategy.GALAXY and PlanStrategy.GALAXY_NO_OVERLAP.runs_as is Strategy.GALAXY
    assert set(PLANNED) - set(RUNNABLE) == {PlanStrategy.GALAXY_NO_OVERLAP}
    assert {s.runs_as for s in RUNNABLE} == set(Strategy)
    assert "galaxy" == PlanStrategy.GALAXY and f"{PlanStrategy.SEQPAR}" == "seqpar"


@pytest.mark.parametrize("s, fields", [
    ("galaxy", ("heads", "mlp_cols", "vocab_rows", "tokens")), ("local", ("heads", "mlp_cols", "vocab_rows", "tokens")),
    ("megatron", ("heads", "mlp_cols", "vocab_rows")), ("seqpar", ("tokens",)), ("pipeline", ("layers",))])
def test_each_strategy_needs_exactly_the_fields_it_splits(s, fields):
    assert PlanStrategy(s).fields == fields
    assert PlanStrategy(s).splits_tokens == ("tokens" in fields)


def test_a_plan_becomes_the_partition_of_the_strategy_it_runs_as_with_its_counts():
    cfg = preset("tiny-llama")
    h, c, v = (1, cfg.n_heads - 1), (10, cfg.ffn - 10), (7, cfg.vocab_size - 7)
    counts = dict(heads=h, mlp_cols=c, vocab_rows=v, tokens=(3, 5), layers=(1, cfg.n_layers - 1))
    for s in RUNNABLE:
        if s is PlanStrategy.LOCAL:
            continue
        p = s.partition(cfg, **counts)
        assert p.strategy == s.runs_as
        if s.tensor_parallel:
            assert (p.heads, p.cols, p.vocab) == (h, c, v)
        if s is PlanStrategy.PIPELINE:
            assert p.layers == counts["layers"]
    one = PlanStrategy.LOCAL.partition(cfg, (cfg.n_heads,), (cfg.ffn,), (cfg.vocab_size,), (8,), (cfg.n_layers,))
    assert one.world == 1 and one.strategy is Strategy.GALAXY
    with pytest.raises(PartitionError):
        PlanStrategy.MEGATRON.partition(cfg, (1, 1), c, v, (), ())
