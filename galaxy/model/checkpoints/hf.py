"""Hugging Face model directories: config.json + safetensors/bin weights + tokenizer files.

This file owns the translation from HF tensor names and layouts to Galaxy's canonical ones (see
`galaxy.model.checkpoints`), one small table per family. Weights are read lazily: safetensors through
`get_slice`, `pytorch_model.bin` through a memory map, and every slice is cut on the *source*
tensor (before any transpose or fused-q|k|v split), so a device reads only its own shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, from_hf_config
from ..tokenizer import Tokenizer
from .source import CheckpointError, WeightSource, expected_shapes

log = logging.getLogger(__name__)

SAVE_HINT = "save the model with model.save_pretrained(DIR) or copy the file from the model's repository"


@dataclass(frozen=True)
class _Src:
    """Where one canonical tensor lives in an HF checkpoint."""

    name: str  # HF name below the family prefix (or the whole name when bare)
    transpose: bool = False  # GPT-2 Conv1D stores weights [in, out]
    part: int = 0  # which of `parts` equal blocks along the out dim (GPT-2 c_attn is q|k|v)
    parts: int = 1
    bare: bool = False  # outside the family prefix (lm_head.weight)


def _pair(canon_w: str, canon_b: str, hf: str, **kw) -> dict[str, _Src]:
    """A weight and its bias, which HF names `<module>.weight` and `<module>.bias`."""
    return {canon_w: _Src(f"{hf}.weight", **kw), canon_b: _Src(f"{hf}.bias", **kw)}


def _norm(canon: str, hf: str) -> dict[str, _Src]:
    return _pair(f"{canon}.weight", f"{canon}.bias", hf)


def _conv1d(canon_w: str, canon_b: str, hf: str, part: int = 0, parts: int = 1) -> dict[str, _Src]:
    """GPT-2 Conv1D: the weight is stored transposed, the bias is not."""
    return {
        canon_w: _Src(f"{hf}.weight", transpose=True, part=part, parts=parts),
        canon_b: _Src(f"{hf}.bias", part=part, parts=parts),
    }


@dataclass(frozen=True)
class _Family:
    prefixes: tuple[str, ...]  # tried in order; the first holding the token embedding wins
    layer: str  # per-layer prefix below the family prefix, with {i}
    top: dict[str, _Src]  # canonical name -> source, outside the layers
    per_layer: dict[str, _Src]  # canonical suffix after "layers.{i}." -> source below `layer`


_BERT = _Family(
    prefixes=("bert.", ""),
    layer="encoder.layer.{i}.",
    top={
        "embed.tokens": _Src("embeddings.word_embeddings.weight"),
        "embed.positions": _Src("embeddings.position_embeddings.weight"),
        "embed.types": _Src("embeddings.token_type_embeddings.weight"),
        **_norm("embed.norm", "embeddings.LayerNorm"),
    },
    per_layer={
        **_pair("attn.wq", "attn.bq", "attention.self.query"),
        **_pair("attn.wk", "attn.bk", "attention.self.key"),
        **_pair("attn.wv", "attn.bv", "attention.self.value"),
        **_pair("attn.wo", "attn.bo", "attention.output.dense"),
        **_pair("mlp.w_up", "mlp.b_up", "intermediate.dense"),
        **_pair("mlp.w_down", "mlp.b_down", "output.dense"),
        **_norm("norm1", "attention.output.LayerNorm"),  # post-norm: after the attention residual
        **_norm("norm2", "output.LayerNorm"),
    },
)

_DISTILBERT = _Family(
    prefixes=("distilbert.", ""),
    layer="transformer.layer.{i}.",
    top={
        "embed.tokens": _Src("embeddings.word_embeddings.weight"),
        "embed.positions": _Src("embeddings.position_embeddings.weight"),
        **_norm("embed.norm", "embeddings.LayerNorm"),
    },
    per_layer={
        **_pair("attn.wq", "attn.bq", "attention.q_lin"),
        **_pair("attn.wk", "attn.bk", "attention.k_lin"),
        **_pair("attn.wv", "attn.bv", "attention.v_lin"),
        **_pair("attn.wo", "attn.bo", "attention.out_lin"),
        **_pair("mlp.w_up", "mlp.b_up", "ffn.lin1"),
        **_pair("mlp.w_down", "mlp.b_down", "ffn.lin2"),
        **_norm("norm1", "sa_layer_norm"),
        **_norm("norm2", "output_layer_norm"),
    },
)

_GPT2 = _Family(
    prefixes=("transformer.", ""),
    layer="h.{i}.",
    top={
        "embed.tokens": _Src("wte.weight"),
        "embed.positions": _Src("wpe.weight"),
        **_norm("final_norm", "ln_f"),
    },
    per_layer={  # attn.bias / attn.masked_bias are causal-mask buffers, never looked up
        **_conv1d("attn.wq", "attn.bq", "attn.c_attn", part=0, parts=3),
        **_conv1d("attn.wk", "attn.bk", "attn.c_attn", part=1, parts=3),
        **_conv1d("attn.wv", "attn.bv", "attn.c_attn", part=2, parts=3),
        **_conv1d("attn.wo", "attn.bo", "attn.c_proj"),
        **_conv1d("mlp.w_up", "mlp.b_up", "mlp.c_fc"),
        **_conv1d("mlp.w_down", "mlp.b_down", "mlp.c_proj"),
        **_norm("norm1", "ln_1"),
        **_norm("norm2", "ln_2"),
    },
)

_OPT = _Family(
    prefixes=("model.decoder.", "decoder.", ""),
    layer="layers.{i}.",
    top={
        "embed.tokens": _Src("embed_tokens.weight"),
        "embed.positions": _Src("embed_positions.weight"),  # includes OPT's 2 offset rows
        **_norm("final_norm", "final_layer_norm"),
        "lm_head": _Src("lm_head.weight", bare=True),
    },
    per_layer={
        **_pair("attn.wq", "attn.bq", "self_attn.q_proj"),
        **_pair("attn.wk", "attn.bk", "self_attn.k_proj"),
        **_pair("attn.wv", "attn.bv", "self_attn.v_proj"),
        **_pair("attn.wo", "attn.bo", "self_attn.out_proj"),
        **_pair("mlp.w_up", "mlp.b_up", "fc1"),
        **_pair("mlp.w_down", "mlp.b_down", "fc2"),
        **_norm("norm1", "self_attn_layer_norm"),
        **_norm("norm2", "final_layer_norm"),
    },
)

_LLAMA = _Family(
    prefixes=("model.", ""),
    layer="layers.{i}.",
    top={
        "embed.tokens": _Src("embed_tokens.weight"),
        "final_norm.weight": _Src("norm.weight"),
        "lm_head": _Src("lm_head.weight", bare=True),
    },
    per_layer={  # biases exist only with attention_bias / mlp_bias
        **_pair("attn.wq", "attn.bq", "self_attn.q_proj"),
        **_pair("attn.wk", "attn.bk", "self_attn.k_proj"),
        **_pair("attn.wv", "attn.bv", "self_attn.v_proj"),
        **_pair("attn.wo", "attn.bo", "self_attn.o_proj"),
        **_pair("mlp.w_gate", "mlp.b_gate", "mlp.gate_proj"),
        **_pair("mlp.w_up", "mlp.b_up", "mlp.up_proj"),
        **_pair("mlp.w_down", "mlp.b_down", "mlp.down_proj"),
        "norm1.weight": _Src("input_layernorm.weight"),
        "norm2.weight": _Src("post_attention_layernorm.weight"),
    },
)

FAMILY_TABLES = {"bert": _BERT, "distilbert": _DISTILBERT, "gpt2": _GPT2, "opt": _OPT, "llama": _LLAMA}


# ---------------------------------------------------------------- weight files


class _SafetensorsFile:
    """One .safetensors file, memory-mapped; `read` copies only the indexed slice."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); {SAVE_HINT}") from e

    def tensor_names(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._f.get_slice(key)[index]


class _TorchFile:
    """One pytorch_model.bin, memory-mapped so only the pages a slice touches are read."""

    def __init__(self, path: Path):
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # pre-1.6 (non-zip) files cannot be memory-mapped
            log.warning("%s cannot be memory-mapped (%s); reading it whole", path, e)
            sd = self._load_whole(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({e}); {SAVE_HINT}") from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, expected a state dict of tensors")
        self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    @staticmethod
    def _load_whole(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({e}); {SAVE_HINT}") from e

    def tensor_names(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._sd[key][index]


def _read_json(path: Path) -> dict | None:
    """A JSON object file, None when absent; malformed files fail with the file's name."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or re-create the file") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(d).__name__}")
    return d


def _shards(d: Path, index_name: str) -> list[Path]:
    """The shard files an HF *.index.json lists, each checked to exist."""
    index = _read_json(d / index_name) or {}
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{d / index_name}: has no 'weight_map' object naming the shard files")
    files = [d / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{d / index_name} lists shard {f.name}, which is missing from {d}")
    return files


def _weight_files(d: Path) -> list[_SafetensorsFile | _TorchFile]:
    """Open the directory's weights, preferring safetensors the way transformers does."""
    if (d / "model.safetensors.index.json").is_file():
        return [_SafetensorsFile(f) for f in _shards(d, "model.safetensors.index.json")]
    if (d / "model.safetensors").is_file():
        return [_SafetensorsFile(d / "model.safetensors")]
    if found := sorted(d.glob("*.safetensors")):
        return [_SafetensorsFile(f) for f in found]
    if (d / "pytorch_model.bin.index.json").is_file():
        return [_TorchFile(f) for f in _shards(d, "pytorch_model.bin.index.json")]
    if (d / "pytorch_model.bin").is_file():
        return [_TorchFile(d / "pytorch_model.bin")]
    raise CheckpointError(
        f"{d}: no weights found; expected model.safetensors (or shards listed in "
        f"model.safetensors.index.json) or pytorch_model.bin; {SAVE_HINT}"
    )


def _modern_name(key: str) -> str:
    """Old (TF-era) checkpoints call LayerNorm parameters gamma/beta; transformers renames them."""
    head, _, last = key.rpartition(".")
    if "norm" in head.lower() and last in ("gamma", "beta"):
        return f"{head}.{'weight' if last == 'gamma' else 'bias'}"
    return key


# ---------------------------------------------------------------- the source


class HFCheckpoint(WeightSource):
    """A local HF model directory (what `save_pretrained` writes), read slice by slice."""

    def __init__(self, path: str | Path):
        d = Path(path).expanduser()
        if not d.is_dir():
            what = "is not a directory" if d.exists() else "does not exist"
            raise CheckpointError(f"HF checkpoint {str(d)!r} {what}; pass the model's folder ({SAVE_HINT})")
        self.dir = d
        self.path = str(d)
        self.config = self._read_config()
        self._shapes = expected_shapes(self.config)
        self._files = _weight_files(d)
        self._where = _index(self._files)
        self._map = self._resolve(FAMILY_TABLES[self.config.family])

    def _read_config(self):
        f = self.dir / "config.json"
        hf = _read_json(f)
        if hf is None:
            raise CheckpointError(
                f"{self.dir}: no config.json, which describes the model's shape; {SAVE_HINT}"
            )
        try:
            return from_hf_config(hf, name=self.dir.name)
        except KeyError as e:
            mt = hf.get("model_type")
            raise CheckpointError(f"{f}: missing field {e.args[0]!r}, which a {mt} config needs") from e
        except TypeError as e:
            raise CheckpointError(f"{f}: a field has the wrong type ({e})") from e
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from e

    def _where_desc(self) -> str:
        """The weight file(s), for error messages."""
        if len(self._files) == 1:
            return str(self._files[0].path)
        return f"{self.dir} ({', '.join(f.path.name for f in self._files)})"

    def _prefix(self, fam: _Family) -> str:
        """The family prefix this checkpoint uses ("bert." for BertForMaskedLM, "" for BertModel...)."""
        probe = fam.top["embed.tokens"].name
        for p in fam.prefixes:
            if p + probe in self._where:
                return p
        tried = " or ".join(repr(p + probe) for p in fam.prefixes)
        raise CheckpointError(
            f"{self._where_desc()}: no token embedding ({tried}), although config.json says "
            f"model_type={self.config.family!r}; the weights belong to another model or were renamed"
        )

    def _resolve(self, fam: _Family) -> dict[str, tuple[str, _Src]]:
        """Canonical name -> (full HF name, source) for every tensor this config needs."""
        prefix = self._prefix(fam)
        table = dict(fam.top)
        for i in range(self.config.n_layers):
            lp = fam.layer.format(i=i)
            table.update(
                {
                    f"layers.{i}.{k}": _Src(lp + s.name, s.transpose, s.part, s.parts)
                    for k, s in fam.per_layer.items()
                }
            )
        missing = [c for c in self._shapes if c not in table]
        if missing:  # a config switch this table does not cover
            raise CheckpointError(
                f"{self.path}: Galaxy does not know the HF names of {missing} "
                f"in {self.config.family} checkpoints"
            )
        return {
            c: (table[c].name if table[c].bare else prefix + table[c].name, table[c]) for c in self._shapes
        }

    def names(self) -> list[str]:
        return [c for c, (key, _) in self._map.items() if key in self._where]

    def _load(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        key, src = self._map[name]
        if key not in self._where:
            raise CheckpointError(
                f"{self._where_desc()}: no tensor {key!r} (Galaxy's {name}); the checkpoint is "
                f"incomplete or not a plain {self.config.family} model"
            )
        f, stored = self._where[key]
        full = self._shapes[name]  # canonical [out, in] or [out]
        want = (full[0] * src.parts, *full[1:])
        want = want[::-1] if src.transpose else want
        got = f.shape(stored)
        if got != want:
            raise CheckpointError(
                f"{f.path}: tensor {stored!r} has shape {got}, but config.json implies {want} "
                f"(Galaxy's {name}); the config and the weights do not match"
            )
        index = [slice(0, n) for n in full]
        index[dim] = slice(start, end)
        off = src.part * full[0]  # fused q|k|v: this block's rows within the out dim
        index[0] = slice(index[0].start + off, index[0].stop + off)
        if src.transpose:
            index.reverse()
        t = f.read(stored, tuple(index))
        return (t.t() if src.transpose else t).contiguous()

    def tokenizer(self):
        """tokenizer.json plus BOS/EOS, add-BOS and chat template from the files beside it."""
        tj = self.dir / "tokenizer.json"
        if not tj.is_file():
            return None
        try:
            tok = Tokenizer.from_file(tj)
        except Exception as e:
            raise CheckpointError(
                f"{tj}: the tokenizers library cannot load it ({e}); re-save the "
                "tokenizer with tokenizer.save_pretrained(DIR)"
            ) from e
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers
        meta = {
            **(_read_json(self.dir / "tokenizer_config.json") or {}),
            **(_read_json(self.dir / "special_tokens_map.json") or {}),
        }
        b = tok.backend
        # transformers treats tokenizer.json's padding/truncation (sentence-transformers saves
        # Fixed(128) padding) as call-time options that are off unless asked for; so do we
        b.no_padding()
        b.no_truncation()
        adds_specials = b.encode("a").ids != b.encode("a", add_special_tokens=False).ids
        return dataclasses.replace(
            tok,
            bos_token_id=_token_id(b, meta.get("bos_token"), self.config.bos_token_id),
            eos_token_id=_token_id(b, meta.get("eos_token"), self.config.eos_token_id),
            # BERT's (and Llama's) post-processor already inserts its specials: never add BOS twice
            add_bos=bool(meta.get("add_bos_token")) and not adds_specials,
            chat_template=self._chat_template(meta),
        )

    def _chat_template(self, meta: dict) -> str | None:
        """chat_template.jinja (newer transformers) wins over tokenizer_config.json's field."""
        jinja = self.dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        t = meta.get("chat_template")
        if isinstance(t, list):  # several named templates: [{"name": ..., "template": ...}]
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        return t if isinstance(t, str) else None


def _index(files: list) -> dict[str, tuple]:
    """HF name -> (file, stored key); gamma/beta names answer to weight/bias too."""
    # reversed: on a name held by two files, the first file's entry is written last and wins
    where = {k: (f, k) for f in reversed(files) for k in f.tensor_names()}
    for f, k in list(where.values()):
        where.setdefault(_modern_name(k), (f, k))
    return where


def _token_id(backend, token, fallback: int | None) -> int | None:
    """A special token given as text (or an AddedToken dict) -> its id; else config.json's id."""
    if isinstance(token, dict):
        token = token.get("content")
    tid = backend.token_to_id(token) if isinstance(token, str) else None
    return fallback if tid is None else tid
