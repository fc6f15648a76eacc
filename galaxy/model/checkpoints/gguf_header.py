"""The GGUF header (metadata and tensor table) read with `struct` over a memory map.

`gguf.GGUFReader` builds a numpy view for every part of every key/value, which takes seconds on a
49k-token vocabulary; every worker opens the file, so that cost lands on every start-up. This module
walks the header once (GGUF v2 and v3, little-endian) and keeps strings as bytes until someone asks
for them. Tensor data stays in the mapped file, viewed in GGUFReader's layout, which is what
`gguf.quants.dequantize` expects:

- F32, F16, F64, I8, I16, I32, I64: the typed array, shape [..., rows, cols];
- every other type (BF16 and the quantized ones): uint8, shape [..., rows, bytes per row].

Every read is checked against the file size first, so a truncated or hostile file gives a
CheckpointError naming the file rather than an IndexError, a struct.error or a huge allocation.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .source import CheckpointError

VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 16  # arrays of arrays nested deeper than this are refused, not recursed into
MAX_DIMS = 4  # as ggml (GGML_MAX_DIMS) and llama.cpp's own loader

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALAR_FORMATS = {  # fixed-size value types -> (numpy dtype, struct format), little-endian as GGUF stores them
    GGUFValueType.UINT8: ("<u1", "<B"),
    GGUFValueType.INT8: ("<i1", "<b"),
    GGUFValueType.UINT16: ("<u2", "<H"),
    GGUFValueType.INT16: ("<i2", "<h"),
    GGUFValueType.UINT32: ("<u4", "<I"),
    GGUFValueType.INT32: ("<i4", "<i"),
    GGUFValueType.FLOAT32: ("<f4", "<f"),
    GGUFValueType.BOOL: ("?", "<?"),
    GGUFValueType.UINT64: ("<u8", "<Q"),
    GGUFValueType.INT64: ("<i8", "<q"),
    GGUFValueType.FLOAT64: ("<f8", "<d"),
}
_SCALARS = {t: np.dtype(d) for t, (d, _) in _SCALAR_FORMATS.items()}
_UNPACK = {t: struct.Struct(f).unpack_from for t, (_, f) in _SCALAR_FORMATS.items()}
# The fewest bytes one array item of each type takes: caps an array's length by what is left of the file.
_MIN_ITEM_SIZE = {**{t: d.itemsize for t, d in _SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV_SIZE = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
# Tensor types GGUFReader hands out as typed arrays; the rest are raw bytes for gguf.quants.
_TYPED = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.F64: np.dtype(np.float64),
    GGMLQuantizationType.I8: np.dtype(np.int8),
    GGMLQuantizationType.I16: np.dtype(np.int16),
    GGMLQuantizationType.I32: np.dtype(np.int32),
    GGMLQuantizationType.I64: np.dtype(np.int64),
}


class GGUFField:
    """One metadata key/value.

    `type` is the value's GGUF type (ARRAY for arrays). `item_type` is the type of an array's
    innermost items: None for scalars, and for an array of arrays its first item's (None if that is
    empty). `value` is a plain Python value: int, float (a float32 widened exactly), bool, str, or a
    list of them (nested for arrays of arrays). Strings are decoded on first access, so a key nobody
    reads cannot fail the load.
    """

    __slots__ = ("name", "type", "item_type", "_raw", "_value", "_path")

    def __init__(self, name: str, type: GGUFValueType, item_type: GGUFValueType | None, raw: Any, path: str):
        self.name, self.type, self.item_type = name, type, item_type
        self._raw, self._value, self._path = raw, None, path

    @property
    def value(self) -> Any:
        if self._raw is not None:
            try:
                self._value = _decode(self._raw)
            except UnicodeDecodeError as e:
                raise CheckpointError(
                    f"{self._path}: metadata {self.name!r} holds a string that is not UTF-8 ({e})"
                ) from e
            self._raw = None
        return self._value

    def __repr__(self) -> str:
        item = f"[{self.item_type.name}]" if self.item_type is not None else ""
        return f"GGUFField({self.name!r}, {self.type.name}{item})"


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # elements, outermost first (torch order; the file lists dims innermost first)
    offset: int  # of the data, in bytes from the start of the file
    n_bytes: int
    data: np.ndarray = field(repr=False)  # read-only view of the mapped file, laid out as the module docstring says


@dataclass(frozen=True, eq=False)
class GGUFHeader:
    path: str
    version: int
    alignment: int
    data_offset: int  # where the data section starts (aligned); tensor offsets count from here
    fields: dict[str, GGUFField]  # in file order
    tensors: dict[str, GGUFTensor]  # in file order


class _Corrupt(Exception):
    """Raised inside the parser; read_header turns it into a CheckpointError naming the file."""


def read_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, or a CheckpointError saying what is wrong with it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if magic == b"GGUF" else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the file ({e})") from e
    if buf is None:
        raise CheckpointError(
            f"{path}: not a GGUF file (starts with {magic!r}, GGUF files start with b'GGUF'); "
            "pass a .gguf written by llama.cpp's converter or an HF-style directory"
        )
    try:
        return _Parser(buf, str(path)).header()
    except (_Corrupt, struct.error) as e:  # struct.error only if a bounds check above it is wrong
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({e}); download or convert it again") from e


def _decode(raw: Any) -> Any:
    """Bytes -> str, through arrays (all items of one array have one type)."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8")
    if not isinstance(raw, list) or not raw:
        return raw
    if isinstance(raw[0], bytes):
        return [b.decode("utf-8") for b in raw]
    if isinstance(raw[0], list):
        return [_decode(x) for x in raw]
    return raw


class _Parser:
    """One pass over the header. Readers take a byte offset; those of variable size also return where they stopped."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.size, self.path = buf, len(buf), path

    def need(self, off: int, n: int, what: str) -> None:
        if off + n > self.size:
            raise _Corrupt(f"{what} at byte {off} needs {n} bytes, the file ends at {self.size}")

    def u32(self, off: int, what: str) -> int:
        self.need(off, 4, what)
        return _U32.unpack_from(self.buf, off)[0]

    def u64(self, off: int, what: str) -> int:
        self.need(off, 8, what)
        return _U64.unpack_from(self.buf, off)[0]

    def string(self, off: int, what: str) -> tuple[bytes, int]:
        n = self.u64(off, f"length of {what}")
        self.need(off + 8, n, what)
        return self.buf[off + 8 : off + 8 + n], off + 8 + n

    def text(self, off: int, what: str) -> tuple[str, int]:
        raw, end = self.string(off, what)
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError as e:
            raise _Corrupt(f"{what} at byte {off} is not UTF-8 ({e})") from e

    def value_type(self, off: int, what: str) -> GGUFValueType:
        raw = self.u32(off, f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"{what} at byte {off} has unknown value type {raw}") from None

    # ---- the file, top down ----

    def header(self) -> GGUFHeader:
        version = self.u32(4, "version")
        if version not in VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                why = "big-endian GGUF files are not supported"
            else:
                why = f"GGUF version {version} is not supported (Galaxy reads versions {VERSIONS[0]} and {VERSIONS[1]})"
            raise CheckpointError(f"{self.path}: {why}; convert the model again with a current llama.cpp")
        n_tensors, n_kv = self.u64(8, "tensor count"), self.u64(16, "key/value count")
        off = 24
        if n_kv * _MIN_KV_SIZE > self.size - off:
            raise _Corrupt(f"the header claims {n_kv} key/values, more than fit in {self.size} bytes")
        fields: dict[str, GGUFField] = {}
        for _ in range(n_kv):
            field, off = self.field(off)
            if field.name in fields:
                raise _Corrupt(f"metadata key {field.name!r} appears twice")
            fields[field.name] = field
        if n_tensors * _MIN_TENSOR_INFO_SIZE > self.size - off:
            raise _Corrupt(f"the header claims {n_tensors} tensors, more than fit in {self.size} bytes")
        infos = []
        for _ in range(n_tensors):
            info, off = self.tensor_info(off)
            infos.append(info)
        alignment = self.alignment(fields.get("general.alignment"))
        data_offset = -(-off // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for info in infos:
            t = self.tensor(*info, data_offset)
            if t.name in tensors:
                raise _Corrupt(f"tensor {t.name!r} appears twice")
            tensors[t.name] = t
        return GGUFHeader(self.path, version, alignment, data_offset, fields, tensors)

    def field(self, off: int) -> tuple[GGUFField, int]:
        key, off = self.text(off, "metadata key")
        vtype = self.value_type(off, repr(key))
        off += 4
        if vtype == GGUFValueType.ARRAY:
            raw, item_type, off = self.array(off, repr(key), depth=1)
        elif vtype == GGUFValueType.STRING:
            raw, off = self.string(off, repr(key))
            item_type = None
        else:
            self.need(off, _SCALARS[vtype].itemsize, repr(key))
            raw, item_type = _UNPACK[vtype](self.buf, off)[0], None
            off += _SCALARS[vtype].itemsize
        return GGUFField(key, vtype, item_type, raw, self.path), off

    def array(self, off: int, what: str, depth: int) -> tuple[list, GGUFValueType | None, int]:
        """An array's items (strings as bytes) and the type of its innermost items."""
        if depth > MAX_ARRAY_DEPTH:
            raise _Corrupt(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        itype = self.value_type(off, f"items of {what}")
        n = self.u64(off + 4, f"length of {what}")
        off += 12
        if n * _MIN_ITEM_SIZE[itype] > self.size - off:
            raise _Corrupt(f"{what}: an array of {n} {itype.name} at byte {off} does not fit in the file")
        if itype in _SCALARS:
            dtype = _SCALARS[itype]
            items = np.frombuffer(self.buf, dtype, n, off).tolist()
            return items, itype, off + n * dtype.itemsize
        if itype == GGUFValueType.ARRAY:
            items, leaf = [], None
            for i in range(n):
                item, item_leaf, off = self.array(off, what, depth + 1)
                items.append(item)
                leaf = item_leaf if i == 0 else leaf  # as GGUFReader: the first item's type
            return items, leaf, off
        # Strings: the hot loop (49k tokens, 49k merges), so struct and the bounds check are inlined.
        buf, size, unpack = self.buf, self.size, _U64.unpack_from
        items = []
        append = items.append
        for _ in range(n):
            if off + 8 > size:
                self.need(off, 8, f"length of a string in {what}")
            k = unpack(buf, off)[0]
            off += 8
            if off + k > size:
                self.need(off, k, f"a string in {what}")
            append(buf[off : off + k])
            off += k
        return items, itype, off

    def tensor_info(self, off: int) -> tuple[tuple, int]:
        name, off = self.text(off, "tensor name")
        n_dims = self.u32(off, f"dimension count of tensor {name!r}")
        off += 4
        if n_dims > MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions, GGUF allows at most {MAX_DIMS}")
        self.need(off, 8 * n_dims + 12, f"dimensions, type and offset of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, off)
        off += 8 * n_dims
        raw_type, rel_offset = _U32.unpack_from(self.buf, off)[0], _U64.unpack_from(self.buf, off + 4)[0]
        return (name, dims, raw_type, rel_offset), off + 12

    def alignment(self, field: GGUFField | None) -> int:
        if field is None:
            return DEFAULT_ALIGNMENT
        if field.type != GGUFValueType.UINT32:
            raise _Corrupt(f"general.alignment is a {field.type.name}, GGUF requires a UINT32")
        a = field.value
        if a == 0 or a & (a - 1):
            raise _Corrupt(f"general.alignment={a} is not a power of two")
        return a

    def tensor(self, name: str, dims: tuple[int, ...], raw_type: int, rel_offset: int, data_offset: int) -> GGUFTensor:
        try:
            ttype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{self.path}: uses a tensor type the installed gguf library does not know "
                f"(tensor {name!r}: {raw_type} is not a valid GGMLQuantizationType); "
                "upgrade it with `pip install -U gguf` or re-quantize the file"
            ) from None
        shape = tuple(reversed(dims))
        n_elements = math.prod(dims)
        if ttype in _TYPED:
            dtype, view_shape, count = _TYPED[ttype], shape, n_elements
        else:
            if not shape or shape[-1] % block:
                raise _Corrupt(f"tensor {name!r} of shape {shape}: rows of {ttype.name} must be whole {block}-blocks")
            dtype, view_shape = np.dtype(np.uint8), (*shape[:-1], shape[-1] // block * type_size)
            count = n_elements // block * type_size
        n_bytes = count * dtype.itemsize
        start = data_offset + rel_offset
        if start + n_bytes > self.size:
            raise _Corrupt(
                f"tensor {name!r} ({ttype.name} {shape}) needs bytes [{start}, {start + n_bytes}), "
                f"the file ends at {self.size}"
            )
        try:
            data = np.frombuffer(self.buf, dtype, count, start).reshape(view_shape)
        except ValueError as e:  # no elements but dims numpy cannot hold, say (2**63, 0)
            raise _Corrupt(f"tensor {name!r} has shape {shape}, which numpy cannot hold ({e})") from e
        return GGUFTensor(name, ttype, shape, start, n_bytes, data)
