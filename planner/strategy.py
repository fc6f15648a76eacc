"""The strategies the planner compares, and the one place that says what each holds per device.

The runtime knows four ways to split a model (`galaxy.parallel.sharding.Strategy`). The planner
prices two more names on top: `local` (the whole model on the fastest device, run as a one-device
galaxy partition, every collective a no-op) and `galaxy-no-overlap` (the galaxy layout with
communication not hidden behind compute, reported beside galaxy to show what overlap is worth; it
is never picked). Everything that used to be a tuple of strategy names in the solver, the cost
model and the plan file -- which fields a device needs, which strategies split the tokens, which
run tensor-parallel, how a plan becomes a runtime `Partition` -- is a property here.
"""

from __future__ import annotations

from enum import Enum

from galaxy.model.config import ModelConfig
from galaxy.parallel.sharding import Partition, Strategy

# Per-device fields of a plan (and, renamed, of a cost-model Layout) that hold a split.
TENSOR_FIELDS = ("heads", "mlp_cols", "vocab_rows")
LAYOUT_NAMES = {"heads": "heads", "mlp_cols": "cols", "vocab_rows": "vocab", "tokens": "tokens", "layers": "layers"}


class PlanStrategy(str, Enum):
    """A strategy as the planner names it. A str enum: equal to its name, as plans and JSON write it."""

    GALAXY = "galaxy"
    GALAXY_NO_OVERLAP = "galaxy-no-overlap"
    MEGATRON = "megatron"
    SEQPAR = "seqpar"
    PIPELINE = "pipeline"
    LOCAL = "local"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def runs_as(self) -> Strategy:
        """The runtime strategy a plan of this kind loads as."""
        return Strategy.GALAXY if self in (PlanStrategy.LOCAL, PlanStrategy.GALAXY_NO_OVERLAP) else Strategy(self.value)

    @property
    def runnable(self) -> bool:
        """A plan may hold it and the solver may pick it (galaxy-no-overlap is only reported)."""
        return self is not PlanStrategy.GALAXY_NO_OVERLAP

    @property
    def tensor_parallel(self) -> bool:
        """Attention and MLP split over heads and columns (local: one device holding all of them)."""
        return self.runs_as in (Strategy.GALAXY, Strategy.MEGATRON)

    @property
    def splits_tokens(self) -> bool:
        """Whether a device's `tokens` is its share of the sequence (and the shares sum to it)."""
        return self.runs_as.splits_tokens

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-device plan fields this strategy needs (the rest may be absent)."""
        if self is PlanStrategy.PIPELINE:
            return ("layers",)
        if self is PlanStrategy.SEQPAR:
            return ("tokens",)
        return TENSOR_FIELDS + (("tokens",) if self.splits_tokens else ())

    @property
    def layout_fields(self) -> tuple[str, ...]:
        """`fields` under the cost model's Layout names (cols, vocab)."""
        return tuple(LAYOUT_NAMES[f] for f in self.fields)

    def partition(self, cfg: ModelConfig, heads, mlp_cols, vocab_rows, tokens, layers) -> Partition:
        """The runtime Partition for per-device counts in ring (or stage) order; the counts a
        strategy does not split are ignored. Tokens become seq_weights, so other lengths split in
        the same proportions. Raises PartitionError if the counts do not fit the model."""
        n = len(heads or tokens or layers)
        whole = ((cfg.n_heads,) * n, (cfg.ffn,) * n, (cfg.vocab_size,) * n)
        full = (cfg.n_layers,) * n
        weights = tuple(float(t) for t in tokens)
        rt = self.runs_as
        if rt is Strategy.SEQPAR:
            return Partition(rt, *whole, full, weights).validate(cfg)
        if rt is Strategy.PIPELINE:
            return Partition(rt, *whole, tuple(layers)).validate(cfg)
        if rt is Strategy.MEGATRON:
            return Partition(rt, tuple(heads), tuple(mlp_cols), tuple(vocab_rows), full).validate(cfg)
        return Partition(rt, tuple(heads), tuple(mlp_cols), tuple(vocab_rows), full, weights).validate(cfg)


PLANNED = tuple(PlanStrategy)  # every strategy the solver prices and a plan may report
RUNNABLE = tuple(s for s in PlanStrategy if s.runnable)  # what a plan may hold and the solver may pick
