"""Random weights for benchmarks of large shapes, reproducible tensor by tensor.

Each tensor is drawn from its own generator seeded by (seed, name), so a device that builds
only its shard gets exactly the slice the single-device reference would hold, with no file.
"""

from __future__ import annotations

import zlib

import torch

from ..config import ModelConfig, preset
from . import WeightSource, expected_shapes


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

    def _full(self, name: str) -> torch.Tensor:
        shape = expected_shapes(self.config)[name]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(shape, generator=g)
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            return 1.0 + 0.1 * noise  # near-identity scales, but not exactly 1 so bugs show
        return self.std * noise

    def _load(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        return self._full(name).narrow(dim, start, end - start).clone()
