"""int8 / int4 run a token's rows dense or on the format's kernel by its position in its request
(model/dense_rows.py): the engine carries each sequence's kernel_from, so a preempted sequence gets the
tokens it gets alone, and the prefix cache shares only dense-role blocks, so a request's tokens do not depend
on who filled the cache first -- while fp32 keeps sharing every full block."""

from __future__ import annotations

import pytest
import torch

from galaxy.engine.block_manager import BlockManager
from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.scheduler import Scheduler, SchedulerConfig
from galaxy.engine.sequence import SamplingParams, Sequence
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.int4_expand import expander
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.inproc import InprocCluster

pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 16, ffn 96: int4's groups of 32 fall on every cut
CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="roles-llama")
SRC = RandomWeights(CFG, seed=5, std=0.3)
FORMATS = ["int8", pytest.param("int4", marks=pytest.mark.skipif(expander() is None, reason="no C compiler"))]
GREEDY = GenerationConfig(6, stop_at_eos=False)


@pytest.fixture
def engine():
    made = []

    def make(fmt: str, config: EngineConfig) -> Engine:
        ex = InprocCluster(1)
        ex.load(SRC, even_partition(CFG, 1, "megatron"), LoadOptions(weights_format=fmt))
        made.append((Engine(ex, CFG, SRC.tokenizer(), config), ex))
        return made[-1][0]

    yield make
    for e, ex in made:
        e.close()
        ex.close()


def _logits(e: Engine) -> dict:
    """Record every logit row the engine samples from, by (prompt, tokens generated before it): a row
    computed again after a preemption replaces the first."""
    seen, sample = {}, e._sample

    def spy(rows, res, on_device):
        for i, it in enumerate(rows):
            gen = e.streams[it.seq_id].generation
            seen[tuple(gen.prompt_tokens), len(gen.tokens)] = res.output[i].clone()
        return sample(rows, res, on_device)

    e._sample = spy
    return seen


def _prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_preempted_sequence_gets_the_tokens_it_gets_alone(engine, fmt):
    prompts = _prompts(9, 6, 11, 7)
    alone = engine(fmt, EngineConfig(block_size=4, prefix_caching=False, roles=True, top1_on_device=False))
    want_logits = _logits(alone)
    want = [alone.generate(p, GREEDY).tokens for p in prompts]
    tight = engine(fmt, EngineConfig(block_size=4, max_batched_tokens=16, max_running=4, kv_blocks=9, roles=True,
                                     top1_on_device=False))
    got_logits = _logits(tight)
    streams = [tight.submit(p, GREEDY) for p in prompts]
    assert [s.result().tokens for s in streams] == want
    assert got_logits.keys() == want_logits.keys()
    assert all(torch.equal(got_logits[k], want_logits[k]) for k in want_logits)  # bit for bit
    assert tight.sched.num_preemptions > 0  # the pool was too small: some ran their tokens again


@pytest.mark.parametrize("fmt", [*FORMATS, "fp32"])
def test_a_shared_prefix_gives_the_tokens_of_a_cold_cache_and_fp32_shares_every_full_block(engine, fmt):
    (a,) = _prompts(8)  # two full blocks of 4: the second holds a's last prompt token (kernel role)
    roles = fmt != "fp32"
    cold = engine(fmt, EngineConfig(block_size=4, prefix_caching=False, roles=roles, top1_on_device=False))
    warm = engine(fmt, EngineConfig(block_size=4, roles=roles, top1_on_device=False))
    first = warm.generate(a, GREEDY).tokens
    follow = a + first + [5, 6, 7]  # a multi-turn follow-up: a's prompt, its answer, more
    for b, shared in ((a, (4, 8)), (follow, (4, 12))):
        hits = warm.sched.blocks.stats.hit_tokens
        want_logits, got_logits = _logits(cold), _logits(warm)
        assert warm.generate(b, GREEDY).tokens == cold.generate(b, GREEDY).tokens
        assert got_logits.keys() == want_logits.keys()
        if roles:  # bit for bit (fp32's GEMM rounds a row by how many rows share the call: not promised there)
            assert all(torch.equal(got_logits[k], want_logits[k]) for k in want_logits)
        # int8 / int4: only the block below a's kernel_from (7); fp32: every full block a computed
        # (the repeated prompt's last token runs again from a copied block: 8 - 1 reused)
        got = warm.sched.blocks.stats.hit_tokens - hits
        assert got == (shared[0] if roles else shared[1] - (b is a))


def test_blocks_with_kernel_role_positions_are_never_named_nor_taken():
    blocks = BlockManager(16, 4, roles=True)
    seq = Sequence(0, list(range(10)), 10, SamplingParams(), 0.0)  # kernel_from 9: blocks [0,4) [4,8) dense
    blocks.allocate(seq)
    seq.num_computed = 10
    seq.token_ids += [10, 11, 12]  # generated, kernel role
    seq.num_computed = 12
    blocks.commit(seq)
    assert [blocks.name[b] is not None for b in seq.block_table] == [True, True, False]
    # another request whose prompt ran positions 8..11 dense names that block; the first, resumed, skips it
    other = Sequence(1, list(range(13)) + [99], 14, SamplingParams(), 0.0)
    blocks.allocate(other)
    other.num_computed = 14
    blocks.commit(other)
    assert blocks.name[other.block_table[2]] is not None
    blocks.free(seq)
    seq.num_preemptions = 1
    blocks.allocate(seq)
    assert seq.num_computed == 8  # its own dense blocks back, not other's block over its generated tokens
    assert blocks.lease(list(range(13)), 12, kernel_from=9) == seq.block_table[:2]  # a K/V handoff: the same cap
    blocks.release(seq.block_table[:2])
    blocks.audit([seq, other])


@pytest.mark.parametrize("roles,named", [(True, 2), (False, 3)])
def test_the_decode_group_names_an_adopted_sequences_blocks_by_the_same_rule(roles, named):
    # phase-separated serving: K/V of a 12-token prompt computed elsewhere, adopted and named here
    sched = Scheduler(SchedulerConfig(16, 4, max_batched_tokens=64, max_model_len=64, roles=roles))
    seq = sched.adopt(list(range(13)), 12, SamplingParams())
    sched.blocks.commit(seq)
    assert sum(sched.blocks.name[b] is not None for b in seq.block_table) == named  # block [8, 12) holds 11


@pytest.mark.parametrize("fmt, roles", [("int8", True), ("fp32", False)])
def test_an_engine_built_directly_takes_its_roles_from_the_executors_loaded_format(engine, fmt, roles):
    """Benches build engines themselves: the rule that keeps the prefix cache exact must not depend on
    every caller remembering to set it."""
    assert engine(fmt, EngineConfig(block_size=4)).config.roles is roles
    assert engine(fmt, EngineConfig(block_size=4, roles=not roles)).config.roles is (not roles)  # asked: kept


def test_an_executor_that_does_not_say_its_format_gets_the_rule_exact_for_every_format():
    from galaxy.engine.engine import token_roles

    assert token_roles(object()) is True
