"""A pass that returns every token's logits (`galaxy run --seq-len N --check`): its reply is the
largest thing a worker holds after its weights, and the memory model counts it (memory.output_bytes,
OUTPUT_COPIES). Measured from outside the worker, through the reply's serialization and gRPC's copy
of it -- which the worker's own peak (taken before it returns) does not see -- the growth of its
resident set must stay within what it admitted the pass by (memory.request_need + RUN_SLACK)."""

from __future__ import annotations

import psutil
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.parallel import memory
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import even_partition
from galaxy.transport.client import Cluster
from galaxy.transport.spawn import LocalWorkers

# The logits dominate: a 49,152-row vocabulary (SmolLM2's) over a thin model, 1,024 tokens.
WIDE = make_config("llama", vocab_size=49152, hidden=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn=128,
                   max_positions=1024, name="wide-vocab")
SEQ = 1024


def _hwm(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_budgeted_workers_full_logits_pass_grows_it_by_no_more_than_the_memory_model_admits():
    part = even_partition(WIDE, 2)
    req = Request(torch.randint(0, WIDE.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(0)))
    lw = LocalWorkers(2, threads=1, extra_args=["--memory-budget", "1GiB"])
    with lw as addrs, Cluster(addrs) as c:
        c.load(RandomWeights(WIDE, seed=1), part, LoadOptions(seq_len=SEQ))
        c.forward(req)  # gRPC's buffers and the allocator's arenas settle on the first pass
        procs = [psutil.Process(p.pid) for p in lw.procs]
        before = []
        for p in procs:
            open(f"/proc/{p.pid}/clear_refs", "w").write("5")  # VmHWM := the current resident set
            before.append(p.memory_info().rss)
        out = c.forward(req).output
        growth = [_hwm(p.pid) - b for p, b in zip(procs, before)]
    assert out.shape == (SEQ, WIDE.vocab_size)
    model = [memory.request_need(WIDE, part, r, 4, req) + memory.RUN_SLACK for r in range(2)]
    logits = [SEQ * part.vocab[r] * 4 for r in range(2)]
    print(f"\nfull-logits pass, {SEQ} tokens: growth {[g >> 20 for g in growth]} MiB, modelled "
          f"{[m >> 20 for m in model]} MiB, logits {[b >> 20 for b in logits]} MiB; "
          f"growth / logits {[round(g / b, 2) for g, b in zip(growth, logits)]}")
    assert all(g <= m for g, m in zip(growth, model)), (growth, model)
