"""GGUF Q4_1 / Q8_0 tensors read as their blocks: the same values as the dequantized path, row for row."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from galaxy.model.checkpoints import CheckpointError
from galaxy.model.checkpoints.gguf import GGUFCheckpoint
from galaxy.model.checkpoints.gguf_blocks import read_blocked, tensor_type

# Small, but every matrix has whole 32-element blocks per row: hidden 64, 4 heads of 16, ffn 96.
H, F, L, NH, NKV, HD, V = 64, 96, 2, 4, 2, 16, 40


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_quantized(path: Path) -> None:
    """A llama GGUF as llama.cpp's Q4_1 files are: Q4_1 layer matrices, a Q8_0 embedding (tied), F32 norms."""
    g = np.random.default_rng(0)
    rand = lambda *s: g.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in [(w.add_block_count, L), (w.add_context_length, 64), (w.add_embedding_length, H),
                   (w.add_feed_forward_length, F), (w.add_head_count, NH), (w.add_head_count_kv, NKV),
                   (w.add_vocab_size, V), (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0)]:
        add(v)

    def put(name: str, t: np.ndarray, qtype: Q) -> None:
        if qtype == Q.F32:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)

    put("token_embd.weight", rand(V, H), Q.Q8_0)
    put("output_norm.weight", 1 + rand(H), Q.F32)
    for i in range(L):
        put(f"blk.{i}.attn_q.weight", llamacpp_permute(rand(NH * HD, H), NH), Q.Q4_1)
        put(f"blk.{i}.attn_k.weight", llamacpp_permute(rand(NKV * HD, H), NKV), Q.Q4_1)
        put(f"blk.{i}.attn_v.weight", rand(NKV * HD, H), Q.Q4_1)
        put(f"blk.{i}.attn_output.weight", rand(H, NH * HD), Q.Q4_1)
        put(f"blk.{i}.ffn_gate.weight", rand(F, H), Q.Q4_1)
        put(f"blk.{i}.ffn_up.weight", rand(F, H), Q.Q4_1)
        put(f"blk.{i}.ffn_down.weight", rand(H, F), Q.Q4_1)
        put(f"blk.{i}.attn_norm.weight", 1 + rand(H), Q.F32)
        put(f"blk.{i}.ffn_norm.weight", 1 + rand(H), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory) -> GGUFCheckpoint:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf"
    write_quantized(path)
    return GGUFCheckpoint(path)


@pytest.mark.parametrize("name, start, end", [
    ("layers.0.attn.wq", 0, 64), ("layers.0.attn.wq", 5, 37),  # permuted Q: whole and across heads
    ("layers.1.attn.wk", 16, 32), ("layers.1.attn.wk", 3, 4),  # permuted K (GQA): one head, one row
    ("layers.0.mlp.w_up", 10, 90), ("layers.1.mlp.w_down", 0, 64), ("embed.tokens", 7, 29),  # Q8_0
])
def test_row_ranges_dequantize_to_the_float_path_bit_for_bit(quantized_gguf, name, start, end):
    b = read_blocked(quantized_gguf, name, 0, start, end)
    assert b.kind == tensor_type(quantized_gguf, name).lower()
    assert torch.equal(b.dequantize(), quantized_gguf.get(name, 0, start, end))


@pytest.mark.parametrize("name, start, end", [("layers.0.mlp.w_down", 32, 96), ("layers.1.attn.wo", 0, 32),
                                              ("layers.0.attn.wq", 32, 64)])
def test_column_ranges_on_blocks_dequantize_to_the_float_path(quantized_gguf, name, start, end):
    assert torch.equal(read_blocked(quantized_gguf, name, 1, start, end).dequantize(),
                       quantized_gguf.get(name, 1, start, end))


def test_column_ranges_off_the_blocks_are_refused(quantized_gguf):
    with pytest.raises(CheckpointError, match="multiples of 32"):
        read_blocked(quantized_gguf, "layers.0.mlp.w_down", 1, 16, 96)


def test_float_tensors_are_left_to_the_float_path(quantized_gguf):
    assert read_blocked(quantized_gguf, "layers.0.norm1.weight") is None


def test_q4_1_codes_and_scales_are_the_files(quantized_gguf):
    b = read_blocked(quantized_gguf, "layers.0.attn.wv")
    assert b.codes.dtype == torch.uint8 and int(b.codes.max()) <= 15 and b.offset is not None
    assert b.scale.shape == (NKV * HD, H // 32)
    assert torch.equal(b.scale.half().float(), b.scale)  # fp16 values, held exactly


def test_embedded_smollm2_blocks_match_its_dequantized_rows(smollm2_path):
    ck = GGUFCheckpoint(smollm2_path)
    for name, start, end in [("embed.tokens", 1000, 1010), ("layers.3.attn.wq", 60, 130),
                             ("layers.29.mlp.w_down", 0, 8)]:
        assert torch.equal(read_blocked(ck, name, 0, start, end).dequantize(), ck.get(name, 0, start, end))
