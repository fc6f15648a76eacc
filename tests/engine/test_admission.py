"""Early rejection (galaxy/engine/admission.py): the TTFT predictor replays the scheduler on the backlog
with the measured step cost; a request predicted to miss the objective is refused with Overloaded at
once, the requests running go on unharmed, and with no objective nothing changes."""

from __future__ import annotations

import threading

import pytest

from galaxy.engine.admission import AdmissionConfig, AdmissionConfigError, Backlog, predict_ttft
from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.scheduler import SchedulerConfigError
from galaxy.errors import GalaxyError, Overloaded
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate


class Gate:
    """Wraps an executor's step: while closed, the engine's next step waits (no timing in the test)."""

    def __init__(self, step):
        self.step, self.open = step, threading.Event()
        self.open.set()

    def __call__(self, *args, **kwargs):
        assert self.open.wait(30), "the gate was never opened"
        return self.step(*args, **kwargs)


@pytest.fixture
def tiny():
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    made = []

    def make(config: EngineConfig):
        ex = InprocCluster(2)
        ex.load(src, even_partition(src.config, 2))
        engine = Engine(ex, src.config, src.tokenizer(), config)
        made.append((engine, ex))
        return engine

    yield src, make
    for engine, ex in made:
        engine.close()
        ex.close()


def test_prediction_replays_the_scheduler_steps_on_the_step_cost_line():
    # 100 prompt tokens waiting, budget 64: step 1 runs 64 of them (1 + 0.64 s), step 2 the other 36
    # and the new prompt's 10 (1 + 0.46 s): its first token at 3.10 s
    queued = Backlog(decodes=(), prompts=((100, 10, False),), max_batched_tokens=64, max_running=4, chunk=64)
    assert predict_ttft(queued, 10, (1.0, 0.01)) == pytest.approx(3.10)
    # one decode running: what is left of its step (1 + 0.01 s), then a step of it and the prompt (1 + 0.11 s)
    decoding = Backlog(decodes=(5,), prompts=(), max_batched_tokens=64, max_running=4, chunk=64)
    assert predict_ttft(decoding, 10, (1.0, 0.01)) == pytest.approx(2.12)
    # the stall bound's budget beside decodes cuts the prompt into chunks of 4: three steps of 1 + 4 tokens
    assert predict_ttft(decoding, 10, (1.0, 0.01), prompt_budget=lambda d: 4) == pytest.approx(1.01 + 2 * 1.05 + 1.03)
    # max_running full: the prompt waits for the decode to end (5 steps) before its own step
    full = Backlog(decodes=(5,), prompts=(), max_batched_tokens=64, max_running=1, chunk=64)
    assert predict_ttft(full, 10, (1.0, 0.01)) == pytest.approx(1.01 + 5 * 1.01 + 1.10)


def test_a_request_predicted_to_miss_is_refused_at_once_and_the_running_one_is_unharmed(tiny, fixed_step_cost):
    src, make = tiny
    prompt, other = list(range(1, 9)), list(range(20, 28))
    want = reference_generate(src, prompt, 24, stop_at_eos=False)
    engine = make(EngineConfig(slo_ttft=0.5))
    # a = 0.3 s per step: alone a prompt's first token is predicted at 0.31 s (admitted, <= 0.9 x 0.5 s);
    # behind a running decode, what is left of its step comes first: 0.61 s (refused)
    engine.admission.cost = fixed_step_cost(0.3, 0.001)
    gate = Gate(engine.ex.step)
    engine.ex.step = gate
    stream = engine.submit(prompt, GenerationConfig(24, stop_at_eos=False))
    events = iter(stream)  # kept: an iteration broken off would cancel the request
    next(events)
    gate.open.clear()  # the running request stays running while the next one is judged
    with pytest.raises(Overloaded) as e:
        engine.submit(other, GenerationConfig(4, stop_at_eos=False))
    err = e.value
    assert err.predicted_ttft_s == pytest.approx(0.61, abs=0.01) and err.slo_ttft_s == 0.5
    assert isinstance(err.retry_after_s, int) and err.retry_after_s >= 1
    assert err.running == 1 and err.waiting == 0 and "0.61 s" in str(err)
    assert engine.load["rejected"] == 1 and engine.load["waiting"] == 0
    gate.open.set()
    assert stream.result().tokens == want  # unharmed
    # drained: the same request is admitted now, and gets its tokens
    assert engine.generate(other, GenerationConfig(4, stop_at_eos=False)).tokens == reference_generate(
        src, other, 4, stop_at_eos=False)


def test_without_an_objective_every_request_is_admitted_and_nothing_is_measured_for_it(tiny):
    src, make = tiny
    engine = make(EngineConfig())
    assert engine.admission is None
    gate = Gate(engine.ex.step)
    engine.ex.step = gate
    first = engine.submit(list(range(1, 9)), GenerationConfig(24, stop_at_eos=False))
    events = iter(first)
    next(events)
    gate.open.clear()
    second = engine.submit(list(range(20, 28)), GenerationConfig(4, stop_at_eos=False))
    gate.open.set()
    assert first.result().tokens == reference_generate(src, list(range(1, 9)), 24, stop_at_eos=False)
    assert second.result().tokens == reference_generate(src, list(range(20, 28)), 4, stop_at_eos=False)
    assert engine.load["rejected"] == 0


def test_before_steps_of_two_sizes_ran_there_is_no_prediction_and_requests_are_admitted(tiny):
    _, make = tiny
    engine = make(EngineConfig(slo_ttft=1e-3))  # an objective nothing could meet
    assert engine.admission.cost.fit is None
    assert len(engine.generate([1, 2, 3], GenerationConfig(3, stop_at_eos=False)).tokens) == 3


def test_bad_admission_settings_name_the_field():
    with pytest.raises(SchedulerConfigError):
        EngineConfig(max_stall=1.0)
    with pytest.raises(AdmissionConfigError, match="slo_ttft_s=-1"):
        EngineConfig(slo_ttft=-1)
    with pytest.raises(AdmissionConfigError, match="headroom=1.5"):
        EngineConfig(slo_ttft=1.0, slo_headroom=1.5)
    assert AdmissionConfig(2.0, 0.5).bound_s == 1.0
    assert issubclass(Overloaded, GalaxyError)
