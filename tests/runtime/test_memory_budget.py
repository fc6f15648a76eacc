"""Devices with memory budgets and no plan: the session sizes the split by memory and speed or
refuses before any push; long prompts are prefilled in chunks that fit; generation stops cleanly
at a device's KV budget. Real worker processes on loopback, a small random Llama, decoding on the
split (decode_layout="split": the split's pools are what these tests pin)."""

from __future__ import annotations

import psutil
import pytest
import torch

from galaxy.errors import DeviceOutOfMemory, KVBudgetExceeded
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.parallel import memory
from galaxy.parallel.forward import Request
from galaxy.parallel.rank import DEFAULT_KV_BYTES
from galaxy.runtime.api import connect
from galaxy.runtime.sources import reference_output
from galaxy.transport import client as rpc_client
from galaxy.transport.spawn import LocalWorkers

# 8 layers of 8 heads of 64: a position of KV cache is 64 KiB of the model (16 KiB per device of a
# 4-way split), so a few MiB of budget run out after a few hundred tokens.
CFG = make_config("llama", vocab_size=512, hidden=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn=1024,
                  max_positions=4096, name="budget-llama")
SRC = RandomWeights(CFG, seed=5)


def _peaks() -> list[int]:
    return [int(next(x for x in open(f"/proc/{p.pid}/status") if x.startswith("VmHWM")).split()[1]) * 1024
            for p in psutil.Process().children()]


def test_without_a_plan_the_split_follows_memory_and_every_device_stays_within_its_budget():
    budgets = ["2GiB", "285MiB", "2GiB"]
    with LocalWorkers(3, threads=1, per_worker_args=[["--memory-budget", b] for b in budgets]) as addrs, \
            connect(addresses=addrs) as s:
        m = s.load(SRC, seq_len=128, decode_layout="split")
        heads, cols = m.partition.heads, m.partition.cols
        assert heads[1] < heads[0] and cols[1] < min(cols[0], cols[2])  # the small device holds least
        ids = list(range(3, 100))
        want = reference_output(SRC, Request(torch.tensor(ids)))
        assert (m.forward(ids) - want).abs().max() <= 1e-4
        roomy = max(b for _, b in s.executor.kv_capacity)
        infos = s.devices()
        peaks = _peaks()
    assert all(p <= i.memory_budget for p, i in zip(peaks, infos))
    assert roomy > DEFAULT_KV_BYTES  # a 2 GiB device's pool is what its budget leaves, not a fixed cap


def test_devices_that_cannot_hold_the_model_are_refused_by_name_before_any_push(monkeypatch):
    monkeypatch.setattr(rpc_client, "_shard_parts", lambda *a: pytest.fail("a shard was pushed"))
    with LocalWorkers(2, threads=1, extra_args=["--memory-budget", "280MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        with pytest.raises(DeviceOutOfMemory, match=r"cannot hold budget-llama .*local0 \(budget 280 MiB.*"
                                                     r"local1 \(budget 280 MiB.*Add a device"):
            s.load(SRC, seq_len=128, stream_weights=True, decode_layout="split")
        assert [i.state for i in s.devices()] == ["idle", "idle"]


def test_the_kv_pool_comes_from_the_memory_model_long_prompts_run_in_chunks_and_generation_stops_at_it():
    """Budgeted workers size their KV pool with galaxy.parallel.memory (budget less the loaded
    process, a reserved pass and the margins); the engine's pool is what the smallest holds; a
    prompt longer than it is refused up front with the numbers; a prompt near it is prefilled in
    chunks (the scheduler's, no longer than the reserved pass) and generation ends with finish
    'kv_budget' with exact greedy tokens; no device passes its budget."""
    with LocalWorkers(4, threads=1, extra_args=["--memory-budget", "330MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        # memory reserved for a 64-token pass; the rest of the budget is KV pool
        m = s.load(SRC, seq_len=64, decode_layout="split")
        ex = s.executor
        for r, (lm, (_, kv_budget)) in enumerate(zip(ex.loaded_memory, ex.kv_capacity)):
            reserve = memory.pass_reserve(CFG, m.partition, r, 4, 64)
            assert kv_budget == memory.kv_pool_budget(lm.budget, lm.resident, reserve) == lm.kv_budget > 0
        engine = m.engine
        positions = engine.pool.num_blocks * engine.pool.block_size
        assert positions == min(b // (t * engine.pool.block_size) for t, b in ex.kv_capacity) * engine.pool.block_size
        assert 64 < positions < CFG.max_positions
        with pytest.raises(KVBudgetExceeded, match=rf"prompt has {positions + 5} tokens and the KV pool holds "
                                                   rf"{positions} positions"):
            m.generate([3 + i % 500 for i in range(positions + 5)], max_new_tokens=4)
        prompt = [(7 * i) % 500 + 3 for i in range(positions - 6)]
        gen = m.generate(prompt, max_new_tokens=100, details=True)
        prefills = [st.tokens for st in gen.steps if st.phase == "prefill"]
        assert len(prefills) > 1 and max(prefills) <= 64 and sum(prefills) == len(prompt)
        assert gen.finish == "kv_budget" and len(gen.tokens) == 6
        # greedy tokens are exact: the single-device forward of prompt + tokens predicts each of them
        logits = reference_output(SRC, Request(torch.tensor(prompt + gen.tokens)))
        assert logits[len(prompt) - 1: -1].argmax(-1).tolist() == gen.tokens
        assert m.generate(prompt[:10], max_new_tokens=2) is not None  # and the devices still serve
        infos = s.devices()
        peaks = _peaks()
    assert all(p <= i.memory_budget for p, i in zip(peaks, infos))


def test_a_pass_a_device_cannot_hold_is_refused_before_it_runs_and_the_devices_serve_on():
    """The coordinator's check (memory.request_need against what each device keeps beside its
    pool), and the worker's own for a caller that skips it."""
    with LocalWorkers(3, threads=1, extra_args=["--memory-budget", "340MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        m = s.load(SRC, seq_len=64, decode_layout="split")
        big = list(range(3, 3003))
        with pytest.raises(DeviceOutOfMemory, match=r"a pass of 3000 tokens needs \d+ MiB there"):
            m.forward([t % 500 for t in big])
        with pytest.raises(DeviceOutOfMemory, match="memory budget reached: this request needs"):
            s.executor.forward(Request(torch.tensor(big) % 500))
        ids = list(range(3, 40))
        assert (m.forward(ids) - reference_output(SRC, Request(torch.tensor(ids)))).abs().max() <= 1e-4


# A 4,096-token prompt: a model small enough to prefill 4,096 tokens in a few seconds (2 KiB of KV per
# position, 1 KiB per device of two), and one with 32x the KV per position whose pool on the same
# budget holds far fewer positions than that (it is refused before it computes anything).
LONG = make_config("llama", vocab_size=512, hidden=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn=256,
                   max_positions=8192, name="long-llama")
DEEP = make_config("llama", vocab_size=512, hidden=256, n_layers=32, n_heads=8, n_kv_heads=8, ffn=256,
                   max_positions=8192, name="deep-llama")
PROMPT_4K = [(13 * i) % 509 + 3 for i in range(4096)]


def test_a_4096_token_prompt_is_prefilled_in_chunks_beside_the_pool_exactly_and_a_one_shot_pass_only_without_it():
    """Before the engine allocates its KV pool a device's budget has room for one 4,096-token pass
    with every logit (the worker admits it beside the pool it holds: none); the coordinator agrees
    (it once counted the pool not yet allocated and refused it: `galaxy run --plan --seq-len 1024
    --check` on issue 19's cluster). Once the pool is allocated, the budget leaves room only for the
    reserved 256-token steps: the 4,096-token prompt is prefilled in chunks, its greedy tokens are
    the unchunked reference's, a 4,096-token pass is refused up front, and no device passes its budget."""
    src = RandomWeights(LONG, seed=11)
    ref = reference_output(src, Request(torch.tensor(PROMPT_4K)))
    with LocalWorkers(2, threads=1, extra_args=["--memory-budget", "400MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        m = s.load(src, seq_len=256, decode_layout="split")
        assert (m.forward(PROMPT_4K) - ref).abs().max() <= 1e-4  # one pass, no pool yet
        gen = m.generate(PROMPT_4K, max_new_tokens=4, details=True)
        assert m.engine.pool.num_blocks * m.engine.pool.block_size > 4096  # the pool holds it ...
        prefills = [st.tokens for st in gen.steps if st.phase == "prefill"]
        assert len(prefills) >= 16 and max(prefills) <= 256 and sum(prefills) == 4096  # ... in chunks
        whole = reference_output(src, Request(torch.tensor(PROMPT_4K + gen.tokens)))
        assert whole[4095:-1].argmax(-1).tolist() == gen.tokens and len(gen.tokens) == 4
        with pytest.raises(DeviceOutOfMemory, match=r"a pass of 4096 tokens needs \d+ MiB there .* beside its "
                                                     r"shard and KV pool"):
            m.forward(PROMPT_4K)  # beside the pool, the budget holds no 4,096-token pass
        infos = s.devices()
        peaks = _peaks()
    assert all(p <= i.memory_budget for p, i in zip(peaks, infos))


def test_a_4096_token_prompt_longer_than_the_kv_pool_is_refused_before_any_step():
    src = RandomWeights(DEEP, seed=12)
    with LocalWorkers(2, threads=1, extra_args=["--memory-budget", "400MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        m = s.load(src, seq_len=256, decode_layout="split")
        engine = m.engine
        positions = engine.pool.num_blocks * engine.pool.block_size
        assert 256 < positions < 4096
        with pytest.raises(KVBudgetExceeded, match=rf"prompt has 4096 tokens and the KV pool holds {positions} "
                                                   rf"positions \({engine.pool.num_blocks} blocks of 16"):
            m.generate(PROMPT_4K, max_new_tokens=4)
        assert engine.steps == 0  # refused at submit: nothing ran on any device
