"""Phase-separated serving on in-process ranks: prompts prefilled on one group (HMP, uneven heads),
their K/V re-sharded to another group with another split, tokens decoded there -- greedy tokens
identical to the single-device reference, whatever the two splits; the prefill blocks freed after
the move; backpressure keeps a sequence on the prefill group without changing a token; a bad box
is refused with a typed error."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.engine.disagg import DisaggConfig, DisaggEngine
from galaxy.engine.engine import EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.errors import KVTransferError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import Partition, Strategy, weighted_partition
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = RandomWeights(preset("tiny-llama").replace(n_layers=3), seed=3, std=0.3)  # peaked logits: no near-ties
CFG = SRC.config  # 6 query heads in 2 KV groups of 3


def split(heads, strategy=Strategy.GALAXY) -> Partition:
    p = weighted_partition(CFG, [1.0] * len(heads), strategy)
    return Partition(p.strategy, tuple(heads), p.cols, p.vocab, p.layers, p.seq_weights).validate(CFG)


def loaded(partition: Partition) -> InprocCluster:
    ex = InprocCluster(partition.world)
    ex.load(SRC, partition)
    return ex


@pytest.fixture
def disagg():
    made = []

    def make(prefill: Partition, decode: Partition, pconf=None, dconf=None, config=None):
        pe, de = loaded(prefill), loaded(decode)
        engine = DisaggEngine(pe, de, CFG, None, pconf or EngineConfig(), dconf or EngineConfig(),
                              config or DisaggConfig())
        made.append((engine, pe, de))
        return engine

    yield make
    for engine, pe, de in made:
        engine.close()
        pe.close()
        de.close()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("prefill,decode", [
    ([3, 1, 2], [6]),  # HMP over 3 ranks with uneven heads (KV head 1 on two of them), decode on one device
    ([1, 2, 3], [4, 2]),  # decode on 2 ranks with another split: heads go in parts to both receivers
])
def test_greedy_tokens_equal_the_single_device_reference_across_placements(disagg, prefill, decode):
    ps = prompts((7, 19, 3, 12))
    want = [reference_generate(SRC, p, 10, stop_at_eos=False) for p in ps]
    small = EngineConfig(block_size=4, max_batched_tokens=32, kv_blocks=40)
    engine = disagg(split(prefill), split(decode, Strategy.MEGATRON if len(decode) > 1 else Strategy.GALAXY),
                    small, EngineConfig(block_size=8, kv_blocks=30), DisaggConfig(chunk_bytes=4096))
    got: list = [None] * len(ps)

    def ask(i):
        got[i] = engine.generate(ps[i], GenerationConfig(10, stop_at_eos=False))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [g.tokens for g in got] == want
    assert all(g.handoff is not None and g.handoff.at_token == 1 for g in got)  # moved right after the first
    assert engine.prefill.moved == len(ps) and engine.decode.adopted == len(ps)
    tokens = [len(p) for p in ps]  # the prompt's K/V move; the first token's are computed by the decode group
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
    if len(decode) == 1:
        assert [g.handoff.nbytes for g in got] == [t * per_token for t in tokens]
    assert all(s.phase == "prefill" for g in got for s in g.steps[:1])
    blocks = engine.prefill.sched.blocks
    assert blocks.num_free == blocks.num_blocks and not engine.prefill.sched.live  # prefill blocks all given back
    assert not engine.decode.sched.live and engine.decode.pending_bytes == 0


def test_a_full_decode_group_keeps_sequences_decoding_on_the_prefill_group_with_the_same_tokens(disagg):
    ps = prompts((6, 9, 4), seed=1)
    want = [reference_generate(SRC, p, 8, stop_at_eos=False) for p in ps]
    one = EngineConfig(block_size=4, max_batched_tokens=8, max_running=1, kv_blocks=16)  # one sequence at a time
    engine = disagg(split([2, 4]), split([6]), EngineConfig(block_size=4, kv_blocks=40), one)
    streams = [engine.submit(p, GenerationConfig(8, stop_at_eos=False)) for p in ps]
    got = [s.result(120) for s in streams]
    assert [g.tokens for g in got] == want
    assert engine.prefill.kept_tokens > 0  # some decoded on the prefill group while the decode group was full
    assert any(g.handoff is None or g.handoff.at_token > 1 for g in got)


def test_a_sequence_that_ends_with_its_first_token_never_moves(disagg):
    engine = disagg(split([4, 2]), split([6]))
    out = engine.generate(prompts((5,))[0], GenerationConfig(1, stop_at_eos=False))
    assert len(out.tokens) == 1 and out.handoff is None and engine.prefill.moved == 0


def test_a_box_of_the_wrong_shape_or_dtype_is_refused_with_a_typed_error():
    ex = loaded(split([4, 2], Strategy.MEGATRON))
    pool = KVPool(4, 8)
    good = torch.zeros(CFG.n_layers, 2, 2, 10, CFG.head_dim)  # rank 0: query heads 0..4, KV heads 0..2
    ex.import_kv(0, (1, 2), good, (0, CFG.n_layers), (0, 2), pool)
    with pytest.raises(KVTransferError, match="expected"):
        ex.import_kv(0, (1, 2), good[:, :, :, :9, :-1], (0, CFG.n_layers), (0, 2), pool)
    with pytest.raises(KVTransferError, match="float16"):
        ex.import_kv(0, (1, 2), good.half(), (0, CFG.n_layers), (0, 2), pool)
    with pytest.raises(KVTransferError, match="not within its KV heads"):
        ex.import_kv(1, (1, 2), good, (0, CFG.n_layers), (0, 2), pool)  # rank 1 holds KV head 1
    with pytest.raises(KVTransferError, match="thread0"):
        ex.export_kv(0, (0,), 4, (0, 1), (0, 1), KVPool(5, 8))  # a pool of another size than the one here
    ex.close()


def test_the_python_api_loads_a_plan_serve_section_and_generates_the_reference_tokens():
    import galaxy
    from galaxy.errors import PlanMismatch

    p = prompts((8,), seed=4)[0]
    want = reference_generate(SRC, p, 6, stop_at_eos=False)
    with galaxy.connect(local=4, transport="inproc") as session:
        lm = session.load(SRC, placement={"placement": "disaggregated", "prefill": [0, 1, 2], "decode": ["thread3"]})
        assert lm.placement.prefill == (0, 1, 2) and lm.placement.decode == (3,)
        out = lm.generate(p, 6, details=True)
        assert out.tokens == want and out.handoff is not None
        load = lm.engine.load
        assert load["moved"] == 1 and load["running"] == 0 and "decode thread0" in load["kv_bytes"]
        with pytest.raises(PlanMismatch, match="distinct device indices"):
            session.load(SRC, placement={"prefill": [0, 1], "decode": [4]})
        colocated = session.load(SRC, placement={"placement": "colocated"})
        assert colocated.groups is None and colocated.generate(p, 6, details=True).tokens == want


def test_galaxy_serve_takes_the_placement_from_its_flags_and_leaves_a_plan_to_the_load():
    import argparse

    from galaxy.cli.serve import serve_placement
    from galaxy.errors import GalaxyError

    flags = argparse.Namespace(prefill_devices="0,1,2", decode_devices="3", plan=None)
    assert serve_placement(flags) == {"placement": "disaggregated", "prefill": "0,1,2", "decode": "3"}
    assert serve_placement(argparse.Namespace(prefill_devices=None, decode_devices=None, plan="p.json")) is None
    with pytest.raises(GalaxyError, match="go together"):
        serve_placement(argparse.Namespace(prefill_devices="0", decode_devices=None, plan=None))


def test_a_planned_disaggregated_placement_prefills_with_the_plan_split_and_decodes_where_it_says():
    """`galaxy plan --serve` writes the prefill devices as the plan's devices (with the split it solved)
    and the decode devices in its serve section; loading that plan runs both, with the reference tokens."""
    import galaxy
    from planner.plan import DevicePlan, ModelRef, Plan, ServePlan, ServePrediction

    heads, cols = (4, 0, 2), (CFG.ffn - 2 * (CFG.ffn // 3), CFG.ffn // 3, CFG.ffn // 3)
    rows = (CFG.vocab_size - 2 * (CFG.vocab_size // 3), CFG.vocab_size // 3, CFG.vocab_size // 3)
    devices = tuple(DevicePlan(f"thread{i}", f"inproc:{i}", heads=h, mlp_cols=c, vocab_rows=v, tokens=t)
                    for i, (h, c, v, t) in enumerate(zip(heads, cols, rows, (6, 4, 6))))
    pred = ServePrediction(0.1, 0.2, 0.01, 0.02, 1.0, 3.0, 0.01, 0.1, 0.01)
    serve = ServePlan("disaggregated", tuple(d.name for d in devices), ("thread3",), 1.0, 8, 6, 1.0, 0.1, pred)
    plan = Plan("galaxy", devices, 16, ModelRef.of(CFG), serve=serve)
    p = prompts((8,), seed=5)[0]
    want = reference_generate(SRC, p, 6, stop_at_eos=False)
    with galaxy.connect(local=4, transport="inproc") as session:
        lm = session.load(SRC, plan=plan)
        assert lm.placement.prefill == (0, 1, 2) and lm.placement.decode == (3,)
        assert lm.placement.prefill_partition.heads == heads
        assert lm.generate(p, 6, details=True).tokens == want


def test_the_scheduler_adopts_a_prefilled_sequence_into_fresh_blocks_and_decodes_its_last_token():
    from galaxy.engine.scheduler import Scheduler, SchedulerConfig
    from galaxy.engine.sequence import InvalidRequest, SamplingParams

    s = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_batched_tokens=8, max_running=2, max_model_len=16))
    params = SamplingParams(max_new_tokens=4)
    seq = s.adopt(list(range(10)), 9, params)  # prompt of 9, its first token sampled elsewhere
    assert seq.num_computed == 9 and len(seq.block_table) == 3
    assert s.adopt(list(range(8)), 7, params) is None  # 2 blocks needed (7 K/V + the next), 1 free
    with pytest.raises(InvalidRequest):
        s.adopt(list(range(16)), 15, params)  # no room to generate in max_model_len
    plan = s.schedule()
    assert [(it.start, it.token_ids, it.logits) for it in plan.items] == [(9, (9,), True)]
    s.blocks.audit(s.live.values())
    s.update(plan, {seq.seq_id: 7})
    assert seq.generated == [9, 7]  # the first token (given) and the one decoded here


def test_the_phase_bench_runs_both_placements_on_the_same_requests_with_the_same_outputs():
    from galaxy.bench.phases import run_phase_bench, table
    from galaxy.bench.serve import Workload

    pre, dec = loaded(split([3, 1, 2])), loaded(split([6]))
    try:
        w = Workload(num_requests=3, concurrency=2, input_len=12, output_len=4)
        report = run_phase_bench(pre, dec, CFG, None, w, EngineConfig(block_size=4, kv_blocks=40, chunk_size=4),
                                 reps=2, stream=True)  # 12-token prompts in 3 chunks: the streamed row streams two
    finally:  # early; in process there is no direct hop: the default path's row is "coordinator"
        pre.close()
        dec.close()
    assert report["outputs_identical"] and set(report["unloaded"]) == {"colocated", "coordinator", "streamed"}
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
    for name in ("coordinator", "streamed"):
        moved = report["unloaded"][name]
        assert moved["kv_bytes"] == 12 * per_token and moved["transfer_s"] > 0 and moved["exposed_s"] > 0
    assert report["unloaded"]["coordinator"]["hidden_s"] == 0  # moved after the prefill: nothing hidden
    assert "transfer_s" not in report["unloaded"]["colocated"]
    assert all(r["completed"] == 3 and r["failed"] == 0 for r in report["loaded"].values())
    assert "greedy outputs identical: yes" in table(report)


def test_the_phase_bench_loads_each_run_fresh_and_judges_both_placements_by_colocated_objectives():
    """The unloaded requests' prompts are the workload's first ones (one seed): a loaded run on the
    engine that served them found them in its prefix cache. Each loaded run now gets a fresh engine;
    a sweep of rates gives each placement an SLO attainment per rate and a goodput."""
    from galaxy.bench.phases import run_phase_bench, table
    from galaxy.bench.serve import Workload

    pre, dec = loaded(split([3, 1, 2])), loaded(split([6]))
    try:
        w = Workload(num_requests=3, input_len=12, output_len=4)
        report = run_phase_bench(pre, dec, CFG, None, w, EngineConfig(block_size=4, kv_blocks=40), reps=2,
                                 rates=(50.0, 100.0), slo_ttft_x=1e6, slo_tpot_x=1e6)
    finally:
        pre.close()
        dec.close()
    assert [(r["placement"], r["rate"]) for r in report["runs"]] == [
        (p, r) for r in (50.0, 100.0) for p in ("colocated", "coordinator")]
    assert all(r["prefix_hit_rate"] == 0 for r in report["runs"])
    assert report["slo"]["ttft_s"] == 1e6 * report["unloaded"]["colocated"]["ttft_s"]
    assert all(r["slo_attainment"] == 1.0 for r in report["runs"])  # objectives no run can miss
    assert report["goodput"] == {"colocated": 100.0, "coordinator": 100.0}
    assert report["outputs_identical"] and "goodput" in table(report)
