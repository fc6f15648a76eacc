"""A compact shard's wire form (parallel/compact_wire.py) and what the memory model says it holds: the
shard a device builds from the pushed parts is the very shard `compact_shard` builds from float32, the
push carries the bytes `memory.push_bytes` admits it by, and `memory.weight_bytes` is what it holds."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints.gguf import GGUFCheckpoint
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.quant import QuantLinear, parse_format
from galaxy.parallel import memory
from galaxy.parallel.compact import align_partition, compact_shard, held_bytes
from galaxy.parallel.compact_wire import build_compact, compact_items, pack_nibbles, unpack_nibbles, wire_tensor_count
from galaxy.parallel.sharding import Partition, meta_model, weighted_partition
from galaxy.parallel.sharding import load_shard as float_shard
from galaxy.transport.shardstore import iter_shard
from tests.model.checkpoints.test_gguf_blocks import write_quantized

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="compact-llama")
SRC = RandomWeights(CFG, seed=5)
# uneven shares on int4's granules (2 heads, 32 columns), a device with no heads and no columns
PART = Partition("galaxy", (2, 0, 2), (32, 0, 64), (20, 50, 27), (2, 2, 2), (1.0, 2.0, 0.5)).validate(CFG)
FORMATS = ["bf16", "fp16", "int8", "int8-int8", "int4", "int4-fp32"]
# an untied head in its own format beside the embedding's row table (compact.compact_vocab)
UNTIED = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                     max_positions=64, rope_theta=10000.0, tie_embeddings=False, name="compact-llama-untied")
UNTIED_SRC = RandomWeights(UNTIED, seed=6)
CASES = [(SRC, n) for n in FORMATS] + [(UNTIED_SRC, n) for n in ["fp16", "int8-int8", "int4", "int4:int8", "int8:int4"]]
IDS = [f"{src.config.name}-{n}" for src, n in CASES]

pytestmark = pytest.mark.usefixtures("one_thread")


def pushed_state(spec, fmt, src=SRC):
    """What a worker holds once a push of `spec` in `fmt` has arrived: every item, the tied head aliased."""
    state = {}
    for name, t, alias in compact_items(iter_shard(src, spec), src, spec, fmt):
        state[name] = state[alias] if t is None else t.clone()
    return state


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("src,name", CASES, ids=IDS)
def test_a_shard_built_from_its_pushed_parts_is_the_shard_compact_shard_builds(src, name):
    fmt, cfg = parse_format(name), src.config
    for r in range(PART.world):
        spec = PART.spec(r, cfg)
        want = compact_shard(float_shard(src, spec), src, fmt)
        got = build_compact(cfg, spec, pushed_state(spec, fmt, src), fmt)
        a, b = linears(want), linears(got)
        assert a.keys() == b.keys()
        assert any(k.endswith("mlp.gate_up.q") for k in a) == bool(spec.cols[1] - spec.cols[0])
        for key in a:
            assert a[key].fmt == b[key].fmt and torch.equal(a[key].dequantized(), b[key].dequantized()), \
                f"{name} rank {r} {key}"
        assert held_bytes(got) == held_bytes(want)
        assert (got.head is not None and got.head is got.embed.table) == (want.head is not None
                                                                          and want.head is want.embed.table)
        x = torch.randn(3, cfg.hidden, generator=torch.Generator().manual_seed(r))
        for key in a:  # the kernels multiply by the same weights
            if a[key].k == cfg.hidden:
                assert torch.equal(a[key](x), b[key](x)), f"{name} rank {r} {key}"


@pytest.mark.parametrize("name", ["int4", "int4-fp32"])
def test_a_q4_1_file_streamed_in_int4_is_the_file_loaded_shard_bit_for_bit(tmp_path, name):
    """The coordinator sends a GGUF file's Q4_1 blocks as their own int4 codes, scales and zeros (no
    requantizing), so a streamed shard holds the very buffers a device reading the file holds."""
    write_quantized(tmp_path / "q.gguf")
    ck = GGUFCheckpoint(tmp_path / "q.gguf")
    cfg, fmt = ck.config, parse_format(name)
    p = Partition("galaxy", (2, 2), (64, 32), (20, 20), (2, 2), (1.0, 0.5)).validate(cfg)
    for r in range(p.world):
        spec = p.spec(r, cfg)
        want = compact_shard(float_shard(ck, spec), ck, fmt)
        got = build_compact(cfg, spec, pushed_state(spec, fmt, ck), fmt)
        a, b = linears(want), linears(got)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].state_dict().keys() == b[key].state_dict().keys()
            for buf, t in a[key].state_dict().items():
                assert torch.equal(t, b[key].state_dict()[buf]), f"rank {r} {key}.{buf}"
        carried = sum(t.numel() * t.element_size() for _, t, _ in compact_items(iter_shard(ck, spec), ck, spec, fmt)
                      if t is not None)
        assert carried == memory.push_bytes(cfg, spec, name)


def test_nibbles_pack_two_codes_a_byte_and_unpack_exactly():
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("src,name", [(SRC, "fp32"), *CASES], ids=["fp32", *IDS])
def test_the_memory_model_counts_what_a_compact_shard_holds_and_what_its_push_carries(src, name):
    fmt, cfg = parse_format(name), src.config
    params = memory.MemoryParams.for_dtype(4, name)
    for r in range(PART.world):
        spec = PART.spec(r, cfg)
        assert memory.weight_bytes(cfg, spec, params) == held_bytes(compact_shard(float_shard(src, spec), src, fmt))
        items = iter_shard(src, spec) if fmt.name == "fp32" else compact_items(iter_shard(src, spec), src, spec, fmt)
        items = list(items)
        carried = sum(t.numel() * t.element_size() for _, t, _ in items if t is not None)
        assert carried == memory.push_bytes(cfg, spec, name)
        if fmt.name != "fp32":
            assert len(items) == wire_tensor_count(meta_model(cfg, spec), fmt)


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
