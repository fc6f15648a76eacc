"""A serving-engine step -- several sequences' tokens packed over the paged KV cache -- gives every
sequence, on every strategy and uneven split, the logits its own single-device forward gives."""

from __future__ import annotations

import random

import pytest
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedBatch
from galaxy.parallel.forward import Step
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import Partition, even_partition, full_spec, load_shard, weighted_partition
from galaxy.runtime.inproc import InprocCluster

# tiny models on in-process ranks: a second intra-op thread only spins (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # fp32 max abs error against the single-device forward of the sequence alone
BLOCK = 4


def _partitions(cfg):
    yield "galaxy uneven", weighted_partition(cfg, [3, 1, 2])
    yield "galaxy, a device without heads", Partition("galaxy", (0, cfg.n_heads - 1, 1), (10, cfg.ffn - 30, 20),
                                                    (cfg.vocab_size - 7, 3, 4), (cfg.n_layers,) * 3, (1.0, 2.0, 1.0))
    yield "megatron", even_partition(cfg, 3, "megatron")
    yield "pipeline", even_partition(cfg, 2, "pipeline")


def _steps(cfg, rnd: random.Random):
    """Sequences arriving over time: prefill chunks of several lengths and decodes, packed together.
    Yields (Step, per logit row the sequence's tokens so far) and feeds back greedy tokens."""
    prompts = [[rnd.randrange(cfg.vocab_size) for _ in range(n)] for n in (9, 3, 14, 1, 6)]
    seqs = [{"tokens": list(p), "done": 0, "blocks": tuple(range(i * 8, (i + 1) * 8))} for i, p in enumerate(prompts)]
    for step in range(8):
        live = [s for s in seqs[: 2 + step] if len(s["tokens"]) < 24]
        items = []
        for s in sorted(live, key=lambda s: s["done"] < len(s["tokens"]) - 1):  # decodes first
            todo = s["tokens"][s["done"]:]
            n = min(len(todo), rnd.choice((1, 3, 5)) if len(todo) > 1 else 1)
            items.append((s, todo[:n]))
        batch = PagedBatch(BLOCK, tuple(len(t) for _, t in items), tuple(s["done"] for s, _ in items),
                           tuple(s["blocks"] for s, _ in items))
        rows, ends, seen = [], 0, []
        for s, t in items:
            ends += len(t)
            if s["done"] + len(t) == len(s["tokens"]):  # the chunk reaches the end: its logits come back
                rows.append(ends - 1)
                seen.append(s)
        ids = torch.tensor([x for _, t in items for x in t])
        out = yield Step(ids, batch, tuple(rows)), [list(s["tokens"]) for s in seen]
        for s, t in items:
            s["done"] += len(t)
        for s, row in zip(seen, out):
            s["tokens"].append(int(row.argmax()))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_packed_step_gives_every_sequence_its_own_logits_on_every_strategy(name):
    cfg = preset(name)
    src = RandomWeights(cfg, seed=5, std=0.3)
    alone = load_shard(src, full_spec(cfg))
    for label, partition in _partitions(cfg):
        with InprocCluster(partition.world) as ex:
            ex.load(src, partition)
            pool = KVPool(64, BLOCK)
            gen = _steps(cfg, random.Random(1))
            step, contexts = next(gen)
            checked = 0
            try:
                while True:
                    logits = ex.step(step, pool).output
                    assert logits.shape == (len(contexts), cfg.vocab_size), label
                    for row, tokens in zip(logits, contexts):
                        want = alone(torch.tensor(tokens), last_only=True)[0]
                        assert (row - want).abs().max() <= TOL, (label, len(tokens))
                        checked += 1
                    step, contexts = gen.send(logits)
            except StopIteration:
                pass
            assert checked >= 10, label


def test_a_step_naming_a_block_outside_the_pool_is_refused_before_any_rank_runs():
    cfg = preset("tiny-llama")
    with InprocCluster(2) as ex:
        ex.load(RandomWeights(cfg, seed=5), even_partition(cfg, 2))
        step = Step(torch.tensor([1, 2, 3]), PagedBatch(BLOCK, (3,), (0,), ((0, 9),)), (2,))
        with pytest.raises(ValueError, match=r"block ids 0\.\.9 outside the pool of 8"):
            ex.step(step, KVPool(8, BLOCK))
        assert all(rt.paged is None for rt in ex.runtimes)  # nothing was allocated


def test_pool_size_is_what_the_smallest_kv_budget_holds():
    cfg = preset("tiny-llama")
    with InprocCluster(2) as ex:
        ex.load(RandomWeights(cfg, seed=5), weighted_partition(cfg, [1, 3]))
        per_token = [rt.kv_bytes_per_token for rt in ex.runtimes]
        ex.runtimes[0].kv_max_bytes, ex.runtimes[1].kv_max_bytes = 10_000, 1 << 30
        assert ex.kv_blocks(BLOCK) == 10_000 // (per_token[0] * BLOCK)
