"""Compact weight formats on real gRPC workers (LoadRequest.weights_format): the workers' shards equal
the single device in the same format where the kernels return float32 (<= 1e-4, the same greedy tokens
through the serving engine), equal the in-process ranks in every format, travel compact when streamed,
and the memory check sizes them by the format."""

from __future__ import annotations

import pytest
import torch

from galaxy.cli import main
from galaxy.engine.engine import Engine
from galaxy.engine.generation import GenerationConfig
from galaxy.errors import DeviceOutOfMemory, PlanMismatch
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.paged_kv import PagedBatch
from galaxy.model.quant import parse_format
from galaxy.parallel import memory
from galaxy.parallel.compact import compact_shard
from galaxy.parallel.executor import DeviceInfo, LoadOptions
from galaxy.parallel.forward import Request, Step
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import Partition, full_spec, load_shard
from galaxy.runtime.api import connect
from galaxy.runtime.inproc import InprocCluster
from galaxy.transport.client import Cluster, check_memory
from galaxy.transport.protocol import step_from_proto, step_to_proto
from galaxy.transport.shardstore import ShardStore

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="compact-llama")
SRC = RandomWeights(CFG, seed=5)
# uneven shares on int4's granules (2 heads, 32 columns), a device with no heads and no columns
PART = Partition("galaxy", (2, 0, 2), (32, 0, 64), (20, 50, 27), (2, 2, 2), (1.0, 2.0, 0.5)).validate(CFG)
IDS = torch.tensor([3, 14, 15, 92, 65, 35, 8])
PROMPT = [3, 14, 15, 92]

pytestmark = pytest.mark.usefixtures("one_thread")


def single(name):
    return compact_shard(load_shard(SRC, full_spec(CFG)), SRC, parse_format(name))


def greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


def engine_greedy(executor, prompt, n):
    engine = Engine(executor, CFG)
    try:
        return engine.generate(prompt, GenerationConfig(n, stop_at_eos=False)).tokens
    finally:
        engine.close()


@pytest.mark.parametrize("stream", [False, True], ids=["read", "streamed"])
@pytest.mark.parametrize("name", ["fp16", "int4-fp32"])
def test_workers_in_a_float32_output_format_equal_the_single_device_in_it(name, stream, servers):
    one = single(name)
    with Cluster(servers.start(3)) as c:
        c.load(SRC, PART, LoadOptions(weights_format=name, stream=stream))
        for ids in (IDS[:1], IDS):
            err = (c.forward(Request(ids)).output - one(ids)).abs().max().item()
            assert err <= 1e-4, f"{name} {len(ids)} tokens: {err}"
        assert engine_greedy(c, PROMPT, 5) == greedy(one, PROMPT, 5)


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_workers_in_a_bf16_activation_format_equal_the_in_process_ranks_in_it(name, servers):
    """Split, these formats are one bf16 rounding of each partial sum away from the single device
    (docs/decode-formats.md); the workers' streamed shards are exactly the in-process ranks' shards."""
    with InprocCluster(3) as ic:
        ic.load(SRC, PART, LoadOptions(weights_format=name))
        want = ic.forward(Request(IDS)).output
        want_tokens = engine_greedy(ic, PROMPT, 5)
    with Cluster(servers.start(3)) as c:
        c.load(SRC, PART, LoadOptions(weights_format=name, stream=True))
        assert (c.forward(Request(IDS)).output - want).abs().max().item() <= 1e-5
        assert engine_greedy(c, PROMPT, 5) == want_tokens


def test_each_sequences_kernel_from_reaches_the_workers_and_routes_their_rows(servers):
    """A recomputed sequence's step (prompt of 4, 3 generated, run again as one chunk) carries its kernel_from
    (StepRequest.kernel_from): the workers run its generated rows on the kernel as the in-process ranks do,
    not dense as an uninterrupted prompt's rows."""
    pool, ids = KVPool(8, 4), IDS[:7]

    def step(kernel_from):
        return Step(ids, PagedBatch(4, (7,), (0,), ((0, 1),)), (6,), kernel_from=kernel_from)

    back, _ = step_from_proto(step_to_proto(step((3,)), pool, "s", 1))
    assert back.kernel_from == (3,) and step_from_proto(step_to_proto(step(()), pool, "s", 1))[0].kernel_from == ()
    with InprocCluster(3) as ic:
        ic.load(SRC, PART, LoadOptions(weights_format="int8"))
        want = ic.step(step((3,)), pool).output
    with Cluster(servers.start(3)) as c:
        c.load(SRC, PART, LoadOptions(weights_format="int8", stream=True))
        got, prompt_roles = c.step(step((3,)), pool).output, c.step(step(()), pool).output
    assert (got - want).abs().max().item() <= 1e-5
    assert not torch.equal(got, prompt_roles)


def test_a_streamed_compact_shard_pushes_fewer_bytes_than_float32_and_loads_at_its_compact_size(servers,
                                                                                              monkeypatch):
    received = []
    receive = ShardStore.receive

    def counting(self, *args, **kwargs):
        out = receive(self, *args, **kwargs)
        received.append(out[1])
        return out

    monkeypatch.setattr(ShardStore, "receive", counting)
    sizes = {}
    with Cluster(servers.start(3)) as c:
        for name in ("fp32", "int4"):
            received.clear()
            held = c.load(SRC, PART, LoadOptions(weights_format=name, stream=True))
            sizes[name] = list(received)
            params = memory.MemoryParams.for_dtype(4, name)
            assert held == [memory.weight_bytes(CFG, PART.spec(r, CFG), params) for r in range(3)]
    assert sorted(sizes["int4"]) == sorted(memory.push_bytes(CFG, PART.spec(r, CFG), "int4") for r in range(3))
    assert sum(sizes["int4"]) < sum(sizes["fp32"]) / 2


def _device(budget: int) -> DeviceInfo:
    return DeviceInfo("127.0.0.1:1", "small", 1, 1, "cpu", 1 << 34, 1 << 34, budget, "idle", rss=200 * memory.MiB)


def test_the_coordinators_memory_check_sizes_a_shard_by_its_weights_format():
    cfg = make_config("llama", vocab_size=1000, hidden=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn=2048,
                      max_positions=128, tie_embeddings=True)
    part = Partition("galaxy", (8,), (2048,), (1000,), (8,), (1.0,)).validate(cfg)
    spec = part.spec(0, cfg)
    need = {f: memory.shard_need(cfg, spec, memory.MemoryParams.for_dtype(4, f), 128, 128,
                                 memory.load_transient_bytes(cfg, spec, memory.MemoryParams.for_dtype(4, f),
                                                             compact_push=True)).total
            for f in ("fp32", "int4")}
    assert need["fp32"] - need["int4"] > 20 * memory.MiB  # the linears: 4 bytes a weight against 0.625
    budget = 200 * memory.MiB + memory.RUN_SLACK + need["int4"]  # holds the int4 shard, not the fp32 one
    check_memory([_device(budget)], ["small"], cfg, part, LoadOptions(weights_format="int4", stream=True,
                                                                       seq_len=128))
    with pytest.raises(DeviceOutOfMemory, match="small: loading its shard needs"):
        check_memory([_device(budget)], ["small"], cfg, part, LoadOptions(stream=True, seq_len=128))


def test_a_bad_weights_format_is_refused_naming_it_before_any_worker_starts(monkeypatch, capsys):
    started = []
    monkeypatch.setattr("galaxy.cli.session.connect", lambda *a, **k: started.append(1))
    for command in ("run", "serve", "plan"):
        with pytest.raises(SystemExit) as e:
            main([command, "--local", "2", "--weights-format", "int9"])
        assert e.value.code == 2
        assert "argument --weights-format: weight format name='int9' is not one of" in capsys.readouterr().err
    assert not started
    with connect(local=2, transport="inproc") as session, pytest.raises(PlanMismatch, match="weights_format='int9'"):
        session.load(SRC, partition=PART.__class__("galaxy", (2, 2), (32, 64), (50, 47), (2, 2), (1.0, 1.0)),
                     weights_format="int9")
