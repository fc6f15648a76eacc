"""The decode thread count on gRPC workers (LoadRequest.decode_threads): sent at load, honoured by every
worker's decode steps while its prompt steps keep its --threads, reported back (LoadReply), measured by
the worker when not given, and without effect on the greedy tokens; after decode steps, each Step reply
reports the count the worker settled on (ForwardReply.decode_threads)."""

from __future__ import annotations

from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.sharding import even_partition
from galaxy.parallel.threads import DecodeTuner, StepThreads, candidates
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


def test_workers_report_the_decode_count_their_steps_settled_on_not_the_loads(servers):
    with Cluster(servers.start(2, threads=2)) as c:
        c.load(SRC, even_partition(CFG, 2), LoadOptions(weights_format="int4", decode_threads=2))
        assert c.decode_threads == [2, 2]  # the load's count, until a step says otherwise
        for _, svc in servers.running:  # each worker's tuner settled on 1 over its first decode steps
            for s in svc.sessions.values():
                tuner = DecodeTuner((1, 2))
                tuner.settled = 1
                s.runtime.threads = StepThreads(2, 2, tuner=tuner)
        _generate(c, n=2)
        assert c.decode_threads == [1, 1]  # what the steps ran with, from their replies
