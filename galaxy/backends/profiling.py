"""Timing a device's blocks at several shard sizes: what `galaxy plan` fits its cost model to.

Runs on the device itself (inside its worker): builds attention / MLP / connective blocks (and,
for a causal LM, the head's one-token product) of the target model's shape with random weights --
timing depends on shapes, not values -- and times them at a few shard sizes and sequence lengths.
Pure torch; the worker wraps it in an RPC.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.checkpoints.random import RandomWeights
from ..model.config import ModelConfig
from ..model.transformer import Block
from ..parallel import memory
from ..parallel.sharding import ShardSpec, load_shard
from .onnx import apply_onnx_block, default_cache_dir


@dataclass(frozen=True)
class Sample:
    kind: str  # "attention" | "mlp" | "connective" | "head" | "decode"
    units: int  # heads, columns, tokens or vocabulary rows; decode: sequences in the step (batch)
    seq: int  # tokens the block processed (the full sequence for TP blocks); decode: layers stacked
    seconds: float  # median of the repeats


def median_times(jobs, repeats: int, progress=lambda done, total: None) -> list[float]:
    """Median seconds of each job, timed in rounds: every job once per round, `repeats` rounds.

    A job is a callable that builds what to time and returns it as a function (rebuilt each round:
    holding every block at once would cost a small device the memory it is being profiled for).
    Rounds spread a job's repeats over the whole profile, so a passing slowdown of the device
    (another process, a co-tenant starting up) touches one sample of many jobs -- which the median
    drops -- instead of every sample of the few jobs it coincides with; a profile cached with
    the MLP measured 20% slow gave the fastest device too little work and it waited 28% of a pass.
    """
    times: list[list[float]] = [[] for _ in jobs]
    for _ in range(repeats):
        for i, build in enumerate(jobs):
            fn = build()
            fn()  # warm-up: allocator, kernels, caches
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
            del fn  # before the next build: two jobs' blocks at once were the profile's peak (two head samples)
            progress(sum(map(len, times)), len(jobs) * repeats)
    return [sorted(t)[len(t) // 2] for t in times]


def _block(cfg: ModelConfig, heads: int, cols: int, dtype, device) -> Block:
    return _layers(cfg, heads, cols, 1, dtype, device)[0]


def _layers(cfg: ModelConfig, heads: int, cols: int, n: int, dtype, device) -> list[Block]:
    sub = cfg.replace(n_layers=n)
    spec = ShardSpec((0, heads), (0, cols), (0, 0), (0, n), embed=False, head=False)
    model = load_shard(RandomWeights(sub), spec, dtype=dtype, device=device)
    return [model.layers[str(i)] for i in range(n)]


HEAD_SAMPLE_BYTES = (24 * 2**20, 48 * 2**20, 96 * 2**20)  # past the caches, within a small device's memory
# A decode step is timed on a stack of whole layers holding at least this many weight bytes (or every layer),
# so the weights stream from memory as a model's do: one cache-warm layer (SmolLM2's is 14 MiB, this machine's
# L3 32 MiB) would time the cache, not the bus. At each of DECODE_BATCHES sequences: the engine's decode step
# reads the weights once for the whole batch, so its cost grows with the batch far less than in proportion.
DECODE_SAMPLE_BYTES = 96 * 2**20
# Two is timed itself: from one sequence to two the linears leave MKL's one-row path for sgemm's multi-row one
# (1.4-1.7x, docs/engine.md "What a batched step costs, by owner"), a step the planner prices apart
# (planner.profile.DecodeTiming.multi_s), where a line from 4 and 16 only extrapolated it.
DECODE_BATCHES = (1, 2, 4, 16)


def decode_layers(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """Whole layers the decode samples stack: enough for DECODE_SAMPLE_BYTES of weights, at most the model's."""
    per_layer = memory.shard_params(cfg, ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, 0), (0, 1), embed=False,
                                                   head=False)) * dtype_bytes
    return max(1, min(cfg.n_layers, -(-DECODE_SAMPLE_BYTES // max(1, per_layer))))


def profile_need(cfg: ModelConfig, seq_lens: list[int], dtype_bytes: int = 4) -> int:
    """Bytes `time_blocks` holds at its peak beside the process, from the jobs it builds one at a
    time: the full layer it keeps for the connective timings, and the largest job -- a layer's block
    with one layer's activations at the longest sequence (memory.layer_activation_bytes, an upper
    bound for a job that runs attention or the MLP alone), or the LM head's largest sample. A
    budgeted worker makes room for it before it profiles (transport/worker.py Profile). Measured
    peak growth with the heap trimmed between jobs, against this: SmolLM2 at 256 and 1,024 tokens,
    GPT-2 at 256 and 1,024, BERT-base at 512, OPT-125m at 2,048 (docs/faults.md)."""
    seq = max(seq_lens)
    layer = memory.shard_params(cfg, ShardSpec((0, cfg.n_heads), (0, cfg.ffn), (0, 0), (0, 1), embed=False,
                                               head=False)) * dtype_bytes
    act = memory.layer_activation_bytes(cfg, seq, cfg.n_heads, cfg.n_kv_heads, cfg.ffn, seq, dtype_bytes)
    head = min(cfg.vocab_size * cfg.hidden * dtype_bytes, max(HEAD_SAMPLE_BYTES)) if cfg.causal else 0
    stack = decode_layers(cfg, dtype_bytes) * layer if cfg.causal else 0  # the decode samples' layers
    return layer + max(layer + act, head + seq * cfg.hidden * dtype_bytes, stack) + memory.RUN_SLACK


def head_rows(cfg: ModelConfig, dtype_bytes: int = 4) -> list[int]:
    """Vocabulary-row counts to time the LM head at: weights of ~24 / 48 / 96 MiB (or the whole
    vocabulary if smaller). The head multiplies one token's row in prefill and in every decode
    step, so it streams its weights once per token: memory-bound, at a fraction of the GEMM rate
    the MLP samples measure, and linear in rows, so a line through these extends to any share."""
    per_row = cfg.hidden * dtype_bytes
    return sorted({max(1, min(cfg.vocab_size, b // per_row)) for b in HEAD_SAMPLE_BYTES})


def shard_sizes(total: int, points: int = 3) -> list[int]:
    """A few shard sizes spanning what a device may get: about 1/4, 1/2 and all of `total`."""
    sizes = sorted({max(1, round(total * f)) for f in (0.25, 0.5, 1.0)[-points:]})
    return sizes


def _on_backend(blk: Block, backend: str, part: str) -> Block:
    """Run the block's `part` steps on `backend` ("torch" leaves them as they are)."""
    if backend == "onnx":
        apply_onnx_block(blk, default_cache_dir(), torch.get_num_threads(), parts=(part,))
    elif backend != "torch":
        raise ValueError(f"backend={backend!r} is not torch|onnx")
    return blk


@torch.inference_mode()
def time_blocks(cfg: ModelConfig, seq_lens: list[int], repeats: int = 3, dtype=torch.float32,
                device: str = "cpu", progress=lambda done, total: None, backend: str = "torch") -> list[Sample]:
    """Median times of every block kind at several shard sizes, for each sequence length.
    backend: "torch" or "onnx" (ONNX Runtime with the calling thread's torch thread count)."""
    head_sizes, col_sizes = shard_sizes(cfg.n_heads), shard_sizes(cfg.ffn)
    jobs = [(s, "attention", h) for s in seq_lens for h in head_sizes]
    jobs += [(s, "mlp", c) for s in seq_lens for c in col_sizes]
    jobs += [(s, "connective", t) for s in seq_lens for t in sorted({max(1, s // 4), s})]
    if cfg.causal:
        itemsize = torch.empty((), dtype=dtype).element_size()
        jobs += [(1, "head", v) for v in head_rows(cfg, itemsize)]
        jobs += [(decode_layers(cfg, itemsize), "decode", b) for b in DECODE_BATCHES]
    full = _on_backend(_block(cfg, cfg.n_heads, cfg.ffn, dtype, device), backend, "connective")

    def build(seq: int, kind: str, units: int):
        x = torch.randn(seq, cfg.hidden, dtype=dtype, device=device)
        if kind == "attention":
            a = _on_backend(_block(cfg, units, 1, dtype, device), backend, "attention").attn
            return lambda: a.project_out(a.attend(a.project(x)))
        if kind == "mlp":
            m = _on_backend(_block(cfg, 1, units, dtype, device), backend, "mlp").mlp
            return lambda: m.contract(m.expand(x))
        if kind == "head":  # the last token's logits over `units` vocabulary rows
            w = torch.full((units, cfg.hidden), 0.01, dtype=dtype, device=device)
            return lambda: x @ w.T  # as Transformer.head_logits
        if kind == "decode":  # one token of each of `units` sequences through `seq` whole layers
            stack = _layers(cfg, cfg.n_heads, cfg.ffn, seq, dtype, device)
            tok = torch.randn(units, cfg.hidden, dtype=dtype, device=device)  # (B, H)

            def step():
                h = tok
                for blk in stack:
                    h = blk(h)
                return h

            return step
        xs = x[:units]
        return lambda: full.after_mlp(xs, full.after_attn(xs, xs))

    seconds = median_times([lambda job=job: build(*job) for job in jobs], repeats, progress)
    return [Sample(kind, units, seq, t) for (seq, kind, units), t in zip(jobs, seconds)]
