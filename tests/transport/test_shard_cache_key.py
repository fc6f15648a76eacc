"""The key a worker's shard cache holds a pushed compact shard under carries the wire layout's version
(compact_wire.LAYOUT_VERSION).

A worker's cache once held int4 shards an older Galaxy had pushed with gate and up apart; the newer one
asked for the same model, format and split, was handed the stale shard and refused it at load ('wire parts
for layers.0.mlp.gate.weight'): every int4 push load failed until the cache was wiped (commit 1ef4983).
Here the coordinator's real push (Cluster.push_shards) talks to a real ShardStore on disk -- the worker's
HaveShard and PushShard are exactly those two calls on it -- with no process and no socket: a cache written
under one layout version is not found under another, and is found again under its own."""

from __future__ import annotations

import pytest

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.parallel import compact_wire
from galaxy.parallel.sharding import even_partition
from galaxy.transport import client as client_module
from galaxy.transport.client import Cluster
from galaxy.transport.shardstore import ShardStore, model_hash
from galaxy.v1 import worker_pb2 as pb

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="cache-key-llama")
SRC = RandomWeights(CFG, seed=4)
PART = even_partition(CFG, 2)  # 2 heads and 64 columns each: on int4's and int8's granules


class StoreStub:
    """A worker's two shard calls on its ShardStore, recording the keys asked for and the pushes taken."""

    def __init__(self, store: ShardStore):
        self.store, self.asked, self.pushed = store, [], []

    def HaveShard(self, request, timeout=None, metadata=None):  # noqa: N802 (the gRPC method's name)
        self.asked.append(request.model_hash)
        return pb.HaveShardReply(content_hash=self.store.have(request.model_hash, request.spec_json))

    def PushShard(self, parts, timeout=None, metadata=None):  # noqa: N802
        h, nbytes, cached = self.store.receive(parts)
        self.pushed.append(h)
        return pb.ShardReceipt(content_hash=h, bytes=nbytes, cached=cached)


@pytest.fixture
def push(tmp_path):
    """push(fmt, layout_version) -> (stubs, content hashes): one push to two workers whose caches are
    on disk under tmp_path and opened afresh each time, as a restarted worker (or an upgraded Galaxy) does."""
    clusters = []

    def run(fmt: str, version: int):
        c = Cluster(["127.0.0.1:1", "127.0.0.1:2"])  # no call goes to these: the stubs are replaced
        clusters.append(c)
        c.stubs = [StoreStub(ShardStore(tmp_path / f"cache{r}")) for r in range(2)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(client_module, "LAYOUT_VERSION", version)
            hashes = c.push_shards(SRC, PART, fmt)
        return c.stubs, hashes

    yield run
    for c in clusters:
        c.close()


def test_the_key_push_shards_uses_is_compact_wire_layout_version():
    """The test below changes the name push_shards reads; it must be compact_wire's constant itself."""
    assert client_module.LAYOUT_VERSION is compact_wire.LAYOUT_VERSION


def test_a_compact_shard_cached_under_another_wire_layout_is_pushed_again_not_handed_out(push):
    now = compact_wire.LAYOUT_VERSION
    old_stubs, old = push("int4", now - 1)  # an older Galaxy pushed its int4 shards
    assert [len(s.pushed) for s in old_stubs] == [1, 1]
    stubs, new = push("int4", now)  # this one: same model, format and split, another layout
    assert [len(s.pushed) for s in stubs] == [1, 1], "the stale shard was handed out from the cache"
    keys = {s.asked[0] for s in stubs}
    assert keys.isdisjoint(s.asked[0] for s in old_stubs) and len(keys) == 1
    assert keys == {f"{model_hash(SRC)}:int4:wire{now}"}  # the model, the format and the layout
    again, hashes = push("int4", now)  # the same layout again: the cache holds it, nothing travels
    assert [len(s.pushed) for s in again] == [0, 0] and hashes == new


def test_the_format_is_in_the_key_and_a_float32_shard_has_no_layout_to_version(push):
    """fp32 shards travel as the float32 state dict itself (no wire parts): their key is the model's alone,
    and a layout change leaves their cache valid; another compact format is another shard."""
    now = compact_wire.LAYOUT_VERSION
    fp32, first = push("fp32", now - 1)
    assert {s.asked[0] for s in fp32} == {model_hash(SRC)}
    cached, hashes = push("fp32", now)
    assert [len(s.pushed) for s in cached] == [0, 0] and hashes == first
    int8, _ = push("int8", now)
    assert [len(s.pushed) for s in int8] == [1, 1] and {s.asked[0] for s in int8} == {
        f"{model_hash(SRC)}:int8:wire{now}"}
