"""Choosing the next token from logits: greedy, temperature, top-k, top-p, reproducible by seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arguments import need_int, need_number, need_seed


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set with this much probability mass
    seed: int | None = None

    def __post_init__(self):  # InvalidRequest (a GalaxyError and a ValueError) naming the field
        need_number("temperature", self.temperature, 0.0)
        need_int("top_k", self.top_k, 0)
        need_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        need_seed("seed", self.seed)


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.gen = torch.Generator()
        if cfg.seed is not None:
            self.gen.manual_seed(cfg.seed)
        else:
            self.gen.seed()

    @property
    def greedy(self) -> bool:
        return self.cfg.temperature == 0

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
