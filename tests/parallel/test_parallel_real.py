"""The embedded real models split across 3 in-process devices equal their reference forward."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints import open_checkpoint
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import Partition, even_partition, full_spec, load_shard, weighted_partition
from galaxy.runtime.inproc import run_inprocess

TOL = 1e-4  # fp32 max abs error


def _check(src, partition, ids, reference=None):
    """Max abs error of the split against the single-device forward (`reference`: that model, loaded
    once per module for SmolLM2, whose GGUF dequantization made each load cost a second or more)."""
    cfg = src.config
    want = (reference or load_shard(src, full_spec(cfg)))(ids)
    models = [load_shard(src, partition.spec(r, cfg)) for r in range(partition.world)]
    out, _ = run_inprocess(models, partition, Request(ids), tiles=2)
    return (out - want).abs().max().item()


@pytest.fixture(scope="module")
def smollm2_src(smollm2_path):
    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_full(smollm2_src):
    """The single-device reference model, read once for the module's checks (each loads its own shards)."""
    return load_shard(smollm2_src, full_spec(smollm2_src.config))


def test_smollm2_gqa_heads_split_across_kv_groups(smollm2_src, smollm2_full):
    """9 query heads over 3 KV heads split 4/3/2: devices 0 and 1 share KV groups 1."""
    cfg = smollm2_src.config
    p = Partition("galaxy", (4, 3, 2), (700, 500, 336), (24000, 16000, 9152), (cfg.n_layers,) * 3,
                  (0.5, 0.3, 0.2)).validate(cfg)
    ids = torch.tensor(smollm2_src.tokenizer().encode("The capital of France is Paris, and Berlin is"))
    assert _check(smollm2_src, p, ids, smollm2_full) <= TOL


@pytest.mark.parametrize("strategy", ["galaxy", "megatron", "pipeline"])
def test_smollm2_even_split_every_strategy(smollm2_src, smollm2_full, strategy):
    ids = torch.arange(100, 117)
    assert _check(smollm2_src, even_partition(smollm2_src.config, 3, strategy), ids, smollm2_full) <= TOL


def test_minilm_uneven_split(minilm_path):
    src = open_checkpoint(minilm_path)
    ids = torch.tensor(src.tokenizer().encode("Edge devices cooperate on one sentence embedding."))
    assert _check(src, weighted_partition(src.config, [0.9, 0.6, 0.45]), ids) <= TOL


def test_smollm2_gguf_device_with_no_heads_no_columns_or_no_vocab_still_exact(smollm2_src, smollm2_full):
    """A plan may leave a memory-starved device without heads, columns or vocabulary rows: its
    empty slices of the quantized GGUF tensors must load (gguf cannot dequantize zero blocks)."""
    cfg = smollm2_src.config
    p = Partition("galaxy", (0, 5, 4), (800, 0, 736), (25000, 24152, 0), (cfg.n_layers,) * 3,
                  (0.4, 0.3, 0.3)).validate(cfg)
    # 2e-4: logits reach ~28 here and the reductions regroup over 30 layers (~7e-6 relative)
    assert _check(smollm2_src, p, torch.arange(200, 213), smollm2_full) <= 2e-4
