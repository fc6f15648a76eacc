"""Random weights for benchmarks of large shapes, reproducible tensor by tensor and block by block.

Each tensor is cut into BLOCK x BLOCK tiles, each drawn from its own generator seeded by
(seed, name, tile row, tile column). A device that builds only its shard draws only the tiles
its slice covers -- rows or columns alike -- and gets exactly the values the single-device
reference holds, with no file and no whole-tensor temporaries.
"""

from __future__ import annotations

import zlib

import torch

from ..config import ModelConfig, preset
from .source import WeightSource, expected_shapes

BLOCK = 512  # rows and columns per independently seeded tile


class RandomWeights(WeightSource):
    def __init__(self, config: ModelConfig, seed: int = 0, std: float = 0.02):
        self.config = config
        self.seed = seed
        self.std = std
        self.path = f"random:{config.name or config.family}"

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> RandomWeights:
        return cls(preset(name), seed=seed)

    def names(self) -> list[str]:
        return list(expected_shapes(self.config))

    def _tile(self, key: int, bi: int, bj: int, rows: int, cols: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((key * 1_000_003 + bi * 65_537 + bj) % (2**63))
        return torch.randn(rows, cols, generator=g)

    def _load(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        shape = expected_shapes(self.config)[name]
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
        r0, r1 = (start, end) if dim == 0 else (0, rows)
        c0, c1 = (start, end) if dim == 1 else (0, cols)
        key = self.seed * 7_919 + zlib.crc32(name.encode())
        out = torch.empty(r1 - r0, c1 - c0)
        for bi in range(r0 // BLOCK, -(-r1 // BLOCK)):
            for bj in range(c0 // BLOCK, -(-c1 // BLOCK)):
                tr0, tc0 = bi * BLOCK, bj * BLOCK
                tile = self._tile(key, bi, bj, min(BLOCK, rows - tr0), min(BLOCK, cols - tc0))
                a, b = max(r0, tr0), min(r1, tr0 + tile.shape[0])
                c, d = max(c0, tc0), min(c1, tc0 + tile.shape[1])
                out[a - r0: b - r0, c - c0: d - c0] = tile[a - tr0: b - tr0, c - tc0: d - tc0]
        out = out.reshape(-1) if len(shape) == 1 else out
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            return 1.0 + 0.1 * out  # near-identity scales, but not exactly 1 so bugs show
        return out.mul_(self.std)
