"""Compact weight formats: each kernel against its own dequantized weight, against fp32, and sliced."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.config import preset
from galaxy.model.quant import Blocked, FormatError, QuantLinear, WeightFormat, parse_format, split_granules

FORMATS = ["fp32", "bf16", "fp16", "int8", "int8-int8", "int4", "int4-fp32", "int4-g64"]


pytestmark = pytest.mark.usefixtures("one_thread")

def weight(n: int = 80, k: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)  # row offsets


def acts(m: int = 5, k: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def half_step(fmt: WeightFormat, w: torch.Tensor) -> torch.Tensor:
    """Largest rounding error each weight may have in `fmt` (elementwise bound, (N, K)): half a code
    step, the step rounded up to the kernel's scale dtype, plus (bf16 int4) the zero's own rounding."""
    n, k = w.shape
    rel = 2.0**-7 if fmt.act == "bf16" else 2.0**-23  # a scale rounded up by one ulp at most
    if fmt.name == "fp32":
        return torch.zeros_like(w)
    if fmt.name == "bf16":
        return w.abs() * 2.0**-8  # half an ulp: 8 significant bits
    if fmt.name == "fp16":
        return (w.abs() * 2.0**-11).clamp_min(2.0**-25)  # 11 significant bits; subnormals below 2^-14
    if fmt.name == "int8":
        return (w.abs().amax(1, keepdim=True) / 127 / 2 * (1 + rel)).expand(n, k)
    g = w.view(n, k // fmt.group, fmt.group)
    lo, step = g.amin(-1), (g.amax(-1) - g.amin(-1)) / 15 * (1 + rel)
    bound = step / 2 + (lo.abs() + 8 * step) * (rel / 2 if fmt.act == "bf16" else 0)
    return bound.repeat_interleave(fmt.group, 1)


def act_error(fmt: WeightFormat, x: torch.Tensor) -> torch.Tensor:
    """Largest error of each activation as the kernel takes it (elementwise bound, (M, K))."""
    if fmt.act == "fp32":
        return torch.zeros_like(x)
    if fmt.act == "bf16":
        return x.abs() * 2.0**-8
    return ((x.max() - x.min()) / 127 / 2).expand_as(x)  # fbgemm: per tensor, 7 bits (reduce_range)


def out_rounding(fmt: WeightFormat) -> float:
    """Relative rounding of the kernel's output (bf16 outputs) or its float32 accumulation."""
    return 2.0**-8 if fmt.act == "bf16" else 1e-5


@pytest.mark.parametrize("name", FORMATS)
def test_kernel_equals_matmul_by_its_own_dequantized_weight(name):
    """Only the activations' rounding (none for fp32) separates the kernel from x @ W_q^T."""
    fmt = parse_format(name)
    q = QuantLinear.from_float(weight(), fmt)
    x = acts()
    wq = q.dequantized().double()
    want = x.double() @ wq.T
    bound = act_error(fmt, x).double() @ wq.abs().T + out_rounding(fmt) * want.abs().max()
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (5, 80)
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("name", FORMATS)
def test_weight_error_is_within_half_a_quantization_step(name):
    fmt = parse_format(name)
    w = weight()
    err = (QuantLinear.from_float(w, fmt).dequantized() - w).abs()
    assert (err <= half_step(fmt, w) * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("name", FORMATS)
def test_output_error_against_fp32_is_within_the_format_bound(name):
    """|x W^T - y| <= |x| |W - W_q|^T + |x - x_act| |W_q|^T (+ the output's own rounding): the stated bound."""
    fmt = parse_format(name)
    w, x = weight(), acts()
    q = QuantLinear.from_float(w, fmt)
    bound = (x.abs().double() @ half_step(fmt, w).double().T
             + act_error(fmt, x).double() @ q.dequantized().abs().double().T)
    exact = x.double() @ w.double().T
    assert ((q(x).double() - exact).abs() <= bound + out_rounding(fmt) * exact.abs().max()).all()


def test_int4_pads_rows_to_a_multiple_of_16():
    w = weight(n=37, k=64)
    q = QuantLinear.from_float(w, parse_format("int4"))
    assert q.packed.shape[0] == 48 and q(acts(k=64)).shape == (5, 37)


def test_int4_needs_k_in_whole_groups():
    with pytest.raises(FormatError, match="K=96 is not a multiple of group=64"):
        QuantLinear.from_float(weight(k=96), parse_format("int4-g64"))


@pytest.mark.parametrize("bad, match", [("int3", "int3"), ("int4-g48", "group=48"), ("int4-fp16", "fp16"),
                                        ("bf16-fp32", "act='fp32'")])
def test_format_names_are_validated(bad, match):
    with pytest.raises(FormatError, match=match):
        parse_format(bad)


def q4_1_blocks(n: int, k: int, seed: int = 0) -> Blocked:
    """Random Q4_1-like blocks: codes 0..15, fp16-representable d > 0 and m."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.08).half().float()
    return Blocked(codes, d, m, 32, "q4_1")


def test_q4_1_blocks_map_onto_int4_with_fp32_activations_exactly():
    """int4pack computes (q - 8) * scale + zero: scale = d, zero = m + 8d is Q4_1's q * d + m."""
    b = q4_1_blocks(48, 128)
    q = QuantLinear.from_blocked(b, parse_format("int4-fp32"))
    w = b.dequantize()
    torch.testing.assert_close(q.dequantized(), w, rtol=0, atol=1e-7)  # (q-8) d + (m + 8d) vs q d + m
    x = acts()
    torch.testing.assert_close(q(x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_blocks_into_other_formats_go_through_their_float_values():
    b = q4_1_blocks(32, 64)
    for name in ("fp32", "bf16", "fp16", "int8", "int8-int8", "int4-g64"):
        fmt = parse_format(name)
        torch.testing.assert_close(QuantLinear.from_blocked(b, fmt).dequantized(),
                                   QuantLinear.from_float(b.dequantize(), fmt).dequantized(), rtol=0, atol=0)


@pytest.mark.parametrize("name", FORMATS)
def test_row_slices_of_a_quantized_weight_are_the_slices_of_its_dequantized_weight(name):
    """Column-parallel shards: quantizing rows [a, b) alone gives rows [a, b) of the whole (every format is
    row-local), so a device can quantize just its rows."""
    fmt = parse_format(name)
    w = weight(n=96)
    whole = QuantLinear.from_float(w, fmt).dequantized()
    for a, b in [(0, 16), (16, 53), (53, 96)]:
        assert torch.equal(QuantLinear.from_float(w[a:b], fmt).dequantized(), whole[a:b])


@pytest.mark.parametrize("name", FORMATS)
def test_column_slices_on_the_alignment_equal_slices_of_the_dequantized_weight(name):
    """Row-parallel shards: columns [a, b) cut at the format's alignment, taken from the quantized whole
    (`QuantLinear.slice`), hold exactly those columns of the dequantized whole, and multiply by them."""
    fmt = parse_format(name)
    w, x = weight(k=256), acts(k=256)
    q = QuantLinear.from_float(w, fmt)
    whole = q.dequantized()
    step = max(fmt.alignment().cols, 64)
    for a, b in [(0, step), (step, 256)]:
        part = q.slice(1, a, b)
        assert torch.equal(part.dequantized(), whole[:, a:b])
        xs, wq = x[:, a:b], whole[:, a:b].double()
        want = xs.double() @ wq.T
        bound = act_error(fmt, xs).double() @ wq.abs().T + out_rounding(fmt) * want.abs().max()
        assert ((part(xs).double() - want).abs() <= bound).all()


def test_int4_column_slices_must_fall_on_groups():
    q = QuantLinear.from_float(weight(k=128), parse_format("int4"))
    with pytest.raises(FormatError, match="group"):
        q.slice(1, 16, 128)


def test_int8pack_refuses_an_input_width_its_kernel_would_misread():
    """int8pack reads K in vectors of 16 unchecked (K = 24 gave inf for one row, a segfault for five):
    such a weight, or a column slice to such a width, is refused before the kernel ever sees it."""
    with pytest.raises(FormatError, match="K=24 is not a multiple of 16"):
        QuantLinear.from_float(weight(k=24), parse_format("int8"))
    q = QuantLinear.from_float(weight(k=64), parse_format("int8"))
    with pytest.raises(FormatError, match="K=8"):
        q.slice(1, 0, 8)
    assert QuantLinear.from_float(weight(k=24), parse_format("int8-int8")).k == 24  # fbgemm has no such limit


def test_int8_row_lookup_is_the_dequantized_row():
    q = QuantLinear.from_float(weight(), parse_format("int8"))
    ids = torch.tensor([3, 0, 79])
    assert torch.equal(q.rows(ids), q.dequantized()[ids])


def test_split_granules_name_the_cuts_each_format_and_file_allow():
    smol = preset("smollm2-135m")  # head_dim 64, ffn 1536
    assert split_granules(smol, parse_format("fp32")) == {"heads": 1, "cols": 1, "vocab": 1}
    assert split_granules(smol, parse_format("int8"), file_block=32) == {"heads": 1, "cols": 32, "vocab": 1}
    assert split_granules(smol, parse_format("int8")) == {"heads": 1, "cols": 16, "vocab": 1}
    assert split_granules(smol, parse_format("int8-int8")) == {"heads": 1, "cols": 1, "vocab": 1}
    assert split_granules(smol, parse_format("int4-g128")) == {"heads": 2, "cols": 128, "vocab": 1}
