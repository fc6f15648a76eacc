"""GGUFCheckpoint: config, tensors, slices and tokenizer against transformers' own GGUF loading,
plus a tiny GGUF written here from known tensors, and the errors a bad file gets."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from galaxy.model.checkpoints import CheckpointError, expected_shapes
from galaxy.model.checkpoints.gguf import GGUFCheckpoint, unpermute_rows
from galaxy.model.defaults import DefaultModelMissing, default_causal_lm_path

# ---- the embedded SmolLM2-135M-Instruct (Q4_1 with a Q8_0 embedding) ----


@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        return default_causal_lm_path()
    except DefaultModelMissing as e:
        pytest.skip(f"embedded SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def smol(smol_path) -> GGUFCheckpoint:
    return GGUFCheckpoint(smol_path)


@pytest.fixture(scope="module")
def hf_state(hf_smollm2) -> dict[str, torch.Tensor]:
    """transformers' own dequantized, un-permuted weights (the session's one load, conftest.hf_smollm2)."""
    return {k: v.detach() for k, v in hf_smollm2.state_dict().items()}


@pytest.fixture(scope="module")
def hf_tokenizer(smol_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


def hf_name(canonical: str) -> str:
    """Canonical name -> transformers LlamaForCausalLM state-dict key."""
    fixed = {
        "embed.tokens": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }
    if canonical in fixed:
        return fixed[canonical]
    _, i, rest = canonical.split(".", 2)
    part = {
        "attn.wq": "self_attn.q_proj.weight",
        "attn.wk": "self_attn.k_proj.weight",
        "attn.wv": "self_attn.v_proj.weight",
        "attn.wo": "self_attn.o_proj.weight",
        "mlp.w_gate": "mlp.gate_proj.weight",
        "mlp.w_up": "mlp.up_proj.weight",
        "mlp.w_down": "mlp.down_proj.weight",
        "norm1.weight": "input_layernorm.weight",
        "norm2.weight": "post_attention_layernorm.weight",
    }[rest]
    return f"model.layers.{i}.{part}"


def test_smol_config(smol):
    c = smol.config
    assert (c.family, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.ffn, c.vocab_size, c.max_positions, c.rope_theta) == (1536, 49152, 8192, 100000.0)
    assert c.tie_embeddings and "lm_head" not in smol.names()
    assert (c.bos_token_id, c.eos_token_id, c.norm_eps) == (1, 2, 1e-5)
    assert not (c.attn_bias or c.out_bias or c.mlp_bias)
    assert sorted(smol.names()) == sorted(expected_shapes(c))


def test_smol_tensors_match_transformers(smol, hf_state):
    for name in smol.names():
        ours, theirs = smol.get(name), hf_state[hf_name(name)]
        assert ours.shape == theirs.shape, name
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-6, f"{name}: max abs difference {err:.3g}"


@pytest.mark.parametrize(
    "name, dim, start, end",
    [
        ("embed.tokens", 0, 1000, 1234),
        ("embed.tokens", 1, 100, 388),
        ("layers.7.attn.wq", 0, 192, 448),  # heads 3..6: what the sharder asks for
        ("layers.7.attn.wq", 0, 10, 300),  # not head-aligned: covering heads are read then cut
        ("layers.7.attn.wk", 0, 64, 128),
        ("layers.7.attn.wk", 0, 33, 161),
        ("layers.7.attn.wk", 1, 17, 400),
        ("layers.7.attn.wo", 1, 64, 320),
        ("layers.7.mlp.w_down", 0, 5, 77),
        ("layers.7.mlp.w_gate", 1, 32, 96),
        ("layers.7.norm2.weight", 0, 100, 200),
        ("layers.7.attn.wq", 0, 70, 70),  # empty
        ("layers.7.attn.wv", 0, 64, 64),  # empty rows of a quantized matrix
        ("layers.7.mlp.w_up", 0, 0, 0),
        ("embed.tokens", 0, 49152, 49152),
    ],
)
def test_smol_slices(smol, name, dim, start, end):
    full = smol.get(name)
    torch.testing.assert_close(
        smol.get(name, dim, start, end), full.narrow(dim, start, end - start), rtol=0, atol=0
    )


def test_smol_tokenizer_matches_transformers(smol, hf_tokenizer):
    tok = smol.tokenizer()
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, False)
    texts = [
        "The capital of France is",
        "Hello, world!",
        "héllo wörld — “quotes” 😀\n\n  def f(x):\n\treturn x",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user")[0] == tok.token_to_id("<|im_start|>") == 1
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_smol_tokenizer_splits_digits(smol):
    """Digits become one token each, after SmolLM2's tokenizer.json (Digits(individual_digits) before
    ByteLevel) and llama.cpp's 'smollm' split. transformers' GGUF converter leaves out the Digits step,
    so on a run of spaces before a digit ("  12") it gives Ġ Ġ 1 2 where SmolLM2 gives ĠĠ 1 2."""
    tok = smol.tokenizer()
    t = tok.token_to_id
    assert tok.encode("12345") == [t(d) for d in "12345"]
    assert tok.encode("  12") == [t("ĠĠ"), t("1"), t("2")]
    assert tok.decode(tok.encode("pi is 3.14159, not  2024")) == "pi is 3.14159, not  2024"


def test_smol_chat_template(smol):
    text = smol.tokenizer().apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# ---- a tiny GGUF written here, as llama.cpp's converter would write it ----

TINY = {"hidden": 24, "layers": 2, "heads": 6, "kv_heads": 2, "head_dim": 4, "ffn": 40, "positions": 64}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for every byte (bytes_to_unicode), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in keep else chr(256 + extra)
        extra += b not in keep
    return [out[b] for b in range(256)]


def tiny_tokens() -> tuple[list[str], list[int], list[str]]:
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", *byte_symbols(), "Ġt", "he", "Ġthe"]
    return tokens, [3] + [1] * (len(tokens) - 1), merges


def write_tiny(path: Path, arch: str = "llama", tokenizer_model: str = "gpt2", extra: tuple = ()) -> dict:
    """A small GQA llama GGUF of F32 tensors; returns the canonical (HF-layout) originals."""
    tokens, types, merges = tiny_tokens()
    H, F, L, nh, nkv, hd = (TINY[k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "head_dim"))
    V = len(tokens)
    g = np.random.default_rng(0)

    def rand(*shape):
        return g.standard_normal(shape).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(TINY["positions"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    canon = {"embed.tokens": rand(V, H), "final_norm.weight": rand(H), "lm_head": rand(V, H)}
    w.add_tensor("token_embd.weight", canon["embed.tokens"])
    w.add_tensor("output_norm.weight", canon["final_norm.weight"])
    w.add_tensor("output.weight", canon["lm_head"])
    for i in range(L):
        layer = {
            "attn.wq": (rand(nh * hd, H), "attn_q", nh),
            "attn.wk": (rand(nkv * hd, H), "attn_k", nkv),
            "attn.wv": (rand(nkv * hd, H), "attn_v", None),
            "attn.wo": (rand(H, nh * hd), "attn_output", None),
            "mlp.w_gate": (rand(F, H), "ffn_gate", None),
            "mlp.w_up": (rand(F, H), "ffn_up", None),
            "mlp.w_down": (rand(H, F), "ffn_down", None),
            "norm1.weight": (rand(H), "attn_norm", None),
            "norm2.weight": (rand(H), "ffn_norm", None),
        }
        for name, (t, gname, permute_heads) in layer.items():
            canon[f"layers.{i}.{name}"] = t
            stored = llamacpp_permute(t, permute_heads) if permute_heads else t
            w.add_tensor(f"blk.{i}.{gname}.weight", stored)
    for gname, t in extra:
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(v) for k, v in canon.items()}


def test_tiny_roundtrip(tmp_path):
    want = write_tiny(tmp_path / "tiny.gguf")
    ck = GGUFCheckpoint(tmp_path / "tiny.gguf")
    c = ck.config
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn) == (2, 24, 6, 2, 4, 40)
    assert (c.vocab_size, c.rope_theta, c.norm_eps, c.tie_embeddings) == (260, 500000.0, 1e-6, False)
    assert sorted(ck.names()) == sorted(want)
    for name, t in want.items():
        torch.testing.assert_close(ck.get(name), t, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    for s, e in [(0, 24), (4, 12), (3, 21), (5, 6)]:  # aligned and not, across GQA heads of hd=4
        torch.testing.assert_close(ck.get("layers.1.attn.wq", 0, s, e), want["layers.1.attn.wq"][s:e])
    torch.testing.assert_close(ck.get("layers.0.attn.wk", 0, 2, 7), want["layers.0.attn.wk"][2:7])


def test_unpermute_inverts_llamacpp_permute():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    back = unpermute_rows(torch.from_numpy(llamacpp_permute(w, 3)), head_dim=8)
    assert torch.equal(back, torch.from_numpy(w))


def test_tiny_tokenizer_default_pre(tmp_path):
    write_tiny(tmp_path / "tiny.gguf")
    tok = GGUFCheckpoint(tmp_path / "tiny.gguf").tokenizer()
    the, eot = tok.token_to_id("Ġthe"), tok.token_to_id("<|endoftext|>")
    ids = tok.encode("he the<|endoftext|>")
    assert ids == [tok.token_to_id("he"), the, eot]
    assert tok.decode(ids) == "he the"


# ---- errors name the file and say what is wrong ----


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        GGUFCheckpoint(p)


def test_truncated(tmp_path):
    write_tiny(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (len(data) // 3, len(data) - 16):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated or corrupt"):
            GGUFCheckpoint(tmp_path / "cut.gguf")


def test_unsupported_arch(tmp_path):
    p = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"g\.gguf: GGUF architecture 'gpt2' is not supported.*llama"):
        GGUFCheckpoint(p)


def test_unknown_tensor(tmp_path):
    write_tiny(tmp_path / "t.gguf", extra=[("rope_freqs.weight", np.ones(2, np.float32))])
    with pytest.raises(CheckpointError, match=r"rope_freqs.*Llama 3\.1"):
        GGUFCheckpoint(tmp_path / "t.gguf")


def test_sentencepiece_tokenizer_not_supported(tmp_path):
    write_tiny(tmp_path / "sp.gguf", tokenizer_model="llama")
    ck = GGUFCheckpoint(tmp_path / "sp.gguf")
    with pytest.raises(
        CheckpointError, match=r"sp\.gguf: tokenizer\.ggml\.model='llama' is not supported yet"
    ):
        ck.tokenizer()


def test_a_shard_read_from_the_gguf_holds_only_its_own_bytes(smol):
    """Column cuts (down and output projections) are read as whole rows and narrowed: the slice
    must not keep the whole tensor alive, or every device holds ~1.8x its shard."""
    from galaxy.parallel.sharding import even_partition, load_shard, shard_bytes

    cfg = smol.config
    spec = even_partition(cfg, 4).spec(1, cfg)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in load_shard(smol, spec).state_dict().values()}
    assert sum(storages.values()) == shard_bytes(cfg, spec)
