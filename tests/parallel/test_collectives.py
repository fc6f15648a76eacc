"""Ring collectives over in-process transport: uneven splits, tiles, N = 1..8, bad messages."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.errors import TransportError
from galaxy.parallel.collectives import Collectives, pieces
from galaxy.parallel.local_transport import LocalGroup


def run_ranks(n, body, tiles=1, timeout=10.0):
    group = LocalGroup(n, timeout)
    comms = [Collectives(group.transport(r), tiles) for r in range(n)]
    out, err = [None] * n, [None] * n

    def work(r):
        try:
            out[r] = body(comms[r])
        except BaseException as e:  # noqa: BLE001
            err[r] = e
            group.abort()

    ts = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return out, err, comms


def uneven(n, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, total + 1, (n - 1,), generator=g).tolist())
    edges = [0, *cuts, total]
    return [edges[i + 1] - edges[i] for i in range(n)]


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("tiles", [1, 3])
def test_all_gather_applies_fn_to_every_rank_rows_in_order(n, tiles):
    sizes = uneven(n, 23, seed=n)
    full = torch.randn(23, 5)
    w = torch.randn(5, 4)
    offs = [sum(sizes[:r]) for r in range(n)]

    out, err, _ = run_ranks(n, lambda c: c.all_gather(full[offs[c.rank]: offs[c.rank] + sizes[c.rank]],
                                                      sizes, lambda x: x @ w), tiles)
    assert err == [None] * n
    for o in out:
        torch.testing.assert_close(o, full @ w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("tiles", [1, 2])
def test_reduce_scatter_sums_partials_and_keeps_own_rows(n, tiles):
    sizes = uneven(n, 19, seed=10 + n)
    partials = [torch.randn(19, 6) for _ in range(n)]
    total = sum(partials)
    offs = [sum(sizes[:r]) for r in range(n)]

    out, err, _ = run_ranks(n, lambda c: c.reduce_scatter(sizes, lambda a, b: partials[c.rank][a:b], 6),
                            tiles)
    assert err == [None] * n
    for r in range(n):
        torch.testing.assert_close(out[r], total[offs[r]: offs[r] + sizes[r]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_all_reduce_matches_sum_even_when_rows_fewer_than_ranks(n):
    xs = [torch.randn(3, 2, 4) for _ in range(n)]
    out, err, _ = run_ranks(n, lambda c: c.all_reduce(xs[c.rank]))
    assert err == [None] * n
    for o in out:
        torch.testing.assert_close(o, sum(xs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("shape", [(4, 576), (40, 576), (2, 20000)])  # direct; two shots; rows fewer than ranks
def test_all_reduce_sums_every_element_in_rank_order_at_any_size(n, shape):
    """A row's sum must not depend on how many rows travel with it (int4 / int8 promise a sequence the bits
    it gets alone): with three ranks, 1 + 2^-24 + 2^-24 is 1 summed left to right and 1 + 2^-23 grouped
    otherwise, as a ring's running sums grouped the rows that fell in rank 0's chunk."""
    g = torch.Generator().manual_seed(n)
    xs = [torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, 2.0 ** -24) * (1 + 0.5 * (r % 2)) for r in range(n)]
    want = xs[0].clone()
    for x in xs[1:]:
        want = want + x
    out, err, comms = run_ranks(n, lambda c: c.all_reduce(xs[c.rank]))
    assert err == [None] * n
    assert all(torch.equal(o, want) for o in out)
    two_shot = xs[0].numel() * 4 > comms[0].direct_max_bytes
    assert [op.tag.endswith(".2shot" if two_shot else ".direct") for op in comms[0].stats.ops] == [True]


def test_zero_row_ranks_take_part_without_messages_for_empty_chunks():
    sizes = [0, 5, 0, 2]
    full = torch.randn(7, 3)
    offs = [0, 0, 5, 5]
    out, err, comms = run_ranks(4, lambda c: c.all_gather(full[offs[c.rank]: offs[c.rank] + sizes[c.rank]],
                                                          sizes))
    assert err == [None] * 4
    assert all(torch.equal(o, full) for o in out)
    # every non-empty chunk travels N-1 hops, empty chunks not at all
    assert sum(c.stats.messages for c in comms) == 2 * 3


def test_pieces_never_yields_empty_subtiles():
    assert pieces(0, 4) == []
    assert pieces(3, 8) == [1, 1, 1]
    assert pieces(10, 3) == [4, 3, 3]


def test_recv_rejects_tensor_of_wrong_shape_or_dtype():
    group = LocalGroup(2, timeout=5)
    a, b = group.transport(0), group.transport(1)
    a.send(1, torch.zeros(2, 3))
    with pytest.raises(TransportError, match=r"got \(2, 3\).*expected \(2, 4\)"):
        b.recv(0, (2, 4), torch.float32)
    a.send(1, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TransportError, match="float64"):
        b.recv(0, (2, 3), torch.float32)


def test_recv_times_out_naming_the_silent_peer():
    group = LocalGroup(2, timeout=0.2)
    with pytest.raises(TransportError, match="nothing from rank 0 within"):
        group.transport(1).recv(0, (1,), torch.float32)


def test_failure_on_one_rank_aborts_the_others_promptly():
    def body(c):
        if c.rank == 0:
            raise RuntimeError("boom")
        return c.all_reduce(torch.ones(4, 4))

    out, err, _ = run_ranks(3, body, timeout=60)
    assert isinstance(err[0], RuntimeError)
    assert all(isinstance(e, TransportError) and "aborted" in str(e) for e in err[1:])


def test_int4_decodes_on_three_ranks_get_their_bits_alone_beside_chunks_sent_direct_or_in_two_shots():
    """Three ranks (where a sum's grouping shows), int4: a step of 2 decodes alone, beside a 38-token chunk
    (direct: int4's partials go as bf16, so its direct size is twice fp32's) and beside a 58-token one (two
    shots) -- each decode's logits bit for bit the same."""
    from dataclasses import replace

    from galaxy.bench import step_shapes as ss
    from galaxy.model.checkpoints.random import RandomWeights
    from galaxy.model.config import preset
    from galaxy.parallel.executor import LoadOptions
    from galaxy.parallel.sharding import even_partition
    from galaxy.runtime.inproc import InprocCluster

    cfg = preset("smollm2-135m").replace(n_layers=2, vocab_size=512)
    ex = InprocCluster(3)
    try:
        ex.load(RandomWeights(cfg, seed=4, std=0.05), even_partition(cfg, 3), LoadOptions(weights_format="int4"))
        sb = ss.StepShapes(decodes=(2,), chunk=58, context=40, reps=1)
        pool = ss.KVPool(ex.kv_blocks(16), 16)
        seqs = ss._Sequences(sb, cfg.vocab_size, pool)
        for step in seqs.prefills():
            ex.step(step, pool)

        def decodes_beside(chunk):
            res = ex.step(replace(seqs.step(2, chunk), top1_rows=()), pool)
            return res.output[:2], {op.tag.rsplit(".", 1)[-1] for op in res.devices[0].ops if ".ar." in op.tag}

        alone, _ = decodes_beside(0)
        for chunk, path in ((38, "direct"), (58, "2shot")):
            logits, tags = decodes_beside(chunk)
            assert tags == {path} and torch.equal(logits, alone)
    finally:
        ex.close()
