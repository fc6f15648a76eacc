"""Lossy wire codecs: bounded error, exact fp32, overflow-safe fp16, validated int8 scales, and
the planner's per-link choice."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import TransportError
from galaxy.parallel import codec
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
