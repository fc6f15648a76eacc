"""HFCheckpoint against tiny random transformers models of every family, and the embedded MiniLM.

Each family is saved by transformers itself (safetensors, sharded safetensors or pytorch_model.bin,
with and without the task-head prefix) and every canonical tensor is compared exactly with the
parameter of the live HF module it must come from.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from galaxy.model.checkpoints import CheckpointError, expected_shapes
from galaxy.model.checkpoints.hf import HFCheckpoint, _SafetensorsFile
from galaxy.model.config import ConfigError

T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V, H, L, NH, F, P = 99, 32, 2, 4, 37, 40  # odd vocab/ffn so off-by-one slices show


# ---------------------------------------------------------------- tiny models and their references


def _configs() -> dict:
    return {
        "bert": T.BertConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
            intermediate_size=F, max_position_embeddings=P, type_vocab_size=3,
        ),
        "distilbert": T.DistilBertConfig(
            vocab_size=V, dim=H, n_layers=L, n_heads=NH, hidden_dim=F, max_position_embeddings=P
        ),
        "gpt2": T.GPT2Config(
            vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=P, bos_token_id=0, eos_token_id=1
        ),
        "opt": T.OPTConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, ffn_dim=F,
            max_position_embeddings=P, word_embed_proj_dim=H,
        ),
        "llama": T.LlamaConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
            num_key_value_heads=2, intermediate_size=F, max_position_embeddings=P,
            tie_word_embeddings=False,
        ),
    }  # fmt: skip


# case id: (family, transformers class, how it is saved, config overrides)
CASES = {
    "bert": ("bert", "BertModel", "safetensors", {}),  # bare names, like all-MiniLM-L6-v2
    "bert-mlm-bin": ("bert", "BertForMaskedLM", "bin", {}),  # "bert." prefix
    "distilbert": ("distilbert", "DistilBertModel", "safetensors", {}),
    "distilbert-mlm": ("distilbert", "DistilBertForMaskedLM", "safetensors", {}),
    "gpt2-sharded": ("gpt2", "GPT2LMHeadModel", "sharded", {}),  # "transformer." prefix
    "gpt2-bare-bin": ("gpt2", "GPT2Model", "bin", {}),
    "opt": ("opt", "OPTForCausalLM", "safetensors", {}),  # "model.decoder."
    "opt-bare": ("opt", "OPTModel", "safetensors", {}),  # "decoder."
    "llama": ("llama", "LlamaForCausalLM", "safetensors", {}),
    "llama-tied-bin": ("llama", "LlamaForCausalLM", "bin", {"tie_word_embeddings": True}),
}


def _randomize(model, seed: int = 0):
    """Every parameter random (norms too), so a swapped norm or q|k|v block cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _save(model, d, how: str) -> None:
    if how == "bin":  # transformers 5 only writes safetensors; this is what older versions wrote
        model.config.save_pretrained(d)
        torch.save(model.state_dict(), d / "pytorch_model.bin")
    else:
        model.save_pretrained(d, max_shard_size="20KB" if how == "sharded" else "50GB")


def _build(case: str, d):
    """Save one CASES entry to `d`; returns (d, live HF model)."""
    family, cls, how, overrides = CASES[case]
    cfg = _configs()[family]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = _randomize(getattr(T, cls)(cfg).eval())
    _save(model, d, how)
    if how == "sharded":
        assert (d / "model.safetensors.index.json").is_file()
    return d, model


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Case id -> (directory, live HF model), each case saved once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            cache[case] = _build(case, tmp_path_factory.mktemp(case))
        return cache[case]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, build):
    """(case id, directory, live HF model) for every case."""
    return (request.param, *build(request.param))


def _lin(p: str, w: str, b: str, mod) -> dict:
    return {p + w: mod.weight} | ({p + b: mod.bias} if mod.bias is not None else {})


def _ln(p: str, mod) -> dict:
    return {p + ".weight": mod.weight} | ({p + ".bias": mod.bias} if mod.bias is not None else {})


def _ref_bert(m) -> dict:
    e = m.base_model.embeddings
    r = {"embed.tokens": e.word_embeddings.weight, "embed.positions": e.position_embeddings.weight,
         "embed.types": e.token_type_embeddings.weight, **_ln("embed.norm", e.LayerNorm)}  # fmt: skip
    for i, x in enumerate(m.base_model.encoder.layer):
        p, a = f"layers.{i}.", x.attention
        r |= _lin(p, "attn.wq", "attn.bq", a.self.query) | _lin(p, "attn.wk", "attn.bk", a.self.key)
        r |= _lin(p, "attn.wv", "attn.bv", a.self.value) | _lin(p, "attn.wo", "attn.bo", a.output.dense)
        r |= _lin(p, "mlp.w_up", "mlp.b_up", x.intermediate.dense)
        r |= _lin(p, "mlp.w_down", "mlp.b_down", x.output.dense)
        r |= _ln(p + "norm1", a.output.LayerNorm) | _ln(p + "norm2", x.output.LayerNorm)
    return r


def _ref_distilbert(m) -> dict:
    e = m.base_model.embeddings
    r = {"embed.tokens": e.word_embeddings.weight, "embed.positions": e.position_embeddings.weight,
         **_ln("embed.norm", e.LayerNorm)}  # fmt: skip
    for i, x in enumerate(m.base_model.transformer.layer):
        p, a = f"layers.{i}.", x.attention
        r |= _lin(p, "attn.wq", "attn.bq", a.q_lin) | _lin(p, "attn.wk", "attn.bk", a.k_lin)
        r |= _lin(p, "attn.wv", "attn.bv", a.v_lin) | _lin(p, "attn.wo", "attn.bo", a.out_lin)
        r |= _lin(p, "mlp.w_up", "mlp.b_up", x.ffn.lin1) | _lin(p, "mlp.w_down", "mlp.b_down", x.ffn.lin2)
        r |= _ln(p + "norm1", x.sa_layer_norm) | _ln(p + "norm2", x.output_layer_norm)
    return r


def _ref_gpt2(m) -> dict:
    b = m.base_model
    r = {"embed.tokens": b.wte.weight, "embed.positions": b.wpe.weight, **_ln("final_norm", b.ln_f)}
    for i, x in enumerate(b.h):
        p, w, bias = f"layers.{i}.", x.attn.c_attn.weight, x.attn.c_attn.bias  # w: Conv1D [in, 3H]
        for j, n in enumerate("qkv"):
            r[p + f"attn.w{n}"], r[p + f"attn.b{n}"] = w[:, j * H : (j + 1) * H].T, bias[j * H : (j + 1) * H]
        r[p + "attn.wo"], r[p + "attn.bo"] = x.attn.c_proj.weight.T, x.attn.c_proj.bias
        r[p + "mlp.w_up"], r[p + "mlp.b_up"] = x.mlp.c_fc.weight.T, x.mlp.c_fc.bias
        r[p + "mlp.w_down"], r[p + "mlp.b_down"] = x.mlp.c_proj.weight.T, x.mlp.c_proj.bias
        r |= _ln(p + "norm1", x.ln_1) | _ln(p + "norm2", x.ln_2)
    return r


def _ref_opt(m) -> dict:
    d = m.base_model.decoder
    r = {"embed.tokens": d.embed_tokens.weight, "embed.positions": d.embed_positions.weight,
         **_ln("final_norm", d.final_layer_norm)}  # fmt: skip
    for i, x in enumerate(d.layers):
        p, a = f"layers.{i}.", x.self_attn
        r |= _lin(p, "attn.wq", "attn.bq", a.q_proj) | _lin(p, "attn.wk", "attn.bk", a.k_proj)
        r |= _lin(p, "attn.wv", "attn.bv", a.v_proj) | _lin(p, "attn.wo", "attn.bo", a.out_proj)
        r |= _lin(p, "mlp.w_up", "mlp.b_up", x.fc1) | _lin(p, "mlp.w_down", "mlp.b_down", x.fc2)
        r |= _ln(p + "norm1", x.self_attn_layer_norm) | _ln(p + "norm2", x.final_layer_norm)
    return r


def _ref_llama(m) -> dict:
    b = m.base_model
    r = {"embed.tokens": b.embed_tokens.weight, "final_norm.weight": b.norm.weight}
    if not m.config.tie_word_embeddings:
        r["lm_head"] = m.lm_head.weight
    for i, x in enumerate(b.layers):
        p, a, f = f"layers.{i}.", x.self_attn, x.mlp
        r |= {p + "attn.wq": a.q_proj.weight, p + "attn.wk": a.k_proj.weight,
              p + "attn.wv": a.v_proj.weight, p + "attn.wo": a.o_proj.weight,
              p + "mlp.w_gate": f.gate_proj.weight, p + "mlp.w_up": f.up_proj.weight,
              p + "mlp.w_down": f.down_proj.weight, p + "norm1.weight": x.input_layernorm.weight,
              p + "norm2.weight": x.post_attention_layernorm.weight}  # fmt: skip
    return r


REFERENCE = {"bert": _ref_bert, "distilbert": _ref_distilbert, "gpt2": _ref_gpt2, "opt": _ref_opt,
             "llama": _ref_llama}  # fmt: skip


# ---------------------------------------------------------------- exactness


def test_every_canonical_tensor_equals_the_hf_parameter(saved):
    case, d, model = saved
    ck = HFCheckpoint(d)
    ref = REFERENCE[ck.config.family](model)
    assert ck.names() == list(expected_shapes(ck.config)) == list(ck._map)
    assert set(ref) == set(ck.names()), case
    for name in ck.names():
        got = ck.get(name)
        assert got.dtype == torch.float32
        assert torch.equal(got, ref[name].detach().float()), f"{case}: {name}"


def test_slices_equal_slices_of_the_full_tensor(saved):
    ck = HFCheckpoint(saved[1])
    for name in ck.names():
        full = ck.get(name)
        for dim in range(full.ndim):
            n = full.shape[dim]
            s, e = n // 3, n - n // 4
            got = ck.get(name, dim, s, e)
            assert torch.equal(got, full.narrow(dim, s, e - s)), f"{name} dim {dim} [{s}, {e})"
            assert got.is_contiguous()


def test_config_follows_config_json(saved):
    case, d, _ = saved
    cfg = HFCheckpoint(d).config
    assert (cfg.vocab_size, cfg.hidden, cfg.n_layers, cfg.n_heads) == (V, H, L, NH)
    assert cfg.name == d.name
    if cfg.family == "llama":
        assert cfg.n_kv_heads == 2
        assert cfg.tie_embeddings == ("tied" in case)


def test_fused_gpt2_slice_reads_only_its_block_of_c_attn(build, monkeypatch):
    reads = []
    real = _SafetensorsFile.read

    def spy(f, key, index):
        t = real(f, key, index)
        reads.append(tuple(t.shape))
        return t

    monkeypatch.setattr(_SafetensorsFile, "read", spy)
    ck = HFCheckpoint(build("gpt2-sharded")[0])
    ck.get("layers.0.attn.wk", 0, 3, 7)  # rows of wk = columns H+3..H+7 of c_attn [in, 3H]
    ck.get("layers.1.attn.wv", 1, 2, 5)  # inputs 2..5 of wv = rows 2..5, columns 2H..3H
    ck.get("layers.0.attn.bq", 0, 0, 8)
    assert reads == [(H, 4), (3, H), (8,)]


def test_bfloat16_weights_come_out_float32(tmp_path):
    model = _randomize(T.LlamaForCausalLM(_configs()["llama"])).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ck = HFCheckpoint(tmp_path)
    w = model.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(ck.get("layers.1.attn.wk", 1, 3, 9), w[:, 3:9].float())


def test_gamma_beta_layernorm_names_are_accepted(tmp_path):
    model = _randomize(T.BertModel(_configs()["bert"]))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in model.state_dict().items()}  # fmt: skip
    assert any(k.endswith("gamma") for k in old)
    _write(tmp_path, model.config.to_dict(), old)
    ck = HFCheckpoint(tmp_path)
    assert torch.equal(ck.get("embed.norm.weight"), model.embeddings.LayerNorm.weight.detach())
    assert torch.equal(
        ck.get("layers.1.norm1.bias"), model.encoder.layer[1].attention.output.LayerNorm.bias.detach()
    )


# ---------------------------------------------------------------- errors


def _write(d, config: dict | None, tensors: dict | None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, d / "model.safetensors")


@pytest.fixture(scope="module")
def bert():
    """(config.json dict, state dict) of a tiny BertModel, to be broken by the error tests."""
    m = _randomize(T.BertModel(_configs()["bert"]))
    return m.config.to_dict(), {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_missing_directory_or_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HFCheckpoint(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        HFCheckpoint(tmp_path / "f")


def test_missing_or_invalid_config_json(tmp_path, bert):
    _write(tmp_path, None, bert[1])
    with pytest.raises(CheckpointError, match=r"no config\.json.*save_pretrained"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        HFCheckpoint(tmp_path)


def test_unsupported_model_type_or_missing_field(tmp_path, bert):
    _write(tmp_path, {**bert[0], "model_type": "t5"}, bert[1])
    with pytest.raises(ConfigError, match=r"config\.json.*model_type='t5' is not supported"):
        HFCheckpoint(tmp_path)
    _write(tmp_path, {k: v for k, v in bert[0].items() if k != "hidden_size"}, None)
    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'hidden_size'"):
        HFCheckpoint(tmp_path)


def test_missing_weights_file(tmp_path, bert):
    _write(tmp_path, bert[0], None)
    with pytest.raises(CheckpointError, match=r"no weights found.*model\.safetensors.*pytorch_model\.bin"):
        HFCheckpoint(tmp_path)


def test_corrupt_weights_or_missing_shard(tmp_path, bert):
    _write(tmp_path, bert[0], None)
    (tmp_path / "model.safetensors").write_bytes(b"garbage, not a header")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage, not a zip")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch weights file"):
        HFCheckpoint(tmp_path)
    index = {"weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"lists shard model-00001-of-00002\.safetensors, which is missing"
    ):
        HFCheckpoint(tmp_path)


def test_wrong_shape_names_the_hf_tensor(tmp_path, bert):
    key = "encoder.layer.1.attention.self.key.weight"
    _write(tmp_path, bert[0], {**bert[1], key: bert[1][key][:, :-1]})
    ck = HFCheckpoint(tmp_path)
    ck.get("layers.0.attn.wk")  # the others still load
    with pytest.raises(
        CheckpointError, match=rf"{key}' has shape \(32, 31\).*\(32, 32\).*layers\.1\.attn\.wk"
    ):
        ck.get("layers.1.attn.wk", 0, 0, 4)


def test_missing_tensor_names_the_hf_tensor_and_file(tmp_path, bert):
    key = "encoder.layer.0.output.LayerNorm.bias"
    _write(tmp_path, bert[0], {k: v for k, v in bert[1].items() if k != key})
    ck = HFCheckpoint(tmp_path)
    assert "layers.0.norm2.bias" not in ck.names()
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors: no tensor '{key}' \(Galaxy's layers\.0\.norm2\.bias\)"
    ):
        ck.get("layers.0.norm2.bias")


def test_weights_of_another_family_or_bad_request(tmp_path, bert):
    _write(tmp_path, bert[0], {f"foo.{k}": v for k, v in bert[1].items()})
    with pytest.raises(CheckpointError, match=r"no token embedding \('bert\.embeddings.*model_type='bert'"):
        HFCheckpoint(tmp_path)
    _write(tmp_path, bert[0], bert[1])
    ck = HFCheckpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no tensor 'lm_head' in a bert model"):
        ck.get("lm_head")
    with pytest.raises(CheckpointError, match="out of"):
        ck.get("embed.tokens", 1, 0, H + 1)


# ---------------------------------------------------------------- tokenizer


def _word_tokenizer(d, bos_post_processor: bool = False) -> None:
    """A tiny word-level tokenizer.json: <unk>=0, <s>=1, </s>=2, hello=3, world=4."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    if bos_post_processor:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tok.save(str(d / "tokenizer.json"))


@pytest.fixture
def llama_dir(tmp_path, build):
    """A fresh copy of the tiny Llama directory, to add tokenizer files to."""
    shutil.copytree(build("llama")[0], tmp_path / "m")
    return tmp_path / "m"


def test_no_tokenizer_json_gives_none(llama_dir):
    assert HFCheckpoint(llama_dir).tokenizer() is None


def test_tokenizer_meta_from_tokenizer_config(llama_dir):
    _word_tokenizer(llama_dir)
    eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False}
    meta = {"bos_token": "<s>", "eos_token": eos, "add_bos_token": True, "chat_template": "{{ bos_token }}x"}
    (llama_dir / "tokenizer_config.json").write_text(json.dumps(meta))
    tok = HFCheckpoint(llama_dir).tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, True)
    assert tok.encode("hello world") == [1, 3, 4]
    assert tok.apply_chat_template([]) == "<s>x"
    (llama_dir / "chat_template.jinja").write_text("from jinja")
    assert HFCheckpoint(llama_dir).tokenizer().chat_template == "from jinja"


def test_bos_added_once_when_the_post_processor_adds_it(llama_dir):
    _word_tokenizer(llama_dir, bos_post_processor=True)
    named = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    meta = {"bos_token": "<s>", "add_bos_token": True, "chat_template": named}
    (llama_dir / "tokenizer_config.json").write_text(json.dumps(meta))
    tok = HFCheckpoint(llama_dir).tokenizer()
    assert tok.add_bos is False
    assert tok.encode("hello world") == [1, 3, 4]
    assert tok.chat_template == "d"


def test_tokenizer_ids_fall_back_to_config_json(llama_dir):
    _word_tokenizer(llama_dir)
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1, "eos_token_id": [2, 4]}))
    tok = HFCheckpoint(llama_dir).tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos, tok.chat_template) == (1, 2, False, None)


def test_malformed_tokenizer_files(llama_dir):
    (llama_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizers library cannot load it"):
        HFCheckpoint(llama_dir).tokenizer()
    _word_tokenizer(llama_dir)
    (llama_dir / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: not valid JSON"):
        HFCheckpoint(llama_dir).tokenizer()


# ---------------------------------------------------------------- the embedded default encoder


@pytest.fixture(scope="module")
def minilm():
    from galaxy.model.defaults import DefaultModelMissing, default_encoder_path

    try:
        return HFCheckpoint(default_encoder_path())
    except DefaultModelMissing as e:
        pytest.skip(f"embedded all-MiniLM-L6-v2 not installed: {e}")


def test_minilm_names_and_shapes_load(minilm):
    cfg = minilm.config
    assert (cfg.family, cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.vocab_size) == ("bert", 384, 6, 12, 30522)
    shapes = expected_shapes(cfg)
    assert minilm.names() == list(shapes)
    for name in minilm.names():
        assert tuple(minilm.get(name, 0, 0, 1).shape) == (1, *shapes[name][1:])
    assert tuple(minilm.get("layers.5.mlp.w_down").shape) == (384, 1536)


def test_minilm_tokenizer_adds_cls_and_sep_once(minilm):
    tok = minilm.tokenizer()
    assert tok.encode("hello world") == [101, 7592, 2088, 102]  # no BOS doubling, no padding to 128
    assert tok.decode([101, 7592, 2088, 102]) == "hello world"
