"""The graph cache: weight-free files shared by same-shape layers and shards, keyed by exactly
what fixes a graph, reused on the second start; and binding / unbinding the ONNX steps."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from galaxy.backends.export import ATTEND, FIELDS, SHAPE_FIELDS, graph_key
from galaxy.backends.onnx import BackendError, OnnxStep, apply_onnx, onnx_steps, remove_onnx
from galaxy.model import transformer as model_py
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import ModelConfig, preset
from galaxy.parallel.sharding import ShardSpec, full_spec, load_shard, weighted_partition


def shard(name, rank=0, n_layers=2, **changes):
    cfg = preset(name).replace(n_layers=n_layers, **changes)
    p = weighted_partition(cfg, [0.9, 0.6, 0.45])
    return load_shard(RandomWeights(cfg, seed=1), p.spec(rank, cfg))


def test_second_start_reuses_weight_free_graphs(onnx_cache):
    """(The session's cache: when this runs first the first start exports; the shapes are those
    test_onnx_parallel needs, so the export is not wasted.)"""
    first = apply_onnx(shard("tiny-llama"), onnx_cache, threads=1)
    assert first.exported + first.reused == 18 and first.steps == 18  # 8 steps + attend, per layer
    assert first.exported in (0, 9)  # both layers share each graph
    assert first.sessions == 9
    assert max(f.stat().st_size for f in onnx_cache.glob("*.onnx")) < 64 * 1024  # no weights inside
    second = apply_onnx(shard("tiny-llama"), onnx_cache, threads=1)
    assert second.exported == 0 and second.reused == 18 and second.steps == 18


def test_keys_follow_what_fixes_a_graph():
    key = lambda m, step, i="0": graph_key(m.cfg, m.layers[i], step)  # noqa: E731
    a = shard("tiny-llama")
    # identical layers and same-architecture shards of another size share every shape-generic graph
    assert all(key(a, s, "0") == key(a, s, "1") for s in ("mlp.expand", ATTEND, "after_attn"))
    b = shard("tiny-llama", rank=1)
    assert key(a, "mlp.expand") == key(b, "mlp.expand") and key(a, "attn.project") == key(b, "attn.project")
    assert key(a, ATTEND) != key(b, ATTEND)  # other heads, other attention graph
    bigger = shard("tiny-llama", hidden=64, ffn=100, n_heads=8, n_kv_heads=4)
    assert key(a, "mlp.contract") == key(bigger, "mlp.contract")
    # anything the math reads changes the key
    assert key(a, ATTEND) != key(shard("tiny-llama", rope_theta=5e5), ATTEND)
    assert key(a, "after_mlp") != key(shard("tiny-llama", norm_eps=1e-6), "after_mlp")
    assert key(a, "mlp.expand") != key(shard("tiny-llama", activation="gelu"), "mlp.expand")
    assert key(a, "attn.project") != key(shard("tiny-llama", attn_bias=True), "attn.project")  # a bias input


def test_keys_cover_every_config_field_model_py_reads():
    """A config field read by model.py's layer code but missing from FIELDS would let two models
    that differ in it share a graph: this fails first."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    owners = {"attn": [model_py.Attention], "mlp": [model_py.MLP], "": [model_py.Block, model_py.Norm]}
    for owner, classes in owners.items():
        read = {f for cls in classes for f in re.findall(r"cfg\.(\w+)", inspect.getsource(cls)) if f in fields}
        missing = read - set(FIELDS[owner]) - set(SHAPE_FIELDS)
        assert not missing, f"model.py's {owner or 'block'} code reads {missing}: add them to FIELDS[{owner!r}]"


def test_remove_onnx_restores_torch(onnx_cache):
    m = shard("tiny-llama")
    x = torch.randn(6, m.cfg.hidden)
    with torch.inference_mode():
        want = m.layers["0"](x)
        apply_onnx(m, onnx_cache, threads=1)
        assert isinstance(m.layers["0"].mlp.expand, OnnxStep)
        got = m.layers["0"](x)
        remove_onnx(m)
        assert onnx_steps(m) == [] and m.layers["0"].mlp.expand.__func__ is model_py.MLP.expand
    assert (got - want).abs().max().item() <= 1e-5


def test_only_float32_shards():
    cfg = preset("tiny-bert")
    m = load_shard(RandomWeights(cfg), full_spec(cfg), dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="float32"):
        apply_onnx(m, "/nonexistent", threads=1)


def test_empty_shard_needs_no_graph(onnx_cache):
    cfg = preset("tiny-bert")
    m = load_shard(RandomWeights(cfg), ShardSpec((0, 0), (0, 0), (0, cfg.vocab_size), (0, cfg.n_layers)))
    s = apply_onnx(m, onnx_cache, threads=1)
    assert s.steps == 2 * cfg.n_layers  # after_attn, after_mlp only
    assert not any(".attn." in n or ".mlp." in n for n in onnx_steps(m))
