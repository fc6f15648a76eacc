"""The gRPC runtime end to end with worker servers in this process: exactness for every strategy
and N = 1..8, tile overlap stats, and the clear errors a user sees when something is wrong."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import AuthError, PeerUnreachable, PlanMismatch, ProtocolMismatch
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import even_partition, full_spec, load_shard, weighted_partition
from galaxy.transport import protocol as wire
from galaxy.transport.client import Cluster, ModelRef

TOL = 1e-4  # fp32 max abs error against the single-device reference


def reference(src, ids):
    return load_shard(src, full_spec(src.config))(ids)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_galaxy_over_grpc_matches_reference_for_any_ring_size(servers, n):
    src = RandomWeights(preset("tiny-llama"), seed=2)
    ids = torch.randint(0, src.config.vocab_size, (11,))
    weights = [1.0 + (i % 3) for i in range(n)]
    with Cluster(servers.start(n)) as c:
        c.hello()
        c.load_ref(ModelRef(src.config, random_init=True, seed=2), weighted_partition(src.config, weights),
                   LoadOptions(tiles=2))
        out = c.forward(Request(ids)).output
    assert (out - reference(src, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("strategy", ["galaxy", "megatron", "pipeline"])
@pytest.mark.parametrize("preset_name", ["tiny-bert", "tiny-gpt2"])
def test_every_strategy_over_grpc(servers, strategy, preset_name):
    src = RandomWeights(preset(preset_name), seed=4)
    ids = torch.randint(0, src.config.vocab_size, (13,))
    with Cluster(servers.start(3)) as c:
        c.load_ref(ModelRef(src.config, random_init=True, seed=4), even_partition(src.config, 3, strategy))
        res = c.forward(Request(ids))
        again = c.forward(Request(ids))  # a second request on the same session
    want = reference(src, ids)
    assert (res.output - want).abs().max().item() <= TOL
    assert torch.equal(res.output, again.output)


def test_forward_reports_per_collective_timings(servers):
    """A pass long enough for HMP reports each ring collective; a short one runs tensor-parallel
    (forward.TENSOR_PARALLEL_MAX_TOKENS) and reports its all-reduces."""
    from galaxy.parallel.forward import TENSOR_PARALLEL_MAX_TOKENS

    src = RandomWeights(preset("tiny-opt"))
    with Cluster(servers.start(2)) as c:
        c.load_ref(ModelRef(src.config, random_init=True), even_partition(src.config, 2))
        res = c.forward(Request(torch.arange(TENSOR_PARALLEL_MAX_TOKENS + 8) % src.config.vocab_size))
        short = c.forward(Request(torch.arange(9)))
    tags = {op.tag for op in res.devices[0].ops}
    assert {"embed.rs", "L0.attn.ag", "L0.attn.rs", "L0.mlp.ag", "L0.mlp.rs", "head.ag"} <= tags
    assert any(".ar" in op.tag for op in short.devices[0].ops)
    sent = [op for op in res.devices[0].ops if op.bytes > 0]
    assert sent and all(op.wall_s >= op.wait_s >= 0 for op in sent)


def test_unreachable_worker_is_named(servers):
    addrs = servers.start(1) + ["127.0.0.1:1"]  # nothing listens on port 1
    with Cluster(addrs, connect_timeout=1.0) as c, pytest.raises(PeerUnreachable, match=r"device 1 .*127.0.0.1:1"):
        c.hello()


def test_wrong_token_is_refused(servers):
    addrs = servers.start(1, token="s3cret")
    with Cluster(addrs, token="guess") as c, pytest.raises(AuthError, match="token"):
        c.hello()
    with Cluster(addrs, token="s3cret") as c:
        assert c.hello()[0].name == "w0"


def test_other_protocol_version_is_refused(servers, monkeypatch):
    addrs = servers.start(1)
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", 999)
    with Cluster(addrs) as c, pytest.raises(ProtocolMismatch, match="protocol version 999 refused"):
        c.hello()


def test_partition_that_does_not_fit_the_cluster_is_refused(servers):
    src = RandomWeights(preset("tiny-gpt2"))
    with Cluster(servers.start(2)) as c, pytest.raises(PlanMismatch, match="3 devices, the cluster 2"):
        c.load_ref(ModelRef(src.config, random_init=True), even_partition(src.config, 3))


def test_worker_refuses_missing_checkpoint_naming_it(servers, tmp_path):
    cfg = preset("tiny-gpt2")
    with Cluster(servers.start(1)) as c, pytest.raises(PlanMismatch, match=r"w0.*load refused.*does not exist"):
        c.load_ref(ModelRef(cfg, path=str(tmp_path / "missing")), even_partition(cfg, 1))


def test_worker_dropping_out_mid_session_fails_fast_naming_it(servers):
    src = RandomWeights(preset("tiny-llama"))
    addrs = servers.start(3)
    with Cluster(addrs, forward_timeout=30) as c:
        c.load_ref(ModelRef(src.config, random_init=True), even_partition(src.config, 3), recv_timeout=20)
        servers.stop(1)
        with pytest.raises(PeerUnreachable, match=r"device 1"):
            c.forward(Request(torch.arange(7)))
