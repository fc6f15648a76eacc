"""GGUF files (llama.cpp's format): config, canonical tensors and tokenizer from one memory-mapped file.

A GGUF carries everything a Hugging Face directory splits over config.json, the safetensors and
tokenizer.json, under llama.cpp's names and layouts. This module owns the translation back:

- the `ModelConfig` from the `{arch}.*` and `tokenizer.ggml.*` metadata;
- GGUF tensor names -> canonical names, dequantized (any type `gguf.quants` knows) to float32;
- Q/K rows un-permuted from llama.cpp's interleaved RoPE layout to HF's rotate-half layout;
- a `tokenizers.Tokenizer` rebuilt from the vocabulary and merges (byte-level BPE only).

The header is read by `gguf_header` (gguf.GGUFReader takes seconds on a large vocabulary); only
dequantization comes from the gguf package. The file stays memory-mapped: a device slicing its
shard by rows reads and dequantizes only those rows, since GGUF quantizes every row on its own.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch
from gguf import GGUFValueType
from tokenizers import decoders, models, pre_tokenizers

from ..config import ConfigError, ModelConfig, make_config
from ..tokenizer import Tokenizer
from .gguf_header import read_header
from .source import CheckpointError, WeightSource, expected_shapes

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)
_REQUIRED = object()

_GLOBAL_NAMES = {
    "token_embd.weight": "embed.tokens",
    "output_norm.weight": "final_norm.weight",
    "output.weight": "lm_head",
}
_LAYER_NAMES = {  # blk.{i}.<gguf suffix> -> layers.{i}.<canonical suffix>
    "attn_q.weight": "attn.wq",
    "attn_k.weight": "attn.wk",
    "attn_v.weight": "attn.wv",
    "attn_output.weight": "attn.wo",
    "attn_q.bias": "attn.bq",
    "attn_k.bias": "attn.bk",
    "attn_v.bias": "attn.bv",
    "attn_output.bias": "attn.bo",
    "ffn_gate.weight": "mlp.w_gate",
    "ffn_up.weight": "mlp.w_up",
    "ffn_down.weight": "mlp.w_down",
    "ffn_gate.bias": "mlp.b_gate",
    "ffn_up.bias": "mlp.b_up",
    "ffn_down.bias": "mlp.b_down",
    "attn_norm.weight": "norm1.weight",
    "ffn_norm.weight": "norm2.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
# Rows llama.cpp's converter permuted for its interleaved RoPE (weights and, if any, biases).
_PERMUTED = ("attn.wq", "attn.wk", "attn.bq", "attn.bk")
_UNSUPPORTED_TENSORS = {
    "rope_freqs.weight": "per-frequency RoPE scaling (Llama 3.1 style)",
    "ffn_gate_exps.weight": "mixture-of-experts FFNs (Mixtral style)",
}
# tokenizer.ggml.pre -> pre-tokenizer; both follow the HF tokenizer.json the GGUF was converted from.
_PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def canonical_name(gguf_name: str) -> str | None:
    """The canonical name of a llama-arch GGUF tensor, or None when Galaxy has no use for it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation on whole heads of rows (dim 0).

    llama.cpp's converter (convert_hf_to_gguf.py `LlamaModel.permute`) turns HF's rotate-half
    layout into interleaved pairs: per head, rows viewed as [2, hd/2] are stored as [hd/2, 2].
    The inverse is the same swap read the other way; it acts inside each head, so any run of
    whole heads can be un-permuted on its own (same as transformers' `reverse_permute_weights`).
    """
    n = w.shape[0] // head_dim
    return w.reshape(n, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _round_f32(x: float) -> float:
    """The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True))


class GGUFCheckpoint(WeightSource):
    """A llama-architecture GGUF file, served as canonical float32 tensors."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).expanduser())
        self._header = read_header(self.path)
        self._tensors = self._header.tensors
        self.arch = self._meta("general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                f"Galaxy reads GGUF files of architecture {', '.join(SUPPORTED_ARCHS)} "
                "(other families load from an HF-style directory)"
            )
        self.config = self._read_config()
        self._gguf_names = self._map_names()
        self._check_shapes()
        self._tokenizer: Tokenizer | None = None

    # ---- metadata -> ModelConfig ----

    def _meta(self, key: str, default=_REQUIRED):
        """A metadata value as a Python object; float32 values rounded to their shortest decimal."""
        field = self._header.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}, which Galaxy needs")
            return default
        if field.type == GGUFValueType.FLOAT32:
            return _round_f32(field.value)
        return field.value

    def _arch_int(self, key: str, default=_REQUIRED) -> int:
        value = self._meta(f"{self.arch}.{key}", default)
        if not isinstance(value, int):
            raise CheckpointError(
                f"{self.path}: {self.arch}.{key}={value!r} is not a single integer "
                "(per-layer values are not supported)"
            )
        return value

    def _read_config(self) -> ModelConfig:
        a = self.arch
        scaling = self._meta(f"{a}.rope.scaling.type", "none")
        if scaling != "none":
            raise CheckpointError(f"{self.path}: {a}.rope.scaling.type={scaling!r} is not supported")
        if self._meta(f"{a}.expert_count", 0):
            raise CheckpointError(f"{self.path}: mixture-of-experts {a} models are not supported")
        hidden, n_heads = self._arch_int("embedding_length"), self._arch_int("attention.head_count")
        head_dim = self._arch_int("attention.key_length", hidden // n_heads)
        rope_dim = self._arch_int("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise CheckpointError(
                f"{self.path}: partial RoPE ({a}.rope.dimension_count={rope_dim} of head_dim={head_dim}) "
                "is not supported"
            )
        tokens = self._header.fields.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens.value) if tokens is not None and tokens.type == GGUFValueType.ARRAY else _REQUIRED
        vocab = self._arch_int("vocab_size", n_tokens)
        first = "blk.0."
        try:
            return make_config(
                "llama",
                vocab_size=vocab,
                hidden=hidden,
                n_layers=self._arch_int("block_count"),
                n_heads=n_heads,
                n_kv_heads=self._arch_int("attention.head_count_kv", n_heads),
                head_dim=head_dim,
                ffn=self._arch_int("feed_forward_length"),
                max_positions=self._arch_int("context_length"),
                norm_eps=float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._meta(f"{a}.rope.freq_base", 10000.0)),
                attn_bias=first + "attn_q.bias" in self._tensors,
                out_bias=first + "attn_output.bias" in self._tensors,
                mlp_bias=first + "ffn_up.bias" in self._tensors,
                tie_embeddings="output.weight" not in self._tensors,
                bos_token_id=self._meta("tokenizer.ggml.bos_token_id", None),
                eos_token_id=self._meta("tokenizer.ggml.eos_token_id", None),
                name=Path(self.path).stem,
            )
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: the GGUF metadata describes an invalid model: {e}") from e

    # ---- tensor names and shapes ----

    def _map_names(self) -> dict[str, str]:
        """canonical -> GGUF name. A tensor with no use is refused: skipping it could change the model."""
        mapping, unknown = {}, []
        for name in self._tensors:
            canon = canonical_name(name)
            if canon is None:
                unknown.append(name)
            else:
                mapping[canon] = name
        if unknown:
            kinds = {m.group(2) if (m := _BLOCK.fullmatch(n)) else n for n in unknown}
            why = "; ".join(
                f"{_UNSUPPORTED_TENSORS[k]} ({k})" for k in sorted(kinds & set(_UNSUPPORTED_TENSORS))
            )
            more = " ..." if len(unknown) > 6 else ""
            raise CheckpointError(
                f"{self.path}: {len(unknown)} tensors Galaxy has no use for: {unknown[:6]}{more}"
                + (f"; this model uses {why}, which is not supported" if why else "")
            )
        missing = [n for n in expected_shapes(self.config) if n not in mapping]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensors for canonical {missing[:6]}")
        return mapping

    def _check_shapes(self) -> None:
        """Compare the header's shapes with the config now, rather than fail later mid-load."""
        for canon, want in expected_shapes(self.config).items():
            t = self._tensors[self._gguf_names[canon]]
            got = t.shape
            if got != want:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} ({canon}) has shape {got}, the metadata implies {want}"
                )

    def names(self) -> list[str]:
        return list(self._gguf_names)

    # ---- tensor data ----

    def _rows(self, gguf_name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a tensor dequantized to float32; reads only those rows of a matrix."""
        t = self._tensors[gguf_name]
        matrix = len(t.shape) > 1
        data = t.data[start:end] if matrix else t.data
        if matrix and end <= start:  # a device given none of these rows: gguf cannot dequantize zero blocks
            data = t.data[0:1]
        try:
            a = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, which the installed gguf "
                f"library cannot dequantize ({e}); upgrade gguf or re-quantize the file"
            ) from e
        a = np.asarray(a, dtype=np.float32)
        if not matrix:
            a = a.reshape(-1)[start:end]
        elif end <= start:
            a = a[:0]
        if not a.flags.writeable:  # F32 data is a view of the read-only map
            a = a.copy()
        return torch.from_numpy(a)

    def _load(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        gname = self._gguf_names[name]
        if not name.endswith(_PERMUTED):
            if dim == 0:
                return self._rows(gname, start, end)
            return self._rows(gname, 0, self.shape(name)[0]).narrow(dim, start, end - start)
        # Q/K: read the whole heads that cover the slice, un-permute them, then cut the slice.
        hd = self.config.head_dim
        if dim != 0:
            full = unpermute_rows(self._rows(gname, 0, self.shape(name)[0]), hd)
            return full.narrow(dim, start, end - start)
        h0, h1 = start // hd, -(-end // hd)
        heads = unpermute_rows(self._rows(gname, h0 * hd, h1 * hd), hd)
        return heads[start - h0 * hd : end - h0 * hd]

    # ---- tokenizer ----

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer rebuilt from the metadata (byte-level BPE), or None when the file has none."""
        if self._tokenizer is None and "tokenizer.ggml.tokens" in self._header.fields:
            backend = self._build_backend()
            self._tokenizer = Tokenizer(
                backend,
                bos_token_id=self.config.bos_token_id,
                eos_token_id=self.config.eos_token_id,
                add_bos=bool(self._meta("tokenizer.ggml.add_bos_token", False)),
                chat_template=self._meta("tokenizer.chat_template", None),
            )
        return self._tokenizer

    def _build_backend(self) -> tokenizers.Tokenizer:
        kind = self._meta("tokenizer.ggml.model", None)
        if kind != "gpt2":
            raise CheckpointError(
                f"{self.path}: tokenizer.ggml.model={kind!r} is not supported yet; Galaxy rebuilds "
                "only byte-level BPE ('gpt2') tokenizers from GGUF. Pass a tokenizer.json instead"
            )
        pre = self._meta("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise CheckpointError(
                f"{self.path}: tokenizer.ggml.pre={pre!r} is not supported yet "
                f"(supported: {', '.join(_PRE_TOKENIZERS)}); its split regex would be guessed wrong"
            )
        if pre == "default":
            log.warning(
                "%s: no tokenizer.ggml.pre; splitting text GPT-2 style, which may differ from "
                "the model's own tokenizer",
                self.path,
            )
        tokens = self._meta("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in self._meta("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        try:
            backend = tokenizers.Tokenizer(models.BPE(vocab, merges))
        except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
            raise CheckpointError(
                f"{self.path}: cannot rebuild the tokenizer from tokenizer.ggml.tokens and merges ({e})"
            ) from e
        backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        types = self._meta("tokenizer.ggml.token_type", [])
        # Control tokens (<|im_start|>, ...) must match whole and never be split by the pre-tokenizer.
        backend.add_special_tokens(
            [
                tokenizers.AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, types)
                if k == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                tokenizers.AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, types)
                if k == _USER_DEFINED
            ]
        )
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            log.warning(
                "%s: tokenizer has %d ids, the GGUF lists %d tokens",
                self.path,
                backend.get_vocab_size(with_added_tokens=True),
                len(tokens),
            )
        return backend
