"""ONNX-backed shards equal the torch reference forward (fp32, max abs err <= 1e-4) on every path.

3 in-process devices with uneven splits: tiny models for every strategy, tiling, empty shards and
KV-cache decode; the Galaxy paper's layer shapes (2 layers) and the embedded real models.
"""

from __future__ import annotations

import pytest
import torch

from galaxy.backends.onnx import apply_onnx_all, apply_onnx_block, onnx_steps
from galaxy.model.checkpoints import open_checkpoint
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedBatch
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request, Step
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import Partition, ShardSpec, even_partition, full_spec, load_shard, weighted_partition
from galaxy.runtime.inproc import InprocCluster, run_inprocess

TOL = 1e-4
UNEVEN = [0.9, 0.6, 0.45]


def onnx_shards(src, partition, cache):
    cfg = src.config
    models = [load_shard(src, partition.spec(r, cfg)) for r in range(partition.world)]
    apply_onnx_all(models, cache, threads=1)
    return models


def error(src, partition, ids, cache, tilings=(2,)):
    """Largest error over the tilings (the same ONNX-backed shards run each)."""
    want = load_shard(src, full_spec(src.config))(ids)
    models = onnx_shards(src, partition, cache)
    outs = [run_inprocess(models, partition, Request(ids), tiles=t)[0] for t in tilings]
    return max((out - want).abs().max().item() for out in outs)


def test_every_strategy_and_tiling(onnx_cache):
    """Llama-style (pre-norm, RMSNorm, RoPE, GQA, SwiGLU) under every strategy and tiling."""
    src = RandomWeights(preset("tiny-llama"), seed=1)
    cfg = src.config
    ids = torch.randint(0, cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(0))
    for p in (weighted_partition(cfg, UNEVEN), even_partition(cfg, 3, "megatron"), even_partition(cfg, 3, "pipeline")):
        err = error(src, p, ids, onnx_cache, tilings=(1, 3))
        assert err <= TOL, f"{p.strategy}: {err}"


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_post_and_pre_norm_layernorm_families(name, onnx_cache):
    src = RandomWeights(preset(name), seed=1)
    ids = torch.randint(0, src.config.vocab_size, (13,), generator=torch.Generator().manual_seed(0))
    assert error(src, weighted_partition(src.config, UNEVEN), ids, onnx_cache, tilings=(1, 3)) <= TOL


def test_every_step_runs_in_onnx_and_empty_pieces_stay_torch(onnx_cache):
    src = RandomWeights(preset("tiny-bert"), seed=1)
    cfg = src.config
    p = Partition("galaxy", (0, cfg.n_heads - 1, 1), (30, 0, cfg.ffn - 30), (cfg.vocab_size - 3, 0, 3),
                  (cfg.n_layers,) * 3, (1.0, 0.0, 2.0)).validate(cfg)
    models = onnx_shards(src, p, onnx_cache)
    # post-norm: attn_input / mlp_input compute nothing and stay torch; the rest of each layer is ONNX
    full = {"attn.project", "attn.attend", "attn.project_out", "mlp.expand", "mlp.contract", "after_attn", "after_mlp"}
    assert {s.split(".", 1)[1] for s in onnx_steps(models[2]) if s.startswith("0.")} == full
    assert {s.split(".", 1)[1] for s in onnx_steps(models[0]) if s.startswith("0.")} == full - {
        "attn.project", "attn.attend", "attn.project_out"}  # zero heads
    assert not any(".mlp." in s for s in onnx_steps(models[1]))  # zero columns
    ids = torch.randint(0, cfg.vocab_size, (9,))
    want = load_shard(src, full_spec(cfg))(ids)
    out, _ = run_inprocess(models, p, Request(ids), tiles=2)  # rank 1 also owns zero tokens
    assert (out - want).abs().max().item() <= TOL


def test_decode_with_kv_cache_matches_torch(onnx_cache):
    """Prefill, chunked prefill and one-token decode steps through the paged KV cache, Galaxy's decode
    path (Megatron-style below 2 tokens per device) included."""
    src = RandomWeights(preset("tiny-llama"), seed=1)
    cfg = src.config
    p = weighted_partition(cfg, UNEVEN)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    clusters = []
    for backend in ("torch", "onnx"):
        c = InprocCluster(3)
        c.load(src, p, LoadOptions(tiles=2))
        if backend == "onnx":
            apply_onnx_all([rt.model for rt in c.runtimes], onnx_cache, threads=1)
        clusters.append(c)
    pools = [KVPool(8, 4) for _ in clusters]
    for start, end in ((0, 11), (11, 15), (15, 16), (16, 17), (17, 18)):
        step = Step(ids[start:end], PagedBatch(4, (end - start,), (start,), (tuple(range(5)),)), (end - start - 1,))
        want, got = (c.step(step, pool).output for c, pool in zip(clusters, pools))
        assert (got - want).abs().max().item() <= TOL, f"positions {start}..{end}"
    ref = load_shard(src, full_spec(cfg))(ids[:18])[-1:]
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["bert-large", "gpt2-large"])
def test_paper_shapes_uneven(name, onnx_cache):
    cfg = preset(name).replace(n_layers=2, vocab_size=4099)
    src = RandomWeights(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    p = weighted_partition(cfg, UNEVEN)
    assert len(set(p.heads)) == 3 and len(set(p.tokens(37))) > 1
    assert error(src, p, ids, onnx_cache) <= TOL


def test_smollm2_gqa_heads_split_across_kv_groups(smollm2_path, onnx_cache):
    """9 query heads over 3 KV heads split 4/3/2: devices 0 and 1 both compute KV head 1."""
    src = open_checkpoint(smollm2_path)
    cfg = src.config
    p = Partition("galaxy", (4, 3, 2), (700, 500, 336), (24000, 16000, 9152), (cfg.n_layers,) * 3,
                  (0.5, 0.3, 0.2)).validate(cfg)
    ids = torch.tensor(src.tokenizer().encode("The capital of France is Paris, and Berlin is"))
    assert error(src, p, ids, onnx_cache) <= TOL


def test_minilm_uneven(minilm_path, onnx_cache):
    src = open_checkpoint(minilm_path)
    ids = torch.tensor(src.tokenizer().encode("Edge devices cooperate on one sentence embedding."))
    assert error(src, weighted_partition(src.config, UNEVEN), ids, onnx_cache) <= TOL


def test_rope_far_from_the_start(onnx_cache):
    """Positions near SmolLM2's 8192 limit: RoPE angles of thousands of radians in both backends."""
    cfg = preset("smollm2-135m").replace(n_layers=1)
    src = RandomWeights(cfg, seed=4)
    spec = ShardSpec((0, 4), (0, 1), (0, 0), (0, 1), embed=False, head=False)
    blk = load_shard(src, spec).layers["0"]
    apply_onnx_block(blk, onnx_cache, 1, parts=("attention",))
    qkv = torch.randn(5, blk.attn.qkv.weight.shape[0])
    with torch.inference_mode():
        for start in (0, 4000, 8187):
            err = (blk.attn.attend(qkv, start) - type(blk.attn).attend(blk.attn, qkv, start)).abs().max().item()
            assert err <= 1e-5, f"start {start}: {err}"
