"""The decode prototype: its logits against the reference forward, per weight format, prefill and decode."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import GalaxyError
from galaxy.model.checkpoints import WeightSource
from galaxy.model.checkpoints.gguf import GGUFCheckpoint
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.decode import load_decoder, native_format
from galaxy.model.quant import QuantLinear, WeightFormat, parse_format
from galaxy.parallel.sharding import full_spec, load_shard
from tests.model.checkpoints.test_gguf_blocks import write_quantized

# Widths that every format holds (K a multiple of 32), GQA 4/2, a tied head.
CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="test-llama")


pytestmark = pytest.mark.usefixtures("one_thread")

class FormatReference(WeightSource):
    """A source's weights as `fmt` rounds them (quantized, then dequantized to float32): the reference
    forward on these is what the decode step computes, up to its activations' rounding."""

    def __init__(self, source: WeightSource, fmt: WeightFormat):
        self.inner, self.fmt, self.config, self.path = source, fmt, source.config, f"{source.path} as {fmt}"

    def names(self):
        return self.inner.names()

    def _load(self, name, dim, start, end):
        t = self.inner.get(name)
        if t.dim() == 2:  # every format is row-local, so quantizing Q, K, V apart equals quantizing Q|K|V
            f = self.fmt.head_format if name in ("embed.tokens", "lm_head") else self.fmt
            t = QuantLinear.from_float(t, f).dequantized()
        return t.narrow(dim, start, end - start)


def decode_logits(dec, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ids[:prompt] (every position's logits), then decode the rest one token at a time: (S, V)."""
    dec.reset()
    rows = [dec(ids[:prompt], all_logits=True)]
    rows += [dec(t.view(1))[None] for t in ids[prompt:]]
    return torch.cat(rows)


IDS = torch.randint(0, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def source():
    return RandomWeights(CFG, seed=1, std=0.1)


def test_fp32_decode_equals_the_reference_forward(source):
    want = load_shard(source, full_spec(CFG))(IDS)
    got = decode_logits(load_decoder(source, parse_format("fp32"), capacity=32), IDS, prompt=5)
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# Max abs logit error against the reference forward on the format's own weights: only activations
# are rounded (bf16: 8 significant bits; int8-int8: 7-bit activations per tensor), over logits of ~|3|.
# (format, head format): int4 with fp32 activations and an fp32 head rounds nothing.
TOLERANCE = {("int4-fp32", "fp32"): 1e-4, ("fp16", ""): 1e-4, ("bf16", ""): 0.1, ("int8", ""): 0.1,
             ("int4", ""): 0.1, ("int4", "fp16"): 0.1, ("int8-int8", ""): 0.3}


@pytest.mark.parametrize("name, head", list(TOLERANCE))
def test_each_format_decodes_as_the_reference_on_its_own_weights(source, name, head):
    f = parse_format(name)
    fmt = WeightFormat(f.name, f.act, f.group, head)
    want = load_shard(FormatReference(source, fmt), full_spec(CFG))(IDS)
    got = decode_logits(load_decoder(source, fmt, capacity=32), IDS, prompt=5)
    assert (got - want).abs().max() <= TOLERANCE[name, head]


def test_chunked_prefill_equals_one_prefill(source):
    dec = load_decoder(source, parse_format("fp32"), capacity=32)
    whole = dec(IDS, all_logits=True)
    dec.reset()
    parts = torch.cat([dec(IDS[:4], all_logits=True), dec(IDS[4:9], all_logits=True), dec(IDS[9:], all_logits=True)])
    assert (parts - whole).abs().max() <= 1e-5


def test_the_cache_refuses_what_it_cannot_hold(source):
    dec = load_decoder(source, parse_format("fp32"), capacity=8)
    dec(IDS[:6])
    with pytest.raises(GalaxyError, match="capacity 8"):
        dec(IDS[6:9])
    with pytest.raises(GalaxyError, match="holds 6 positions"):
        dec(IDS[:1], start=2)


def test_quantized_gguf_runs_in_int4_as_its_fp32_reference(tmp_path):
    """A Q4_1 file in int4 with fp32 activations keeps every weight: the decode step equals the fp32
    reference forward on the file's dequantized weights (greedy tokens identical)."""
    write_quantized(tmp_path / "q.gguf")
    ck = GGUFCheckpoint(tmp_path / "q.gguf")
    ids = IDS.remainder(ck.config.vocab_size)
    fmt = WeightFormat("int4", act="fp32", head="fp32")  # head: the Q8_0 embedding, kept exact too
    want = load_shard(ck, full_spec(ck.config))(ids)
    got = decode_logits(load_decoder(ck, fmt, capacity=32), ids, prompt=5)
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_quantized_gguf_runs_in_its_compact_format_by_default(tmp_path, source):
    write_quantized(tmp_path / "q.gguf")
    assert native_format(GGUFCheckpoint(tmp_path / "q.gguf")).name == "int4"
    assert native_format(source).name == "fp32"
