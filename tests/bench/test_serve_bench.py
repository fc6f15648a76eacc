"""`galaxy bench serve`'s long-prompt scenario on a tiny in-process model: long prompts keep coming
while the streams decode, every scheduler sees the same requests, and the report says the P99 ITL
against the unloaded TPOT."""

from __future__ import annotations

import pytest

from galaxy.bench.serve import ServeBench, Workload, long_prompts, run_serve_bench, table
from galaxy.engine.engine import EngineConfig
from galaxy.errors import GalaxyError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster


def test_long_prompts_keep_arriving_while_the_streams_decode_under_every_scheduler():
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    ex = InprocCluster(2)
    try:
        ex.load(src, even_partition(src.config, 2))
        sb = ServeBench(Workload(num_requests=3, concurrency=2, input_len=5, output_len=12, long_prompt_len=48),
                        engine=EngineConfig(max_batched_tokens=32))
        report = run_serve_bench(ex, src.config, src.tokenizer(), sb)
    finally:
        ex.close()
    runs = {r["scheduler"]: r for r in report["runs"]}
    assert set(runs) == {"batch", "fifo", "batch-no-stall-bound"}
    for r in runs.values():
        assert r["completed"] == 3 and r["itl_p99_x_unloaded_tpot"] > 0
        assert r["itl_p99_x_unloaded_tpot"] == pytest.approx(r["itl_s"]["p99"] / report["unloaded"]["tpot_s"])
        assert r["long_prompts"] >= 0 and "long_ttft_s" in r
        assert r.get("outputs_match", True)  # the long prompts never change a stream's tokens
    assert "kept arriving" in table(report)


def test_long_prompts_are_reproducible_and_must_fit_the_context():
    w = Workload(long_prompt_len=30, seed=2)
    assert long_prompts(w, 100, 64) == long_prompts(w, 100, 64)
    assert {len(s.prompt) for s in long_prompts(w, 100, 64)} == {30}
    assert long_prompts(Workload(), 100, 64) == []
    with pytest.raises(GalaxyError, match="long prompts of 30 tokens"):
        long_prompts(w, 100, 30)


@pytest.mark.parametrize("args,msg", [
    (["--schedulers", "batch,batch:max_stal=2"], "'max_stal=2' is not FIELD=VALUE"),
    (["--schedulers", "batch:itl_target=1"], "itl_target=1 must be"),
    (["--kv-path", "direct,coordinator"], "one path, except with --prefill-devices"),
])
def test_bench_serve_refuses_bad_settings_before_it_starts_a_device(args, msg, monkeypatch, capsys):
    from galaxy.cli import bench as cli_bench
    from galaxy.cli import main

    def started(*a, **kw):
        raise AssertionError("a device was started before the settings were checked")

    monkeypatch.setattr(cli_bench, "bench_devices", started)
    assert main(["bench", "serve", "--local", "1", "--random-init", "tiny-llama", *args]) == 2
    assert msg in capsys.readouterr().err


def test_a_phase_separated_row_prints_each_groups_step_shapes_like_a_colocated_row():
    """`galaxy bench serve` on a disaggregated placement: the row's step shapes are the prefill group's
    (prompt-only steps) and the decode group's (decode-only steps), each named and printed as the colocated
    row's are."""
    from galaxy.engine.disagg import DisaggEngine
    from tests.engine.test_disagg import CFG, loaded, split

    pre, dec = loaded(split([3, 3])), loaded(split([6]))
    try:
        ec = EngineConfig(block_size=4, kv_blocks=40)
        sb = ServeBench(Workload(num_requests=2, concurrency=2, input_len=6, output_len=4), schedulers=("batch",),
                        engine=ec)
        report = run_serve_bench(pre, CFG, None, sb, make_engine=lambda ec: DisaggEngine(pre, dec, CFG, None, ec, ec))
    finally:
        pre.close()
        dec.close()
    steps = report["runs"][0]["steps"]
    assert set(steps) == {"prefill", "decode"}
    assert steps["prefill"]["prompt_only"]["steps"] >= 1 and steps["decode"]["decode_only"]["steps"] >= 3
    text = table(report)
    assert "batch prefill group steps: prompt-only" in text and "batch decode group steps: decode-only" in text
