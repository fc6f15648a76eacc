"""The serving contract end to end with real tensors: scheduler plans run through a tiny random
model over a PagedKVCache give, for every sequence, the logits its own forward gives alone.

The model runner here is the smallest one that follows the contract in the module docstrings
(copy blocks, then per layer write K/V at the plan's slots and attend over block tables); it is
test scaffolding, not the engine.
"""

from __future__ import annotations

import random

import pytest
import torch

from galaxy.engine.scheduler import BatchPlan, Scheduler, SchedulerConfig
from galaxy.engine.sequence import FinishReason, SamplingParams
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedBatch, PagedKVCache
from galaxy.model.transformer import rope
from galaxy.parallel.sharding import full_spec, load_shard

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def paged_step(model, cache: PagedKVCache, plan: BatchPlan, method: str) -> torch.Tensor:
    """Logits (rows, V) of the plan's logit rows."""
    cfg = model.cfg
    batch = PagedBatch(plan.block_size, tuple(len(it.token_ids) for it in plan.items),
                       tuple(it.start for it in plan.items), tuple(it.block_table for it in plan.items))
    cache.copy_blocks(plan.copies)
    pos, t = batch.positions, batch.num_tokens
    x = model.embed.finish(model.embed.lookup(torch.tensor(plan.token_ids())), pos, None)  # (T, H)
    for idx, blk in model.layers.items():
        attn, hd = blk.attn, cfg.head_dim
        qkv = attn.project(blk.attn_input(x))
        q, k, v = qkv.split([attn.nq * hd, attn.nkv * hd, attn.nkv * hd], dim=-1)
        q, k, v = (z.view(t, -1, hd).transpose(0, 1) for z in (q, k, v))  # (heads, T, hd)
        if cfg.position == "rope":
            q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        cache.write(idx, k, v, batch.slot_mapping)
        ctx = cache.paged_attention(q, idx, batch, attn.kv_map, method)  # (nq, T, hd)
        x = blk.after_attn(x, attn.project_out(ctx.transpose(0, 1).reshape(t, attn.nq * hd)))
        x = blk.after_mlp(x, blk.mlp.contract(blk.mlp.expand(blk.mlp_input(x))))
    h = x[plan.logit_rows()]
    return model.head_logits(model.final_norm(h) if model.final_norm is not None else h)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["gather", "padded"])
def test_every_sequence_in_a_batch_gets_what_it_gets_alone(name, method):
    cfg = preset(name)
    model = load_shard(RandomWeights(cfg, seed=3), full_spec(cfg))
    sc = SchedulerConfig(num_blocks=12, block_size=4, max_batched_tokens=12, chunk_size=5, max_running=4,
                         max_model_len=40, vocab_size=cfg.vocab_size)
    sched = Scheduler(sc)
    cache = PagedKVCache.for_model(model, sc.num_blocks, sc.block_size)
    rnd = random.Random(0)
    system = [rnd.randrange(cfg.vocab_size) for _ in range(9)]
    prompts = [[rnd.randrange(cfg.vocab_size) for _ in range(8)]]  # two full blocks, repeated below
    for i in range(1, 8):
        prompts.append((system if i % 2 else []) + [rnd.randrange(cfg.vocab_size) for _ in range(rnd.randint(1, 14))])
    seqs, seen = [], []  # seen: (tokens before the sample, paged logits)
    step = 0
    while step == 0 or sched.has_unfinished():
        step += 1
        if step == 1:
            seqs.append(sched.add(prompts[0], SamplingParams(max_new_tokens=6)))
        if step == 3:  # the first prompt is cached: the same prompt again (copy on write), then the rest
            seqs.append(sched.add(prompts[0], SamplingParams(max_new_tokens=3)))
            seqs += [sched.add(p, SamplingParams(max_new_tokens=rnd.randint(2, 9))) for p in prompts[1:]]
        plan = sched.schedule()
        logits = paged_step(model, cache, plan, method)
        sampled = {}
        for it, row in zip([it for it in plan.items if it.logits], logits):
            seq = sched.live[it.seq_id]
            sampled[it.seq_id] = int(row.argmax())
            seen.append((list(seq.token_ids), row))
        sched.update(plan, sampled)
    stats = sched.blocks.stats  # the hard cases happened
    assert sched.num_preemptions > 0 and stats.hit_tokens > 0 and stats.copied_blocks > 0
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    for tokens, row in seen:
        alone = model(torch.tensor(tokens), last_only=True)[0]
        torch.testing.assert_close(row, alone, rtol=0, atol=1e-4)
