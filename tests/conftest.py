"""Shared fixtures: tiny random models of every family, the embedded real models, one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from galaxy.engine.step_cost import StepCost
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset

TINY = ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-opt", "tiny-llama"]


@pytest.fixture(scope="session", params=TINY)
def tiny_source(request):
    return RandomWeights(preset(request.param), seed=1)


def _default(getter):
    from galaxy.model.defaults import DefaultModelMissing

    try:
        return getter()
    except DefaultModelMissing as e:
        pytest.skip(f"embedded default model not installed: {e}")


@pytest.fixture(scope="session")
def smollm2_path():
    from galaxy.model.defaults import default_causal_lm_path

    return _default(default_causal_lm_path)


@pytest.fixture(scope="session")
def minilm_path():
    from galaxy.model.defaults import default_encoder_path

    return _default(default_encoder_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared two-core machine the
    threads' spin-waits made such modules up to 15x slower (22 s against 1.5 s). Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fixed_step_cost():
    """make(a, b): a StepCost whose line is seconds = a + b * tokens and stays there whatever steps run,
    so what is derived from it (the stall bound's chunk, early rejection's prediction) is known in advance."""
    def make(a: float, b: float) -> StepCost:
        cost = StepCost()
        cost.fit = (a, b)
        cost.observe = lambda tokens, seconds: None
        return cost

    return make
