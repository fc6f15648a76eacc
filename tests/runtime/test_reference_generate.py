"""The single-device reference that every parallel run is checked against (runtime/sources.py)."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import full_spec, load_shard
from galaxy.runtime.sources import reference_generate


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-opt", "tiny-llama"])
def test_reference_greedy_with_dense_kv_is_the_whole_sequence_recomputed_every_step(name):
    """The cached decode must be the same reference: the tokens of the plain forward re-run over the
    whole sequence for each new token: learned positions (GPT-2, OPT's offset) and RoPE (Llama)."""
    src = RandomWeights(preset(name), seed=5, std=0.2)  # peaked logits: no near-ties
    prompt = torch.randint(0, src.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    model = load_shard(src, full_spec(src.config))
    ids, want = list(prompt), []
    for _ in range(40):
        want.append(int(model(torch.tensor(ids), last_only=True)[-1].argmax()))
        ids.append(want[-1])
    assert reference_generate(src, prompt, 40, stop_at_eos=False) == want


def test_reference_greedy_stops_at_the_models_end_of_sequence_token():
    src = RandomWeights(preset("tiny-gpt2"), seed=5, std=0.2)
    prompt = [3, 1, 4, 1, 5]
    free = reference_generate(src, prompt, 12, stop_at_eos=False)
    eos = free[4]
    stopped = reference_generate(RandomWeights(src.config.replace(eos_token_id=eos), seed=5, std=0.2), prompt, 12)
    assert stopped == free[: free.index(eos)]
