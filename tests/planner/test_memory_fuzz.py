"""Fuzz over device memories and models: every plan the planner emits passes the check the
coordinator runs before a push (the workers' own admission); every split it cannot make is
refused with nothing moved; and a few plans are loaded and run on real budgeted workers."""

from __future__ import annotations

import random

import psutil
import pytest
import torch

from galaxy.errors import DeviceOutOfMemory
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config, preset
from galaxy.parallel import memory
from galaxy.parallel.executor import DeviceInfo, LoadOptions
from galaxy.parallel.forward import Request
from galaxy.runtime.api import connect
from galaxy.runtime.budget import fit_partition
from galaxy.runtime.sources import reference_output
from galaxy.transport.client import check_memory
from galaxy.transport.spawn import LocalWorkers
from planner.fit import fit_plan
from planner.plan import PlanError
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link

MODELS = ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bert", "gpt2", "smollm2-135m", "opt-125m"]


def random_model(rng: random.Random):
    if rng.random() < 0.6:
        return preset(rng.choice(MODELS))
    heads = rng.choice([4, 6, 8])
    return make_config(rng.choice(["llama", "gpt2"]), vocab_size=rng.randint(100, 5000), hidden=heads * 16,
                       n_layers=rng.randint(1, 6), n_heads=heads, ffn=rng.randint(32, 512), max_positions=1024,
                       name="fuzz")


def profile(rng: random.Random, cfg, seq: int, n: int, dtype_bytes: int) -> ClusterProfile:
    params = memory.MemoryParams.for_dtype(dtype_bytes)
    full = memory.shard_params(cfg, memory.ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size),
                                                     (0, cfg.n_layers))) * dtype_bytes
    devices = []
    for i in range(n):
        resident = rng.randint(150, 300) * memory.MiB
        budget = resident + int(full * rng.uniform(0.1, 1.5)) + rng.randint(0, 200) * memory.MiB
        cm = ComputeModel(rng.uniform(1e9, 2e10), rng.choice([0.0, 1e-4]))
        devices.append(DeviceProfile(f"d{i}", f"d{i}:1", cm, cm, ComputeModel(1e9, 0.0),
                                     max(0, memory.solver_room(budget, resident, cfg, seq, params)),
                                     budget_bytes=budget, resident_bytes=resident))
    links = [[None if i == j else Link(rng.choice([1e8, 1e9]), 1e-4) for j in range(n)] for i in range(n)]
    return ClusterProfile(devices, links)


def infos_of(prof: ClusterProfile) -> list[DeviceInfo]:
    return [DeviceInfo(d.address, d.name, 2, 1, "cpu", 16 << 30, 8 << 30, d.budget_bytes, "idle", d.resident_bytes)
            for d in prof.devices]


def test_every_plan_passes_the_admission_and_every_misfit_is_refused_before_anything_moves():
    rng, planned, refused = random.Random(19), 0, 0
    for _ in range(30):
        cfg = random_model(rng)
        seq = rng.choice([8, 64, 256, min(1024, cfg.max_positions)])
        dtype_bytes = rng.choice([4, 4, 2])
        prof = profile(rng, cfg, seq, rng.randint(1, 3), dtype_bytes)
        options = LoadOptions(dtype="float32" if dtype_bytes == 4 else "bfloat16", seq_len=seq)
        try:
            plan = fit_plan(cfg, seq, prof, rng.choice([None, "galaxy"]), dtype_bytes)
        except PlanError:
            refused += 1
        else:
            planned += 1
            by_name = {d.name: d for d in prof.devices}
            used = ClusterProfile([by_name[d.name] for d in plan.devices])
            check_memory(infos_of(used), [d.name for d in used.devices], cfg, plan.to_partition(cfg), options)
        infos = infos_of(prof)  # and without a plan: a split that fits, or a refusal naming the devices
        try:
            part = fit_partition(cfg, infos, [d.name for d in prof.devices], options)
        except DeviceOutOfMemory as e:
            assert "nothing was pushed or loaded" in str(e)
        else:
            check_memory(infos, [d.name for d in prof.devices], cfg, part, options)
    assert planned >= 10 and refused >= 3  # both outcomes were exercised


CFG = make_config("llama", vocab_size=512, hidden=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn=512,
                  max_positions=1024, name="fuzz-llama")


@pytest.mark.parametrize("seed", [1, 2])
def test_plans_for_real_budgeted_workers_load_and_run_within_their_budgets(seed):
    rng = random.Random(seed)
    budgets = [rng.choice(["300MiB", "320MiB", "400MiB", "1GiB"]) for _ in range(3)]
    src = RandomWeights(CFG, seed=seed)
    with LocalWorkers(3, threads=1, per_worker_args=[["--memory-budget", b] for b in budgets]) as addrs, \
            connect(addresses=addrs) as s:
        infos = s.devices()
        seq = rng.choice([64, 256])
        params = memory.MemoryParams()
        file = memory.file_transient_bytes(CFG, 0)  # local workers build their random shards themselves
        cm = ComputeModel(1e10, 0.0)
        prof = ClusterProfile([DeviceProfile(i.name, i.address, cm, cm, cm, max(0, memory.solver_room(
            i.memory_budget, i.rss, CFG, seq, params, file)), budget_bytes=i.memory_budget, resident_bytes=i.rss)
            for i in infos], [[None if a == b else Link(1e9, 1e-4) for b in range(3)] for a in range(3)])
        plan = fit_plan(CFG, seq, prof, "galaxy", transient=file)
        if len(plan.devices) != 3:  # the plan left a device out: a session runs on the plan's devices
            pytest.skip(f"the plan uses {len(plan.devices)} of 3 devices")
        m = s.load(src, plan=plan, decode_layout="split")
        ids = list(range(3, 3 + seq))
        assert (m.forward(ids) - reference_output(src, Request(torch.tensor(ids)))).abs().max() <= 1e-4
        peaks = [int(next(x for x in open(f"/proc/{p.pid}/status") if x.startswith("VmHWM")).split()[1]) * 1024
                 for p in psutil.Process().children()]
    assert all(p <= i.memory_budget for p, i in zip(peaks, infos))
