"""Model shape and architecture: the one description every other module reads.

A `ModelConfig` covers the five families Galaxy runs (BERT, DistilBERT, GPT-2, OPT, Llama) by
a handful of architecture switches (norm placement, norm kind, activation, gating, positions),
gpt-fast style. It is frozen and validates itself; sharding never rewrites it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import GalaxyError

FAMILIES = ("bert", "distilbert", "gpt2", "opt", "llama")
ENCODER_FAMILIES = ("bert", "distilbert")


class ConfigError(GalaxyError, ValueError):
    """A model description that cannot be built; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # one of FAMILIES
    vocab_size: int
    hidden: int  # model width H
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA/MQA when fewer than n_heads)
    head_dim: int
    ffn: int  # MLP intermediate columns F
    max_positions: int  # longest sequence the position scheme allows
    causal: bool  # decoder (causal mask, LM head) or encoder
    pre_norm: bool  # norm before attention/MLP (GPT-2, OPT, Llama) or after the residual (BERT)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu" | "gelu_tanh" | "relu" | "silu"
    gated_mlp: bool = False  # SwiGLU: act(x W_gate) * (x W_up)
    position: str = "learned"  # "learned" | "rope"
    position_offset: int = 0  # OPT keeps 2 unused rows at the top of its position table
    rope_theta: float = 10000.0
    type_vocab_size: int = 0  # BERT segment embeddings (0: none)
    embed_norm: bool = False  # BERT/DistilBERT: norm right after the embeddings
    final_norm: bool = False  # pre-norm models: norm before the output
    attn_bias: bool = True  # biases on Q, K, V
    out_bias: bool = True  # bias on the attention output projection
    mlp_bias: bool = True
    tie_embeddings: bool = True  # LM head shares the token embedding (causal only)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"model config {self.name or self.family!r}: {msg}")

        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            if kind == "int":
                need(isinstance(v, int) and not isinstance(v, bool), f"{f.name}={v!r} is not an integer")
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v: not NaN
                need(ok, f"{f.name}={v!r} is not a number")
            elif kind == "bool":
                need(isinstance(v, bool), f"{f.name}={v!r} is not true/false")
            elif kind == "str":
                need(isinstance(v, str), f"{f.name}={v!r} is not a string")
            elif kind == "int | None":
                need(v is None or (isinstance(v, int) and not isinstance(v, bool)), f"{f.name}={v!r} is not an integer")
        need(self.family in FAMILIES, f"family={self.family!r} is not one of {FAMILIES}")
        for f in ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn"):
            need(getattr(self, f) > 0, f"{f}={getattr(self, f)} must be positive")
        need(self.max_positions > 0, f"max_positions={self.max_positions} must be positive")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
        )
        need(self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r} is not layernorm|rmsnorm")
        need(
            self.activation in ("gelu", "gelu_tanh", "relu", "silu"),
            f"activation={self.activation!r} is not gelu|gelu_tanh|relu|silu",
        )
        need(self.position in ("learned", "rope"), f"position={self.position!r} is not learned|rope")
        need(self.position != "rope" or self.head_dim % 2 == 0, "rope needs an even head_dim")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_encoder(self) -> bool:
        return not self.causal

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config has unknown fields {sorted(unknown)}")
        return cls(**d)

    def n_params(self) -> int:
        """Parameter count (tied head counted once)."""
        h, f, hd = self.hidden, self.ffn, self.head_dim
        qkv = h * hd * (self.n_heads + 2 * self.n_kv_heads)
        attn = qkv + self.n_heads * hd * h
        mlp = h * f * (3 if self.gated_mlp else 2)
        per_layer = attn + mlp
        emb = self.vocab_size * h
        if self.position == "learned":
            emb += (self.max_positions + self.position_offset) * h
        emb += self.type_vocab_size * h
        head = self.vocab_size * h if self.causal and not self.tie_embeddings else 0
        return emb + self.n_layers * per_layer + head


def _family_defaults(family: str) -> dict:
    """Architecture switches that follow from the family (what HF hard-codes per model class)."""
    if family in ENCODER_FAMILIES:
        return dict(
            causal=False, pre_norm=False, norm="layernorm", activation="gelu", gated_mlp=False,
            position="learned", embed_norm=True, final_norm=False, norm_eps=1e-12,
        )
    if family == "gpt2":
        return dict(
            causal=True, pre_norm=True, norm="layernorm", activation="gelu_tanh", gated_mlp=False,
            position="learned", final_norm=True, norm_eps=1e-5,
        )
    if family == "opt":
        return dict(
            causal=True, pre_norm=True, norm="layernorm", activation="relu", gated_mlp=False,
            position="learned", position_offset=2, final_norm=True, norm_eps=1e-5,
        )
    if family == "llama":
        return dict(
            causal=True, pre_norm=True, norm="rmsnorm", activation="silu", gated_mlp=True,
            position="rope", final_norm=True, attn_bias=False, out_bias=False, mlp_bias=False,
        )
    raise ConfigError(f"family={family!r} is not one of {FAMILIES}")


def make_config(family: str, **shape) -> ModelConfig:
    """A config from a family plus shape fields; head_dim and n_kv_heads default sensibly."""
    d = _family_defaults(family)
    d.update(shape)
    d.setdefault("n_kv_heads", d["n_heads"])
    d.setdefault("head_dim", d["hidden"] // d["n_heads"])
    return ModelConfig(family=family, **d)


def _get(hf: dict, *keys, default=None):
    for k in keys:
        if k in hf and hf[k] is not None:
            return hf[k]
    return default


def from_hf_config(hf: dict, name: str = "") -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(
            f"config.json model_type={mt!r} is not supported; Galaxy runs {', '.join(FAMILIES)}"
        )
    if mt == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("config.json: only position_embedding_type='absolute' is supported")
        act = hf.get("hidden_act", "gelu")
        return make_config(
            "bert", vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            ffn=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
            activation=_hf_act(act), name=name,
        )
    if mt == "distilbert":
        return make_config(
            "distilbert", vocab_size=hf["vocab_size"], hidden=hf["dim"], n_layers=hf["n_layers"],
            n_heads=hf["n_heads"], ffn=hf["hidden_dim"],
            max_positions=hf["max_position_embeddings"], activation=_hf_act(hf.get("activation", "gelu")),
            norm_eps=1e-12, name=name,
        )
    if mt == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ConfigError("config.json: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                              "reorder_and_upcast_attn) are not supported")
        h = hf["n_embd"]
        return make_config(
            "gpt2", vocab_size=hf["vocab_size"], hidden=h, n_layers=hf["n_layer"],
            n_heads=hf["n_head"], ffn=hf.get("n_inner") or 4 * h, max_positions=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_hf_act(hf.get("activation_function", "gelu_new")),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), name=name,
        )
    if mt == "opt":
        h = hf["hidden_size"]
        if hf.get("word_embed_proj_dim", h) != h:
            raise ConfigError(
                f"config.json: OPT with word_embed_proj_dim={hf['word_embed_proj_dim']} != "
                f"hidden_size={h} (OPT-350m's project_in/out) is not supported"
            )
        pre = hf.get("do_layer_norm_before", True)
        return make_config(
            "opt", vocab_size=hf["vocab_size"], hidden=h, n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], ffn=hf["ffn_dim"],
            max_positions=hf["max_position_embeddings"], pre_norm=pre, final_norm=pre,
            activation=_hf_act(hf.get("activation_function", "relu")),
            attn_bias=hf.get("enable_bias", True), out_bias=hf.get("enable_bias", True),
            mlp_bias=hf.get("enable_bias", True),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), name=name,
        )
    # llama
    if hf.get("rope_scaling") not in (None, {}) and (hf["rope_scaling"] or {}).get("rope_type", "default") != "default":
        raise ConfigError(f"config.json: rope_scaling={hf['rope_scaling']} is not supported")
    n_heads = hf["num_attention_heads"]
    rope_theta = _get(hf, "rope_theta", default=None)
    if rope_theta is None:
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = hf.get("eos_token_id")
    return make_config(
        "llama", vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, ffn=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta), activation=_hf_act(hf.get("hidden_act", "silu")),
        attn_bias=hf.get("attention_bias", False), out_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        name=name,
    )


def _hf_act(act: str) -> str:
    table = {
        "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
    }
    if act not in table:
        raise ConfigError(f"config.json: activation {act!r} is not supported ({sorted(table)})")
    return table[act]


# Shapes of the Galaxy paper's models (and small ones for tests). Random-init builds any of them.
PRESETS: dict[str, ModelConfig] = {
    "distilbert": make_config("distilbert", vocab_size=30522, hidden=768, n_layers=6, n_heads=12,
                              ffn=3072, max_positions=512, name="distilbert"),
    "bert-base": make_config("bert", vocab_size=30522, hidden=768, n_layers=12, n_heads=12, ffn=3072,
                             max_positions=512, type_vocab_size=2, name="bert-base"),
    "bert-large": make_config("bert", vocab_size=30522, hidden=1024, n_layers=24, n_heads=16,
                              ffn=4096, max_positions=512, type_vocab_size=2, name="bert-large"),
    "minilm-l6": make_config("bert", vocab_size=30522, hidden=384, n_layers=6, n_heads=12, ffn=1536,
                             max_positions=512, type_vocab_size=2, name="minilm-l6"),
    "gpt2": make_config("gpt2", vocab_size=50257, hidden=768, n_layers=12, n_heads=12, ffn=3072,
                        max_positions=1024, bos_token_id=50256, eos_token_id=50256, name="gpt2"),
    "gpt2-large": make_config("gpt2", vocab_size=50257, hidden=1280, n_layers=36, n_heads=20,
                              ffn=5120, max_positions=1024, bos_token_id=50256, eos_token_id=50256,
                              name="gpt2-large"),
    "opt-125m": make_config("opt", vocab_size=50272, hidden=768, n_layers=12, n_heads=12, ffn=3072,
                            max_positions=2048, bos_token_id=2, eos_token_id=2, name="opt-125m"),
    "opt-large": make_config("opt", vocab_size=50272, hidden=2048, n_layers=24, n_heads=32,
                             ffn=8192, max_positions=2048, bos_token_id=2, eos_token_id=2,
                             name="opt-large"),  # OPT-1.3B
    "opt-xl": make_config("opt", vocab_size=50272, hidden=2560, n_layers=32, n_heads=32, ffn=10240,
                          max_positions=2048, bos_token_id=2, eos_token_id=2, name="opt-xl"),  # 2.7B
    "smollm2-135m": make_config("llama", vocab_size=49152, hidden=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, ffn=1536, max_positions=8192, rope_theta=100000.0,
                                tie_embeddings=True, bos_token_id=1, eos_token_id=2,
                                name="smollm2-135m"),
    "llama-1b": make_config("llama", vocab_size=32000, hidden=2048, n_layers=22, n_heads=32,
                            n_kv_heads=4, ffn=5632, max_positions=2048, tie_embeddings=False,
                            bos_token_id=1, eos_token_id=2, name="llama-1b"),  # TinyLlama-1.1B
    # Tiny shapes for tests: odd sizes on purpose so uneven splits are exercised.
    "tiny-bert": make_config("bert", vocab_size=101, hidden=48, n_layers=2, n_heads=6, ffn=90,
                             max_positions=64, type_vocab_size=2, name="tiny-bert"),
    "tiny-distilbert": make_config("distilbert", vocab_size=97, hidden=40, n_layers=2, n_heads=5,
                                   ffn=70, max_positions=64, name="tiny-distilbert"),
    "tiny-gpt2": make_config("gpt2", vocab_size=103, hidden=48, n_layers=2, n_heads=6, ffn=100,
                             max_positions=128, name="tiny-gpt2"),
    "tiny-opt": make_config("opt", vocab_size=107, hidden=48, n_layers=2, n_heads=6, ffn=88,
                            max_positions=128, name="tiny-opt"),
    "tiny-llama": make_config("llama", vocab_size=109, hidden=48, n_layers=2, n_heads=6,
                              n_kv_heads=2, ffn=76, max_positions=128, tie_embeddings=False,
                              name="tiny-llama"),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
