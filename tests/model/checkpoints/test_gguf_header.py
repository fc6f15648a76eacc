"""read_header against gguf.GGUFReader (SmolLM2 and files written here with gguf.GGUFWriter), and
what a truncated, garbled or hostile file gets: always a CheckpointError naming the file."""

from __future__ import annotations

import math
import struct
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galaxy.model.checkpoints import CheckpointError
from galaxy.model.checkpoints.gguf import GGUFCheckpoint
from galaxy.model.checkpoints.gguf_header import DEFAULT_ALIGNMENT, read_header


def flatten(v):
    """GGUFReader.contents() flattens arrays of arrays; read_header keeps them nested."""
    return [x for item in v for x in flatten(item)] if isinstance(v, list) else [v]


def assert_same_as_reader(path: Path) -> None:
    h, r = read_header(path), gguf.GGUFReader(path, "r")
    assert h.version == r.fields["GGUF.version"].contents()
    assert (h.alignment, h.data_offset) == (r.alignment, r.data_offset)
    theirs = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(h.fields) == list(theirs)
    for key, f in theirs.items():
        ours = h.fields[key]
        assert ours.type == f.types[0], key
        if len(f.types) > 1 and f.types[-1] != V.ARRAY:  # GGUFReader has no item type for empty arrays
            assert ours.item_type == f.types[-1], key
        want = f.contents()
        got = flatten(ours.value) if ours.type == V.ARRAY else ours.value
        assert got == want, key
        assert [type(x) for x in flatten(got)] == [type(x) for x in flatten(want)], key  # bool is not int
    assert r.fields["GGUF.tensor_count"].contents() == len(h.tensors)
    assert list(h.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        ours = h.tensors[t.name]
        assert ours.tensor_type == t.tensor_type, t.name
        assert ours.shape == tuple(reversed(t.shape.tolist())), t.name
        assert (ours.offset, ours.n_bytes) == (t.data_offset, t.n_bytes), t.name
        assert (ours.data.dtype, ours.data.shape) == (t.data.dtype, t.data.shape), t.name
        assert ours.data.tobytes() == t.data.tobytes(), t.name
        assert not ours.data.flags.writeable, t.name


def dequantize_same_as_reader(path: Path) -> None:
    """gguf.quants.dequantize reads our views (whole, and the first rows) as it reads GGUFReader's."""
    h, r = read_header(path), gguf.GGUFReader(path, "r")
    for t in r.tensors:
        ours = h.tensors[t.name]
        if t.tensor_type in (Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):  # gguf cannot dequantize these
            continue
        pairs = [(ours.data, t.data)] + [(ours.data[:2], t.data[:2])] * (ours.data.ndim > 1)
        for a, b in pairs:
            x, y = gguf.quants.dequantize(a, t.tensor_type), gguf.quants.dequantize(b, t.tensor_type)
            assert x.shape == y.shape and x.tobytes() == y.tobytes(), t.name


# ---- the embedded SmolLM2 (Q4_1 with a Q8_0 embedding and F32 norms) ----


def test_smol_same_as_reader(smollm2_path):
    assert_same_as_reader(smollm2_path)


def test_smol_header_reads_vocabulary_and_quantized_rows(smollm2_path):
    h = read_header(smollm2_path)
    assert h.fields["tokenizer.ggml.tokens"].value[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert h.tensors["token_embd.weight"].data.shape == (49152, 576 // 32 * 34)  # Q8_0: 34 bytes per 32


# ---- files written here with gguf.GGUFWriter ----

METADATA = [  # (key, value, type)
    ("t.u8", 200, V.UINT8),
    ("t.i8", -100, V.INT8),
    ("t.u16", 60000, V.UINT16),
    ("t.i16", -30000, V.INT16),
    ("t.u32", 4_000_000_000, V.UINT32),
    ("t.i32", -2_000_000_000, V.INT32),
    ("t.f32", 1e-5, V.FLOAT32),
    ("t.bool", True, V.BOOL),
    ("t.u64", 2**64 - 1, V.UINT64),
    ("t.i64", -(2**63), V.INT64),
    ("t.f64", math.pi, V.FLOAT64),
    ("t.str", "héllo wörld 😀", V.STRING),
    ("t.empty_str", "", V.STRING),
    ("t.strs", ["a", "", "Ġthe", "<|im_start|>", "日本語"], V.ARRAY),
    ("t.ints", [3, 1, -4, 1, 5], V.ARRAY),
    ("t.floats", [0.5, -2.25, 1e-5], V.ARRAY),
    ("t.bools", [True, False, True], V.ARRAY),
    ("t.nested_ints", [[1, 2, 3], [4], [5, 6]], V.ARRAY),
    ("t.nested_strs", [["a", "b"], ["c"]], V.ARRAY),
    ("t.nested3", [[[1.5], [2.5, 3.5]], [[4.5]]], V.ARRAY),
]


def quantized(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(x, qtype)


def random_bytes(rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Any bytes are a valid K-quant block; gguf cannot quantize to these types itself."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.random.default_rng(1).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)


def write_small(path: Path, alignment: int | None = None) -> Path:
    g = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype in METADATA:
        w.add_key_value(key, value, vtype)
    w.add_tensor("f32", g.standard_normal((5, 7)).astype(np.float32))
    w.add_tensor("f32_1d", g.standard_normal(3).astype(np.float32))
    w.add_tensor("f32_3d", g.standard_normal((2, 3, 4)).astype(np.float32))
    w.add_tensor("f16", g.standard_normal((4, 6)).astype(np.float16))
    w.add_tensor("f64", g.standard_normal((2, 3)))
    w.add_tensor("i8", g.integers(-128, 128, (3, 5), dtype=np.int8))
    w.add_tensor("i32", g.integers(-(2**31), 2**31, (4,), dtype=np.int32))
    w.add_tensor("bf16", quantized(3, 8, Q.BF16), raw_dtype=Q.BF16)
    w.add_tensor("q8_0", quantized(6, 64, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("q4_1", quantized(5, 96, Q.Q4_1), raw_dtype=Q.Q4_1)
    w.add_tensor("q4_0_1d", quantized(1, 32, Q.Q4_0)[0], raw_dtype=Q.Q4_0)
    w.add_tensor("q6_k", random_bytes(2, 256, Q.Q6_K), raw_dtype=Q.Q6_K)
    w.add_tensor("empty", np.zeros((0, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_small(tmp_path_factory.mktemp("small") / "small.gguf")


@pytest.mark.parametrize("alignment", [None, 1, 64, 4096])
def test_small_same_as_reader(tmp_path, alignment):
    path = write_small(tmp_path / "small.gguf", alignment)
    assert_same_as_reader(path)
    dequantize_same_as_reader(path)
    assert read_header(path).alignment == (alignment or DEFAULT_ALIGNMENT)


def test_small_values(small):
    h = read_header(small)
    want = {key: value for key, value, _ in METADATA}
    got = {key: f.value for key, f in h.fields.items() if key.startswith("t.")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        if h.fields[key].type == V.FLOAT32 or h.fields[key].item_type == V.FLOAT32:
            assert flatten(got[key]) == pytest.approx(flatten(value), rel=1e-7), key  # stored as float32
        else:
            assert got[key] == value, key
    assert h.fields["t.nested3"].item_type == V.FLOAT32
    assert h.fields["t.strs"].item_type == V.STRING and h.fields["t.str"].item_type is None
    f32 = h.tensors["f32_3d"]
    assert (f32.tensor_type, f32.shape, f32.data.shape, f32.data.dtype) == (Q.F32, (2, 3, 4), (2, 3, 4), np.float32)
    q = h.tensors["q4_1"]
    assert (q.tensor_type, q.shape, q.data.shape, q.data.dtype) == (Q.Q4_1, (5, 96), (5, 3 * 20), np.uint8)
    assert h.tensors["empty"].data.shape == (0, 4)


def test_version_2(tmp_path, small):
    """v2 and v3 lay out a little-endian file the same way."""
    data = bytearray(small.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(data)
    assert read_header(tmp_path / "v2.gguf").version == 2
    assert_same_as_reader(tmp_path / "v2.gguf")


# ---- truncated, garbled and hostile files ----


def data_end(path: Path) -> int:
    """Where the last tensor's data ends: a file cut anywhere before this is broken, after it only padding."""
    return max(t.offset + t.n_bytes for t in read_header(path).tensors.values())


def test_truncated_everywhere(tmp_path, small):
    """Cut at every byte of the header and every 7th of the data: each is a CheckpointError naming the file."""
    data = small.read_bytes()
    end, header_end = data_end(small), read_header(small).data_offset
    cuts = [*range(header_end + 1), *range(header_end, end, 7), end - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.gguf: (truncated or corrupt|not a GGUF file)"):
            read_header(path)
        path.unlink()
    for cut in range(end, len(data)):  # only trailing padding is gone
        (tmp_path / "ok.gguf").write_bytes(data[:cut])
        assert read_header(tmp_path / "ok.gguf").tensors.keys() == read_header(small).tensors.keys()


def test_truncated_checkpoint(tmp_path):
    """Through GGUFCheckpoint, which must say the same."""
    p = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_token_list(["a", "b", "c"] * 50)
    w.add_tensor("token_embd.weight", np.ones((3, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = p.read_bytes()
    for cut in range(4, data_end(p), 13):
        (tmp_path / f"c{cut}.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"c{cut}\.gguf: truncated or corrupt GGUF file"):
            GGUFCheckpoint(tmp_path / f"c{cut}.gguf")


def check_garbage(data: bytes) -> None:
    """Any bytes: a header, or a CheckpointError naming the file; nothing else, never slowly."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "garbage.gguf"
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            h = read_header(path)
        except CheckpointError as e:
            assert "garbage.gguf: " in str(e)
        else:
            for f in h.fields.values():
                try:
                    _ = f.value
                except CheckpointError as e:  # a string that is not UTF-8, found only when read
                    assert "garbage.gguf: " in str(e) and "not UTF-8" in str(e)
        assert time.perf_counter() - start < 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_garbled_bytes(small, data):
    """Overwrite a few bytes of the header (lengths, counts, types, offsets) with anything."""
    raw = bytearray(small.read_bytes())
    header_end = read_header(small).data_offset
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(4, header_end - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        raw[at : at + len(chunk)] = chunk
    check_garbage(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_magic(tail):
    check_garbage(b"GGUF" + tail)


# Hand-built files: every length, count and type as a test wants it.


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + u32(vtype) + payload


def info(name: str, dims: list[int], ttype: int, offset: int = 0) -> bytes:
    return s(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


def build(kvs=(), infos=(), data=b"", version=3, n_kv=None, n_tensors=None, alignment=32) -> bytes:
    head = b"GGUF" + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


def write(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "bad.gguf").write_bytes(data)
    return tmp_path / "bad.gguf"


ARCH = kv("general.architecture", V.STRING, s("llama"))
F32_4 = info("w", [4], Q.F32)
HOSTILE = {
    "huge key/value count": (build([ARCH], n_kv=2**63), "claims 9223372036854775808 key/values"),
    "huge tensor count": (build([ARCH], n_tensors=2**64 - 1), "claims 18446744073709551615 tensors"),
    "huge string": (build([kv("k", V.STRING, u64(2**63))]), "'k' at byte 45 needs 9223372036854775808 bytes"),
    "huge key": (build([u64(2**62) + b"\0" * 16]), "metadata key at byte 32 needs"),
    "huge array": (build([kv("k", V.ARRAY, u32(V.UINT64) + u64(2**61))]), "array of 2305843009213693952 UINT64"),
    "huge string array": (build([kv("k", V.ARRAY, u32(V.STRING) + u64(2**40))]), "1099511627776 STRING"),
    "string array cut": (build([kv("k", V.ARRAY, u32(V.STRING) + u64(2) + s("a") + u64(99))]), "a string in 'k'"),
    "deep arrays": (build([kv("k", V.ARRAY, (u32(V.ARRAY) + u64(1)) * 100 + u32(V.UINT8) + u64(0))]), "nested more"),
    "unknown value type": (build([kv("k", 13, u32(0))]), "unknown value type 13"),
    "unknown item type": (build([kv("k", V.ARRAY, u32(99) + u64(1))]), "unknown value type 99"),
    "key not UTF-8": (build([kv(b"\xff\xfe", V.UINT8, b"\0")]), "metadata key at byte 24 is not UTF-8"),
    "duplicate key": (build([ARCH, ARCH]), "'general.architecture' appears twice"),
    "duplicate tensor": (build([ARCH], [F32_4, F32_4], b"\0" * 16), "tensor 'w' appears twice"),
    "too many dims": (build([ARCH], [info("w", [1] * 5, Q.F32)], b"\0" * 4), "5 dimensions, GGUF allows at most 4"),
    "huge n_dims": (build([ARCH], [s("w") + u32(2**32 - 1)]), "4294967295 dimensions"),
    "data past the end": (build([ARCH], [info("w", [4, 2**40], Q.F32)]), "tensor 'w' (F32 (1099511627776, 4))"),
    "huge empty tensor": (build([ARCH], [info("w", [0, 2**64 - 1], Q.F32)]), "numpy cannot hold"),
    "offset past the end": (build([ARCH], [info("w", [4], Q.F32, 2**64 - 1)], b"\0" * 16), "tensor 'w'"),
    "partial block": (build([ARCH], [info("w", [16], Q.Q8_0)], b"\0" * 34), "whole 32-blocks"),
    "alignment zero": (build([kv("general.alignment", V.UINT32, u32(0))]), "general.alignment=0"),
    "alignment 48": (build([kv("general.alignment", V.UINT32, u32(48))]), "not a power of two"),
    "alignment type": (build([kv("general.alignment", V.UINT64, u64(32))]), "general.alignment is a UINT64"),
    "header cut": (b"GGUF" + u32(3) + u64(0), "key/value count at byte 16 needs 8 bytes"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile(tmp_path, case):
    data, why = HOSTILE[case]
    with pytest.raises(CheckpointError, match=r"bad\.gguf: truncated or corrupt GGUF file \(") as e:
        read_header(write(tmp_path, data))
    assert why in str(e.value)


def test_hand_built_same_as_reader(tmp_path):
    """Empty arrays (GGUFWriter will not write them), a bool that is 2, and zero-sized tensors."""
    kvs = [
        ARCH,
        kv("empty_ints", V.ARRAY, u32(V.INT32) + u64(0)),
        kv("empty_strs", V.ARRAY, u32(V.STRING) + u64(0)),
        kv("empty_inner", V.ARRAY, u32(V.ARRAY) + u64(2) + (u32(V.UINT8) + u64(0)) * 2),
        kv("bool2", V.BOOL, b"\x02"),
    ]
    path = write(tmp_path, build(kvs, [info("z", [0, 3], Q.F32), F32_4, info("scalar", [], Q.F32, 16)], b"\0" * 20))
    assert_same_as_reader(path)
    h = read_header(path)
    assert (h.fields["empty_ints"].value, h.fields["empty_ints"].item_type) == ([], V.INT32)
    assert h.fields["empty_inner"].value == [[], []] and h.fields["bool2"].value is True
    assert h.tensors["z"].data.shape == (3, 0) and h.tensors["scalar"].data.shape == ()


def test_value_not_utf8_fails_when_read(tmp_path):
    """GGUFReader decodes values only when asked; so do we, so an unread key cannot fail the load."""
    path = write(tmp_path, build([ARCH, kv("tokens", V.ARRAY, u32(V.STRING) + u64(2) + s("ok") + s(b"\xff"))]))
    h = read_header(path)
    assert h.fields["general.architecture"].value == "llama"
    with pytest.raises(CheckpointError, match=r"bad\.gguf: metadata 'tokens' holds a string that is not UTF-8"):
        _ = h.fields["tokens"].value


def test_unknown_tensor_type(tmp_path):
    path = write(tmp_path, build([ARCH], [info("token_embd.weight", [4], 1000)], b"\0" * 64))
    with pytest.raises(
        CheckpointError,
        match=r"bad\.gguf: uses a tensor type the installed gguf library does not know .*1000.*pip install -U gguf",
    ):
        GGUFCheckpoint(path)


@pytest.mark.parametrize(
    "version, why",
    [(1, "GGUF version 1 is not supported"), (4, "GGUF version 4 is not supported"), (3 << 24, "big-endian")],
)
def test_unsupported_version(tmp_path, version, why):
    with pytest.raises(CheckpointError, match=rf"bad\.gguf: {why}"):
        read_header(write(tmp_path, build([ARCH], version=version)))


@pytest.mark.parametrize("data", [b"", b"GG", b"GGUX" + b"\0" * 40, b"\0" * 100])
def test_not_gguf(tmp_path, data):
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a GGUF file"):
        read_header(write(tmp_path, data))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.gguf: cannot read the file"):
        read_header(tmp_path / "nope.gguf")
