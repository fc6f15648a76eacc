"""Weight streaming: workers with no model file receive exactly their shard, verify it, cache it,
and a restarted worker loads from its cache instead of being sent it again."""

from __future__ import annotations

import hashlib

import pytest
import torch

from galaxy.errors import GalaxyError
from galaxy.model.checkpoints import open_checkpoint
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import full_spec, load_shard, weighted_partition
from galaxy.transport import client as rpc_client
from galaxy.transport.client import Cluster
from galaxy.transport.protocol import to_proto
from galaxy.transport.shardstore import ShardStore, digest
from galaxy.v1 import worker_pb2 as pb


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return open_checkpoint(minilm_path)


def test_streamed_shards_run_exactly_and_restarts_load_from_cache(servers, minilm, tmp_path, monkeypatch):
    caches = [tmp_path / f"w{i}" for i in range(3)]
    addrs = [servers.start(1, shard_cache=str(c))[0] for c in caches]
    p = weighted_partition(minilm.config, [0.9, 0.6, 0.45])
    ids = torch.tensor(minilm.tokenizer().encode("weights travel to the devices"))
    want = load_shard(minilm, full_spec(minilm.config))(ids)
    with Cluster(addrs) as c:
        c.load(minilm, p, LoadOptions(stream=True))
        assert (c.forward(Request(ids)).output - want).abs().max() <= 1e-4
    assert all(len(list(d.glob("*.safetensors"))) == 1 for d in caches)

    servers.stop()  # restart the devices on the same caches: nothing may be sent again
    addrs = [servers.start(1, shard_cache=str(c))[0] for c in caches]

    def no_push(*args):
        raise AssertionError("a cached shard was pushed again")

    monkeypatch.setattr(rpc_client, "_shard_parts", no_push)
    with Cluster(addrs) as c:
        c.load(minilm, p, LoadOptions(stream=True))
        assert (c.forward(Request(ids)).output - want).abs().max() <= 1e-4


def _push(tensor: torch.Tensor, sent: torch.Tensor) -> list:
    """A push of one tensor whose hash is computed over `tensor` but carries `sent`."""
    h = hashlib.sha256()
    digest(h, "x", tensor)
    return [pb.ShardPart(model_hash="m", spec_json="{}", n_tensors=1),
            pb.ShardPart(name="x", tensor=to_proto(sent)), pb.ShardPart(content_hash=h.hexdigest())]


def test_corrupted_push_is_refused(tmp_path):
    store = ShardStore(tmp_path)
    with pytest.raises(GalaxyError, match="hash mismatch"):
        store.receive(_push(torch.ones(3), torch.ones(3) * 2))
    assert not store.have("m", "{}")


def test_corrupted_cache_file_is_detected_and_dropped(tmp_path):
    key, _, cached = ShardStore(tmp_path).receive(_push(torch.arange(6.0), torch.arange(6.0)))
    assert cached
    f = tmp_path / f"{key}.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-4] ^= 0xFF  # flip bits in the tensor data
    f.write_bytes(bytes(raw))
    with pytest.raises(GalaxyError, match="corrupt"):
        ShardStore(tmp_path).take(key)
    assert not f.exists()
