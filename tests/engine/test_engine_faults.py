"""Faults in the middle of a batch, on real worker processes: a device dropping out while several
requests are in flight ends each of them cleanly, or (with recovery) lets each finish with the
tokens it would have got; a flood of requests is refused at once without disturbing the batch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import galaxy
from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.scheduler import QueueFull
from galaxy.errors import InvalidRequest, KVBudgetExceeded, PeerUnreachable
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate
from galaxy.serving.openai import FINISH

SRC = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
PROMPTS = [list(range(5, 5 + n)) for n in (4, 11, 7, 15)]


def _kill_at_step(session, k: int):
    """Kill worker 0 right before the engine's k-th step (deterministic, whatever the timing)."""
    real, calls = session.executor.step, []

    def step(*args):
        calls.append(1)
        if len(calls) == k:
            session._owned.procs[0].kill()
        return real(*args)

    session.executor.step = step


def test_a_device_lost_mid_batch_with_recovery_lets_every_request_finish_with_its_tokens():
    want = [reference_generate(SRC, p, 16, stop_at_eos=False) for p in PROMPTS]
    with galaxy.connect(local=3, recover=True) as s:
        lm = s.load(SRC)
        _kill_at_step(s, 5)
        streams = [lm.submit(p, 16) for p in PROMPTS]  # all in flight together
        got = [st.result(timeout=120).tokens for st in streams]
        assert s.executor.events[-1].kind == "recover" and lm.partition.world == 2
    assert got == want


def test_a_device_lost_mid_batch_without_recovery_ends_every_request_naming_it_and_frees_the_blocks():
    with galaxy.connect(local=3) as s:
        lm = s.load(SRC, decode_layout="split")  # the split's steps, which _kill_at_step wraps
        engine = lm.engine
        _kill_at_step(s, 4)
        t0 = time.monotonic()
        streams = [lm.submit(p, 30) for p in PROMPTS]
        for st in streams:
            with pytest.raises(PeerUnreachable, match="local0"):
                st.result(timeout=60)
        assert time.monotonic() - t0 < 30  # nothing waits out a long timeout
        assert engine.load["running"] == 0 and engine.load["kv_blocks_used"] == 0


def test_a_flood_is_refused_at_once_while_the_batch_goes_on():
    ex = InprocCluster(2)
    ex.load(SRC, even_partition(SRC.config, 2))
    engine = Engine(ex, SRC.config, config=EngineConfig(max_running=2, max_waiting=3))
    try:
        want = [reference_generate(SRC, p, 10, stop_at_eos=False) for p in PROMPTS[2:]]
        long = [engine.submit(p, GenerationConfig(50, stop_at_eos=False)) for p in (PROMPTS[0], PROMPTS[2])]
        deadline = time.monotonic() + 30
        while engine.load["running"] < 2:  # both admitted, for 50 tokens: the next ones wait
            assert time.monotonic() < deadline
            time.sleep(0.002)
        accepted = [engine.submit(p, GenerationConfig(10, stop_at_eos=False)) for p in PROMPTS[2:]]
        refused, flood, t0 = 0, [], time.monotonic()
        for _ in range(20):
            try:
                flood.append(engine.submit([1, 2, 3], GenerationConfig(10)))
            except QueueFull:
                refused += 1
        assert refused == 19 and len(flood) == 1 and time.monotonic() - t0 < 1.0  # refused at once
        assert [st.result(timeout=60).tokens for st in accepted] == want
        assert flood[0].result(timeout=60).finish in ("length", "eos")
        assert all(len(st.result(timeout=60).tokens) == 50 for st in long)
    finally:
        engine.close()
        ex.close()


def test_requests_from_many_threads_through_the_api_each_get_their_own_tokens():
    want = [reference_generate(SRC, p, 12, stop_at_eos=False) for p in PROMPTS]
    with galaxy.connect(local=2, transport="inproc") as s:
        lm = s.load(SRC)
        got: list = [None] * len(PROMPTS)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(
            i, lm.generate(PROMPTS[i], 12, details=True).tokens)) for i in range(len(PROMPTS))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    assert got == [w[: len(g)] for w, g in zip(want, got)] and all(len(g) == 12 for g in got)


def test_a_prompt_too_long_for_the_pool_is_refused_and_the_others_run():
    ex = InprocCluster(1)
    ex.load(SRC, even_partition(SRC.config, 1))
    engine = Engine(ex, SRC.config, config=EngineConfig(block_size=4, kv_blocks=8))  # 32 positions in all
    try:
        with pytest.raises(KVBudgetExceeded, match=r"prompt has 39 tokens and the KV pool holds 32 positions "
                                                   r"\(8 blocks of 4.*need 40") as e:
            engine.submit(list(range(1, 40)), GenerationConfig(4))
        assert isinstance(e.value, (InvalidRequest, galaxy.DeviceOutOfMemory))  # a 400, and about memory
        ok = engine.generate(torch.arange(1, 6).tolist(), GenerationConfig(4, stop_at_eos=False))
        assert len(ok.tokens) == 4
    finally:
        engine.close()
        ex.close()


def test_a_sequence_that_fills_the_kv_pool_finishes_with_kv_budget_and_the_tokens_it_would_have_got():
    """The pool (here 32 positions) is below the model's context: generation stops cleanly when a
    sequence's K/V fill it -- finish 'kv_budget' (OpenAI 'length'), no error -- with exactly the
    greedy tokens a roomy pool gives, up to that point."""
    ex = InprocCluster(2)
    ex.load(SRC, even_partition(SRC.config, 2))
    prompt = list(range(3, 23))  # 20 tokens: 12 positions left
    small = Engine(ex, SRC.config, config=EngineConfig(block_size=4, kv_blocks=8))
    try:
        got = small.generate(prompt, GenerationConfig(30, stop_at_eos=False))
    finally:
        small.close()
    roomy = Engine(ex, SRC.config, config=EngineConfig(block_size=4, kv_blocks=64))
    try:
        want = roomy.generate(prompt, GenerationConfig(30, stop_at_eos=False))
    finally:
        roomy.close()
        ex.close()
    assert got.finish == "kv_budget" and FINISH[got.finish] == "length"
    assert len(got.tokens) == 32 - len(prompt) and got.tokens == want.tokens[: len(got.tokens)]
    assert want.finish == "length" and len(want.tokens) == 30
