"""Greedy sampling on the devices: each rank's top-1 over its vocabulary rows, and joining them.

A greedy sequence needs one number from its logit row, the argmax, yet the full row is the vocabulary
in float32 (SmolLM2: 49,152 x 4 B = 192 KiB a token, 1.5 MiB for a step of 8 sequences) -- bytes each
rank serializes, the wire carries and the coordinator parses every decode step. So a Step may name
`top1_rows` (a subset of its logit rows): for those each rank holding LM-head rows returns, per row,
its slice's largest logit and the global id of that value's first occurrence, and the coordinator
keeps the largest value, on equal values the smallest id. That is exactly `torch.argmax`'s rule over
the whole row (the first maximum; a NaN counts as the maximum, as there): the row's maximum lies in
some slice, and its first occurrence is in the first slice (lowest ids) whose maximum equals it, at
that slice's own first maximum. Ranks hold contiguous, ascending vocabulary ranges in rank order
(`sharding.Partition.spec`), so "the first rank among equal values" is "the smallest id", which is
what `argmax` along the ranks picks. Greedy tokens are therefore bit-identical to sampling the
assembled logits; rows a sampler needs whole (temperature, top-k / top-p) still come back as logits
in the same step.

Pure torch: the worker, the in-process executor and the coordinator's join share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Top1:
    """One rank's answer for a step's top-1 rows: per row, the largest logit over its vocabulary rows
    and the global id of its first occurrence."""

    values: torch.Tensor  # (G,) float32
    ids: torch.Tensor  # (G,) int64, global vocabulary ids


@dataclass(frozen=True)
class StepPiece:
    """A rank's output of one engine step: the logits of the logit rows not asked for top-1 only (over
    this rank's vocabulary rows), and the top-1 of the others (None: none asked, or no vocabulary here)."""

    logits: torch.Tensor  # (logit rows - top-1 rows, this rank's vocab rows), float32
    top1: Top1 | None


def check_top1_rows(logit_rows: tuple[int, ...], top1_rows: tuple[int, ...]) -> None:
    """Refuse top-1 rows that are not ascending, distinct logit rows (ValueError, naming the first bad one):
    a worker checks them before any peer waits on it."""
    if list(top1_rows) != sorted(set(top1_rows)):
        raise ValueError(f"top-1 rows {list(top1_rows)[:8]} are not ascending and distinct")
    have = set(logit_rows)
    bad = [r for r in top1_rows if r not in have]
    if bad:
        raise ValueError(f"top-1 row {bad[0]} is not one of the step's {len(logit_rows)} logit rows "
                         f"{list(logit_rows)[:8]}")


def row_split(logit_rows: tuple[int, ...], top1_rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the logit rows: (those whose logits come back, those whose top-1 does), each in order."""
    picked = set(top1_rows)
    full = [i for i, r in enumerate(logit_rows) if r not in picked]
    top = [i for i, r in enumerate(logit_rows) if r in picked]
    return torch.tensor(full, dtype=torch.long), torch.tensor(top, dtype=torch.long)


def slice_top1(logits: torch.Tensor, offset: int) -> Top1 | None:
    """Per row of `logits` (G, V_r), the vocabulary slice [offset, offset + V_r): its largest value and
    the global id of its first occurrence. None for an empty slice (a rank holding no vocabulary rows)."""
    if logits.shape[1] == 0:
        return None
    idx = logits.argmax(dim=1)  # (G,): the first maximum (a NaN counts as the maximum)
    values = logits.gather(1, idx[:, None])[:, 0].float()  # (G,)
    return Top1(values, idx + offset)


def step_piece(out: torch.Tensor | None, logit_rows: tuple[int, ...], top1_rows: tuple[int, ...],
               offset: int) -> StepPiece | torch.Tensor | None:
    """A rank's forward output (logit rows, V_r) cut into what goes back: unchanged when no top-1 row is
    asked (or the rank has no output: a pipeline stage before the last), else a StepPiece."""
    if out is None or not top1_rows:
        return out
    out = out.float()
    if len(top1_rows) == len(logit_rows):  # every row greedy (a decode step's usual case; the rows are checked)
        return StepPiece(out[:0], slice_top1(out, offset))
    full, top = row_split(logit_rows, top1_rows)
    return StepPiece(out[full], slice_top1(out[top], offset))


def join_top1(pieces: list[Top1 | None], rows: int) -> torch.Tensor:
    """The token of each of `rows` top-1 rows from the ranks' pieces, in rank order (ascending vocabulary
    ranges): the largest value, on equal values the first rank's, i.e. the smallest id (argmax over the
    whole row). Ranks without vocabulary rows give None. ValueError if no rank answered or a piece has
    another number of rows."""
    got = [p for p in pieces if p is not None]
    if not got:
        raise ValueError(f"no rank returned a top-1 for the step's {rows} top-1 rows")
    for p in got:
        if p.values.shape != (rows,) or p.ids.shape != (rows,):
            raise ValueError(f"a rank's top-1 has {tuple(p.values.shape)} values and {tuple(p.ids.shape)} ids "
                             f"for {rows} rows")
    if len(got) == 1:  # one rank holds the vocabulary (a pipeline's last stage, decode on one device)
        return got[0].ids.long()
    values = torch.stack([p.values.float() for p in got])  # (P, G)
    ids = torch.stack([p.ids.long() for p in got])  # (P, G)
    first = values.argmax(dim=0, keepdim=True)  # (1, G): the first rank among equal maxima
    return ids.gather(0, first)[0]
