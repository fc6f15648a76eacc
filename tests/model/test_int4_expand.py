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
