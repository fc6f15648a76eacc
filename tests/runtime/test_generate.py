"""Generation across devices: greedy tokens equal the single-device reference, KV caches hold only
each device's heads, chunked prefill and the prefix cache change nothing but the work done."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints import open_checkpoint
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import even_partition, weighted_partition
from galaxy.runtime.generate import GenerationConfig, PrefixCache, TextGenerator
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sampling import Sampler, SamplingConfig
from galaxy.runtime.sources import reference_generate


def generator(src, partition, prefix=None):
    ex = InprocCluster(partition.world)
    ex.load(src, partition)
    return ex, TextGenerator(ex, src.tokenizer(), src.config, prefix)


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m"])
def test_greedy_64_tokens_match_reference_on_random_gpt2_and_llama_shapes(name):
    src = RandomWeights(preset(name).replace(n_layers=4), seed=11, std=0.2)  # peaked logits: no near-ties
    cfg = src.config
    prompt = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference_generate(src, prompt, 64, stop_at_eos=False)
    _, gen = generator(src, weighted_partition(cfg, [1.0, 2.0, 1.5]))
    got = gen.generate(prompt, GenerationConfig(64, stop_at_eos=False))
    assert got.tokens == want and got.finish == "length"
    assert {s.collective for s in got.steps if s.phase == "decode"} == {"direct all-reduce (1 hop)"}


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return open_checkpoint(smollm2_path)


def test_default_model_64_greedy_tokens_match_reference(smollm2):
    prompt = smollm2.tokenizer().encode("The capital of France is")
    want = reference_generate(smollm2, prompt, 64)
    _, gen = generator(smollm2, even_partition(smollm2.config, 3))
    got = gen.generate(prompt, GenerationConfig(64))
    assert got.tokens == want[: len(got.tokens)] and "Paris" in got.text


def test_each_device_caches_only_its_own_kv_heads(smollm2):
    cfg = smollm2.config  # 3 KV heads; a 4/3/2 split of 9 query heads touches KV groups {0,1}, {1,2}, {2}
    ex, gen = generator(smollm2, weighted_partition(cfg, [4, 3, 2]))
    out = gen.generate(smollm2.tokenizer().encode("Hello"), GenerationConfig(3))
    kv_heads = [rt.model.layers["0"].attn.nkv for rt in ex.runtimes]
    assert kv_heads == [2, 2, 1]
    per_head = out.kv_cache_bytes[2]
    assert out.kv_cache_bytes == [2 * per_head, 2 * per_head, per_head]


def test_chunked_prefill_equals_unchunked(smollm2):
    prompt = smollm2.tokenizer().encode("Chunked prefill keeps activation memory bounded on small devices, so")
    _, gen = generator(smollm2, weighted_partition(smollm2.config, [1, 1, 2]), PrefixCache(0))
    whole = gen.generate(prompt, GenerationConfig(12))
    chunked = gen.generate(prompt, GenerationConfig(12, prefill_chunk=5))
    assert [s.tokens for s in chunked.steps if s.phase == "prefill"] == [
        min(5, len(prompt) - i) for i in range(0, len(prompt), 5)]
    assert chunked.tokens == whole.tokens and chunked.reused_prefix == 0


def test_prefix_cache_reuses_a_repeated_system_prompt_and_stays_bounded(smollm2):
    tok = smollm2.tokenizer()
    system = [{"role": "system", "content": "You are a helpful assistant for a smart home."}]
    ask = lambda q: tok.encode(tok.apply_chat_template(system + [{"role": "user", "content": q}]))  # noqa: E731
    ex, gen = generator(smollm2, even_partition(smollm2.config, 3), PrefixCache(max_entries=2))
    first = gen.generate(ask("Turn on the lights."), GenerationConfig(6))
    second = gen.generate(ask("What is the temperature?"), GenerationConfig(6))
    system_tokens = len(tok.encode(tok.apply_chat_template(system, add_generation_prompt=False)))
    assert first.reused_prefix == 0 and second.reused_prefix >= system_tokens
    prefill = [s.tokens for s in second.steps if s.phase == "prefill"]
    assert prefill == [len(ask("What is the temperature?")) - second.reused_prefix]
    _, cold = generator(smollm2, even_partition(smollm2.config, 3), PrefixCache(0))
    fresh = cold.generate(ask("What is the temperature?"), GenerationConfig(6))
    assert second.tokens == fresh.tokens  # reuse changes the work, not the answer
    for q in ("a", "b", "c", "d"):
        gen.generate(ask(q), GenerationConfig(2))
    gen.generate(ask("e"), GenerationConfig(1))  # carries the pending drops to the devices
    assert all(len(rt.kv.caches) <= 3 for rt in ex.runtimes)  # 2 kept prefixes + the live sequence


def test_stop_strings_and_eos_end_generation(smollm2):
    _, gen = generator(smollm2, even_partition(smollm2.config, 2))
    prompt = smollm2.tokenizer().encode("The capital of France is")
    out = gen.generate(prompt, GenerationConfig(30, stop=("\n",)))
    assert out.finish == "stop" and "\n" not in out.text and out.text.strip().startswith("Paris")
    eos = gen.generate(smollm2.tokenizer().encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"),
                       GenerationConfig(60))
    assert eos.finish == "eos"


def test_sampling_is_reproducible_by_seed_and_respects_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    draw = lambda **kw: [Sampler(SamplingConfig(**kw))(logits) for _ in range(1)]  # noqa: E731
    assert draw(temperature=1.0, seed=7) == draw(temperature=1.0, seed=7)
    s = Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=1))
    assert all(s(logits) == int(logits.argmax()) for _ in range(20))
    top3 = set(torch.topk(logits, 3).indices.tolist())
    s = Sampler(SamplingConfig(temperature=2.0, top_k=3, seed=2))
    assert {s(logits) for _ in range(200)} <= top3
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
