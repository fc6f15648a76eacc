"""Tensor <-> protobuf conversion and protocol constants: the one place bytes become tensors.

Tensors travel as raw little-endian bytes with an explicit dtype and shape. Decoding checks the
dtype is known, every dimension is non-negative, the element count is within limits and the
byte length is exactly what the shape needs -- before anything is allocated.
"""

from __future__ import annotations

import math
import sys

import torch

from ..errors import GalaxyError, TransportError
from ..model.paged_kv import PagedBatch
from ..parallel import codec
from ..parallel.forward import Step
from ..parallel.rank import KVPool
from ..v1 import worker_pb2 as pb

PROTOCOL_VERSION = 4  # 2: engine Steps over a paged KV cache replace named caches; 3: a Step's kernel_from
# (int8/int4 rows by role) and direct K/V receipts, which an older worker would silently ignore; 4: the
# all-reduce above the direct size in two shots (an older worker's ring would wait for messages never sent),
# int4 / int8 direct up to 128 KiB and fp32 frames sent as exact bf16 (parallel/codec.exact16)
META_PROTOCOL = "galaxy-protocol"
META_TOKEN = "galaxy-token"
META_SESSION = "galaxy-session"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # hard cap on any gRPC message, both directions
MAX_TENSOR_ELEMENTS = MAX_MESSAGE_BYTES // 2
MAX_DIMS = 8

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
    """The wire's code for a dtype (the protobuf DType, also the TCP frames' dtype byte)."""
    if dtype not in _TO_PB:
        raise TypeError(f"dtype {dtype} cannot travel on the wire")
    return _TO_PB[dtype]


def from_proto_dtype(code: int, what: str, label: str = "dtype") -> torch.dtype:
    if code not in _FROM_PB:
        raise TransportError(f"{what}: unknown {label} code {code}")
    return _FROM_PB[code]


def announced_layout(code: int, shape: tuple[int, ...], what: str) -> tuple[torch.dtype, int]:
    """(dtype, byte count) of a tensor announced by dtype code and shape, once both are within limits."""
    dtype = from_proto_dtype(code, what)
    if any(d < 0 for d in shape):
        raise TransportError(f"{what}: negative dimension in shape {shape}")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > MAX_TENSOR_ELEMENTS:
        raise TransportError(f"{what}: shape {shape} exceeds the limit of {MAX_TENSOR_ELEMENTS} elements / "
                             f"{MAX_DIMS} dims")
    return dtype, math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def checked_layout(code: int, shape: tuple[int, ...], nbytes: int, what: str) -> torch.dtype:
    """The dtype of a tensor announced as (dtype code, shape, byte count), once the three agree and
    are within limits: every transport checks this before it allocates for the tensor."""
    dtype, want = announced_layout(code, shape, what)
    if nbytes != want:
        raise TransportError(f"{what}: {nbytes} bytes for shape {shape} {dtype}, expected {want}")
    return dtype


def to_proto(t: torch.Tensor) -> pb.Tensor:
    return fill_proto(pb.Tensor(), t)


def fill_proto(m: pb.Tensor, t: torch.Tensor) -> pb.Tensor:
    """Write t into the (sub)message m in place: a large output is copied once into the message,
    never into a second message it would then be copied from."""
    m.dtype = to_proto_dtype(t.dtype)
    t = t.detach().contiguous().cpu()
    m.shape[:] = list(t.shape)
    m.data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # raw bytes, any dtype incl. bf16
    return m


class TensorReply:
    """A reply message and the tensor that goes in its `field` (a pb.Tensor submessage), kept apart
    until gRPC serializes it (`serialize_tensor_reply`, the method's response serializer). Filling
    the message first (`fill_proto`) held the tensor, its bytes and the message's copy at once, then
    the message, its serialization and gRPC's copy: three times the tensor. Serialized here, the
    tensor's buffer goes once into the wire bytes and is dropped before gRPC copies those."""

    __slots__ = ("message", "field", "tensor")

    def __init__(self, message, field: str, tensor: torch.Tensor):
        self.message, self.field = message, field
        self.tensor = tensor.detach().contiguous().cpu()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, size: int) -> bytes:
    """The key and length of a length-delimited field (wire type 2) of `size` bytes."""
    return _varint(number << 3 | 2) + _varint(size)


def serialize_tensor_reply(reply) -> bytes:
    """A response serializer: a plain message as protobuf serializes it; a TensorReply as the same
    bytes protobuf would give for its message with the tensor in `field` (fields may come in any
    order on the wire), built in one join straight from the tensor's buffer."""
    if not isinstance(reply, TensorReply):
        return reply.SerializeToString()
    t, reply.tensor = reply.tensor, None  # this is the last reference: gone once joined
    head = pb.Tensor(dtype=to_proto_dtype(t.dtype), shape=list(t.shape)).SerializeToString()
    data = t.reshape(-1).view(torch.uint8).numpy().data  # a view: no copy
    data_key = _length_delimited(pb.Tensor.DESCRIPTOR.fields_by_name["data"].number, data.nbytes)
    inner = len(head) + len(data_key) + data.nbytes
    number = reply.message.DESCRIPTOR.fields_by_name[reply.field].number
    parts = [reply.message.SerializeToString(), _length_delimited(number, inner), head, data_key, data]
    out = b"".join(parts)
    del parts, data, t
    return out


def from_proto(m: pb.Tensor, what: str = "tensor") -> torch.Tensor:
    """Decode and validate; raises TransportError naming `what` on any inconsistency."""
    shape = tuple(int(d) for d in m.shape)
    dtype = checked_layout(m.dtype, shape, len(m.data), what)
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    buf = torch.frombuffer(bytearray(m.data), dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


MAX_STEP_SEQUENCES = 4096  # sequences one engine step may pack
MAX_POOL_BLOCKS = 1 << 24  # block ids a pool may hold (its bytes are bounded by each worker's KV budget)


def step_to_proto(step: Step, pool: KVPool, session_id: str, request_id: int) -> pb.StepRequest:
    b = step.batch
    return pb.StepRequest(
        session_id=session_id, request_id=request_id, input_ids=to_proto(step.ids.cpu()),
        query_lens=list(b.query_lens), starts=list(b.starts), block_table_lens=[len(t) for t in b.block_tables],
        block_tables=[x for t in b.block_tables for x in t], logit_rows=list(step.logit_rows),
        copies=[x for pair in step.copies for x in pair], num_blocks=pool.num_blocks, block_size=pool.block_size,
        top1_rows=list(step.top1_rows), kernel_from=list(step.kernel_from))


def step_from_proto(m: pb.StepRequest, device: str = "cpu") -> tuple[Step, KVPool]:
    """An engine step from the wire, every count and index checked before anything is allocated
    for it (PagedBatch and RankRuntime.validate_step check the rest against the model and pool)."""
    n = len(m.query_lens)
    if not 1 <= n <= MAX_STEP_SEQUENCES:
        raise TransportError(f"step: {n} sequences (1..{MAX_STEP_SEQUENCES})")
    if len(m.starts) != n or len(m.block_table_lens) != n:
        raise TransportError(f"step: {n} query lengths, {len(m.starts)} starts, {len(m.block_table_lens)} block tables")
    if min(m.block_table_lens) < 0 or sum(m.block_table_lens) != len(m.block_tables) or len(m.copies) % 2:
        raise TransportError(f"step: block tables of {list(m.block_table_lens)[:8]}... do not cover the "
                             f"{len(m.block_tables)} block ids, or {len(m.copies)} copy ids are not pairs")
    if not 1 <= m.num_blocks <= MAX_POOL_BLOCKS or not 1 <= m.block_size <= 1 << 16:
        raise TransportError(f"step: a pool of {m.num_blocks} blocks of {m.block_size} positions")
    ids = from_proto(m.input_ids, "step input_ids")
    tables, at = [], 0
    for k in m.block_table_lens:
        tables.append(tuple(m.block_tables[at: at + k]))
        at += k
    try:
        batch = PagedBatch(m.block_size, tuple(m.query_lens), tuple(m.starts), tuple(tables))
        pool = KVPool(m.num_blocks, m.block_size)
    except (GalaxyError, ValueError) as e:
        raise TransportError(f"step: {e}") from None
    copies = tuple((m.copies[i], m.copies[i + 1]) for i in range(0, len(m.copies), 2))
    if len(m.kernel_from) not in (0, n):
        raise TransportError(f"step: {len(m.kernel_from)} kernel_from for {n} sequences")
    return Step(ids.to(device), batch, tuple(m.logit_rows), copies, tuple(m.top1_rows), tuple(m.kernel_from)), pool


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
    want = from_proto_dtype(decoded, what, "decoded dtype")
    s = from_proto(scales, f"{what} scales") if scales is not None else None
    try:
        return codec.decode(t, s, want)
    except ValueError as e:
        raise TransportError(f"{what}: {e}") from None


# --- K/V boxes of phase-separated serving (galaxy/parallel/kv_transfer.py) --------------------------
def kv_box_to_proto(session_id: str, block_table, tokens: int, layers: tuple[int, int], heads: tuple[int, int],
                    pool: KVPool, box: torch.Tensor | None = None, start: int = 0,
                    while_stepping: bool = False) -> pb.KVBox:
    m = pb.KVBox(session_id=session_id, block_table=list(block_table), num_tokens=tokens, layer_lo=layers[0],
                 layer_hi=layers[1], head_lo=heads[0], head_hi=heads[1], num_blocks=pool.num_blocks,
                 block_size=pool.block_size, start=start, while_stepping=while_stepping)
    if box is not None:
        fill_proto(m.kv, box)
    return m


def kv_box_from_proto(m: pb.KVBox) -> tuple[tuple[int, ...], int, tuple[int, int], tuple[int, int], KVPool]:
    """(block table, tokens, layers, heads, pool) of a K/V box request, counts checked before use
    (parallel.kv_transfer checks them against what the device holds)."""
    if not 1 <= m.num_blocks <= MAX_POOL_BLOCKS or not 1 <= m.block_size <= 1 << 16:
        raise TransportError(f"K/V box: a pool of {m.num_blocks} blocks of {m.block_size} positions")
    if not 1 <= len(m.block_table) <= m.num_blocks or not 1 <= m.num_tokens <= len(m.block_table) * m.block_size:
        raise TransportError(f"K/V box: {m.num_tokens} positions in {len(m.block_table)} blocks of {m.block_size} "
                             f"(pool of {m.num_blocks})")
    if not (0 <= m.layer_lo < m.layer_hi and 0 <= m.head_lo < m.head_hi):
        raise TransportError(f"K/V box: layers {m.layer_lo}..{m.layer_hi}, KV heads {m.head_lo}..{m.head_hi}")
    return (tuple(m.block_table), int(m.num_tokens), (m.layer_lo, m.layer_hi), (m.head_lo, m.head_hi),
            KVPool(m.num_blocks, m.block_size))


def kv_box_start(m: pb.KVBox) -> int:
    """The first position of a K/V box request ([start, num_tokens): a streamed chunk of a prompt)."""
    if not 0 <= m.start < m.num_tokens:
        raise TransportError(f"K/V box: positions {m.start}..{m.num_tokens}")
    return int(m.start)
