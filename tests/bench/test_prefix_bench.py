"""The repeated-document bench (galaxy/bench/prefix.py) on in-process ranks: every placement and the
cache-off run on the same prompts, the repeats' computed tokens and moved K/V counted."""

from __future__ import annotations

import pytest

from galaxy.bench.prefix import run_prefix_bench, table
from galaxy.engine.engine import EngineConfig
from galaxy.runtime.inproc import InprocCluster
from tests.engine.test_prefix_index import CFG, SRC, split

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_prefix_bench_counts_what_the_repeats_computed_and_moved_in_each_placement():
    pre, dec = InprocCluster(3), InprocCluster(1)
    pre.load(SRC, split([3, 1, 2]))
    dec.load(SRC, split([6]))
    try:
        report = run_prefix_bench(pre, dec, CFG, None, doc_len=32, question_len=5, output_len=3, repeats=3,
                                  clients=2, engine=EngineConfig(block_size=4, kv_blocks=60))
    finally:
        pre.close()
        dec.close()
    rows = report["placements"]
    assert report["outputs_identical"] == {"colocated": True, "disaggregated": True}
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
    assert rows["colocated"]["first_computed"] == 37 and rows["colocated"]["repeat_computed"] == 5
    assert rows["disaggregated"]["repeat_computed"] == 5
    assert rows["colocated, prefix cache off"]["repeat_computed"] == 37
    assert rows["disaggregated"]["first_kv_bytes"] == 37 * per_token
    assert rows["disaggregated"]["repeat_kv_bytes"] == 5 * per_token  # the document's 32 positions stayed put
    assert rows["disaggregated"]["kv_blocks"] == {"prefill": 60, "decode": 60}
    assert "colocated yes, disaggregated yes" in table(report)


def test_under_eviction_the_prefix_bench_runs_each_placement_with_and_without_the_spill_tier_side_by_side():
    pre, dec = InprocCluster(2), InprocCluster(1)
    pre.load(SRC, split([3, 3]))
    dec.load(SRC, split([6]))
    try:  # pools of 14 blocks of 4: the other 37-token prompt evicts most of the first document
        report = run_prefix_bench(pre, dec, CFG, None, doc_len=32, question_len=5, output_len=3, repeats=2,
                                  clients=2, engine=EngineConfig(block_size=4, kv_blocks=14, spill_bytes=1 << 20),
                                  evict_docs=1)
    finally:
        pre.close()
        dec.close()
    rows = report["placements"]
    assert list(rows) == ["colocated", "colocated, spill", "disaggregated", "disaggregated, spill",
                          "colocated, prefix cache off"]
    assert all(report["outputs_identical"].values()) and len(report["outputs_identical"]) == 4
    assert rows["colocated"]["back_computed"] > 5 and rows["colocated"]["spill"] is None
    for name in ("colocated, spill", "disaggregated, spill"):
        assert rows[name]["back_computed"] == 5 and rows[name]["spill"]["restored_blocks"] > 0
    assert "back after eviction" in table(report) and "written back" in table(report)
