"""Lossy wire codecs: bounded error, exact fp32, overflow-safe fp16, validated int8 scales, and
the planner's per-link choice."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import TransportError
from galaxy.parallel import codec
from galaxy.transport.datalink import encode_frame
from galaxy.transport.protocol import compress, decompress, to_proto, to_proto_dtype
from planner import wire
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link


@pytest.mark.parametrize("fmt,bound", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3), ("int8", 8e-3)])
def test_round_trip_error_relative_to_group_scale(fmt, bound):
    x = torch.randn(37, 200) * torch.linspace(0.1, 50, 200)  # outlier channels like LLM activations
    data, scales = codec.encode(x, fmt)
    y = codec.decode(data, scales, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x).abs() / codec._groups(x).abs().amax(-1).repeat_interleave(64, -1)[:, :200]
    assert float(err.max()) <= bound


def test_fp16_overflow_falls_back_to_bf16():
    x = torch.tensor([[1e6, -3.0]])
    data, _ = codec.encode(x, "fp16")
    assert data.dtype == torch.bfloat16 and torch.isfinite(codec.decode(data, None, torch.float32)).all()


def test_int8_frame_with_wrong_scales_is_refused():
    data, _ = compress(torch.randn(4, 70), "int8")  # needs (4, 2) scales: 70 values = 2 groups of 64
    with pytest.raises(TransportError, match="group scales"):
        decompress(data, to_proto_dtype(torch.float32), to_proto(torch.ones(4, 1)), "test frame")


def test_bytes_per_value_reflect_the_format():
    x = torch.randn(8, 128)
    for fmt in codec.FORMATS:
        data, scales = codec.encode(x, fmt)
        sent = data.numel() * data.element_size() + (0 if scales is None else scales.numel() * 4)
        assert sent == pytest.approx(x.numel() * codec.BYTES_PER_VALUE[fmt])


def _cluster(bw):
    cm = ComputeModel(1e10)
    codecs = {"fp32": 0.0, "bf16": 1e-10, "fp16": 2e-10, "int8": 5e-10}
    devs = [DeviceProfile(f"d{i}", f"a{i}", cm, cm, cm, 10**9, codec_s_per_byte=codecs) for i in range(2)]
    return ClusterProfile(devs, [[None, Link(bw, 1e-4)], [Link(bw, 1e-4), None]])


def test_planner_compresses_slow_links_and_keeps_fast_ones_exact():
    assert wire.choose(_cluster(50e6))[0][1] == "int8"  # 50 Mbit/s: every byte counts
    assert wire.choose(_cluster(50e9))[0][1] == "fp32"  # faster than the codecs: no gain
    assert wire.choose(_cluster(50e6), allowed=("fp32", "fp16"))[0][1] == "fp16"
    eff = wire.effective(_cluster(50e6), wire.choose(_cluster(50e6)))
    assert eff.links[0][1].bandwidth_bps > 3 * 50e6  # int8 carries fp32 activations ~3.8x faster


def test_fp32_wire_sends_bf16_valued_tensors_in_half_the_bytes_bit_for_bit():
    """int4 / int8 linears' outputs are bf16 values in float32: their all-reduce partials travel as bf16,
    losslessly (NaN, infinities and -0.0 included), through both the data plane's and gRPC's frames."""
    x = (torch.randn(40, 576) * 100).to(torch.bfloat16).to(torch.float32)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    data, scales = codec.encode(x, "fp32")
    assert data.dtype == torch.bfloat16 and scales is None
    assert torch.equal(codec.decode(data, None, torch.float32).view(torch.int32), x.view(torch.int32))
    frame = encode_frame(1, 0, x)
    assert len(frame[1]) == x.numel() * 2
    sent, _ = compress(x, "fp32")
    assert torch.equal(decompress(sent, to_proto_dtype(torch.float32), None, "test frame").view(torch.int32),
                       x.view(torch.int32))


@pytest.mark.parametrize("where", [0, 300, 23039])  # within the probe, past it, the last value
def test_fp32_wire_keeps_float32_when_any_value_is_not_bf16(where):
    x = torch.randn(40, 576).to(torch.bfloat16).to(torch.float32)
    x.view(-1)[where] += 2.0 ** -20 * x.view(-1)[where]
    data, _ = codec.encode(x, "fp32")
    assert data.dtype == torch.float32 and torch.equal(data, x)


def test_fp32_wire_sends_small_frames_as_they_are():
    """A small step's frames cost more to check and widen than their bytes cost on the link."""
    x = torch.randn(28, 576).to(torch.bfloat16).to(torch.float32)
    assert codec.encode(x, "fp32")[0] is x
