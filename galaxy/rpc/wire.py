"""Tensor <-> protobuf conversion and protocol constants: the one place bytes become tensors.

Tensors travel as raw little-endian bytes with an explicit dtype and shape. Decoding checks the
dtype is known, every dimension is non-negative, the element count is within limits and the
byte length is exactly what the shape needs -- before anything is allocated.
"""

from __future__ import annotations

import math
import sys

import torch

from .. import codec
from ..errors import TransportError
from ..v1 import worker_pb2 as pb

PROTOCOL_VERSION = 1
META_PROTOCOL = "galaxy-protocol"
META_TOKEN = "galaxy-token"
META_SESSION = "galaxy-session"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # hard cap on any gRPC message, both directions
MAX_TENSOR_ELEMENTS = MAX_MESSAGE_BYTES // 2

_TO_PB = {
    torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64, torch.int32: pb.INT32, torch.int8: pb.INT8, torch.uint8: pb.UINT8,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}

assert sys.byteorder == "little", "Galaxy's wire format is little-endian; big-endian hosts are unsupported"


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def to_proto_dtype(dtype: torch.dtype) -> int:
    return _TO_PB[dtype]


def to_proto(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in _TO_PB:
        raise TypeError(f"dtype {t.dtype} cannot travel on the wire")
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # raw bytes, any dtype incl. bf16
    return pb.Tensor(dtype=_TO_PB[t.dtype], shape=list(t.shape), data=data)


def from_proto(m: pb.Tensor, what: str = "tensor") -> torch.Tensor:
    """Decode and validate; raises TransportError naming `what` on any inconsistency."""
    if m.dtype not in _FROM_PB:
        raise TransportError(f"{what}: unknown dtype code {m.dtype}")
    dtype = _FROM_PB[m.dtype]
    shape = tuple(int(d) for d in m.shape)
    if any(d < 0 for d in shape):
        raise TransportError(f"{what}: negative dimension in shape {shape}")
    if len(shape) > 8 or math.prod(max(d, 1) for d in shape) > MAX_TENSOR_ELEMENTS:
        raise TransportError(f"{what}: shape {shape} exceeds the limit of {MAX_TENSOR_ELEMENTS} elements / 8 dims")
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(m.data) != n * itemsize:
        raise TransportError(
            f"{what}: {len(m.data)} bytes for shape {shape} {dtype}, expected {n * itemsize}"
        )
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    buf = torch.frombuffer(bytearray(m.data), dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


def metadata(token: str | None, session: str | None = None) -> list[tuple[str, str]]:
    md = [(META_PROTOCOL, str(PROTOCOL_VERSION))]
    if token:
        md.append((META_TOKEN, token))
    if session:
        md.append((META_SESSION, session))
    return md


# --- lossy activation compression on the wire (codec.py does the arithmetic) -----------------
WIRE_FORMATS = codec.FORMATS


def compress(t: torch.Tensor, fmt: str) -> tuple[pb.Tensor, pb.Tensor | None]:
    data, scales = codec.encode(t, fmt)
    return to_proto(data), None if scales is None else to_proto(scales)


def decompress(m: pb.Tensor, decoded: int, scales: pb.Tensor | None, what: str) -> torch.Tensor:
    """Rebuild the sender's tensor from a frame, checking the scales fit the data."""
    t = from_proto(m, what)
    if not decoded or decoded == m.dtype:
        return t
    if decoded not in _FROM_PB:
        raise TransportError(f"{what}: unknown decoded dtype code {decoded}")
    s = from_proto(scales, f"{what} scales") if scales is not None else None
    try:
        return codec.decode(t, s, _FROM_PB[decoded])
    except ValueError as e:
        raise TransportError(f"{what}: {e}") from None
