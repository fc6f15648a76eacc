"""What one engine step costs by what it carries (`galaxy bench steps`): d decodes, and a c-token prompt
chunk beside them, timed on any executor with each device's forward, busy and process CPU time.

Why: the stall bound prices a step as `a + bd * decodes + bp * prompt_tokens` (engine/step_cost.py), fitted
to the engine's own steps under traffic, where decodes and chunks vary together and foreign load moves
every sample. This bench holds everything but the shape fixed -- the same sequences, contexts and token ids
in every repetition, shapes interleaved within a round so load drifts hit all of them alike -- so the
marginal cost of one more decode (from 1 to 2 decodes, where a one-row matmul becomes a multi-row one, and
beyond) and of one more prompt token can be read apart, and per device: on a split, the step's wall time
is its slowest device's work plus the waits between them (docs/engine.md "What a batched step costs, by
owner").

Every timed step is also a check: each decode's greedy token (picked on the devices, `top1_rows`) must
be the token the same sequence gets in a step of its own. The decode's K/V slot is rewritten with the same
token every time, so the contexts never change between repetitions.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..errors import GalaxyError
from ..model.paged_kv import PagedBatch
from ..parallel.forward import Step
from ..parallel.rank import KVPool


@dataclass(frozen=True)
class StepShapes:
    """The shapes timed: a step of each decode count, and (chunk > 0) a chunk alone, beside one decode and
    beside the most decodes; every decode at position `context`, the chunk at positions
    [context, context + chunk) of a sequence of its own."""

    decodes: tuple[int, ...] = (1, 2, 4, 8)
    chunk: int = 48
    context: int = 160
    reps: int = 15
    block_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if not self.decodes or min(self.decodes) < 1:
            raise GalaxyError(f"step shapes: decodes={self.decodes}: each count must be >= 1")
        for name, value, low in (("chunk", self.chunk, 0), ("context", self.context, 1), ("reps", self.reps, 1),
                                 ("block_size", self.block_size, 1)):
            if value < low:
                raise GalaxyError(f"step shapes: {name}={value}, must be >= {low}")

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(decodes, chunk tokens) per timed step, in the order each round runs them."""
        out = [(d, 0) for d in sorted(set(self.decodes))]
        if self.chunk:
            out += [(0, self.chunk), (1, self.chunk), (max(self.decodes), self.chunk)]
        return out


class _Sequences:
    """The bench's sequences on the pool: `n` decoding ones and one prefilling, their blocks, fixed ids."""

    def __init__(self, sb: StepShapes, vocab_size: int, pool: KVPool):
        n, bs = max(sb.decodes), sb.block_size
        per_decode = -(-(sb.context + 1) // bs)
        per_chunk = -(-(sb.context + sb.chunk) // bs)
        need = n * per_decode + per_chunk
        if need > pool.num_blocks:
            raise GalaxyError(f"step shapes: {n} decodes at position {sb.context} and a {sb.chunk}-token chunk "
                              f"need {need} blocks of {bs}; the pool holds {pool.num_blocks}")
        self.sb, self.pool = sb, pool
        self.tables = [tuple(range(i * per_decode, (i + 1) * per_decode)) for i in range(n)]
        self.tables.append(tuple(range(n * per_decode, n * per_decode + per_chunk)))
        g = torch.Generator().manual_seed(sb.seed)
        self.contexts = [torch.randint(0, vocab_size, (sb.context,), generator=g) for _ in range(n + 1)]
        self.next_ids = torch.randint(0, vocab_size, (n,), generator=g)  # each decode's token at `context`
        self.chunk_ids = torch.randint(0, vocab_size, (sb.chunk,), generator=g)

    def prefills(self) -> list[Step]:
        """One step per sequence writing its context's K/V (positions [0, context))."""
        c = self.sb.context
        return [Step(ids, PagedBatch(self.sb.block_size, (c,), (0,), (table,)), (c - 1,))
                for ids, table in zip(self.contexts, self.tables)]

    def step(self, decodes: int, chunk: int, first: int = 0) -> Step:
        """Decodes of sequences first..first+decodes-1 (greedy rows: top-1 on the devices), then the chunk."""
        sb = self.sb
        seqs = range(first, first + decodes)
        lens, starts = [1] * decodes, [sb.context] * decodes
        tables = [self.tables[i] for i in seqs]
        ids = [self.next_ids[first: first + decodes]]
        if chunk:
            lens, starts, tables = lens + [chunk], starts + [sb.context], tables + [self.tables[-1]]
            ids.append(self.chunk_ids[:chunk])
        rows = tuple(range(decodes)) + ((decodes + chunk - 1,) if chunk else ())
        return Step(torch.cat(ids), PagedBatch(sb.block_size, tuple(lens), tuple(starts), tuple(tables)), rows,
                    top1_rows=tuple(range(decodes)))


def run_step_shapes(executor, vocab_size: int, sb: StepShapes = StepShapes(), progress=lambda msg: None) -> dict:
    """Time every shape `sb.reps` times, interleaved, on a loaded executor; the report's rows hold medians."""
    pool = KVPool(executor.kv_blocks(sb.block_size), sb.block_size)
    seqs = _Sequences(sb, vocab_size, pool)
    for step in seqs.prefills():
        executor.step(step, pool)
    alone = [int(executor.step(seqs.step(1, 0, first=i), pool).top1[0]) for i in range(max(sb.decodes))]
    samples: dict[tuple[int, int], list] = {s: [] for s in sb.shapes}
    as_alone = {s: True for s in sb.shapes}
    for s in sb.shapes:  # one untimed step of each shape first
        executor.step(seqs.step(*s), pool)
    for rep in range(sb.reps):
        progress(f"round {rep + 1} of {sb.reps}")
        for s in sb.shapes:
            res = executor.step(seqs.step(*s), pool)
            as_alone[s] &= ([] if res.top1 is None else [int(t) for t in res.top1]) == alone[: s[0]]
            samples[s].append((res.seconds, [(d.forward_s, d.busy_s, d.cpu_s) for d in res.devices]))
    rows = []
    for (d, c), runs in samples.items():
        per_device = list(zip(*(devs for _, devs in runs)))  # per device: its (forward, busy, cpu) per run
        rows.append({
            "decodes": d, "chunk": c, "step_ms": _ms(t for t, _ in runs),
            "forward_ms": [_ms(f for f, _, _ in dev) for dev in per_device],
            "busy_ms": [_ms(b for _, b, _ in dev) for dev in per_device],
            "cpu_ms": [_ms(u for _, _, u in dev) for dev in per_device],
            "tokens_as_alone": as_alone[(d, c)],
        })
    return {"context": sb.context, "reps": sb.reps, "block_size": sb.block_size, "rows": rows,
            "marginal": marginal(rows)}


def _ms(values) -> float:
    return statistics.median(values) * 1e3


def marginal(rows: list[dict]) -> dict:
    """Per extra decode (1 -> 2, and 2 -> the most) and per prompt token (a chunk alone against one decode
    alone), in step ms and in the busiest device's CPU ms; from the medians."""
    by = {(r["decodes"], r["chunk"]): r for r in rows}
    out = {}

    def slope(name, a, b, per):
        if a in by and b in by and per > 0:
            ra, rb = by[a], by[b]
            out[name] = {"step_ms": (rb["step_ms"] - ra["step_ms"]) / per,
                         "cpu_ms": (max(rb["cpu_ms"], default=0) - max(ra["cpu_ms"], default=0)) / per}

    most = max(d for d, c in by if c == 0)
    slope("decode 1->2", (1, 0), (2, 0), 1)
    if most > 2:
        slope(f"decode 2->{most}", (2, 0), (most, 0), most - 2)
    chunks = [c for _, c in by if c]
    if chunks:
        slope("prompt token", (1, 0), (0, chunks[0]), chunks[0] - 1)
    return out


def table(report: dict) -> str:
    lines = [f"engine step by shape: decodes at position {report['context']}, medians of {report['reps']} "
             "interleaved rounds (ms; per device: forward / busy / process CPU)",
             "| decodes | chunk | step | forward | busy | CPU | tokens as alone |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        each = ["/".join(f"{x:.0f}" for x in r[key]) or "-" for key in ("forward_ms", "busy_ms", "cpu_ms")]
        lines.append(f"| {r['decodes']} | {r['chunk']} | {r['step_ms']:.1f} | {' | '.join(each)} | "
                     f"{'yes' if r['tokens_as_alone'] else 'NO'} |")
    for name, m in report["marginal"].items():
        lines.append(f"per {name}: step {m['step_ms']:+.2f} ms, busiest device CPU {m['cpu_ms']:+.2f} ms")
    return "\n".join(lines)
