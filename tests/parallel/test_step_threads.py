"""A step's intra-op threads by its token count (galaxy.parallel.threads): decode steps run with the decode
count, prompt chunks with the prefill count, on the thread that runs them and on no other; the count is
measured at load unless given, validated wherever it is given, and changes no greedy token."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.engine.engine import Engine
from galaxy.engine.generation import GenerationConfig
from galaxy.errors import InvalidRequest, PlanMismatch
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.sharding import even_partition, full_spec, load_shard
from galaxy.parallel.threads import (
    DECODE_MAX_TOKENS,
    TUNE_STEPS,
    DecodeTuner,
    StepThreads,
    candidates,
    choose_decode_threads,
    intra_op_threads,
    measure_step_threads,
)
from galaxy.runtime.api import connect
from galaxy.runtime.inproc import InprocCluster

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128,
                  max_positions=96, rope_theta=10000.0, tie_embeddings=True, name="threads-llama")
SRC = RandomWeights(CFG, seed=3)
PROMPT = list(range(3, 3 + DECODE_MAX_TOKENS + 9))  # one prefill step above the decode bound


@pytest.fixture
def two_threads():
    """The process at 2 intra-op threads (the prefill count a load takes), put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _generate(executor, n: int = 6) -> list[int]:
    engine = Engine(executor, CFG)
    try:
        return engine.generate(PROMPT, GenerationConfig(n, stop_at_eos=False)).tokens
    finally:
        engine.close()


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_decode_steps_run_on_the_decode_count_and_prompt_steps_on_the_prefill_count(fmt, two_threads,
                                                                                    step_threads_seen):
    with InprocCluster(1) as ex:
        ex.load(SRC, even_partition(CFG, 1), LoadOptions(weights_format=fmt, decode_threads=1))
        assert ex.decode_threads == [1]
        _generate(ex)
    assert step_threads_seen[0] == (len(PROMPT), 2)
    decodes = step_threads_seen[1:]
    assert decodes and all(seen == (1, 1) for seen in decodes)
    assert torch.get_num_threads() == 2  # the calling thread's own count is put back after every step


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_greedy_tokens_are_the_same_with_one_and_two_decode_threads(fmt, two_threads):
    tokens = {}
    for n in (1, 2):
        with InprocCluster(2) as ex:  # two ranks: their step threads set their own count too
            ex.load(SRC, even_partition(CFG, 2), LoadOptions(weights_format=fmt, decode_threads=n))
            assert ex.decode_threads == [n, n]
            tokens[n] = _generate(ex, 8)
    assert tokens[1] == tokens[2]


def test_a_load_without_a_count_measures_one_among_the_candidates(two_threads):
    with InprocCluster(1) as ex:
        ex.load(SRC, even_partition(CFG, 1), LoadOptions())
        assert ex.decode_threads[0] in candidates(2)
        assert ex.runtimes[0].threads.prefill == 2


def test_measuring_times_every_candidate_and_a_given_count_or_one_thread_measures_nothing():
    model = load_shard(SRC, full_spec(CFG))
    threads, timings = measure_step_threads(model, prefill=4)
    assert set(timings) == set(candidates(4)) == {1, 2, 4}
    assert all(t > 0 for t in timings.values()) and threads.decode in timings and threads.prefill == 4
    assert measure_step_threads(model, prefill=4, decode=3) == (StepThreads(4, 3), {})
    assert measure_step_threads(model, prefill=1) == (StepThreads(1, 1), {})


def test_a_larger_count_is_chosen_only_when_it_is_clearly_faster():
    assert choose_decode_threads({1: 10.0, 2: 9.9}) == 1  # within PREFER_FEWER: the spare core wins
    assert choose_decode_threads({1: 10.0, 2: 6.0, 4: 5.95}) == 2
    assert choose_decode_threads({1: 10.0, 2: 12.0}) == 1
    assert choose_decode_threads({}, fallback=3) == 3


def _tune(tuner: DecodeTuner, tokens: int, seconds: dict[int, float]) -> list[int]:
    """Decode steps of `tokens` tokens until the tuner settles, each taking `seconds[count]`; the counts run."""
    ran = []
    while tuner.settled is None and len(ran) < 100:
        n = tuner.count(tokens)
        ran.append(n)
        tuner.observe(tokens, n, seconds[n])
    return ran


def test_the_decode_count_is_settled_on_real_steps_taking_turns_first_step_of_each_dropped():
    tuner = DecodeTuner((2, 1))
    ran = _tune(tuner, 1, {1: 0.017, 2: 0.024})
    assert ran == [1, 2] * (TUNE_STEPS + 1)  # in turn, one dropped + TUNE_STEPS timed each
    assert tuner.settled == 1 and tuner.count(1) == 1 and tuner.count(8) == 1  # for good, every size
    tuner = DecodeTuner((1, 2))
    _tune(tuner, 1, {1: 0.024, 2: 0.017})
    assert tuner.settled == 2
    tuner = DecodeTuner((1, 2))
    _tune(tuner, 1, {1: 0.0170, 2: 0.0169})  # within PREFER_FEWER: the spare core wins, as at load
    assert tuner.settled == 1


def test_steps_of_different_sizes_are_never_compared_and_a_warm_up_outlier_is_dropped():
    tuner = DecodeTuner((1, 2))
    for _ in range(TUNE_STEPS + 1):  # count 2 only ever sees 8-row steps (slower), count 1 only 1-row steps
        tuner.observe(1, 1, 0.010)
        tuner.observe(8, 2, 0.030)
    assert tuner.settled is None
    tuner = DecodeTuner((1, 2))
    tuner.observe(1, 1, 5.0)  # the first step on a new thread team
    tuner.observe(1, 2, 0.020)
    for _ in range(TUNE_STEPS):
        tuner.observe(1, 1, 0.015)
        tuner.observe(1, 2, 0.020)
    assert tuner.settled == 1


def test_a_measured_load_settles_its_decode_count_on_its_steps_and_a_given_one_never_changes(two_threads):
    with InprocCluster(1) as ex:
        ex.load(SRC, even_partition(CFG, 1), LoadOptions())
        threads = ex.runtimes[0].threads
        assert threads.tuner is not None and threads.tuner.settled is None
        tokens = _generate(ex, 2 * (TUNE_STEPS + 1) + 2)
        assert threads.tuner.settled in candidates(2) and threads.decode_now == threads.tuner.settled
    with InprocCluster(1) as ex:
        ex.load(SRC, even_partition(CFG, 1), LoadOptions(decode_threads=1))
        assert ex.runtimes[0].threads.tuner is None
        assert _generate(ex, len(tokens)) == tokens  # the turns change no greedy token


def test_a_switch_on_one_thread_leaves_another_threads_count_alone(two_threads):
    """OpenMP's team size is per thread (libgomp), so a decode step's switch to 1 thread never shrinks a
    prefill running at 2 on another thread of the process (the in-process disaggregated engines, a
    worker's concurrent sessions)."""
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def prefill():
        with intra_op_threads(2):
            torch.ones(64, 64) @ torch.ones(64, 64)  # the thread's OpenMP state is set up
            barrier.wait()  # the other thread switches to 1 now
            barrier.wait()
            seen["prefill"] = torch.get_num_threads()

    t = threading.Thread(target=prefill)
    t.start()
    barrier.wait()
    with intra_op_threads(1):
        seen["decode"] = torch.get_num_threads()
        barrier.wait()
        t.join()
    assert seen == {"prefill": 2, "decode": 1}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_decode_thread_count_is_refused_naming_the_option(bad):
    with pytest.raises(PlanMismatch, match="decode_threads"):
        LoadOptions(decode_threads=bad)
    with pytest.raises(PlanMismatch, match="decode"):
        StepThreads(prefill=2, decode=bad if bad != "2" else 0)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_session_load_refuses_a_bad_decode_thread_count_naming_it(bad):
    with connect(local=1, transport="inproc") as session:
        with pytest.raises(InvalidRequest, match="decode_threads"):
            session.load(random_init="tiny-llama", decode_threads=bad)


def test_session_load_honours_the_decode_thread_count(two_threads):
    with connect(local=1, transport="inproc") as session:
        session.load(random_init="tiny-llama", decode_threads=1)
        assert session.executor.decode_threads == [1]
