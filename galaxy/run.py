"""What `galaxy run` does, as functions: pick a model source, build the input, run, check.

The CLI (cli.py) only parses arguments and prints; everything here is callable from code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .checkpoints import WeightSource, open_checkpoint
from .checkpoints.random import RandomWeights
from .config import preset
from .defaults import resolve_model
from .parallel import Request
from .sharding import Partition, full_spec, load_shard

DEFAULT_PROMPT = "The capital of France is"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_source(model: str | None = None, random_init: str | None = None, seed: int = 0) -> WeightSource:
    """A weight source: a random-init preset, a path, or an embedded default ('smollm2', 'minilm')."""
    if random_init is not None:
        return RandomWeights(preset(random_init), seed=seed)
    return open_checkpoint(resolve_model(model))


def make_request(source: WeightSource, prompt: str | None = None, input_ids: list[int] | None = None,
                 seq_len: int | None = None, seed: int = 0) -> tuple[Request, str]:
    """Token ids from explicit ids, a prompt (through the model's tokenizer) or random ids."""
    cfg = source.config
    if input_ids is not None:
        ids, how = list(input_ids), "input-ids"
    elif prompt is not None or (seq_len is None and source.tokenizer() is not None):
        tok = source.tokenizer()
        if tok is None:
            raise ValueError(f"{source.path} has no tokenizer; pass --input-ids or --seq-len instead")
        ids, how = tok.encode(prompt if prompt is not None else DEFAULT_PROMPT), "prompt"
    else:
        g = torch.Generator().manual_seed(seed)
        ids, how = torch.randint(0, cfg.vocab_size, (seq_len or 128,), generator=g).tolist(), "random"
    if not ids:
        raise ValueError("the input is empty: give a non-empty prompt or --input-ids")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(f"input ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    limit = cfg.max_positions
    if len(ids) > limit:
        raise ValueError(f"input has {len(ids)} tokens; the model allows at most {limit}")
    return Request(torch.tensor(ids, dtype=torch.long)), how


def reference_output(source: WeightSource, req: Request, dtype=torch.float32) -> torch.Tensor:
    """The single-device forward, the yardstick for every parallel run."""
    model = load_shard(source, full_spec(source.config), dtype=dtype)
    return model(req.ids, req.types, req.start_pos)


@dataclass
class RunResult:
    output: torch.Tensor  # logits (S, V) or hidden states (S, H), float32
    partition: Partition
    seconds: dict = field(default_factory=dict)  # phase -> wall seconds
    per_device: list = field(default_factory=list)  # per-rank stats dicts


def run_inprocess_model(source: WeightSource, partition: Partition, req: Request, tiles: int = 1,
                        dtype=torch.float32) -> RunResult:
    """Load one shard per rank in this process and run the forward on threads."""
    from .inproc import run_inprocess

    cfg = source.config
    t0 = time.perf_counter()
    models = [load_shard(source, partition.spec(r, cfg), dtype=dtype) for r in range(partition.world)]
    t1 = time.perf_counter()
    out, comms = run_inprocess(models, partition, req, tiles=tiles)
    t2 = time.perf_counter()
    stats = [
        {"rank": r, "wait_s": c.stats.wait_s, "compute_s": c.stats.compute_s,
         "bytes_sent": c.stats.bytes_sent, "messages": c.stats.messages}
        for r, c in enumerate(comms)
    ]
    return RunResult(out.float(), partition, {"load": t1 - t0, "forward": t2 - t1}, stats)
