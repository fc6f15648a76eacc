"""Sharding math: integer splits, partition validation, GQA head mapping, shard sizes."""

from __future__ import annotations

import warnings

import pytest
import torch

from galaxy.model.config import preset
from galaxy.model.transformer import Attention
from galaxy.parallel.sharding import (
    Partition,
    PartitionError,
    even_partition,
    full_spec,
    shard_bytes,
    split_even,
    split_weighted,
    weighted_partition,
)


@pytest.mark.parametrize("total,weights", [(12, [1, 1, 1]), (7, [3, 2, 1]), (5, [0.9, 0.6, 0.45]),
                                           (2, [1, 1, 1, 1]), (100, [0, 1, 3])])
def test_split_weighted_sums_to_total_and_tracks_weights(total, weights):
    out = split_weighted(total, weights)
    assert sum(out) == total
    for o, w in zip(out, weights):
        assert abs(o - total * w / sum(weights)) < 1.0
        if w == 0:
            assert o == 0


def test_split_weighted_rejects_bad_weights():
    with pytest.raises(PartitionError):
        split_weighted(4, [0, 0])
    with pytest.raises(PartitionError):
        split_weighted(4, [1, -1])


def test_split_even_differs_by_at_most_one():
    assert split_even(10, 3) == [4, 3, 3]
    assert split_even(2, 4) == [1, 1, 0, 0]


def test_partition_validation_names_the_field_and_numbers():
    cfg = preset("tiny-gpt2")
    p = even_partition(cfg, 3)
    with pytest.raises(PartitionError, match="heads sum to 5, model has 6"):
        Partition("galaxy", (2, 2, 1), p.cols, p.vocab, p.layers, (1, 1, 1)).validate(cfg)
    with pytest.raises(PartitionError, match="cols has 2 entries"):
        Partition("galaxy", p.heads, p.cols[:2], p.vocab, p.layers, (1, 1, 1)).validate(cfg)
    with pytest.raises(PartitionError, match="seq_weights"):
        Partition("galaxy", p.heads, p.cols, p.vocab, p.layers, (0, 0, 0)).validate(cfg)
    with pytest.raises(PartitionError, match="layers sum to 1"):
        Partition("pipeline", (6,), (100,), (103,), (1,)).validate(cfg)
    with pytest.raises(PartitionError, match="strategy"):
        Partition("ring", p.heads, p.cols, p.vocab, p.layers).validate(cfg)


def test_gqa_partial_group_reads_the_right_kv_heads():
    cfg = preset("smollm2-135m")  # 9 query heads over 3 KV heads: groups {0,1,2} {3,4,5} {6,7,8}
    a = Attention(cfg, 2, 6)  # heads 2..5 straddle groups 0 and 1
    assert (a.kv0, a.kv1, a.nq, a.nkv) == (0, 2, 4, 2)
    assert a.kv_map == [0, 1, 1, 1]
    b = Attention(cfg, 3, 6)  # exactly group 1: one KV head serves all three
    assert (b.kv0, b.kv1, b.kv_map) == (1, 2, [0, 0, 0])
    m = Attention(preset("tiny-gpt2"), 1, 4)  # no GQA: identity, no index_select
    assert m.kv_map is None
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # torch warns about initialising zero-size weights
        z = Attention(cfg, 4, 4)  # no heads at all
    assert (z.nq, z.nkv) == (0, 0)


def test_shards_hold_a_share_of_the_weights_not_the_whole_model():
    cfg = preset("gpt2-large")
    full = shard_bytes(cfg, full_spec(cfg))
    p = weighted_partition(cfg, [0.9, 0.6, 0.45])
    parts = [shard_bytes(cfg, p.spec(r, cfg)) for r in range(3)]
    # only norms, biases of reduced outputs and position table are replicated (~1%)
    assert full < sum(parts) < 1.02 * full
    assert parts[0] > parts[1] > parts[2]
    assert max(parts) < 0.5 * full


def test_pipeline_stages_embed_first_and_decode_last():
    cfg = preset("tiny-opt")
    p = even_partition(cfg, 3, "pipeline")
    specs = [p.spec(r, cfg) for r in range(3)]
    assert [s.layers for s in specs] == [(0, 1), (1, 2), (2, 2)]
    assert [s.embed for s in specs] == [True, False, False]
    assert [s.head for s in specs] == [False, False, True]


def test_work_shares_follow_heads_and_columns_not_the_planners_token_counts():
    cfg = preset("gpt2-large")
    planned = Partition("galaxy", (10, 4, 6), (2482, 1226, 1412), (21938, 28319, 0), (36,) * 3, (85.0, 85.0, 86.0))
    shares = planned.validate(cfg).work_shares(cfg)
    assert sum(shares) == pytest.approx(1.0)
    # attention is 1/3 of a GPT-2 layer's GEMM flops (4 H^2 of 12 H^2), the MLP 2/3
    want = [h / 20 / 3 + c / 5120 * 2 / 3 for h, c in zip(planned.heads, planned.cols)]
    assert shares == pytest.approx(want)
    assert shares[0] > 0.45 > shares[2] > shares[1]  # not 1/3 each, as the token counts would say
    assert weighted_partition(cfg, [3, 2, 1]).work_shares(cfg) == pytest.approx([1 / 2, 1 / 3, 1 / 6], abs=0.01)
    assert even_partition(cfg, 3, "pipeline").work_shares(cfg) == [1 / 3] * 3


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 2.5, None])
def test_a_plan_files_count_that_is_not_a_whole_number_is_a_malformed_partition_not_rounded(bad):
    doc = {"strategy": "galaxy", "heads": [bad, 2], "cols": [1, 1], "vocab": [1, 1], "layers": [1, 1]}
    with pytest.raises(PartitionError, match="malformed partition"):
        Partition.from_dict(doc)
    assert Partition.from_dict({**doc, "heads": [2.0, 2]}).heads == (2, 2)  # a JSON 2.0 is the count 2
