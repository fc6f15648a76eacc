"""Profiling on a device with a memory budget (issue 19): timing the blocks once held two jobs'
blocks at a time (two LM-head samples, 144 MiB on SmolLM2's shape) beside whatever the worker kept
loaded, unchecked -- on the emulated 500 MiB device the worker's resident set passed its budget
while `galaxy plan` profiled it. Now each job is released before the next is built, and a
budgeted worker makes room for the profile's peak (backends.profiling.profile_need) by dropping
loaded sessions, or refuses the profile by name."""

from __future__ import annotations

import gc
import re
import weakref

import pytest

from galaxy.backends.profiling import median_times
from galaxy.errors import DeviceOutOfMemory
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config, preset
from galaxy.parallel.sharding import even_partition
from galaxy.transport.client import Cluster
from galaxy.transport.spawn import LocalWorkers


def test_each_timed_job_is_released_before_the_next_one_is_built():
    alive_at_build = []
    refs: list[weakref.ref] = []

    class Block:
        def __call__(self):
            return None

    def job():
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in refs))
        blk = Block()
        refs.append(weakref.ref(blk))
        return blk

    median_times([job, job, job], repeats=2)
    assert alive_at_build == [0] * 6


# ~72 MiB of weights: loaded, the worker has no room left for SmolLM2's profile beside it
HEAVY = make_config("llama", vocab_size=512, hidden=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn=1024,
                    max_positions=1024, name="heavy-llama")


def test_a_budgeted_worker_drops_its_session_to_make_room_for_a_profile_and_refuses_one_it_cannot_hold():
    smol = preset("smollm2-135m")
    with LocalWorkers(1, threads=1, extra_args=["--memory-budget", "430MiB"]) as addrs, Cluster(addrs) as c:
        c.load(RandomWeights(HEAVY, seed=1), even_partition(HEAVY, 1))
        assert c.hello()[0].state == "loaded"
        reply = c.profile(smol, [256], repeats=1)[0]
        assert reply.samples and c.hello()[0].state == "idle"  # the session went to make room
        info = c.hello()[0]
        assert info.rss <= info.memory_budget
        with pytest.raises(DeviceOutOfMemory, match=re.escape("local0: timing its blocks at 16384 tokens needs")):
            c.profile(smol, [16384], repeats=1)
