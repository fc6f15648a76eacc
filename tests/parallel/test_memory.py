"""The memory model: exact shard sizes, a solver room that is safe for the worker's own sum, pass
needs, and errors that name the device, the need and the budget."""

from __future__ import annotations

import random

import pytest
import torch

from galaxy.errors import DeviceOutOfMemory
from galaxy.model.config import PRESETS, preset
from galaxy.parallel import memory as M
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import ShardSpec, even_partition, shard_bytes, weighted_partition


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shard_params_is_the_module_trees_size_for_every_split(name):
    cfg = preset(name)
    parts = [even_partition(cfg, 1), weighted_partition(cfg, [0.5, 0.3, 0.2]), even_partition(cfg, 3, "pipeline")]
    for part in parts:
        for r in range(part.world):
            spec = part.spec(r, cfg)
            assert M.shard_params(cfg, spec) * 4 == shard_bytes(cfg, spec)


def _random_spec(rng, cfg, heads, cols, vocab):
    h0 = rng.randint(0, cfg.n_heads - heads)
    c0, v0 = rng.randint(0, cfg.ffn - cols), rng.randint(0, cfg.vocab_size - vocab)
    return ShardSpec((h0, h0 + heads), (c0, c0 + cols), (v0, v0 + vocab), (0, cfg.n_layers))


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2", "llama-1b", "tiny-llama", "tiny-gpt2", "opt-125m"])
def test_any_shard_the_solver_room_holds_passes_the_workers_admission(name):
    """solver_room is what the profiler gives the solver: every shard whose weights and planner
    estimate fit it must fit the worker's exact sum within the budget's room, whatever its units."""
    cfg, rng, checked = preset(name), random.Random(name), 0
    for _ in range(300):
        seq = rng.choice([16, 100, 512, min(2048, cfg.max_positions), cfg.max_positions])
        dtype = rng.choice([4, 2])
        params = M.MemoryParams.for_dtype(dtype)
        budget, resident = rng.randint(300, 8000) * M.MiB, rng.randint(150, 300) * M.MiB
        solver = M.solver_room(budget, resident, cfg, seq, params)
        heads, cols = rng.randint(0, cfg.n_heads), rng.randint(0, cfg.ffn)
        vocab, tokens = rng.randint(0, cfg.vocab_size), rng.randint(0, seq)
        spec = _random_spec(rng, cfg, heads, cols, vocab)
        planned = M.shard_params(cfg, spec) * dtype + M.planner_activation_bytes(cfg, seq, heads, cols, tokens, dtype)
        if planned <= solver:
            need = M.shard_need(cfg, spec, params, seq, tokens, M.load_transient_bytes(cfg, spec, params))
            assert need.total <= M.room(budget, resident), (spec, seq, dtype, need)
            checked += 1
    assert checked >= 100  # most random shards fit some budget: the property is not vacuous


def test_the_solver_room_is_not_needlessly_small():
    """For SmolLM2 at 64 tokens the linear bound keeps at least half of what the budget leaves. (At
    1,024 tokens it keeps 13%: each vocabulary row's share of a full-logits reply, 1,024 x 4 x
    OUTPUT_COPIES bytes, is several times the row's weights, and the bound charges that rate to every
    weight; planner/fit.py relaxes the room towards the exact sum, which charges it to the rows.)"""
    cfg = preset("smollm2-135m")
    room = M.room(600 * M.MiB, 250 * M.MiB)
    assert 0.5 * room < M.solver_room(600 * M.MiB, 250 * M.MiB, cfg, 64, M.MemoryParams()) < room


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2", "tiny-llama", "opt-125m"])
def test_the_kv_pool_a_load_leaves_holds_the_positions_it_reserved(name):
    """A load admitted by shard_need leaves, once its transient is gone, a KV pool budget
    (kv_pool_budget beside the loaded process and a reserved pass) that holds the KV of every
    position the load reserved: the engine gets what the plan promised."""
    cfg, rng, checked = preset(name), random.Random(name), 0
    for _ in range(200):
        seq = rng.choice([16, 128, 512, min(1024, cfg.max_positions)])
        params = M.MemoryParams.for_dtype(rng.choice([4, 2]))
        part = weighted_partition(cfg, [rng.uniform(0.1, 1) for _ in range(rng.randint(1, 4))])
        r = rng.randrange(part.world)
        spec = part.spec(r, cfg)
        need = M.shard_need(cfg, spec, params, seq, part.tokens(seq)[r], M.load_transient_bytes(cfg, spec, params))
        budget, resident = rng.randint(300, 3000) * M.MiB, rng.randint(150, 300) * M.MiB
        if need.total > M.room(budget, resident):
            continue  # refused at load
        pool = M.kv_pool_budget(budget, resident + need.weights, M.pass_reserve(cfg, part, r, params.act_bytes, seq))
        assert pool >= need.kv, (spec, seq, need, pool)
        checked += 1
    assert checked >= 50


def test_a_pass_needs_its_activations_and_reply():
    cfg = preset("smollm2-135m")
    part = even_partition(cfg, 2)
    last = M.request_need(cfg, part, 0, 4, Request(torch.zeros(300, dtype=torch.long), last_only=True))
    full = M.request_need(cfg, part, 0, 4, Request(torch.zeros(300, dtype=torch.long)))
    vocab = part.spec(0, cfg).vocab[1] - part.spec(0, cfg).vocab[0]
    assert full - last == M.output_bytes(300, vocab) - M.output_bytes(1, vocab)  # every token's logits come back
    decode = M.pass_need(cfg, part, 0, 4, 1, 300, 1)
    assert decode < last / 10  # one token reading 300 positions: the pool holds its K/V already
    longer = M.pass_need(cfg, part, 0, 4, 1, 3000, 1)
    assert longer > decode  # the gathered context grows with its length


def test_a_shard_that_does_not_fit_names_the_device_the_need_and_the_budget():
    cfg = preset("smollm2-135m")
    spec = even_partition(cfg, 1).spec(0, cfg)
    need = M.shard_need(cfg, spec, M.MemoryParams(), 512, 512)
    with pytest.raises(DeviceOutOfMemory, match=r"pi4: loading its shard needs \d+ MiB \(513 MiB of weights .* "
                                                r"memory budget is 608 MiB"):
        M.check_fits("pi4", need, 608 * M.MiB, 240 * M.MiB)
    M.check_fits("big", need, 4096 * M.MiB, 240 * M.MiB)  # fits: no error
    M.check_fits("uncapped", need, 0, 240 * M.MiB)  # no budget: never refused here


@pytest.mark.parametrize("transient,compile_", [(50, 200), (300, 200), (50, 0), (0, 200)])
def test_a_needs_description_adds_up_to_its_total(transient, compile_):
    # the load's transient and the decode-graph build never overlap: the message names the larger, as total
    need = M.ShardNeed(100 * M.MiB, transient * M.MiB, 10 * M.MiB, 5 * M.MiB, compile=compile_ * M.MiB)
    text = need.describe()
    assert sum(int(part.split(" MiB")[0]) for part in text.split(" + ")) * M.MiB == need.total
    assert (f"{compile_} MiB" in text and "decode step" in text) == (compile_ > 0)  # named, if not added
