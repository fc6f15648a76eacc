"""A worker with a memory budget builds its decode graphs (parallel/decode_graph.py) only when the budget holds
their build beside the shard it just loaded (memory.decode_compile_bytes, measured on SmolLM2): short of
that the shard loads and decodes eagerly, with the refusal logged, rather than the device being pushed past its
budget. The graphs are traced here (GALAXY_DECODE_COMPILE=traced): the policy says build, inductor is not run."""

from __future__ import annotations

import gc
import logging

import psutil

from galaxy.parallel import decode_graph, memory
from galaxy.parallel.sharding import even_partition
from galaxy.transport.client import Cluster, ModelRef
from tests.parallel.test_decode_graph import CFG, SRC

REF = ModelRef(CFG, random_init=True, seed=SRC.seed, std=SRC.std)


def _loaded_graphs(servers, budget: int):
    addr = servers.start(1, memory_budget=budget)
    service = servers.running[-1][1]
    with Cluster(addr) as c:
        c.load_ref(REF, even_partition(CFG, 1))
        return next(iter(service.sessions.values())).runtime.graphs


def test_decode_graphs_are_built_only_where_the_budget_holds_their_build(servers, monkeypatch, caplog):
    monkeypatch.setenv(decode_graph.COMPILE_ENV, "traced")
    gc.collect()
    resident = psutil.Process().memory_info().rss  # the worker runs in this process: this is what it holds
    peak = memory.decode_compile_bytes()
    short = resident + memory.RUN_SLACK + peak // 2  # the tiny shard fits; the build does not
    with caplog.at_level(logging.WARNING, logger="galaxy.transport.worker"):
        assert _loaded_graphs(servers, short) is None
    assert "compiling its decode step needs" in caplog.text and "decodes eagerly instead" in caplog.text
    assert _loaded_graphs(servers, short + 2 * peak) is not None
