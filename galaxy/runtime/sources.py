"""Pieces of `galaxy run` callable from code: pick a model source, build the input, the
single-device references a run is checked against, and the per-layer overlap report."""

from __future__ import annotations

import torch

from ..errors import InvalidRequest
from ..model.checkpoints import WeightSource, open_checkpoint
from ..model.checkpoints.random import RandomWeights
from ..model.config import preset
from ..model.defaults import resolve_model
from ..model.quant import parse_format
from ..parallel.compact import compact_shard
from ..parallel.forward import Request
from ..parallel.sharding import full_spec, load_shard

DEFAULT_PROMPT = "The capital of France is"


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
            raise InvalidRequest(f"{source.path} has no tokenizer; pass --input-ids or --seq-len instead")
        ids, how = tok.encode(prompt if prompt is not None else DEFAULT_PROMPT), "prompt"
    else:
        g = torch.Generator().manual_seed(seed)
        ids, how = torch.randint(0, cfg.vocab_size, (seq_len or 128,), generator=g).tolist(), "random"
    if not ids:
        raise InvalidRequest("the input is empty: give a non-empty prompt or --input-ids")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise InvalidRequest(f"input ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    limit = cfg.max_positions
    if len(ids) > limit:
        raise InvalidRequest(f"input has {len(ids)} tokens; the model allows at most {limit}")
    return Request(torch.tensor(ids, dtype=torch.long)), how


def reference_model(source: WeightSource, dtype=torch.float32, weights_format: str = "fp32"):
    """The single-device model, its linears in `weights_format` (parallel/compact.py) as the devices hold them."""
    return compact_shard(load_shard(source, full_spec(source.config), dtype=dtype), source,
                         parse_format(weights_format))


def reference_output(source: WeightSource, req: Request, dtype=torch.float32, weights_format: str = "fp32"
                     ) -> torch.Tensor:
    """The single-device forward in the same dtype and weights format, the yardstick for every parallel run."""
    model = reference_model(source, dtype, weights_format)
    return model(req.ids, req.types, req.start_pos)


@torch.inference_mode()
def reference_generate(source: WeightSource, prompt_ids: list[int], max_new_tokens: int,
                       stop_at_eos: bool = True, weights_format: str = "fp32") -> list[int]:
    """Greedy tokens from the single-device model in `weights_format`. Each token is computed once, its
    K and V kept in plain per-layer tensors (`_dense_step`) rather than the whole sequence recomputed
    every step (16 tokens after a 37-token prompt: 52 token-passes instead of 712); the dense tensors
    share no code with the engine's paged cache, which this checks."""
    model = reference_model(source, weights_format=weights_format)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    ids, out = list(prompt_ids), []
    step, start = torch.tensor(ids), 0
    for _ in range(max_new_tokens):
        tok = int(_dense_step(model, step, start, cache)[-1].argmax())
        if stop_at_eos and tok == source.config.eos_token_id:
            break
        out.append(tok)
        start += int(step.shape[0])
        step = torch.tensor([tok])
    return out


def _dense_step(model, ids: torch.Tensor, start: int, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The reference forward (Transformer.forward: the same blocks in the same order) of the tokens
    `ids` at positions start.., attending to the K/V of earlier positions kept in `cache` (one
    (nkv, positions, hd) pair per layer, extended here): the last token's logits (1, V)."""
    pos = torch.arange(start, start + ids.shape[0])
    x = model.embed.finish(model.embed.lookup(ids), pos, None)
    for i, blk in enumerate(model.layers.values()):
        att = blk.attn
        q, k, v = att.split_heads(att.project(blk.attn_input(x)), start)  # (nq|nkv, S, hd)
        if i < len(cache):
            k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)  # (nkv, start + S, hd)
            cache[i] = (k, v)
        else:
            cache.append((k, v))
        x = blk.after_attn(x, att.project_out(att.attend_heads(q, k, v, start)))
        x = blk.after_mlp(x, blk.mlp.contract(blk.mlp.expand(blk.mlp_input(x))))
    if model.final_norm is not None:
        x = model.final_norm(x)
    return model.head_logits(x[-1:])
