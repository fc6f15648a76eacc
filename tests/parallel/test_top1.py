"""Greedy sampling on the devices (parallel/top1.py): the ranks' slice maxima, joined, pick exactly the
token torch.argmax picks over the whole logit row -- ties across slices to the first index, NaN and empty
slices included -- and an in-process step's top-1 rows equal the argmax of the same step's full logits."""

from __future__ import annotations

import random

import pytest
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.model.paged_kv import PagedBatch
from galaxy.parallel.forward import Step
from galaxy.parallel.rank import KVPool
from galaxy.parallel.sharding import Partition, weighted_partition
from galaxy.parallel.top1 import join_top1, slice_top1
from galaxy.runtime.inproc import InprocCluster

pytestmark = pytest.mark.usefixtures("one_thread")


def _joined(rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The top-1 of every row of `rows` (G, V) as ranks holding `sizes` vocabulary rows would give it."""
    pieces, at = [], 0
    for n in sizes:
        pieces.append(slice_top1(rows[:, at: at + n], at))
        at += n
    return join_top1(pieces, rows.shape[0])


def test_joined_slice_maxima_are_the_whole_rows_argmax_over_uneven_splits_full_of_ties():
    rnd = random.Random(0)
    for trial in range(200):
        v = rnd.randrange(1, 40)
        cuts = sorted(rnd.randrange(0, v + 1) for _ in range(rnd.randrange(0, 4)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, v])]  # empty slices included
        rows = torch.randint(0, 3, (5, v), generator=torch.Generator().manual_seed(trial)).float()  # many ties
        rows[1] = float("-inf")
        rows[2, rnd.randrange(v)] = float("nan")
        assert torch.equal(_joined(rows, sizes), rows.argmax(dim=-1)), (sizes, rows)


def test_a_tie_between_two_ranks_slices_goes_to_the_first_index():
    row = torch.tensor([[0.5, 2.0, 1.0, 2.0, 2.0, -1.0]])  # the maximum 2.0 at 1 (rank 0), 3 and 4 (rank 1)
    assert _joined(row, [2, 4]).tolist() == [1] == row.argmax(dim=-1).tolist()
    assert _joined(row, [0, 3, 3]).tolist() == [1]  # a rank without vocabulary rows answers nothing
    flipped = row.flip(-1)  # the maximum at 1, 2 (rank 0) and 4 (rank 1)
    assert _joined(flipped, [3, 3]).tolist() == [1] == flipped.argmax(dim=-1).tolist()


def test_a_piece_of_another_number_of_rows_or_no_piece_at_all_is_refused():
    a = slice_top1(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="for 3 rows"):
        join_top1([a], 3)
    with pytest.raises(ValueError, match="no rank returned"):
        join_top1([None, None], 2)


def _tied_head(ex: InprocCluster, ranks: tuple[int, int], scale: float = 1000.0) -> tuple[list[int], list[int]]:
    """Make two ranks' LM-head slices end and begin with twin rows (+e_0 and -e_0, scaled): every logit
    row's maximum is then |h_0| x scale, reached exactly -- one non-zero product -- on both ranks.
    Returns the twins' global ids on the first rank and on the second."""
    ids = []
    for r in ranks:
        head = ex.runtimes[r].model.lm_head
        lo = ex.runtimes[r].model.spec.vocab[0]
        with torch.no_grad():
            head[:2] = 0.0
            head[0, 0], head[1, 0] = scale, -scale
        ids.append([lo, lo + 1])
    return ids[0], ids[1]


def _step(cfg, n_seqs: int, rows: list[int] | None = None, top1: tuple[int, ...] = ()) -> Step:
    """A prefill step of `n_seqs` sequences of 3 tokens each; logit rows: every sequence's last token."""
    ids = torch.arange(3 * n_seqs) % cfg.vocab_size
    batch = PagedBatch(4, (3,) * n_seqs, (0,) * n_seqs, tuple((s,) for s in range(n_seqs)))
    return Step(ids, batch, tuple(rows if rows is not None else [3 * s + 2 for s in range(n_seqs)]), (), top1)


@pytest.mark.parametrize("n_seqs", [4, 22])  # 12 tokens run tensor-parallel, 66 under HMP (forward.py)
def test_an_inprocess_step_returns_the_top1_rows_argmax_and_the_other_rows_logits_over_an_uneven_vocab_split(n_seqs):
    cfg = preset("tiny-llama")
    base = weighted_partition(cfg, [3.0, 1.0, 2.0])
    partition = Partition(base.strategy, base.heads, base.cols, (40, 0, cfg.vocab_size - 40), base.layers,
                          base.seq_weights).validate(cfg)  # the middle rank holds no vocabulary rows
    with InprocCluster(3) as ex:
        ex.load(RandomWeights(cfg, seed=4, std=0.3), partition)
        first, second = _tied_head(ex, (0, 2))
        pool = KVPool(n_seqs, 4)
        last = [3 * s + 2 for s in range(n_seqs)]
        full = ex.step(_step(cfg, n_seqs), pool).output  # (n_seqs, V)
        assert full.shape == (n_seqs, cfg.vocab_size)
        best = full.max(dim=-1).values
        for i, row in enumerate(full):  # the constructed tie: the maximum on rank 0 and on rank 2
            hits = (row == best[i]).nonzero().flatten().tolist()
            assert len(hits) == 2 and hits[0] in first and hits[1] in second, hits
        greedy = [0, n_seqs - 1]  # the first and last sequences greedy, the others whole rows
        mixed = ex.step(_step(cfg, n_seqs, top1=tuple(last[i] for i in greedy)), pool)
        assert mixed.top1.tolist() == full[greedy].argmax(dim=-1).tolist()
        assert all(t in first for t in mixed.top1.tolist())  # the first index of the tie
        assert torch.equal(mixed.output, full[1:-1])
        every = ex.step(_step(cfg, n_seqs, top1=tuple(last)), pool)
        assert every.output.shape == (0, cfg.vocab_size)
        assert every.top1.tolist() == full.argmax(dim=-1).tolist()


@pytest.mark.parametrize("top1, why", [((3,), "not one of the step's 2 logit rows"),
                                       ((99,), "not one of the step's 2 logit rows"),
                                       ((5, 2), "not ascending")])
def test_top1_rows_that_are_not_logit_rows_are_refused_before_the_step_runs(top1, why):
    cfg = preset("tiny-llama")
    with InprocCluster(2) as ex:
        ex.load(RandomWeights(cfg, seed=4), weighted_partition(cfg, [1.0, 1.0]))
        with pytest.raises(ValueError, match=why):
            ex.step(_step(cfg, 2, top1=top1), KVPool(8, 4))
