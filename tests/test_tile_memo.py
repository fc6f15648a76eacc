"""The suite's kept random tiles (conftest.TileMemo) are the generator's own draws, so every random
model a test builds in this process holds the values RandomWeights defines."""

from __future__ import annotations

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
