"""Profiling: block timings on the device, the fitted cost model, caching, real link tests."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from galaxy.backends.profiling import median_times, time_blocks
from galaxy.model.config import preset
from galaxy.parallel import memory
from galaxy.transport.client import Cluster
from galaxy.transport.worker import WorkerSettings, start_server
from planner import profiler
from planner.profile import ComputeModel, Tenancy


def test_fit_recovers_rate_and_overhead():
    true = ComputeModel(5e10, 0.002)
    pts = [(f, true.seconds(f)) for f in (1e8, 5e8, 2e9, 8e9)]
    m = profiler.fit(pts)
    assert m.flops_per_s == pytest.approx(5e10, rel=1e-6)
    assert m.overhead_s == pytest.approx(0.002, rel=1e-6)


def test_fit_never_returns_negative_overhead():
    m = profiler.fit([(1e9, 0.010), (2e9, 0.030)])  # extrapolates to -10 ms at zero work
    assert m.overhead_s == 0.0 and m.flops_per_s > 0


def test_time_blocks_covers_every_kind_and_size():
    cfg = preset("tiny-llama")
    samples = time_blocks(cfg, [16, 32], repeats=1)
    kinds = {(s.kind, s.seq) for s in samples}
    # the LM head multiplies one token's row (the last in prefill, each decode step's); a decode step runs
    # one token of each of several sequences through a stack of whole layers (all of a tiny model's)
    assert kinds == ({(k, q) for k in ("attention", "mlp", "connective") for q in (16, 32)} | {("head", 1)}
                     | {("decode", cfg.n_layers)})
    assert sorted(s.units for s in samples if s.kind == "decode") == [1, 2, 4, 16]
    assert all(s.seconds > 0 for s in samples)
    assert {s.units for s in samples if s.kind == "attention"} == {2, 3, 6}
    assert {s.units for s in samples if s.kind == "head"} == {cfg.vocab_size}  # a small vocabulary: all of it
    assert not any(s.kind in ("head", "decode") for s in time_blocks(preset("tiny-bert"), [16], repeats=1))


def test_a_passing_slowdown_costs_each_job_one_sample_which_the_median_drops(monkeypatch):
    clock = {"now": 0.0, "calls": 0}

    def job(cost):  # a job whose every call costs `cost`, or 50x that while the device is disturbed
        def run():
            clock["calls"] += 1
            slow = 4 <= clock["calls"] <= 9  # a slowdown spanning three consecutive timed calls
            clock["now"] += cost * (50 if slow else 1)
        return lambda: run

    monkeypatch.setattr("galaxy.backends.profiling.time.perf_counter", lambda: clock["now"])
    seen = []
    got = median_times([job(1.0), job(2.0), job(3.0)], repeats=3, progress=lambda d, t: seen.append((d, t)))
    assert got == [1.0, 2.0, 3.0]  # back-to-back repeats would have reported the second job 50x slow
    assert seen[-1] == (9, 9) and len(seen) == 9


def test_head_is_timed_past_the_caches_on_a_real_vocabulary():
    from galaxy.backends.profiling import head_rows

    cfg = preset("gpt2-large")  # 50257 rows of 1280 floats: 245 MiB in all
    assert [r * cfg.hidden * 4 // 2**20 for r in head_rows(cfg)] == [23, 47, 95]
    assert head_rows(cfg, 2) == [9830, 19660, 39321]  # half the bytes per row: twice the rows


def test_head_model_prices_the_one_token_product_slower_than_the_mlp_gemm():
    """What the planner sees: a head fitted from its own samples, not the MLP's GEMM rate."""
    cfg = preset("gpt2")
    from galaxy.backends.profiling import Sample

    samples = [Sample("attention", 12, 64, 0.01), Sample("attention", 6, 64, 0.005),
               Sample("mlp", 3072, 64, 0.008), Sample("mlp", 1536, 64, 0.004),
               Sample("connective", 64, 64, 1e-4), Sample("connective", 16, 64, 3e-5),
               Sample("head", 8192, 1, 0.004), Sample("head", 16384, 1, 0.008)]  # ~4 GFLOP/s: memory-bound
    models = profiler.fit_samples(cfg, samples)
    assert models["head"].flops_per_s == pytest.approx(2 * 768 * 8192 / 0.004, rel=1e-6)
    assert models["head"].flops_per_s < models["mlp"].flops_per_s / 10


@pytest.fixture
def two_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path))
    started = [start_server("127.0.0.1:0", WorkerSettings(name=f"p{i}", memory_budget=10**10)) for i in range(2)]
    yield [addr for _, addr, _ in started]
    for server, _, service in started:
        service.close()
        server.stop(grace=0).wait()


def test_profile_cluster_measures_caches_and_caps_memory(two_workers, monkeypatch):
    cfg = preset("tiny-gpt2")
    with Cluster(two_workers) as c:
        prof = profiler.profile_cluster(c, cfg, [16], memory_budget=5 * 10**8, show_progress=False)
        assert [d.name for d in prof.devices] == ["p0", "p1"]
        assert all(d.memory_bytes == 5 * 10**8 for d in prof.devices)  # the tighter of worker and user caps
        assert all(d.attention.flops_per_s > 0 and d.mlp.flops_per_s > 0 for d in prof.devices)
        t0, t1 = (d.tenancy for d in prof.devices)  # both on this machine: co-tenants
        assert t0.host == t1.host and t0.host_cpus == os.cpu_count() and 0 < t0.cores <= os.cpu_count()
        link = prof.link(0, 1)
        assert link.bandwidth_bps > 1e7 and 0 < link.latency_s < 0.1 and prof.link(1, 0) == link

        calls = []
        monkeypatch.setattr(c, "profile", lambda *a, **k: calls.append(a) or {})
        again = profiler.profile_cluster(c, cfg, [16], show_progress=False)
        assert calls == [] and again.devices[0].attention == prof.devices[0].attention  # from the cache
        # only the worker's cap this time: what it leaves beside the worker (in-process here: this test's
        # own memory), made safe for the solver's linear estimate -- the worker's admission sum
        d, info = again.devices[0], c.hello()[0]
        assert d.budget_bytes == 10**10 and abs(d.resident_bytes - (info.rss - info.droppable)) < 64 * 2**20
        assert d.memory_bytes == memory.solver_room(10**10, d.resident_bytes, cfg, 16, memory.MemoryParams())
        assert d.memory_bytes < memory.room(10**10, d.resident_bytes) - memory.PUSH_TRANSIENT


def test_the_decode_fit_is_a_layers_step_growing_with_the_batch():
    samples = [SimpleNamespace(kind="decode", units=b, seq=4, seconds=4 * (3e-3 + 0.5e-3 * (b - 1)))
               for b in (1, 4, 16)]
    t = profiler.fit_decode(samples)
    assert t.layer_s == pytest.approx(3e-3) and t.per_seq_s == pytest.approx(0.5e-3)
    assert t.seconds(30, 8) == pytest.approx(30 * (3e-3 + 7 * 0.5e-3))
    assert profiler.fit_decode([SimpleNamespace(kind="mlp", units=1, seq=4, seconds=1.0)]) is None  # an encoder


class _OneWorker:
    """A cluster of one worker on machine "H" whose block timings are made up (no process, no torch)."""

    def __init__(self):
        self.timed = []

    def hello(self):
        return [SimpleNamespace(name="w", address="127.0.0.1:1", host_id="H", host_cpus=2, compute_device="cpu",
                                threads=1, cpu_count=2, cpu_limit=2.0, rss=0, droppable=0, memory_budget=10**10,
                                available_memory=10**10)]

    def profile(self, cfg, seq_lens, dtype, ranks=None):
        self.timed.append(ranks)
        pts = [("attention", u, 16, 1e-3 * u) for u in (1, 2)] + [("mlp", u, 16, 1e-5 * u) for u in (8, 16)]
        pts += [("connective", u, 16, 1e-6 * u) for u in (4, 16)] + [("decode", b, 2, 2e-3 * b) for b in (1, 4)]
        return {0: SimpleNamespace(samples=[SimpleNamespace(kind=k, units=u, seq=q, seconds=t) for k, u, q, t in pts],
                                   codec_s_per_byte={})}


def test_a_profile_cached_at_a_very_different_load_is_timed_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path))
    cfg, c = preset("tiny-gpt2"), _OneWorker()

    def plan_at(host: str, load: float):
        return profiler.profile_cluster(c, cfg, [16], host_load=profiler.HostLoad(host, load, 2))

    prof = plan_at("H", 0.1)
    assert c.timed == [[0]] and prof.devices[0].decode.layer_s == pytest.approx(1e-3)  # 2 layers stacked
    plan_at("H", 1.3)  # a thread's share of a core 0.87 against 1: the cached timings hold
    assert c.timed == [[0]]
    capsys.readouterr()
    plan_at("H", 6.0)  # 0.29 against 1
    assert c.timed == [[0], [0]]
    err = capsys.readouterr().err
    assert "timing w again: its cached profile was timed at load average 0.1, now 6.0 on 2 CPUs" in err
    plan_at("H", 6.5)  # the new entry records the load it was timed at
    plan_at("elsewhere", 0.0)  # planned from another machine: its load says nothing of this worker's
    assert c.timed == [[0], [0]]


def test_co_tenants_are_the_other_workers_reporting_the_same_host():
    infos = [SimpleNamespace(name=n, host_id=h) for n, h in (("a", "H1"), ("b", "H1"), ("c", "H2"), ("d", ""),
                                                             ("e", ""))]
    assert profiler.co_tenants(infos) == [["b"], ["a"], [], [], []]  # an unknown host shares with nobody


def test_tenancy_is_a_cpu_workers_threads_capped_by_its_quota_on_its_machine():
    def info(**kw):
        base = dict(host_id="H1", host_cpus=2, compute_device="cpu", threads=1, cpu_count=2, cpu_limit=2.0)
        return SimpleNamespace(**{**base, **kw})

    assert profiler.tenancy(info()) == Tenancy("H1", 1.0, 2)
    assert profiler.tenancy(info(threads=2, cpu_limit=0.45)).cores == 0.45  # an emulated device's CPU quota
    assert profiler.tenancy(info(compute_device="cuda")) is None  # a GPU does not share the host's cores
    assert profiler.tenancy(info(host_cpus=0)) is None and profiler.tenancy(info(host_id="")) is None  # not reported


def test_workers_sharing_a_machine_are_timed_together_and_cached_per_set_of_co_tenants(tmp_path, monkeypatch):
    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path))
    started = [start_server("127.0.0.1:0", WorkerSettings(name=f"s{i}")) for i in range(3)]
    addrs = [addr for _, addr, _ in started]
    cfg = preset("tiny-gpt2")

    def profile(addresses):
        with Cluster(addresses) as c:
            timed, real = [], c.profile

            def spy(*a, ranks=None, **k):
                timed.append(ranks)
                return real(*a, ranks=ranks, **k)

            monkeypatch.setattr(c, "profile", spy)
            profiler.profile_cluster(c, cfg, [16], show_progress=False)
            return c.hello()[0].host_id, timed

    try:
        host, timed = profile(addrs[:2])
        assert host and timed == [[0, 1]]
        assert profile(addrs)[1] == [[0, 1, 2]]  # s2 joined their machine: the pair's timings no longer hold
        assert profile(addrs[:2])[1] == []  # the pair alone again: its own timings are cached
        assert profile(addrs[1:])[1] == [[0, 1]]  # a pair never timed together
    finally:
        for server, _, service in started:
            service.close()
            server.stop(grace=0).wait()


def test_memory_aware_plan_moves_work_off_a_small_device_where_the_even_split_fails(smollm2_path, tmp_path,
                                                                                     monkeypatch):
    """Budgets where an even split overflows device 2: the planner shifts its heads and columns
    to the others and the run succeeds (worker processes, real budgets, the real SmolLM2)."""
    import torch

    from galaxy.errors import DeviceOutOfMemory
    from galaxy.model.checkpoints import open_checkpoint
    from galaxy.parallel.executor import LoadOptions
    from galaxy.parallel.forward import Request
    from galaxy.parallel.sharding import even_partition, full_spec, load_shard
    from galaxy.transport.spawn import LocalWorkers
    from planner.solver import solve

    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path))
    src = open_checkpoint(smollm2_path)
    cfg = src.config
    budgets = [["--memory-budget", "3GB"], ["--memory-budget", "3GB"], ["--memory-budget", "440MB"]]
    with LocalWorkers(3, threads=1, per_worker_args=budgets) as addrs, Cluster(addrs) as c:
        with pytest.raises(DeviceOutOfMemory, match="local2"):
            c.load(src, even_partition(cfg, 3))
        prof = profiler.profile_cluster(c, cfg, [16], show_progress=False)
        plan = solve(cfg, 16, prof, "galaxy")
        small = next((d for d in plan.devices if d.name == "local2"), None)  # left out, or given less
        if small is not None:
            even_share = sum(d.memory.weights_bytes for d in plan.devices) / 3
            assert small.memory.weights_bytes <= small.memory.budget_bytes
            assert small.memory.weights_bytes < 0.9 * even_share
        with Cluster(plan.addresses()) as run:  # reserving what the plan was solved for: 16 tokens
            run.load(src, plan.to_partition(cfg), LoadOptions(seq_len=16))
            ids = torch.tensor(src.tokenizer().encode("Memory-aware plans keep small devices alive."))
            out = run.forward(Request(ids)).output
    assert float((out - load_shard(src, full_spec(cfg))(ids)).abs().max()) <= 1e-4
