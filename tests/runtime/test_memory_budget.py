"""Devices with memory budgets and no plan: the session sizes the split by memory and speed or
refuses before any push; long prompts are prefilled in chunks that fit; generation stops cleanly
at a device's KV budget. Real worker processes on loopback, a small random Llama."""

from __future__ import annotations

import psutil
import pytest
import torch

from galaxy.errors import DeviceOutOfMemory
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.parallel import memory
from galaxy.parallel.forward import Request
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
        m = s.load(SRC, seq_len=128)
        heads, cols = m.partition.heads, m.partition.cols
        assert heads[1] < heads[0] and cols[1] < min(cols[0], cols[2])  # the small device holds least
        ids = list(range(3, 100))
        want = reference_output(SRC, Request(torch.tensor(ids)))
        assert (m.forward(ids) - want).abs().max() <= 1e-4
        infos = s.devices()
        peaks = _peaks()
    assert all(p <= i.memory_budget for p, i in zip(peaks, infos))


def test_devices_that_cannot_hold_the_model_are_refused_by_name_before_any_push(monkeypatch):
    monkeypatch.setattr(rpc_client, "_shard_parts", lambda *a: pytest.fail("a shard was pushed"))
    with LocalWorkers(2, threads=1, extra_args=["--memory-budget", "280MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        with pytest.raises(DeviceOutOfMemory, match=r"cannot hold budget-llama .*local0 \(budget 280 MiB.*"
                                                     r"local1 \(budget 280 MiB.*Add a device"):
            s.load(SRC, seq_len=128, stream_weights=True)
        assert [i.state for i in s.devices()] == ["idle", "idle"]


def test_a_long_prompt_is_prefilled_in_chunks_that_fit_and_generation_stops_at_the_kv_budget():
    with LocalWorkers(4, threads=1, extra_args=["--memory-budget", "350MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        m = s.load(SRC, seq_len=64)  # memory reserved for 64 tokens; the devices have some more
        prompt = [(7 * i) % 500 + 3 for i in range(2000)]
        assert m._guard.prompt_shortfall(len(prompt), "probe") is None  # its KV cache fits ...
        assert m._guard.prefill_chunk(prompt, 0, "probe") < len(prompt)  # ... but not its activations at once
        gen = m.generate(prompt, max_new_tokens=2000, details=True)
        prefills = [st.tokens for st in gen.steps if st.phase == "prefill"]
        assert len(prefills) > 1 and sum(prefills) == len(prompt)
        assert gen.finish == "kv_budget" and 0 < len(gen.tokens) < 2000
        # greedy tokens are exact: the single-device forward of prompt + tokens predicts each of them
        logits = reference_output(SRC, Request(torch.tensor(prompt + gen.tokens)))
        assert logits[len(prompt) - 1: -1].argmax(-1).tolist() == gen.tokens
        assert list(m._prefix.entries)  # the coordinator stopped it, not a worker's refusal: its cache is whole
        used = gen.kv_cache_bytes
        assert m.generate(prompt[:10], max_new_tokens=2) is not None  # and the devices still serve
        infos = s.devices()
        peaks = _peaks()
    assert all(p <= i.memory_budget for p, i in zip(peaks, infos))
    per_position = memory.spec_kv_bytes_per_position(CFG, m.partition.spec(0, CFG), 4)
    assert used[0] >= (len(prompt) + len(gen.tokens) - memory.KV_BLOCK) * per_position


def test_a_request_a_worker_cannot_hold_is_refused_by_it_cleanly_and_it_serves_on():
    """The worker's own check, for a caller that skips the coordinator's guard."""
    with LocalWorkers(3, threads=1, extra_args=["--memory-budget", "340MiB"]) as addrs, \
            connect(addresses=addrs) as s:
        m = s.load(SRC, seq_len=64)
        with pytest.raises(DeviceOutOfMemory, match="memory budget reached: this request needs"):
            s.executor.forward(Request(torch.arange(3, 3003) % 500, last_only=True, cache="big"))
        ids = list(range(3, 40))
        assert (m.forward(ids) - reference_output(SRC, Request(torch.tensor(ids)))).abs().max() <= 1e-4
