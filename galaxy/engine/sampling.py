"""Choosing the next token from logits: greedy, temperature, top-k, top-p, reproducible by seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidRequest


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set with this much probability mass
    seed: int | None = None

    def __post_init__(self):
        def number(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and x == x

        if not number(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature={self.temperature!r} must be a number >= 0 (0: greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequest(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p={self.top_p!r} must be a number in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequest(f"seed={self.seed!r} must be an integer or None")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.gen = torch.Generator()
        if cfg.seed is not None:
            self.gen.manual_seed(cfg.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token id from the logits of one position, (V,)."""
        c = self.cfg
        if c.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits.float() / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if c.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            cut = cum - sorted_p > c.top_p  # tokens entirely beyond the mass
            sorted_p[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            probs /= probs.sum()
        return int(torch.multinomial(probs, 1, generator=self.gen))
