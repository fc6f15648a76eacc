"""Fuzzing the parsers that read untrusted input: wire tensors and frames, plan files,
partitions and model configs. Each must return a value or raise its own clear error type --
never crash with another exception, never hang."""

from __future__ import annotations

import json

import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galaxy.errors import TransportError
from galaxy.model.config import ConfigError, ModelConfig, preset
from galaxy.parallel.sharding import Partition, PartitionError
from galaxy.transport.peers import PeerTransport
from galaxy.transport.protocol import from_proto
from galaxy.v1 import worker_pb2 as pb
from planner.plan import Plan, PlanError

FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=6),
    max_leaves=30,
)


@FAST
@given(dtype=st.integers(-2, 12), shape=st.lists(st.integers(-3, 2**40), max_size=5), data=st.binary(max_size=256))
def test_wire_tensor_decodes_or_raises_transport_error(dtype, shape, data):
    try:
        t = from_proto(pb.Tensor(dtype=dtype, shape=shape, data=data))
    except TransportError:
        return
    assert tuple(t.shape) == tuple(shape) and t.numel() * t.element_size() == len(data)


@FAST
@given(raw=st.binary(max_size=512))
def test_random_bytes_as_a_frame_never_reach_the_collectives_unchecked(raw):
    transport = PeerTransport(0, ["a:1", "b:2"], "s", None, recv_timeout=0.01)
    try:
        frame = pb.Frame.FromString(raw)
    except DecodeError:
        return
    try:
        transport.deliver(frame)
    except TransportError:
        return
    assert frame.src_rank == 1  # the only peer rank 0 accepts tiles from


@FAST
@given(doc=json_values)
def test_plan_parser_accepts_or_raises_plan_error(doc):
    try:
        Plan.from_json(json.dumps(doc), cfg=preset("tiny-gpt2"))
    except PlanError:
        pass


@FAST
@given(doc=st.dictionaries(st.sampled_from(["strategy", "heads", "cols", "vocab", "layers", "seq_weights", "x"]),
                           json_values, max_size=7))
def test_partition_parser_accepts_or_raises_partition_error(doc):
    try:
        Partition.from_dict(doc).validate(preset("tiny-gpt2"))
    except PartitionError:
        pass


@FAST
@given(changes=st.dictionaries(st.sampled_from(["n_heads", "n_kv_heads", "hidden", "head_dim", "ffn", "family",
                                                "norm", "activation", "position", "vocab_size", "bogus"]),
                               json_values, max_size=4))
def test_model_config_parser_accepts_or_raises_config_error(changes):
    d = preset("tiny-llama").to_dict() | changes
    try:
        cfg = ModelConfig.from_dict(d)
    except ConfigError:
        return
    assert cfg.n_heads % cfg.n_kv_heads == 0 and torch.Size([cfg.hidden])
