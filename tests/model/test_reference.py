"""The reference forward itself: against transformers (tiny models of every family and the real
MiniLM), and against known behaviour of the embedded real models."""

from __future__ import annotations

import pytest
import torch

from galaxy.model.checkpoints import open_checkpoint
from galaxy.model.transformer import mean_pool
from galaxy.parallel.sharding import full_spec, load_shard

# small forwards: a second intra-op thread only spins (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

T = pytest.importorskip("transformers", reason="transformers (test extra) cross-checks our forward")

XCHECK_TOL = 1e-5  # fp32 max abs error against transformers


def _tiny_hf(family: str):
    V, H, L, NH, F, P = 99, 32, 2, 4, 37, 40
    cfgs = {
        "bert": ("BertModel", T.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                           num_attention_heads=NH, intermediate_size=F,
                                           max_position_embeddings=P)),
        "distilbert": ("DistilBertModel", T.DistilBertConfig(vocab_size=V, dim=H, n_layers=L, n_heads=NH,
                                                             hidden_dim=F, max_position_embeddings=P)),
        "gpt2": ("GPT2LMHeadModel", T.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=NH,
                                                 n_positions=P)),
        "opt": ("OPTForCausalLM", T.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                              num_attention_heads=NH, ffn_dim=F, max_position_embeddings=P,
                                              word_embed_proj_dim=H)),
        "llama": ("LlamaForCausalLM", T.LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                    num_attention_heads=NH, num_key_value_heads=2,
                                                    intermediate_size=F, max_position_embeddings=P,
                                                    tie_word_embeddings=False)),
    }
    cls, cfg = cfgs[family]
    model = getattr(T, cls)(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms and biases too
            base = 1.0 if ("norm" in name.lower() and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "opt", "llama"])
def test_reference_forward_matches_transformers(family, tmp_path):
    hf = _tiny_hf(family)
    hf.save_pretrained(tmp_path)
    src = open_checkpoint(tmp_path)
    ours = load_shard(src, full_spec(src.config))
    ids = torch.randint(0, 99, (23,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(ids[None])
    want = (out.logits if src.config.causal else out.last_hidden_state)[0]
    err = (ours(ids) - want).abs().max().item()
    assert err <= XCHECK_TOL, f"{family}: {err}"


@pytest.fixture(scope="module")
def minilm(minilm_path):
    src = open_checkpoint(minilm_path)
    return src, load_shard(src, full_spec(src.config))


def _embed(src, model, text):
    return mean_pool(model(torch.tensor(src.tokenizer().encode(text))))


def test_minilm_matches_transformers_bert(minilm, minilm_path):
    src, model = minilm
    hf = T.BertModel.from_pretrained(minilm_path).eval()
    ids = src.tokenizer().encode("Galaxy splits one transformer across several small devices.")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).last_hidden_state[0]
    assert (model(torch.tensor(ids)) - want).abs().max().item() <= XCHECK_TOL


def test_minilm_similarity_ranks_related_sentences_first(minilm):
    src, model = minilm
    q = _embed(src, model, "How do I bake bread at home?")
    related = _embed(src, model, "A simple recipe for homemade bread.")
    unrelated = _embed(src, model, "The stock market fell sharply on Tuesday.")
    assert float(q @ related) > float(q @ unrelated) + 0.2


def test_minilm_pinned_embedding_values(minilm):
    """The published sentence-transformers embedding of "hello world" starts with these values."""
    src, model = minilm
    e = _embed(src, model, "hello world")
    assert e.shape == (384,) and abs(float(e.norm()) - 1.0) < 1e-5
    torch.testing.assert_close(e[:4], torch.tensor(PINNED_MINILM_HELLO), atol=1e-5, rtol=0)


PINNED_MINILM_HELLO = [-0.034477, 0.031023, 0.006735, 0.026109]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    src = open_checkpoint(smollm2_path)
    return src, load_shard(src, full_spec(src.config))


def _greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):  # full recompute: the reference has no KV cache on purpose
        ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    return ids


def test_smollm2_greedy_continuation_names_paris(smollm2):
    src, model = smollm2
    tok = src.tokenizer()
    prompt = tok.encode("The capital of France is")
    text = tok.decode(_greedy(model, prompt, 4)[len(prompt):])
    assert "Paris" in text, text


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, request):
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    src, model = smollm2
    hf = request.getfixturevalue("hf_smollm2")  # transformers' own GGUF loading, once per session (conftest)
    ids = src.tokenizer().encode("<|im_start|>user\nWhat is two plus two?<|im_end|>")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (model(torch.tensor(ids)) - want).abs().max().item() <= 1e-4
