"""A compact shard's wire form (parallel/compact_wire.py) and what the memory model says it holds: the
shard a device builds from the pushed parts is the very shard `compact_shard` builds from float32, the
push carries the bytes `memory.push_bytes` admits it by, and `memory.weight_bytes` is what it holds."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.quant import QuantLinear, parse_format
from galaxy.parallel import memory
from galaxy.parallel.compact import align_partition, compact_shard, held_bytes
from galaxy.parallel.compact_wire import build_compact, compact_items, pack_nibbles, unpack_nibbles
from galaxy.parallel.sharding import Partition, weighted_partition
from galaxy.parallel.sharding import load_shard as float_shard
from galaxy.transport.shardstore import iter_shard

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="compact-llama")
SRC = RandomWeights(CFG, seed=5)
# uneven shares on int4's granules (2 heads, 32 columns), a device with no heads and no columns
PART = Partition("galaxy", (2, 0, 2), (32, 0, 64), (20, 50, 27), (2, 2, 2), (1.0, 2.0, 0.5)).validate(CFG)
FORMATS = ["bf16", "fp16", "int8", "int8-int8", "int4", "int4-fp32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def pushed_state(spec, fmt):
    """What a worker holds once a push of `spec` in `fmt` has arrived: every item, the tied head aliased."""
    state = {}
    for name, t, alias in compact_items(iter_shard(SRC, spec), SRC, spec, fmt):
        state[name] = state[alias] if t is None else t.clone()
    return state


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", FORMATS)
def test_a_shard_built_from_its_pushed_parts_is_the_shard_compact_shard_builds(name):
    fmt = parse_format(name)
    for r in range(PART.world):
        spec = PART.spec(r, CFG)
        want = compact_shard(float_shard(SRC, spec), SRC, fmt)
        got = build_compact(CFG, spec, pushed_state(spec, fmt), fmt)
        a, b = linears(want), linears(got)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key].dequantized(), b[key].dequantized()), f"{name} rank {r} {key}"
        assert held_bytes(got) == held_bytes(want)
        x = torch.randn(3, CFG.hidden, generator=torch.Generator().manual_seed(r))
        for key in a:  # the kernels multiply by the same weights
            if a[key].k == CFG.hidden:
                assert torch.equal(a[key](x), b[key](x)), f"{name} rank {r} {key}"


def test_nibbles_pack_two_codes_a_byte_and_unpack_exactly():
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("name", ["fp32", *FORMATS])
def test_the_memory_model_counts_what_a_compact_shard_holds_and_what_its_push_carries(name):
    fmt = parse_format(name)
    params = memory.MemoryParams.for_dtype(4, name)
    for r in range(PART.world):
        spec = PART.spec(r, CFG)
        assert memory.weight_bytes(CFG, spec, params) == held_bytes(compact_shard(float_shard(SRC, spec), SRC, fmt))
        items = iter_shard(SRC, spec) if fmt.name == "fp32" else compact_items(iter_shard(SRC, spec), SRC, spec, fmt)
        carried = sum(t.numel() * t.element_size() for _, t, _ in items if t is not None)
        assert carried == memory.push_bytes(CFG, spec, name)


def test_a_compact_push_carries_a_fraction_of_the_float32_one_and_its_load_needs_no_float32_copy():
    spec = PART.spec(2, CFG)
    fp32, int4 = memory.push_bytes(CFG, spec), memory.push_bytes(CFG, spec, "int4")
    assert int4 < fp32 / 2  # this tiny model's embedding (float32 either way) is a large part of it
    params = memory.MemoryParams.for_dtype(4, "int4")
    pushed = memory.load_transient_bytes(CFG, spec, params, compact_push=True)
    converted = memory.load_transient_bytes(CFG, spec, params)  # received float32, converted on the device
    assert converted - pushed == sum(4 * n * k - memory.linear_held_bytes(n, k, parse_format("int4"))
                                     for n, k in memory.shard_linears(CFG, spec)) * 2  # 2 layers


def test_a_weighted_split_is_moved_onto_the_formats_granules_by_less_than_one():
    p = weighted_partition(CFG, [0.9, 0.6, 0.45])
    a = align_partition(CFG, p, parse_format("int4"))
    assert all(c % 32 == 0 for c in a.cols[:-1]) and sum(a.cols) == CFG.ffn
    assert all(h % 2 == 0 for h in a.heads[:-1]) and sum(a.heads) == CFG.n_heads
    assert all(abs(x - y) < 64 for x, y in zip(a.cols, p.cols))
    assert align_partition(CFG, p, parse_format("fp16")) == p  # 16-bit formats cut anywhere
