"""Generation through the serving engine on split models: greedy tokens equal the single-device
reference, alone and batched with other requests; chunked prefill, the prefix cache and preemption
change the work, never the answer; the KV pool holds only each device's heads."""

from __future__ import annotations

import threading

import pytest
import torch

from galaxy.engine.engine import Engine, EngineConfig
from galaxy.engine.generation import GenerationConfig
from galaxy.engine.sampling import Sampler, SamplingConfig
from galaxy.engine.step_cost import StepCost
from galaxy.errors import GalaxyError, InvalidRequest
from galaxy.model.checkpoints import open_checkpoint
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.sharding import even_partition, weighted_partition
from galaxy.runtime.inproc import InprocCluster
from galaxy.runtime.sources import reference_generate

# in-process ranks, three threads on two cores: a second intra-op thread only spins (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def engines():
    made = []

    def make(src, partition, config=EngineConfig()):
        ex = InprocCluster(partition.world)
        ex.load(src, partition)
        engine = Engine(ex, src.config, src.tokenizer(), config)
        made.append((engine, ex))
        return ex, engine

    yield make
    for engine, ex in made:
        engine.close()
        ex.close()


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m"])
def test_greedy_64_tokens_match_reference_on_random_gpt2_and_llama_shapes(engines, name):
    src = RandomWeights(preset(name).replace(n_layers=4), seed=11, std=0.2)  # peaked logits: no near-ties
    cfg = src.config
    prompt = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference_generate(src, prompt, 64, stop_at_eos=False)
    _, engine = engines(src, weighted_partition(cfg, [1.0, 2.0, 1.5]))
    got = engine.generate(prompt, GenerationConfig(64, stop_at_eos=False))
    assert got.tokens == want and got.finish == "length"
    assert {s.collective for s in got.steps if s.phase == "decode"} == {"direct all-reduce (1 hop)"}
    assert got.ttft_s > 0 and got.per_token_s > 0 and len(got.token_times) == 64


def test_concurrent_requests_each_get_their_tokens_alone_batched_with_chunks_and_preemption(engines):
    """Eight requests from eight threads at once on a pool too small for all of them: the steps mix
    decodes with prompt chunks, some sequences are preempted and run again, and every request still
    gets exactly its single-device greedy tokens."""
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    cfg = src.config
    gen = torch.Generator().manual_seed(2)
    lengths = (3, 17, 9, 25, 5, 12, 1, 20)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    want = [reference_generate(src, p, 12, stop_at_eos=False) for p in prompts]
    small = EngineConfig(block_size=4, max_batched_tokens=16, chunk_size=6, max_running=8, kv_blocks=24)
    _, engine = engines(src, weighted_partition(cfg, [2, 1, 1]), small)
    got: list = [None] * len(prompts)

    def ask(i):
        got[i] = engine.generate(prompts[i], GenerationConfig(12, stop_at_eos=False))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [g.tokens for g in got] == want
    assert engine.sched.num_preemptions > 0  # the pool was too small: some sequences ran their tokens again
    assert max(s.batch_tokens for g in got for s in g.steps) > 1  # requests shared steps
    assert any(s.phase == "prefill" and s.tokens == 6 for g in got for s in g.steps)  # prompts came in chunks


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return open_checkpoint(smollm2_path)


def test_default_model_64_greedy_tokens_match_reference(engines, smollm2):
    prompt = smollm2.tokenizer().encode("The capital of France is")
    want = reference_generate(smollm2, prompt, 64)
    _, engine = engines(smollm2, even_partition(smollm2.config, 3))
    got = engine.generate(prompt, GenerationConfig(64))
    assert got.tokens == want[: len(got.tokens)] and "Paris" in got.text


def test_each_device_holds_only_its_own_kv_heads(engines, smollm2):
    cfg = smollm2.config  # 3 KV heads; a 4/3/2 split of 9 query heads touches KV groups {0,1}, {1,2}, {2}
    ex, engine = engines(smollm2, weighted_partition(cfg, [4, 3, 2]))
    out = engine.generate(smollm2.tokenizer().encode("Hello"), GenerationConfig(3))
    assert [rt.model.layers["0"].attn.nkv for rt in ex.runtimes] == [2, 2, 1]
    per_head = out.kv_cache_bytes[2]
    assert per_head > 0 and out.kv_cache_bytes == [2 * per_head, 2 * per_head, per_head]


def test_chunked_prefill_equals_unchunked(engines, smollm2):
    prompt = smollm2.tokenizer().encode("Chunked prefill keeps activation memory bounded on small devices, so")
    _, engine = engines(smollm2, weighted_partition(smollm2.config, [1, 1, 2]), EngineConfig(prefix_caching=False))
    whole = engine.generate(prompt, GenerationConfig(12))
    chunked = engine.generate(prompt, GenerationConfig(12, prefill_chunk=5))
    assert [s.tokens for s in chunked.steps if s.phase == "prefill"] == [
        min(5, len(prompt) - i) for i in range(0, len(prompt), 5)]
    assert chunked.tokens == whole.tokens and chunked.reused_prefix == 0


def test_prefix_cache_reuses_a_repeated_system_prompt(engines, smollm2):
    tok = smollm2.tokenizer()
    system = [{"role": "system", "content": "You are a helpful assistant for a smart home, brief and exact."}]
    ask = lambda q: tok.encode(tok.apply_chat_template(system + [{"role": "user", "content": q}]))  # noqa: E731
    _, engine = engines(smollm2, even_partition(smollm2.config, 3))
    first = engine.generate(ask("Turn on the lights."), GenerationConfig(6))
    second = engine.generate(ask("What is the temperature?"), GenerationConfig(6))
    system_tokens = len(tok.encode(tok.apply_chat_template(system, add_generation_prompt=False)))
    bs = engine.config.block_size
    assert first.reused_prefix == 0 and second.reused_prefix >= system_tokens // bs * bs > 0
    assert sum(s.tokens for s in second.steps if s.phase == "prefill") == len(ask("What is the temperature?")) \
        - second.reused_prefix
    _, cold = engines(smollm2, even_partition(smollm2.config, 3), EngineConfig(prefix_caching=False))
    assert second.tokens == cold.generate(ask("What is the temperature?"), GenerationConfig(6)).tokens


def test_stop_strings_and_eos_end_generation(engines, smollm2):
    _, engine = engines(smollm2, even_partition(smollm2.config, 2))
    prompt = smollm2.tokenizer().encode("The capital of France is")
    out = engine.generate(prompt, GenerationConfig(30, stop=("\n",)))
    assert out.finish == "stop" and "\n" not in out.text and out.text.strip().startswith("Paris")
    eos = engine.generate(smollm2.tokenizer().encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"),
                          GenerationConfig(60))
    assert eos.finish == "eos"


def test_cancel_frees_the_blocks_at_once_and_bad_requests_are_refused_without_touching_others(engines):
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    _, engine = engines(src, even_partition(src.config, 2), EngineConfig(block_size=4, kv_blocks=16))
    stream = engine.submit(list(range(1, 9)), GenerationConfig(40, stop_at_eos=False))
    next(iter(stream))  # running: it holds blocks
    with pytest.raises(InvalidRequest, match="outside"):
        engine.submit([src.config.vocab_size + 5], GenerationConfig(3))
    stream.cancel()
    assert stream.result().finish == "abort" and engine.load["kv_blocks_used"] == 0
    assert len(engine.generate([1, 2, 3], GenerationConfig(4, stop_at_eos=False)).tokens) == 4  # still serving
    engine.close()
    with pytest.raises(GalaxyError, match="closed"):
        engine.submit([1], GenerationConfig(1))


def test_sampling_is_reproducible_by_seed_and_respects_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    draw = lambda **kw: [Sampler(SamplingConfig(**kw))(logits) for _ in range(1)]  # noqa: E731
    assert draw(temperature=1.0, seed=7) == draw(temperature=1.0, seed=7)
    s = Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=1))
    assert all(s(logits) == int(logits.argmax()) for _ in range(20))
    top3 = set(torch.topk(logits, 3).indices.tolist())
    s = Sampler(SamplingConfig(temperature=2.0, top_k=3, seed=2))
    assert {s(logits) for _ in range(200)} <= top3
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingConfig(top_p=0)


class FixedCost(StepCost):
    """A step-cost line that does not move: the stall bound's chunk is then known in advance."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.fit = (a, b)

    def observe(self, tokens: int, seconds: float) -> None:
        pass

    def observe_shape(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        pass


def _long_prompt_beside_a_stream(engines, config: EngineConfig, n_stream: int):
    """A 6-token prompt streams n_stream tokens; once it decodes, a 57-token prompt arrives. The engine's
    cost line is fixed (a = 0.2 s, b = 0.01 s/token). Returns the two generations and their reference tokens."""
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    cfg = src.config
    gen = torch.Generator().manual_seed(5)
    short = torch.randint(0, cfg.vocab_size, (6,), generator=gen).tolist()
    long = torch.randint(0, cfg.vocab_size, (57,), generator=gen).tolist()
    want = [reference_generate(src, p, n, stop_at_eos=False) for p, n in ((short, n_stream), (long, 4))]
    _, engine = engines(src, even_partition(cfg, 2), config)
    engine.cost = FixedCost(0.2, 0.01)
    stream = engine.submit(short, GenerationConfig(n_stream, stop_at_eos=False))
    events = iter(stream)  # kept: an iteration broken off would cancel the request
    next(events)  # the stream decodes before the long prompt arrives
    late = engine.generate(long, GenerationConfig(4, stop_at_eos=False))
    assert sum(s.tokens for s in late.steps if s.phase == "prefill") == len(long)
    return stream.result(), late, want


def test_a_long_prompt_beside_a_stream_runs_in_chunks_the_stall_bound_allows_and_changes_no_token(engines):
    """A step carrying prompt tokens beside a running stream takes at most max_stall x its decode-only
    step on the learnt cost line (here a = 0.2 s, b = 0.01 s/token: 1 decode + 10 prompt tokens at
    max_stall 1.5); a step with no stream decoding takes the whole budget; tokens are unchanged."""
    first, late, want = _long_prompt_beside_a_stream(
        engines, EngineConfig(max_batched_tokens=64, max_stall=1.5, min_chunk=4), 40)
    assert [first.tokens, late.tokens] == want
    beside = [s.tokens for s in late.steps if s.phase == "prefill" and s.batch_tokens > s.tokens]
    assert beside and all(n <= 10 for n in beside)


@pytest.mark.parametrize("objective", [{"itl_target": 1.5, "min_chunk": 2},
                                       {"max_stall": None, "tpot_target": 3.0, "min_chunk": 2}])
def test_a_long_prompt_under_an_objective_bound_runs_in_the_chunks_it_allows_and_changes_no_token(engines, objective):
    """The objective bounds (itl_target: every gap; tpot_target: the streams' mean, bursts from their slack)
    only choose how many prompt tokens ride beside the stream; every token is the one it gets alone."""
    first, late, want = _long_prompt_beside_a_stream(engines, EngineConfig(max_batched_tokens=64, **objective), 30)
    assert [first.tokens, late.tokens] == want


def test_greedy_and_seeded_requests_sampled_in_one_step_each_get_what_they_get_alone(engines):
    """The greedy rows of a step are sampled by one argmax over all of them; a seeded sampler in the
    same step still draws its own tokens."""
    src = RandomWeights(preset("tiny-llama"), seed=3, std=0.3)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, src.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 8, 11)]
    configs = [GenerationConfig(12, SamplingConfig(), stop_at_eos=False),
               GenerationConfig(12, SamplingConfig(temperature=0.9, top_k=20, seed=4), stop_at_eos=False),
               GenerationConfig(12, SamplingConfig(), stop_at_eos=False)]
    _, engine = engines(src, even_partition(src.config, 2))
    alone = [engine.generate(p, c).tokens for p, c in zip(prompts, configs)]
    streams = [engine.submit(p, c) for p, c in zip(prompts, configs)]
    together = [s.result() for s in streams]
    assert [g.tokens for g in together] == alone
    assert max(s.batch_tokens for g in together for s in g.steps) > 1  # they did share steps
