"""The compiled one-token decode halves (galaxy.parallel.decode_graph): a step through them gives the eager
step's logits and greedy tokens, alone and split over two ranks; they are built only where the policy and
the shard allow, and a graph that fails leaves the step to the eager path.

The graphs run traced, not inductor-compiled (`GALAXY_DECODE_COMPILE=traced`): what Galaxy builds -- one
graph for every layer, the weights its inputs, the step wired through it -- is checked in well under a
second; inductor's compile (seconds even for this model) is not run in the suite. `galaxy bench decode`
compares the compiled step's greedy tokens with the eager path's on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from galaxy.engine.engine import Engine
from galaxy.engine.generation import GenerationConfig
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.paged_kv import PagedBatch
from galaxy.parallel import decode_graph
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Step
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="graph-llama")
SRC = RandomWeights(CFG, seed=5)
PROMPT = [5, 17, 3, 44, 9]


@pytest.fixture
def compile_on(monkeypatch):
    monkeypatch.setenv(decode_graph.COMPILE_ENV, "traced")


def _load(world: int, fmt: str) -> InprocCluster:
    ex = InprocCluster(world)
    ex.load(SRC, even_partition(CFG, world), LoadOptions(weights_format=fmt, decode_threads=1))
    return ex


def _greedy(ex, n: int = 8) -> list[int]:
    engine = Engine(ex, CFG)
    try:
        return engine.generate(PROMPT, GenerationConfig(n, stop_at_eos=False)).tokens
    finally:
        engine.close()


def _one_token_logits(ex, pos: int) -> torch.Tensor:
    """A one-token step at `pos` over a pool whose earlier positions an eager prompt step wrote."""
    pool = KVPool(4, 16)
    table = (0, 1)
    ex.step(Step(torch.tensor(PROMPT + [1] * (pos - len(PROMPT))), PagedBatch(16, (pos,), (0,), (table,)),
                 (pos - 1,)), pool)
    return ex.step(Step(torch.tensor([7]), PagedBatch(16, (1,), (pos,), (table,)), (0,)), pool).output


@pytest.mark.parametrize("world", [1, 2])
def test_a_compiled_step_gives_the_eager_steps_logits_and_tokens(world, compile_on):
    with _load(world, "int4") as ex:
        graphs = [rt.graphs for rt in ex.runtimes]
        assert all(g is not None for g in graphs)
        compiled = [_one_token_logits(ex, pos) for pos in (5, 21)], _greedy(ex)
        for rt in ex.runtimes:
            rt.graphs = None
        eager = [_one_token_logits(ex, pos) for pos in (5, 21)], _greedy(ex)
    for a, b in zip(compiled[0], eager[0]):
        assert torch.equal(a, b)
    assert compiled[1] == eager[1]


def test_the_policy_builds_nothing_when_off_or_for_opaque_weights(monkeypatch):
    monkeypatch.setenv(decode_graph.COMPILE_ENV, "0")
    with _load(1, "int4") as ex:
        assert ex.runtimes[0].graphs is None
    monkeypatch.setenv(decode_graph.COMPILE_ENV, "1")
    with _load(1, "fp16") as ex:  # fbgemm's packed fp16 weight is an object, not a tensor a graph takes
        assert "opaque" in decode_graph.ineligible(ex.runtimes[0].model)
        assert ex.runtimes[0].graphs is None
    monkeypatch.delenv(decode_graph.COMPILE_ENV)
    with _load(1, "fp32") as ex:  # auto: a model this small decodes in microseconds, compiles in seconds
        model = ex.runtimes[0].model
        assert decode_graph.block_bytes(model) < decode_graph.AUTO_MIN_BYTES
        assert ex.runtimes[0].graphs is None
        monkeypatch.setattr(decode_graph, "AUTO_MIN_BYTES", 0)
        assert decode_graph.policy(model, 1) and not decode_graph.policy(model, 2)  # auto: a device decoding alone


def test_a_failing_graph_leaves_the_step_to_the_eager_path(compile_on):
    with _load(1, "int4") as ex:
        g = ex.runtimes[0].graphs
        want = _greedy(ex)

        def broken(*args):
            raise RuntimeError("inductor said no")

        g.post.fn = broken
        assert _greedy(ex) == want
        assert g.failed == "inductor said no" and not g.fits(torch.zeros(1, CFG.hidden))


def test_a_lone_prompt_row_runs_dense_as_it_would_in_a_longer_chunk(compile_on):
    """int8's prompt rows run a dense GEMM (model/dense_rows.py) whatever the chunk; a one-row chunk of a
    prompt must not take the graphs, which run a row on the int8 kernel."""
    def one_row_chunks(ex) -> torch.Tensor:
        pool, table = KVPool(4, 16), (0, 1)
        for i, tok in enumerate(PROMPT):
            last = i == len(PROMPT) - 1
            out = ex.step(Step(torch.tensor([tok]), PagedBatch(16, (1,), (i,), (table,)), (0,) if last else ()),
                          pool).output
        return out

    with _load(1, "int8") as ex:
        assert ex.runtimes[0].graphs is not None
        compiled = one_row_chunks(ex)
        ex.runtimes[0].graphs = None
        eager = one_row_chunks(ex)
    assert torch.equal(compiled, eager)


def test_the_mean_fallback_leaves_inductors_tables_as_it_found_them():
    """`_aten_means` patches inductor's global tables for the decode graphs' compile only: after it, the
    lowering, and the op's place in `fallbacks` and `needs_realized_inputs` (read by every later compile),
    are what they were."""
    lw = pytest.importorskip("torch._inductor.lowering")
    op = torch.ops.aten.mean.dim

    def tables():
        return lw.lowerings.get(op), op in lw.fallbacks, op in lw.needs_realized_inputs

    before = tables()
    with decode_graph._aten_means():
        assert tables()[1:] == (True, True) and tables()[0] is not before[0]
    assert tables() == before


def test_the_halves_compile_with_one_thread_whatever_the_hosts_cores(monkeypatch):
    """inductor's pool runs a compile worker per core (up to 32), each hundreds of MiB: the build compiles
    with one thread, so its peak is one figure on every host (memory.decode_compile_bytes). inductor itself
    is not run: its compile is replaced by one that records the setting and returns the traced graph."""
    config = pytest.importorskip("torch._inductor.config")
    seen = []

    def compile_(gm, inputs):
        seen.append(config.compile_threads)
        return gm

    monkeypatch.setenv(decode_graph.COMPILE_ENV, "1")
    monkeypatch.setattr(config, "compile_threads", 32)
    monkeypatch.setattr(torch._inductor, "compile", compile_)
    assert _load(1, "fp32").runtimes[0].graphs is not None  # built at the load
    assert seen == [1, 1, 1] and config.compile_threads == 32
