"""Pieces of `galaxy run` callable from code: pick a model source, build the input, the
single-device references a run is checked against, and the per-layer overlap report."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import WeightSource, open_checkpoint
from .checkpoints.random import RandomWeights
from .config import preset
from .defaults import resolve_model
from .parallel import Request
from .sharding import full_spec, load_shard

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


@torch.inference_mode()
def reference_generate(source: WeightSource, prompt_ids: list[int], max_new_tokens: int,
                       stop_at_eos: bool = True) -> list[int]:
    """Greedy tokens from the single-device model, recomputing the whole sequence every step
    (no KV cache: independent of the cache code it checks)."""
    model = load_shard(source, full_spec(source.config))
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        tok = int(model(torch.tensor(ids), last_only=True)[-1].argmax())
        if stop_at_eos and tok == source.config.eos_token_id:
            break
        out.append(tok)
        ids.append(tok)
    return out


def model_ref(source: WeightSource):
    """How workers find the same weights: the checkpoint path, or the random-init recipe."""
    from .rpc.client import ModelRef

    if isinstance(source, RandomWeights):
        return ModelRef(source.config, random_init=True, seed=source.seed, std=source.std)
    return ModelRef(source.config, path=str(Path(source.path).resolve()))


def busy_seconds(devices: list[dict]) -> list[float]:
    """Per device of a parallel pass (ForwardResult.devices), its own work: its forward minus the
    time it sat blocked waiting for a peer. Equal on every device when the split is balanced."""
    return [d["forward_s"] - sum(op[2] for op in d["ops"]) for d in devices]


def layer_overlap(devices: list[dict], s_per_byte: list[float] | None = None) -> list[dict]:
    """Per layer, averaged over devices: communication time, the part compute did not hide.

    comm_s is the wire time of the bytes each device sent: bytes at the measured rate of the link
    it sends on (s_per_byte, per device in rank order), or, without rates, its time handing them to
    the transport -- over TCP that returns once the socket buffer holds them, so it is a lower
    bound. exposed_s is the time ranks sat blocked waiting for a peer; hidden_s = comm_s -
    exposed_s (at least 0) is what tile overlap hid behind the GEMMs. Waiting also absorbs load
    imbalance, so hidden_s is a lower bound too.
    """
    layers: dict[str, dict] = {}
    for r, dev in enumerate(devices):
        spb = s_per_byte[r] if s_per_byte and r < len(s_per_byte) else 0.0
        for tag, wall, wait, compute, nbytes, send in dev["ops"]:
            name = tag.split(".")[0]
            row = layers.setdefault(name, {"layer": name, "wall_s": 0.0, "compute_s": 0.0, "comm_s": 0.0,
                                           "exposed_s": 0.0, "bytes": 0})
            row["wall_s"] += wall
            row["compute_s"] += compute
            row["comm_s"] += max(send, nbytes * spb) if spb else send
            row["exposed_s"] += wait
            row["bytes"] += nbytes
    n = max(1, len(devices))
    out = []
    for row in layers.values():
        for k in ("wall_s", "compute_s", "comm_s", "exposed_s"):
            row[k] /= n
        row["hidden_s"] = max(0.0, row["comm_s"] - row["exposed_s"])
        row["hidden_frac"] = row["hidden_s"] / row["comm_s"] if row["comm_s"] > 0 else 0.0
        out.append(row)
    return out
