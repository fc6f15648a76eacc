"""torch vs ONNX Runtime, block by block, on this machine: the numbers behind docs/onnx.md.

    python -c "from galaxy.bench.backends import report; print(report(['bert-large', 'gpt2-large']))"

Uses the profiler's own timings (profiling.time_blocks) under both backends, so it measures
exactly what `--backend auto` compares. The two backends are timed in alternation, `rounds`
times, keeping each sample's fastest round: on a machine shared with other work, load that
comes and goes then hits both backends alike instead of whichever ran second.
"""

from __future__ import annotations

import torch

from ..backends.profiling import time_blocks
from ..model.config import ModelConfig, preset


def compare(cfg: ModelConfig, seq_lens: list[int], repeats: int = 3, rounds: int = 2) -> list[dict]:
    """Per block kind, shard size and sequence length: torch and ONNX Runtime seconds."""
    best: dict[str, dict] = {"torch": {}, "onnx": {}}
    for _ in range(rounds):
        for backend, seen in best.items():
            for s in time_blocks(cfg, seq_lens, repeats, backend=backend):
                key = (s.kind, s.units, s.seq)
                seen[key] = min(seen.get(key, float("inf")), s.seconds)
    return [{"kind": k, "units": u, "seq": q, "torch_s": best["torch"][(k, u, q)], "onnx_s": best["onnx"][(k, u, q)]}
            for (k, u, q) in best["torch"]]


def report(models: list[str], seq_lens=(128, 512), threads: int = 1, repeats: int = 3, rounds: int = 2) -> str:
    """A markdown table of onnx/torch time ratios per block for preset models (< 1: ONNX faster)."""
    torch.set_num_threads(threads)
    lines = [f"threads={threads}, best of {rounds} alternating rounds of median-of-{repeats}", "",
             "| model | block | units | seq | torch ms | onnx ms | onnx/torch |", "|---|---|---|---|---|---|---|"]
    for name in models:
        cfg = preset(name)
        for r in compare(cfg, list(seq_lens), repeats, rounds):
            lines.append(f"| {name} | {r['kind']} | {r['units']} | {r['seq']} | {r['torch_s'] * 1e3:.2f} | "
                         f"{r['onnx_s'] * 1e3:.2f} | {r['onnx_s'] / r['torch_s']:.2f} |")
    return "\n".join(lines)
