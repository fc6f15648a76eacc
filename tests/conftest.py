"""Shared fixtures: tiny random models of every family, the embedded real models, one intra-op thread,
worker servers in the test process."""

from __future__ import annotations

import os

import pytest
import torch

# no compiled decode steps in the suite (parallel/decode_graph.py): compiling costs seconds a load; the graphs'
# own test asks for them (subprocesses, the test's `galaxy worker`s, inherit this)
os.environ["GALAXY_DECODE_COMPILE"] = "0"

import galaxy.parallel.rank as rank_module
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
def hf_smollm2(smollm2_path):
    """transformers' own LlamaForCausalLM of the embedded SmolLM2 GGUF (dequantized, fp32, eval), loaded
    once for the session: the checkpoint tests compare its weights and the reference tests its logits,
    and each load took ~15 s on the shared two-core machine. Read-only: no test may change it."""
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) cross-checks our loader")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()


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


class Servers:
    """Worker servers inside the test process (real gRPC on loopback, no subprocesses), named w0, w1, ...;
    `stop(i)` stops one for good (its port refuses from then on), as a killed worker process would."""

    def __init__(self):
        self.running = []

    def start(self, n: int, token: str | None = None, **settings) -> list[str]:
        from galaxy.transport.worker import WorkerSettings, start_server  # grpc: only for the tests that use it

        addrs = []
        for i in range(n):
            server, addr, service = start_server("127.0.0.1:0", WorkerSettings(name=f"w{i}", token=token, **settings))
            self.running.append((server, service))
            addrs.append(addr)
        return addrs

    def stop(self, index: int | None = None) -> None:
        """Stop the server first, then drop its sessions: as a killed process, its port refuses from the
        first moment on, never answering in between without the sessions it held."""
        for i, (server, service) in enumerate(list(self.running)):
            if index is None or i == index:
                server.stop(grace=0).wait(timeout=10)
                service.close()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.stop()


@pytest.fixture
def step_threads_seen(monkeypatch) -> list[tuple[int, int]]:
    """(tokens, intra-op threads) of every rank pass in this process (in-process ranks and workers), as
    the rank's forward sees them (galaxy.parallel.threads)."""
    seen = []
    inner = rank_module.rank_forward

    def spy(model, comm, partition, p, *graphs):
        seen.append((int(p.ids.numel()), torch.get_num_threads()))
        return inner(model, comm, partition, p, *graphs)

    monkeypatch.setattr(rank_module, "rank_forward", spy)
    return seen


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
