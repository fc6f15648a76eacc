"""The decode thread count on gRPC workers (LoadRequest.decode_threads): sent at load, honoured by every
worker's decode steps while its prompt steps keep its --threads, reported back (LoadReply), measured by
the worker when not given, and without effect on the greedy tokens."""

from __future__ import annotations

import torch

import galaxy.parallel.rank as rank_module
from galaxy.engine.engine import Engine
from galaxy.engine.generation import GenerationConfig
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.sharding import even_partition
from galaxy.parallel.threads import DECODE_MAX_TOKENS, StepThreads, candidates
from galaxy.transport.client import Cluster

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128,
                  max_positions=96, rope_theta=10000.0, tie_embeddings=True, name="threads-llama")
SRC = RandomWeights(CFG, seed=3)
PROMPT = list(range(3, 3 + DECODE_MAX_TOKENS + 9))


def _generate(executor, n: int = 6) -> list[int]:
    engine = Engine(executor, CFG)
    try:
        return engine.generate(PROMPT, GenerationConfig(n, stop_at_eos=False)).tokens
    finally:
        engine.close()


def test_workers_decode_on_the_count_sent_at_load_and_prefill_on_their_threads(servers, monkeypatch):
    seen = []
    inner = rank_module.rank_forward

    def spy(model, comm, partition, p):
        seen.append((int(p.ids.numel()), torch.get_num_threads()))
        return inner(model, comm, partition, p)

    monkeypatch.setattr(rank_module, "rank_forward", spy)
    tokens = {}
    with Cluster(servers.start(2, threads=2)) as c:
        for n in (2, 1):
            seen.clear()
            c.load(SRC, even_partition(CFG, 2), LoadOptions(weights_format="int4", decode_threads=n))
            assert c.decode_threads == [n, n]
            assert [s.runtime.threads for _, svc in servers.running for s in svc.sessions.values()] == \
                [StepThreads(2, n)] * 2
            tokens[n] = _generate(c)
            assert sorted(set(seen)) == [(1, n), (len(PROMPT), 2)]  # both workers, every step
        assert tokens[1] == tokens[2]
        c.load(SRC, even_partition(CFG, 2), LoadOptions())  # not given: each worker measures its own
        assert all(n in candidates(2) for n in c.decode_threads) and len(c.decode_threads) == 2
