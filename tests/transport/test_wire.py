"""Tensor encoding on the wire: exact round trips, and malformed messages rejected up front."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import TransportError
from galaxy.transport.protocol import (
    MAX_TENSOR_ELEMENTS,
    TensorReply,
    fill_proto,
    from_proto,
    serialize_tensor_reply,
    to_proto,
)
from galaxy.v1 import worker_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.int8, torch.uint8])
def test_round_trip_is_bit_exact(dtype):
    x = (torch.randn(4, 3, 5) * 50).to(dtype)
    y = from_proto(to_proto(x))
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(x, y)


def test_raw_little_endian_bytes_not_repeated_floats():
    m = to_proto(torch.tensor([1.0, -2.0]))
    assert m.dtype == pb.FLOAT32 and list(m.shape) == [2]
    assert m.data == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


def test_empty_and_scalar_tensors():
    assert from_proto(to_proto(torch.zeros(0, 7))).shape == (0, 7)
    assert from_proto(to_proto(torch.tensor(2.5))).item() == 2.5


def test_non_contiguous_tensor_is_sent_in_logical_order():
    x = torch.arange(12.0).reshape(3, 4).T
    assert torch.equal(from_proto(to_proto(x)), x)


@pytest.mark.parametrize("msg,match", [
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 2], data=b"\x00" * 15), "15 bytes for shape"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, -2], data=b""), "negative dimension"),
    (pb.Tensor(dtype=99, shape=[1], data=b"\x00" * 4), "unknown dtype"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\x00" * 4), "unknown dtype"),
    (pb.Tensor(dtype=pb.INT8, shape=[MAX_TENSOR_ELEMENTS + 1], data=b""), "exceeds the limit"),
])
def test_malformed_tensor_is_rejected_naming_the_problem(msg, match):
    with pytest.raises(TransportError, match=match):
        from_proto(msg, "test tensor")


@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (1030, 17), (1, 40_000)])
def test_a_tensor_reply_serializes_to_the_bytes_of_the_message_with_the_tensor_filled_in(shape):
    t = torch.randn(*shape)
    head = pb.ForwardReply(forward_s=1.5, peak_rss_bytes=123, cpu_s=0.25)
    want = pb.ForwardReply()
    want.CopyFrom(head)
    fill_proto(want.output, t)
    got = pb.ForwardReply.FromString(serialize_tensor_reply(TensorReply(head, "output", t)))
    assert got == want and torch.equal(from_proto(got.output), t)
    assert serialize_tensor_reply(want) == want.SerializeToString()  # a plain message as protobuf writes it
