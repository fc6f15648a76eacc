"""int4pack's weight expanded natively to bf16 (model/int4_expand.py): bit for bit the kernel's float32
weight rounded once, at any thread count, tails and groups included; built once into the cache, and a
machine without a compiler keeps int4's kernel for every row instead of failing."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from galaxy.model import int4_expand
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.quant import QuantLinear, WeightFormat, parse_format
from galaxy.parallel.compact import compact_shard
from galaxy.parallel.sharding import full_spec, load_shard

pytestmark = pytest.mark.usefixtures("one_thread")

EXPANDER = int4_expand.expander()
needs_native = pytest.mark.skipif(EXPANDER is None, reason="no C compiler here: int4 keeps its kernel")


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k,group", [(320, 96, 32), (112, 64, 32), (40, 256, 64), (16, 128, 128)])
def test_the_expansion_is_bit_equal_to_the_kernels_own_weight_in_bf16(n, k, group, threads):
    # 5 full blocks of 64 rows; rows not a multiple of 64 leave int4pack's tails (48, 40 padded to 48, 16);
    # the reference is unpacked
    # by the kernel itself (QuantLinear._int4_parts: the kernel on the identity), not from the layout
    q = QuantLinear.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)),
                               WeightFormat("int4", group=group))
    out = torch.empty(k, q.packed.shape[0], dtype=torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        EXPANDER(q.packed, q.scale_zero, k, group, out)
    finally:
        torch.set_num_threads(before)
    codes, scale, zero = q._int4_parts()
    want = int4_expand.reference(codes, scale, zero, group)
    assert torch.equal(out[:, :n].T.view(torch.int16), want.view(torch.int16))
    assert torch.equal(want.to(torch.float32), q.dequantized().to(torch.bfloat16).to(torch.float32))


def pack_pairwise(block: int):
    """aarch64's int4pack (aten's weight_to_int4pack_kernel built without AVX2 / AVX-512), in Python: blocks of
    `block` rows, each (K, width/2) bytes whose byte j holds row 2j in its low nibble and 2j + 1 in its high."""
    def pack(codes: torch.Tensor) -> torch.Tensor:
        n, k = codes.shape
        out = torch.empty(n * k // 2, dtype=torch.uint8)
        for n0 in range(0, n, block):
            c = codes[n0:n0 + block].to(torch.uint8)  # (width, K)
            pairs = (c[1::2] << 4) | c[0::2]  # (width/2, K)
            out[n0 * k // 2:(n0 + c.shape[0]) * k // 2] = pairs.T.reshape(-1)  # (K, width/2)
        return out.view(n, k // 2)
    return pack


@needs_native
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("n,k,group", [(112, 64, 32), (320, 96, 32), (48, 256, 64)])
def test_the_pairwise_layout_of_torch_without_avx_expands_bit_equal_to_the_reference(block, n, k, group):
    # every block of 16 or 32 rows read as row pairs (tails of 16 with 32); 2 threads split the blocks
    g = torch.Generator().manual_seed(n + k + block)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = torch.rand(n, k // group, generator=g).add(0.01).to(torch.bfloat16).to(torch.float32)
    zero = torch.randn(n, k // group, generator=g).to(torch.bfloat16).to(torch.float32)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
    expand = int4_expand.Expander(EXPANDER.lib, block, pairwise=True)
    out = torch.empty(k, n, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expand(pack_pairwise(block)(codes), sz, k, group, out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out.T.view(torch.int16), int4_expand.reference(codes, scale, zero, group).view(torch.int16))


@needs_native
def test_the_probe_finds_the_pairwise_layouts_and_this_torchs_own():
    assert int4_expand.layout_of(EXPANDER.fn, pack=pack_pairwise(16)) == (16, True)
    assert int4_expand.layout_of(EXPANDER.fn, pack=pack_pairwise(32)) == (32, True)
    assert int4_expand.layout_of(EXPANDER.fn) == (EXPANDER.block, EXPANDER.pairwise) == (EXPANDER.block, False)


@needs_native
def test_a_buffer_that_does_not_describe_the_weight_is_refused():
    q = QuantLinear.from_float(torch.randn(64, 64), WeightFormat("int4"))
    with pytest.raises(ValueError, match="do not describe one int4pack weight of K = 64"):
        EXPANDER(q.packed, q.scale_zero, 64, 32, torch.empty(64, 32, dtype=torch.bfloat16))


@needs_native
def test_a_build_is_compiled_once_and_its_portable_path_expands_alike(tmp_path, monkeypatch):
    # -O3 alone: no AVX-512, so the portable C path (any block, tails) does every row
    monkeypatch.setattr(int4_expand, "FLAGS", ("-O3",))
    monkeypatch.setattr(int4_expand, "_compiler_id", lambda cc: "the same compiler")
    monkeypatch.setattr(int4_expand, "_target_id", lambda cc, flags: "the same CPU")
    first = int4_expand.build(tmp_path)
    assert first is not None and first.parent == tmp_path
    portable = int4_expand.Expander(ctypes.CDLL(str(first)), EXPANDER.block)
    q = QuantLinear.from_float(torch.randn(112, 64, generator=torch.Generator().manual_seed(4)), WeightFormat("int4"))
    out, native = (torch.empty(64, 112, dtype=torch.bfloat16) for _ in range(2))
    assert torch.equal(portable(q.packed, q.scale_zero, 64, 32, out).view(torch.int16),
                       EXPANDER(q.packed, q.scale_zero, 64, 32, native).view(torch.int16))
    monkeypatch.setattr(int4_expand.subprocess, "run", lambda *a, **kw: pytest.fail("compiled again"))
    assert int4_expand.build(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no build directory left behind


def test_a_cache_another_cpu_filled_is_not_loaded_here(tmp_path, monkeypatch):
    """-march=native code from another CPU (a shared home, a copied image) could hold instructions this
    one lacks: the build's name carries the instruction sets the compiler targets, so it is built anew."""
    def cc(cmd, **kw):  # a compiler that only writes its output file
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(int4_expand, "_compiler_id", lambda cc: "the same compiler")
    monkeypatch.setattr(int4_expand.subprocess, "run", cc)
    monkeypatch.setattr(int4_expand, "_target_id", lambda cc, flags: "#define __AVX512F__ 1")
    avx512 = int4_expand.build(tmp_path)
    assert int4_expand.build(tmp_path) == avx512
    monkeypatch.setattr(int4_expand, "_target_id", lambda cc, flags: "#define __AVX2__ 1")
    assert int4_expand.build(tmp_path) not in (None, avx512)


def test_the_target_is_what_the_compiler_predefines_with_the_flags():
    cc = int4_expand._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    assert "__OPTIMIZE__" in int4_expand._target_id(cc, ("-O3",))
    assert "__OPTIMIZE__" not in int4_expand._target_id(cc, ())


def test_without_a_compiler_int4_keeps_its_kernel_for_every_row(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert int4_expand.build(tmp_path) is None
    monkeypatch.setattr("galaxy.model.quant.expander", lambda: None)
    cfg = make_config("llama", vocab_size=97, hidden=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn=96,
                      max_positions=64, rope_theta=10000.0, name="int4-expand-llama")
    src = RandomWeights(cfg, seed=3)
    shard = compact_shard(load_shard(src, full_spec(cfg)), src, parse_format("int4"))
    q = shard.layers["0"].mlp.gate_up.q
    assert q.scratch is not None and not q.routes_rows()  # the scratch is still held (counted alike everywhere)
