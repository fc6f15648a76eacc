"""The decode thread count on gRPC workers (LoadRequest.decode_threads): sent at load, honoured by every
worker's decode steps while its prompt steps keep its --threads, reported back (LoadReply), measured by
the worker when not given, and without effect on the greedy tokens."""

from __future__ import annotations

from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.sharding import even_partition
from galaxy.parallel.threads import StepThreads, candidates
from galaxy.transport.client import Cluster
from tests.parallel.test_step_threads import CFG, PROMPT, SRC, _generate


def test_workers_decode_on_the_count_sent_at_load_and_prefill_on_their_threads(servers, step_threads_seen):
    seen = step_threads_seen  # the workers run in this process: the spy sees their steps
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
