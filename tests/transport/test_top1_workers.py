"""Greedy sampling on gRPC workers (StepRequest.top1_rows, ForwardReply.top1_values / top1_ids): the engine
gets the same tokens with the devices picking greedy rows' argmax as with every row's logits, over an uneven
vocabulary split whose maxima tie across two workers' slices, in steps that mix greedy and sampled rows;
top-1 rows that are not the step's logit rows are refused by name, and the workers serve on. A one-worker
step (a one-device decode group) is a blocking call, still watched by the heartbeat."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.sampling import SamplingConfig
from galaxy.errors import PeerUnreachable, WorkerError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.checkpoints.source import WeightSource
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedBatch
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Step
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import Partition, weighted_partition
from galaxy.runtime.sources import reference_generate
from galaxy.transport.client import Cluster
from galaxy.transport.worker import WorkerService

VOCAB = (50, 0, 59)  # tiny-llama's 109 rows; the middle worker holds none
TWINS = ((0, 1), (50, 51))  # +e_0 and -e_0 (scaled) at the head of worker 0's and worker 2's slices


class TwinHead(WeightSource):
    """tiny-llama's random weights with twin LM-head rows on two workers: every logit row's maximum,
    |h_0| x 1000 (one non-zero product: exact), is reached on worker 0 and on worker 2 alike."""

    def __init__(self):
        self.inner = RandomWeights(preset("tiny-llama"), seed=7, std=0.3)
        self.config, self.path = self.inner.config, "random:tiny-llama-twin-head"
        self.seed, self.std = "twin-head", 0.3  # shardstore.model_hash: the recipe is the identity
        head = self.inner.get("lm_head")
        for plus, minus in TWINS:
            head[[plus, minus]] = 0.0
            head[plus, 0], head[minus, 0] = 1000.0, -1000.0
        self.head = head

    def names(self) -> list[str]:
        return self.inner.names()

    def _load(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        if name == "lm_head":
            return self.head.narrow(dim, start, end - start).clone()
        return self.inner._load(name, dim, start, end)


def _partition(cfg) -> Partition:
    base = weighted_partition(cfg, [3.0, 1.0, 2.0])
    return Partition(base.strategy, base.heads, base.cols, VOCAB, base.layers, base.seq_weights).validate(cfg)


def _generate(cluster: Cluster, src, on_device: bool, requests) -> tuple[list[list[int]], list[Step]]:
    """Every request at once through an engine; their tokens, and the steps the cluster was sent."""
    steps, real = [], cluster.step

    def spy(step, pool):
        steps.append(step)
        return real(step, pool)

    cluster.step = spy
    engine = Engine(cluster, src.config, None, EngineConfig(top1_on_device=on_device))
    try:
        streams = [engine.submit(p, gc) for p, gc in requests]
        return [s.result(60).tokens for s in streams], steps
    finally:
        engine.close()
        del cluster.step


def test_device_top1_gives_the_full_logits_tokens_with_ties_across_workers_and_sampled_rows_beside(servers):
    src = TwinHead()
    greedy = GenerationConfig(10, stop_at_eos=False)
    requests = [([5, 9, 2], greedy),
                ([7, 1, 30, 4, 8], GenerationConfig(10, SamplingConfig(temperature=0.9, seed=3), stop_at_eos=False)),
                ([60, 61], greedy),
                ([3] * 7, GenerationConfig(10, SamplingConfig(temperature=1.5, top_p=0.9, seed=4), stop_at_eos=False))]
    with Cluster(servers.start(3)) as c:
        c.load(src, _partition(src.config), LoadOptions(stream=True))
        full, full_steps = _generate(c, src, False, requests)
        top1, top1_steps = _generate(c, src, True, requests)
    assert top1 == full
    assert not any(s.top1_rows for s in full_steps)
    assert any(0 < len(s.top1_rows) < len(s.logit_rows) for s in top1_steps)  # greedy and sampled rows together
    for (prompt, gc), tokens in zip(requests, top1):
        if gc is greedy:  # the single-device argmax: every maximum tied across workers 0 and 2, the first wins
            assert tokens == reference_generate(src, prompt, 10, stop_at_eos=False)
            assert set(tokens) <= {TWINS[0][0], TWINS[0][1]}
    sampled = {t for (_, gc), tokens in zip(requests, top1) if gc is not greedy for t in tokens}
    assert sampled & {TWINS[1][0], TWINS[1][1]}  # the samplers saw whole rows: the twins on worker 2 too


def test_top1_rows_that_are_not_logit_rows_are_refused_by_every_worker_which_then_serves_on(servers):
    src = RandomWeights(preset("tiny-llama"), seed=7, std=0.3)
    ids = torch.tensor([5, 9, 2, 7, 1, 3])
    batch = PagedBatch(4, (3, 3), (0, 0), ((0,), (1,)))
    pool = KVPool(4, 4)
    with Cluster(servers.start(3)) as c:
        c.load(src, _partition(src.config), LoadOptions(stream=True))
        for top1, why in (((4,), "top-1 row 4 is not one of the step's 2 logit rows"),
                          ((1 << 20,), "is not one of the step's 2 logit rows"), ((5, 2), "not ascending")):
            with pytest.raises(WorkerError, match=f"bad step: .*{why}"):
                c.step(Step(ids, batch, (2, 5), (), top1), pool)
        good = c.step(Step(ids, batch, (2, 5), (), (5,)), pool)
        assert good.output.shape == (1, src.config.vocab_size) and good.top1.shape == (1,)


def test_a_one_worker_step_frozen_in_its_blocking_call_is_declared_gone_by_the_heartbeat_and_the_worker_used_again(
        servers, monkeypatch):
    """One worker's steps are blocking calls (Cluster._call_alone): a worker silent with its connection open
    is still declared gone by its heartbeat in seconds, naming it; its channel, closed to end the call, is
    opened again, so the worker answers the next step once it is back."""
    frozen, thaw = threading.Event(), threading.Event()
    for rpc in ("Step", "Ping"):
        real = getattr(WorkerService, rpc)

        def silent(self, request, context, real=real):
            if frozen.is_set():
                thaw.wait(30)
            return real(self, request, context)

        monkeypatch.setattr(WorkerService, rpc, silent)
    src = RandomWeights(preset("tiny-llama"), seed=7, std=0.3)
    ids = torch.tensor([5, 9, 2])
    step, pool = Step(ids, PagedBatch(4, (3,), (0,), ((0,),)), (2,), (), (2,)), KVPool(4, 4)
    try:
        with Cluster(servers.start(1)) as c:
            c.load(src, weighted_partition(src.config, [1.0]), LoadOptions(stream=True))
            want = c.step(step, pool).top1
            c.heartbeat_s = 0.2  # gone after 3 missed pings
            frozen.set()
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable, match=r"device 0 .*: no heartbeat for 1 s during a request"):
                c.step(step, pool)
            assert time.monotonic() - t0 < 10
            frozen.clear()
            thaw.set()
            assert torch.equal(c.step(step, pool).top1, want)
    finally:
        thaw.set()
