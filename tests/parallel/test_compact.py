"""Shards in a compact weight format (parallel/compact.py): each holds exactly its slice of the whole
model's compact weights, and the parallel forward with float32-output kernels equals the single device
in the same format (<= 1e-4 in the logits, the same greedy tokens), uneven and empty shares included."""

from __future__ import annotations

import pytest
import torch

from galaxy.engine.engine import Engine
from galaxy.engine.generation import GenerationConfig
from galaxy.errors import PlanMismatch
from galaxy.model.checkpoints.gguf import GGUFCheckpoint
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.decode import load_decoder
from galaxy.model.quant import FormatError, QuantLinear, parse_format
from galaxy.parallel.compact import CompactLinear, compact_shard, held_bytes
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import Partition, full_spec, load_shard
from galaxy.runtime.api import connect
from galaxy.runtime.inproc import InprocCluster, run_inprocess
from tests.model.checkpoints.test_gguf_blocks import write_quantized

# head_dim 16, ffn 96: int4's groups of 32 fall on 2 heads and on 32 columns; GQA 4/2; a tied head.
CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="compact-llama")
SRC = RandomWeights(CFG, seed=5)
TOL = 1e-4
# Uneven shares on every format's granules, a device with no heads, no columns or no vocabulary rows.
PARTITIONS = [
    Partition("galaxy", (2, 2), (64, 32), (60, 37), (2, 2), (1.0, 0.4)),
    Partition("galaxy", (2, 0, 2), (32, 0, 64), (20, 50, 27), (2, 2, 2), (1.0, 2.0, 0.5)),
    Partition("megatron", (0, 2, 2), (32, 64, 0), (0, 90, 7), (2, 2, 2)),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def single(fmt):
    return compact_shard(load_shard(SRC, full_spec(CFG)), SRC, fmt)


def shards(p, fmt):
    return [compact_shard(load_shard(SRC, p.spec(r, CFG)), SRC, fmt) for r in range(p.world)]


def parallel_logits(models, p, ids):
    return run_inprocess(models, p, Request(ids))[0]


def greedy(logits_of, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits_of(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["fp32", "fp16", "int4-fp32"])
@pytest.mark.parametrize("p", PARTITIONS, ids=["galaxy-2", "galaxy-3-empty", "megatron-3-empty"])
def test_float32_output_formats_split_unevenly_equal_the_single_device_in_the_same_format(name, p):
    fmt = parse_format(name)
    one = single(fmt)
    models = shards(p.validate(CFG), fmt)
    for seq in (1, 7):
        ids = torch.randint(0, CFG.vocab_size, (seq,), generator=torch.Generator().manual_seed(seq))
        err = (parallel_logits(models, p, ids) - one(ids)).abs().max().item()
        assert err <= TOL, f"{name} seq={seq}: {err}"
    prompt = [3, 14, 15, 92]
    assert greedy(lambda x: parallel_logits(models, p, x), prompt, 5) == greedy(one, prompt, 5)


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8", "int4"])
def test_every_shard_holds_exactly_its_slice_of_the_whole_compact_weights(name):
    """Column-parallel rows and row-parallel columns alike, int8's whole-row scales included."""
    fmt = parse_format(name)
    whole = single(fmt).layers["1"]
    p = PARTITIONS[1]
    for r, m in enumerate(shards(p, fmt)):
        spec, blk = p.spec(r, CFG), m.layers["1"]
        h0, h1 = (x * CFG.head_dim for x in spec.heads)
        c0, c1 = spec.cols
        if h1 > h0:
            assert torch.equal(blk.attn.out.weight, whole.attn.out.weight[:, h0:h1])
            assert torch.equal(blk.attn.qkv.weight[: h1 - h0], whole.attn.qkv.weight[h0:h1])  # the Q rows
        if c1 > c0:
            assert torch.equal(blk.mlp.down.weight, whole.mlp.down.weight[:, c0:c1])
            c, f = c1 - c0, CFG.ffn  # gate|up fused: [gate; up] rows of the shard, of the whole
            assert torch.equal(blk.mlp.gate_up.weight[:c], whole.mlp.gate_up.weight[c0:c1])
            assert torch.equal(blk.mlp.gate_up.weight[c:], whole.mlp.gate_up.weight[f + c0 : f + c1])
            assert isinstance(blk.mlp.down, CompactLinear)


def test_a_cut_off_the_formats_granule_is_refused_with_both_numbers():
    p = Partition("galaxy", (2, 2), (40, 56), (50, 47), (2, 2), (1.0, 1.0)).validate(CFG)
    with pytest.raises(FormatError, match="cols cut at 40 is not a multiple of 32"):
        compact_shard(load_shard(SRC, p.spec(0, CFG)), SRC, parse_format("int4"))
    compact_shard(load_shard(SRC, p.spec(0, CFG)), SRC, parse_format("fp16"))  # 16-bit: any cut


def test_fp32_leaves_the_shard_as_loaded():
    m = load_shard(SRC, full_spec(CFG))
    assert compact_shard(m, SRC, parse_format("fp32")).layers["0"].attn.qkv is m.layers["0"].attn.qkv


def test_the_engine_on_in_process_ranks_generates_in_the_load_options_format():
    """The serving engine's paged steps over an uneven 3-rank split in fp16 give the single device's greedy
    tokens in fp16; the weight bytes reported are the compact ones."""
    p = PARTITIONS[1]
    prompt = [3, 14, 15, 92, 65]
    with InprocCluster(3) as c:
        fp32_bytes = c.load(SRC, p)
        compact_bytes = c.load(SRC, p, LoadOptions(weights_format="fp16"))
        engine = Engine(c, CFG)
        try:
            g = engine.generate(prompt, GenerationConfig(6, stop_at_eos=False))
        finally:
            engine.close()
    assert g.tokens == greedy(single(parse_format("fp16")), prompt, 6)
    assert sum(compact_bytes) < sum(fp32_bytes)


def test_load_options_refuse_a_bad_weights_format_naming_it():
    with pytest.raises(PlanMismatch, match="weights_format='int9'"):
        LoadOptions(weights_format="int9")
    with pytest.raises(PlanMismatch, match="dtype='bfloat16' must be float32"):
        LoadOptions(weights_format="int8", dtype="bfloat16")


def test_the_python_api_loads_in_a_weights_format_on_in_process_devices():
    with connect(local=2, transport="inproc") as session:
        lm = session.load(SRC, partition=PARTITIONS[0], weights_format="int4-fp32")
        ids = lm.generate([3, 14, 15, 92], max_new_tokens=4, details=True).tokens
    assert ids == greedy(single(parse_format("int4-fp32")), [3, 14, 15, 92], 4)


@pytest.mark.parametrize("name", ["fp16", "int4-fp32"])
def test_fused_gate_up_gives_the_separate_gate_and_up_matmuls(name):
    """MLP.gate_up is [gate; up] in the format: its expand equals act(gate(x)) * up(x) of each alone."""
    fmt = parse_format(name)
    plain = load_shard(SRC, full_spec(CFG)).layers["0"].mlp
    fused = single(fmt).layers["0"].mlp
    assert fused.gate is None and fused.up is None
    gate, up = (QuantLinear.from_float(w, fmt) for w in (plain.gate.weight, plain.up.weight))
    x = torch.randn(3, CFG.hidden, generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.silu(gate(x)) * up(x)
    torch.testing.assert_close(fused.expand(x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,head", [("int4", "fp16"), ("int8", "fp16"), ("bf16", "bf16"), ("int4:int4", "int4")])
def test_the_embedding_and_head_are_held_in_the_head_format_and_each_shard_holds_its_rows(name, head):
    fmt = parse_format(name)
    whole = single(fmt)
    assert whole.lm_head is None and whole.embed.tokens is None
    assert whole.head.fmt.name == head and whole.embed.table.fmt.name == ("fp16" if head == "int4" else head)
    assert (whole.head is whole.embed.table) == (head != "int4")  # tied: one module unless int4 has no rows
    ids = torch.arange(CFG.vocab_size)
    for r, m in enumerate(shards(PARTITIONS[1], fmt)):
        v0, v1 = PARTITIONS[1].spec(r, CFG).vocab
        assert torch.equal(m.head.dequantized(), whole.head.dequantized()[v0:v1])
        inside = (ids >= v0) & (ids < v1)
        assert torch.equal(m.embed.lookup(ids)[inside], whole.embed.lookup(ids)[inside])
        assert not m.embed.lookup(ids)[~inside].any()


def test_held_bytes_count_the_row_table_an_opaque_head_keeps_for_lookups():
    m = single(parse_format("int4"))  # the tied fp16 head: packed for the matmul, rows kept for lookups
    v, h = CFG.vocab_size, CFG.hidden
    layers = sum(mod.nbytes for mod in m.layers.modules() if isinstance(mod, QuantLinear))
    norms = sum(t.numel() * 4 for n, t in m.named_parameters() if "norm" in n)
    scratch = m.dense_scratch.nbytes  # the bf16 buffer int4's prompt rows expand a weight into (model/dense_rows.py)
    assert held_bytes(m) == layers + norms + 2 * (v * h * 2) + scratch


def test_a_q4_1_file_in_int4_is_held_block_for_block_as_the_decoder_holds_it_and_splits_exactly(tmp_path):
    """A GGUF Q4_1 file's blocks go straight into int4 (no requantizing): the whole shard holds the compact
    decoder's weights, and a 2-way split with fp32 activations equals the fp32 reference on the file's
    dequantized weights (<= 1e-4, the same greedy tokens)."""
    write_quantized(tmp_path / "q.gguf")
    ck = GGUFCheckpoint(tmp_path / "q.gguf")
    cfg = ck.config
    fmt = parse_format("int4-fp32:fp32")  # the head: the file's Q8_0 embedding, exact in fp32
    whole = compact_shard(load_shard(ck, full_spec(cfg)), ck, fmt)
    dec = load_decoder(ck, fmt, capacity=32)
    for i, layer in enumerate(dec.layers):
        blk = whole.layers[str(i)]
        for ours, theirs in ((blk.attn.qkv, layer.qkv), (blk.attn.out, layer.out), (blk.mlp.gate_up, layer.gate_up),
                             (blk.mlp.down, layer.down)):
            assert torch.equal(ours.q.dequantized(), theirs.dequantized())
    p = Partition("galaxy", (2, 2), (64, 32), (20, 20), (2, 2), (1.0, 0.5)).validate(cfg)
    models = [compact_shard(load_shard(ck, p.spec(r, cfg)), ck, fmt) for r in range(2)]
    ref = load_shard(ck, full_spec(cfg))
    ids = torch.tensor([3, 14, 15, 9, 26, 5])
    assert (parallel_logits(models, p, ids) - ref(ids)).abs().max().item() <= TOL
    assert greedy(lambda x: parallel_logits(models, p, x), [3, 14], 4) == greedy(ref, [3, 14], 4)
