"""Measures paged attention on CPU: `gather` against `padded`, beside plain contiguous attention.

One call is one layer of one device: the packed queries of a step's batch over the K/V of
their sequences, scattered over a shuffled block pool as a busy server leaves them. Shapes are
one layer's heads: SmolLM2-135M whole (9 query heads over 3 KV heads), a third of it (3 over 1,
one device of three) and GPT-2 Large (20 over 20), all with head_dim 64, in fp32. Scenarios:

- decode: every sequence decodes one token at the same context length (padding's best case);
- decode-mixed: decodes at context lengths spread evenly up to the given one;
- mixed: B-1 decodes at the given context and one 128-token prefill chunk ending there.

`contiguous` attends each sequence's K/V already in one piece with the same kernel calls as
`gather`, so their difference is what paging costs; `model` is today's unpaged path
(galaxy.model.transformer.attention_core: K/V copied per query head, 3-D SDPA, which takes the slower math
kernel on CPU). Times are medians over `--reps` rounds, in ms, the methods called in turn in
every round (see `median_ms`). The batch tensors (`PagedBatch`) are built once per step and
shared by every layer, so they are timed apart. Run it under the CPU lock:

    flock /tmp/galaxy-cpu.lock galaxy bench --paged-attention          (--attention-kernels: the kernels)
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..model.paged_kv import PagedBatch, PagedKVCache, causal_sdpa, group_size
from ..model.transformer import attention_core

HD, BLOCK = 64, 16
SHAPES = {"smollm2-135m": (9, 3), "smollm2-135m/3": (3, 1), "gpt2-large": (20, 20)}  # one layer: (nq, nkv)
SCENARIOS = ("decode", "decode-mixed", "mixed")
CHUNK = 128
KERNELS = ("3-D expand", "4-D expand", "4-D enable_gqa", "4-D fold", "gather index_select", "gather advanced index",
           "gather block-major")


def scenario(name: str, b: int, ctx: int) -> list[tuple[int, int]]:
    """(start, query_len) per sequence."""
    if name == "decode":
        return [(ctx - 1, 1)] * b
    if name == "decode-mixed":
        return [(max(1, ctx * (i + 1) // b) - 1, 1) for i in range(b)]
    chunk = min(CHUNK, ctx)
    return [(ctx - 1, 1)] * (b - 1) + [(ctx - chunk, chunk)]


def build(nq: int, nkv: int, seqs: list[tuple[int, int]], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(s + n) // BLOCK) for s, n in seqs]
    ids = torch.randperm(sum(need), generator=gen).tolist()
    tables, a = [], 0
    for k in need:
        tables.append(tuple(ids[a : a + k]))
        a += k
    cache = PagedKVCache(["0"], nkv, HD, sum(need), BLOCK)
    cache.k["0"].normal_(generator=gen)
    cache.v["0"].normal_(generator=gen)
    batch = PagedBatch(BLOCK, tuple(n for _, n in seqs), tuple(s for s, _ in seqs), tuple(tables))
    q = torch.randn(nq, batch.num_tokens, HD, generator=gen)
    kv_map = [j * nkv // nq for j in range(nq)] if nq != nkv else None
    return cache, batch, q, kv_map


def median_ms(fns: dict, reps: int) -> dict:
    """Median ms of each function over `reps` rounds. Every round calls each function in turn,
    so load from other processes falls on all alike; each timed call follows an untimed one of
    the same function, because a call right after another method's pays for what that one
    left behind in memory (measured: +0.8 ms on a 0.2 ms call after the model path)."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            fn()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def measure(shape: str, b: int, ctx: int, scen: str, reps: int) -> dict:
    nq, nkv = SHAPES[shape]
    seqs = scenario(scen, b, ctx)
    cache, batch, q, kv_map = build(nq, nkv, seqs)
    # unpaged: each sequence's K/V already in one piece, attended with the same kernel calls as
    # `gather` (GQA folded, 4-D SDPA), so gather - contiguous is what paging costs
    contig = [(cache.k["0"].index_select(1, s).contiguous(), cache.v["0"].index_select(1, s).contiguous())
              for s in batch.context_slots]
    g = group_size(kv_map, nq, nkv)

    def contiguous():
        a = 0
        for (k, v), (start, n) in zip(contig, seqs):
            causal_sdpa(q[:, a : a + n].reshape(nq // g, g * n, HD), k, v, start, g)
            a += n

    # today's unpaged path (galaxy.model): GQA by copying K/V per query head, 3-D SDPA
    idx = torch.tensor(kv_map) if kv_map is not None else None

    def model_path():
        a = 0
        for (k, v), (start, n) in zip(contig, seqs):
            if idx is not None:
                k, v = k.index_select(0, idx), v.index_select(0, idx)
            attention_core(q[:, a : a + n], k, v, causal=True, q_start=start)
            a += n

    fresh = lambda: PagedBatch(batch.block_size, batch.query_lens, batch.starts, batch.block_tables)
    row = dict(shape=shape, b=b, ctx=ctx, scenario=scen)
    row.update(median_ms({
        "model": model_path,
        "contiguous": contiguous,
        "gather": lambda: cache.paged_attention(q, "0", batch, kv_map, "gather"),
        "padded": lambda: cache.paged_attention(q, "0", batch, kv_map, "padded"),
        "build_gather": lambda: (fresh().context_slots, fresh().slot_mapping),
        "build_padded": lambda: (fresh().padded, fresh().slot_mapping),
    }, reps))
    return row


def kernel_row(nq: int, nkv: int, rows: int, ctx: int, reps: int) -> dict:
    """One sequence's attention and gather, each way paged_kv could do it (see `kernels`)."""
    g, nb = nq // nkv, ctx // BLOCK
    table = torch.randperm(3 * nb)[:nb]
    slots = (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    pool = torch.randn(nkv, 3 * nb * BLOCK, HD)  # head-major, as paged_kv keeps it
    blocks = torch.randn(3 * nb, nkv, BLOCK, HD)  # block-major
    heads = torch.tensor([j // g for j in range(nq)])
    q, k = torch.randn(nq, rows, HD), pool.index_select(1, slots)
    mask = None if rows == 1 else torch.ones(rows, ctx, dtype=torch.bool).tril(ctx - rows)

    def sdpa(a, b, **kw):
        return F.scaled_dot_product_attention(a, b, b, attn_mask=mask, **kw)

    return median_ms({
        "3-D expand": lambda: sdpa(q, k.index_select(0, heads)),
        "4-D expand": lambda: sdpa(q[None], k.index_select(0, heads)[None]),
        "4-D enable_gqa": lambda: sdpa(q[None], k[None], enable_gqa=True),
        "4-D fold": lambda: causal_sdpa(q.reshape(nkv, g * rows, HD), k, k, ctx - rows, g),
        "gather index_select": lambda: pool.index_select(1, slots),
        "gather advanced index": lambda: pool[heads[:, None], slots[None, :]],
        "gather block-major": lambda: blocks.index_select(0, table).permute(1, 0, 2, 3).reshape(nkv, ctx, HD),
    }, reps)


def kernels(reps: int) -> None:
    """The choices inside paged_kv against their alternatives, on one sequence's context: SDPA
    called 3-D or 4-D; GQA by copying K/V per query head (expand), by enable_gqa, or by folding a
    group's query heads into rows; a context gathered by index_select on the head-major pool, by
    advanced indexing of heads and slots at once, or as block-major blocks then a permute."""
    print("| nq/nkv | rows | ctx | " + " | ".join(KERNELS) + " |")
    print("|---|---|---|" + "---|" * len(KERNELS))
    for nq, nkv in ((9, 3), (20, 20)):
        for rows, ctx in ((1, 256), (1, 2048), (128, 2048)):
            r = kernel_row(nq, nkv, rows, ctx, reps)
            print(f"| {nq}/{nkv} | {rows} | {ctx} | " + " | ".join(f"{r[n]:.3f}" for n in KERNELS) + " |", flush=True)


def report(threads: int = 1, reps: int = 21, quick: bool = False, kernel_choices: bool = False) -> None:
    """Print the gather/padded/contiguous table (or, with kernel_choices, the kernels inside paged_kv).
    quick: one shape, two context lengths."""
    torch.set_num_threads(threads)
    if kernel_choices:
        print(f"torch {torch.__version__}, {threads} thread(s), fp32, median of {reps}; ms per call")
        return kernels(reps)
    shapes = ["smollm2-135m"] if quick else list(SHAPES)
    ctxs = [256, 2048] if quick else [64, 256, 1024, 2048]
    print(f"torch {torch.__version__}, {threads} thread(s), fp32, block {BLOCK}, median of {reps}; "
          "ms per layer call")
    print("| shape | B | ctx | scenario | model | contiguous | gather | padded | padded/gather | build g/p per step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for scen in SCENARIOS:
            for b in (1, 4, 8):
                if b == 1 and scen != "decode":
                    continue  # one sequence: the same batch in every scenario but the chunk
                for ctx in ctxs:
                    r = measure(shape, b, ctx, scen, reps)
                    cols = [r[m] for m in ("model", "contiguous", "gather", "padded")]
                    print(f"| {shape} | {b} | {ctx} | {scen} | " + " | ".join(f"{c:.3f}" for c in cols) +
                          f" | {r['padded'] / r['gather']:.2f} | "
                          f"{r['build_gather']:.3f} / {r['build_padded']:.3f} |", flush=True)

