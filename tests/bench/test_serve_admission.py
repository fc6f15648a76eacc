"""`galaxy bench serve --slo-admission` and `--plan`: requests refused by early rejection are counted
apart from failed ones, and a plan's predictions are printed beside the measurements with their ratio."""

from __future__ import annotations

import pytest

from galaxy.bench import serve_predicted
from galaxy.bench.serve import ServeBench, Workload, run_serve_bench, table
from galaxy.engine.engine import EngineConfig
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster
from planner.plan import ServePlan, ServePrediction


@pytest.fixture(scope="module")
def tiny():
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    ex = InprocCluster(2)
    ex.load(src, even_partition(src.config, 2))
    yield src, ex
    ex.close()


def test_rejected_requests_are_counted_apart_from_failed_and_admission_off_changes_nothing(tiny):
    src, ex = tiny
    # a TTFT objective of 0.1 ms nothing meets: once the engine has a step-cost line (steps of two sizes ran),
    # every later request is refused; the first ones were admitted before it had one
    sb = ServeBench(Workload(num_requests=8, concurrency=2, input_len=5, output_len=6), schedulers=("batch",),
                    engine=EngineConfig(max_batched_tokens=32), admission=True, objectives_s=(1e-4, 10.0))
    report = run_serve_bench(ex, src.config, src.tokenizer(), sb)
    runs = {r["scheduler"]: r for r in report["runs"]}
    plain, gated = runs["batch"], runs["batch+admission"]
    assert plain["rejected"] == 0 and plain["completed"] == 8 and plain["failed"] == 0
    assert gated["rejected"] >= 6 and gated["failed"] == 0 and gated["completed"] + gated["rejected"] == 8
    assert gated["outputs_match"]  # the admitted requests got the tokens they get without admission
    assert gated["slo_attainment_admitted"] == 0.0 and gated["good_rps"] == 0.0
    assert report["slo"]["ttft_s"] == 1e-4
    text = table(report)
    assert "| rejected |" in text and f"| {gated['rejected']} |" in text


def test_a_plans_prediction_is_printed_beside_the_measurement_with_the_ratio(tiny):
    src, ex = tiny
    sb = ServeBench(Workload(num_requests=4, input_len=5, output_len=6), rates=(40.0, 80.0), schedulers=("batch",),
                    engine=EngineConfig(max_batched_tokens=32), objectives_s=(10.0, 10.0))
    report = run_serve_bench(ex, src.config, src.tokenizer(), sb)
    pred = ServePrediction(ttft_p50_s=0.01, ttft_p90_s=0.02, tpot_p50_s=0.004, tpot_p90_s=0.005, attainment=0.95,
                           goodput_rps=50.0, decode_s_per_token=0.004, unloaded_ttft_s=0.008, unloaded_tpot_s=0.004)
    serve = ServePlan("colocated", ("local0", "local1"), ("local0", "local1"), 40.0, 5, 6, 10.0, 10.0, pred)
    cmp = serve_predicted.compare(report, serve, "plan.json")
    at = next(r for r in report["runs"] if r["rate"] == 40.0)
    rows = cmp["rows"]
    assert rows["ttft_p50_s"]["measured"] == at["ttft_s"]["median"]
    assert rows["ttft_p50_s"]["ratio"] == pytest.approx(at["ttft_s"]["median"] / 0.01)
    assert rows["unloaded_tpot_s"]["measured"] == report["unloaded"]["tpot_s"]
    # every request meets objectives of 10 s: the highest swept rate is the measured goodput
    assert rows["goodput_rps"]["measured"] == 80.0 and rows["goodput_rps"]["ratio"] == pytest.approx(80.0 / 50.0)
    assert cmp["goodput_sweep"] == {"goodput_rps": 80.0, "next_missed_rps": None, "swept_rps": [40.0, 80.0]}
    assert cmp["notes"] == []
    text = serve_predicted.table(cmp)
    assert "| quantity | predicted | measured | measured / predicted |" in text
    assert f"| goodput req/s | 50 | 80 | {80 / 50:.2f} |" in text
    # a plan for another workload says so
    other = ServePlan("colocated", ("local0",), ("local0",), 3.0, 128, 32, 1.0, 1.0, pred)
    notes = serve_predicted.compare(report, other)["notes"]
    assert any("128 + 32" in n for n in notes) and any("3 req/s" in n for n in notes)
