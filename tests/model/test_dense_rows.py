"""Prompt rows of int8 and int4 linears through a dense bf16 GEMM (model/dense_rows.py): within bf16 of the
kernel, a row's result does not depend on the rows beside it, and a prompt gets the same logits whichever
chunks it is cut into and whatever decode rows share its steps; the shard holds and counts the scratch."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.dense_rows import Scratch, dense_linear, kernel_rows, roles_of_logits, scratch_bytes
from galaxy.model.int4_expand import expander
from galaxy.model.paged_kv import PagedBatch, PagedKVCache
from galaxy.model.quant import QuantLinear, WeightFormat, parse_format
from galaxy.parallel.collectives import Collectives, pieces
from galaxy.parallel.compact import compact_shard
from galaxy.parallel.forward import Step, rank_forward, step_pass
from galaxy.parallel.local_transport import LocalGroup
from galaxy.parallel.sharding import even_partition, full_spec, load_shard

pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 16, ffn 96: int4's groups of 32 fall on every cut; GQA 4/2
CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, tie_embeddings=True, name="dense-rows-llama")
SRC = RandomWeights(CFG, seed=11)


# int4's prompt rows run dense only where its native expansion built (model/int4_expand.py)
FORMATS = ["int8", pytest.param("int4", marks=pytest.mark.skipif(expander() is None, reason="no C compiler"))]


@pytest.mark.parametrize("name", FORMATS)
def test_dense_rows_are_within_bf16_of_the_kernel(name):
    fmt = WeightFormat(name)
    q = QuantLinear.from_float(torch.randn(200, 96, generator=torch.Generator().manual_seed(0)), fmt)
    q.scratch = Scratch.size_for([(200, 96)], QuantLinear.scratch_rows(fmt))  # int4: 200 rows padded to 208
    x = torch.randn(40, 96)
    kernel, dense = q.forward(x), q._dense(x)
    assert (dense - kernel).abs().max() <= 0.02 * kernel.abs().max()  # each a bf16 rounding of the same sum


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n", [(64, 128), (96, 64), (576, 1536), (1536, 576)])  # this test's model; SmolLM2's
def test_a_rows_dense_result_does_not_depend_on_the_rows_beside_it(k, n, threads):
    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(37, k, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for weight in (w, w.T.contiguous().T):  # int8's codes (N, K); int4's expanded W^T (K, N), transposed
            whole = dense_linear(x, weight)
            for a, b in [(0, 1), (5, 6), (36, 37), (0, 2), (3, 20), (17, 37), (1, 36)]:
                assert torch.equal(dense_linear(x[a:b], weight), whole[a:b]), (a, b)
    finally:
        torch.set_num_threads(before)


def test_a_rows_role_is_its_position_against_its_requests_kernel_from():
    # an uninterrupted step: a decode at 9, a prompt's last chunk (4 rows from 4, logits), a chunk mid-prompt
    starts, lens = [9, 4, 0], [1, 4, 3]
    assert roles_of_logits(starts, lens, (0, 4)) == [9, 7, 3]
    want = [True, False, False, False, True, False, False, False]
    assert kernel_rows(starts, lens, roles_of_logits(starts, lens, (0, 4))).tolist() == want
    assert kernel_rows(starts, lens, [5, 7, 20]).tolist() == want  # the engine's kernel_from: the same roles
    # a preempted sequence (prompt of 4, 3 generated) run again as one chunk: its generated tokens keep the kernel
    assert kernel_rows([0], [7], [3]).tolist() == [False] * 3 + [True] * 4
    assert kernel_rows([0], [5], roles_of_logits([0], [5], None)).tolist() == [False] * 4 + [True]  # a Request
    assert kernel_rows([7, 12], [1, 1], [3, 12]) is None  # a step of decodes: nothing to route


def test_the_scratch_is_held_by_the_shard_and_counted_in_its_memory():
    assert scratch_bytes([(192, 64), (64, 96)]) == 2 * 192 * 64
    assert scratch_bytes([(200, 64), (64, 96)], 16) == 2 * 208 * 64  # int4: rows padded as int4pack pads them
    from galaxy.parallel import memory
    from galaxy.parallel.compact import held_bytes
    for fmt in ("int8", "int4", "int4-fp32", "bf16"):  # int4-fp32 and bf16 route nothing: no scratch
        shard = compact_shard(load_shard(SRC, full_spec(CFG)), SRC, parse_format(fmt))
        scratch = getattr(shard, "dense_scratch", None)
        want = 2 * 192 * 64 if fmt in ("int8", "int4") else 0  # [gate; up] is the largest
        assert (scratch.nbytes if scratch else 0) == want
        assert memory.weight_bytes(CFG, full_spec(CFG), memory.MemoryParams.for_dtype(4, fmt)) == held_bytes(shard)


def _run(model, cache, seqs, block=4, kernel_from=()):
    """One engine step: seqs = [(token ids, start, logits?)], each with its own blocks; -> logit rows' logits.
    kernel_from: each sequence's (the engine's), () for an uninterrupted run's roles."""
    tables = tuple(tuple(range(i * 16, i * 16 + 16)) for i in range(len(seqs)))
    batch = PagedBatch(block, tuple(len(t) for t, _, _ in seqs), tuple(s for _, s, _ in seqs), tables)
    ends = torch.tensor([len(t) for t, _, _ in seqs]).cumsum(0) - 1
    rows = tuple(int(e) for e, (_, _, lg) in zip(ends, seqs) if lg)
    step = Step(torch.tensor([x for t, _, _ in seqs for x in t]), batch, rows, kernel_from=tuple(kernel_from))
    comm = Collectives(LocalGroup(1).transport(0))
    return rank_forward(model, comm, even_partition(CFG, 1, "megatron"), step_pass(step, cache))


@pytest.mark.parametrize("name", FORMATS)
def test_a_prompt_gets_the_same_logits_in_any_chunks_and_beside_decode_rows(name, monkeypatch):
    model = compact_shard(load_shard(SRC, full_spec(CFG)), SRC, parse_format(name))
    prompt = torch.randint(0, CFG.vocab_size, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    other = torch.randint(0, CFG.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).tolist()

    alone_cache = PagedKVCache.for_model(model, 64, 4)
    alone = _run(model, alone_cache, [(prompt, 0, True)])[0]

    cache = PagedKVCache.for_model(model, 64, 4)  # sequence 0: `other`, then decoding; sequence 1: the prompt
    _run(model, cache, [(other, 0, True), (prompt[:1], 0, False)])  # a one-row chunk, mid-prompt
    _run(model, cache, [(other[:1], 9, True), (prompt[1:8], 1, False)])  # a decode row beside a chunk
    _run(model, cache, [(other[:1], 10, True), (prompt[8:20], 8, False)])
    last = _run(model, cache, [(other[:1], 11, True), (prompt[20:], 20, True)])  # the last token alone
    assert torch.equal(last[1], alone)

    # the prompt rows did run dense: with every row on the kernel the logits are another rounding away
    monkeypatch.setattr(QuantLinear, "routes_rows", lambda self: False)
    kernel_only = _run(model, PagedKVCache.for_model(model, 64, 4), [(prompt, 0, True)])[0]
    assert not torch.equal(kernel_only, alone)
    assert (kernel_only - alone).abs().max() <= 0.05 * alone.abs().max()


@pytest.mark.parametrize("name", FORMATS)
def test_a_sequence_computed_again_gets_the_logits_of_its_uninterrupted_run(name):
    """Preemption (recompute) or a resume after a device dropped out runs a sequence's prompt and generated
    tokens again as one prompt: with the request's kernel_from its generated tokens keep the kernel, so its
    next logits are bit for bit those of the run that was never interrupted."""
    model = compact_shard(load_shard(SRC, full_spec(CFG)), SRC, parse_format(name))
    prompt = torch.randint(0, CFG.vocab_size, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    kf = [len(prompt) - 1]
    cache = PagedKVCache.for_model(model, 64, 4)
    tokens, logits = list(prompt), _run(model, cache, [(prompt, 0, True)], kernel_from=kf)[0]
    for _ in range(6):  # greedy decodes, one a step
        tokens.append(int(logits.argmax()))
        logits = _run(model, cache, [(tokens[-1:], len(tokens) - 1, True)], kernel_from=kf)[0]

    again = PagedKVCache.for_model(model, 64, 4)  # its blocks were taken: every token runs again, in chunks
    _run(model, again, [(tokens[:6], 0, False)], kernel_from=kf)
    resumed = _run(model, again, [(tokens[6:], 6, True)], kernel_from=kf)[0]
    assert torch.equal(resumed, logits)

    # without it the recomputed generated tokens would run dense, as prompt rows: other K/V, other logits
    legacy = PagedKVCache.for_model(model, 64, 4)
    assert not torch.equal(_run(model, legacy, [(tokens, 0, True)])[0], logits)


@pytest.mark.parametrize("overlap", [True, False])
def test_each_gathered_tile_is_told_its_first_row_among_all_ranks(overlap):
    # galaxy_layer's linears route rows by where a tile starts: each rank's rows hold their global indices
    sizes, tiles, got = [3, 0, 5], 2, {}

    def work(r):
        comm = Collectives(group.transport(r), tiles, overlap=overlap)
        start = sum(sizes[:r])
        local = torch.arange(start, start + sizes[r], dtype=torch.float32)[:, None]
        got[r] = comm.all_gather(local, sizes, lambda x, s: x - s, at_rows=True)  # 0, 1, .. within each tile

    group = LocalGroup(len(sizes))
    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    if overlap:  # each tile counted from its own first row
        want = [i for n in sizes for p in pieces(n, tiles) for i in range(p)]
    else:  # one call over every row, from row 0
        want = list(range(sum(sizes)))
    assert len(got) == len(sizes) and all(g[:, 0].tolist() == want for g in got.values())
