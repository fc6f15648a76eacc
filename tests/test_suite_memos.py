"""What the suite keeps between tests (conftest.TileMemo, conftest.GGUFRowsMemo) is what the code it
stands in for returns, so every model a test builds in this process holds the values it would without."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset


def test_a_kept_tile_is_the_generators_draw_and_is_drawn_once(random_tiles_drawn_once):
    memo = random_tiles_drawn_once
    src = RandomWeights(preset("tiny-llama"), seed=123)
    drawn = memo.drawn
    tile = src._tile(99, 1, 2, 512, 40)
    assert src._tile(99, 1, 2, 512, 40) is tile and memo.drawn == drawn + 1
    assert torch.equal(tile, memo.draw(src, 99, 1, 2, 512, 40))  # RandomWeights' own _tile, called afresh
    assert not torch.equal(tile, memo.draw(src, 99, 1, 3, 512, 40))  # another tile's generator


def test_kept_smollm2_rows_are_a_fresh_reads_values_and_each_caller_gets_its_own_copy(smollm2_rows_read_once,
                                                                                     smollm2_path):
    from galaxy.model.checkpoints import open_checkpoint

    memo = smollm2_rows_read_once
    if memo is None:
        pytest.skip("the embedded SmolLM2 is not installed")
    src = open_checkpoint(smollm2_path)
    name = next(n for n in src._gguf_names.values() if n.endswith("ffn_down.weight"))
    first = src._rows(name, 100, 164)
    again = src._rows(name, 100, 164)
    assert torch.equal(first, again) and torch.equal(again, memo.read(src, name, 100, 164))  # the ordinary read
    again.zero_()  # a caller writing into what it got changes nobody else's
    assert torch.equal(src._rows(name, 100, 164), first) and first.abs().sum() > 0
