"""Weight streaming: a device needs no model file.

The coordinator reads the checkpoint once and streams each worker exactly its shard, one tensor
at a time (so it holds about one tensor per worker above its own needs), ending with a SHA-256
over every tensor. The worker recomputes the hash, refuses a mismatch, and keeps the shard in a
bounded on-disk cache keyed by (model identity, shard spec), so a restarted worker is not sent
it again.

Memory stays bounded on a small device (galaxy.parallel.memory): a tensor arrives in chunks of
PUSH_CHUNK_BYTES, which the worker copies straight into the tensor it allocated when the tensor
was announced -- no message ever holds a whole tensor, and no tensor is copied twice. The disk
cache is written and read the same way, a chunk at a time, and its page cache is flushed and
dropped as it goes: a memory cgroup counts page cache, and dirty pages it cannot reclaim fast
enough are what its OOM killer found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import GalaxyError
from ..parallel.memory import PUSH_CHUNK_BYTES
from ..parallel.sharding import ShardSpec, iter_shard_state, meta_model
from ..v1 import worker_pb2 as pb
from .protocol import announced_layout, to_proto_dtype

log = logging.getLogger(__name__)

_SAMPLE = 1 << 20  # bytes hashed from each end of every checkpoint file


def model_hash(source) -> str:
    """Identity of a checkpoint: its config plus each file's name, size, first and last MiB.

    Cheap (no full read) and changes whenever the weights file is replaced by another."""
    h = hashlib.sha256(json.dumps(source.config.to_dict(), sort_keys=True).encode())
    seed = getattr(source, "seed", None)
    if seed is not None:  # random init: the recipe is the identity
        h.update(f"random:{seed}:{getattr(source, 'std', '')}".encode())
        return h.hexdigest()
    root = Path(source.path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            if size > _SAMPLE:
                fh.seek(max(_SAMPLE, size - _SAMPLE))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def source_file_bytes(source) -> int:
    """Bytes of the checkpoint file(s) a device maps while it reads its shard itself (0: random init)."""
    if getattr(source, "seed", None) is not None:
        return 0
    root = Path(source.path)
    if root.is_file():
        return root.stat().st_size
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0


def spec_json(spec: ShardSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def spec_from_json(text: str) -> ShardSpec:
    try:
        d = json.loads(text)
        return ShardSpec(tuple(d["heads"]), tuple(d["cols"]), tuple(d["vocab"]), tuple(d["layers"]),
                         bool(d["embed"]), bool(d["head"]))
    except (ValueError, KeyError, TypeError) as e:
        raise GalaxyError(f"malformed shard spec {text[:200]!r}: {e}") from None


def digest(h, name: str, t: torch.Tensor | None, alias: str = "") -> None:
    """Fold one tensor (or an alias) into the running shard hash."""
    h.update(name.encode() + b"\0")
    if t is None:
        h.update(b"alias:" + alias.encode())
        return
    t = t.contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the tensor


def iter_shard(source, spec: ShardSpec):
    """(name, tensor | None, alias) of a shard, one tensor at a time (no whole-model copy); a tied
    head comes last, as an alias of the embedding sent before it."""
    model = meta_model(source.config, spec)
    tied = []
    for key, t in iter_shard_state(source, spec, model):
        if t is None:
            tied.append(key)
        else:
            yield key, t.float(), ""
    for key in tied:
        yield key, None, "embed.tokens"


def tensor_parts(name: str, t: torch.Tensor, chunk: int = PUSH_CHUNK_BYTES) -> Iterator[pb.ShardPart]:
    """One tensor of a push: its announcement (name, dtype, shape), then its bytes in chunks."""
    t = t.detach().contiguous().cpu()
    yield pb.ShardPart(name=name, tensor=pb.Tensor(dtype=to_proto_dtype(t.dtype), shape=list(t.shape)))
    raw = memoryview(_bytes_of(t))
    for a in range(0, len(raw), chunk):
        yield pb.ShardPart(chunk=bytes(raw[a: a + chunk]))


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes as a writable uint8 array over the same memory (any dtype, bf16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class _Filling:
    """The tensor being received: allocated at its final size when announced, filled chunk by chunk."""

    def __init__(self, name: str, t: torch.Tensor):
        self.name, self.tensor, self.raw, self.filled = name, t, _bytes_of(t), 0

    def add(self, data: bytes, h) -> None:
        end = self.filled + len(data)
        if end > len(self.raw):
            raise GalaxyError(f"tensor {self.name!r}: {end} bytes arrived for a {len(self.raw)}-byte tensor")
        self.raw[self.filled: end] = np.frombuffer(data, dtype=np.uint8)
        h.update(data)
        self.filled = end

    def done(self) -> None:
        if self.filled != len(self.raw):
            raise GalaxyError(f"tensor {self.name!r}: {self.filled} of its {len(self.raw)} bytes arrived")


class ShardStore:
    """Shards pushed to this worker: in memory until loaded, and in a bounded on-disk cache.

    At most one pushed shard waits in memory for its load: a newer push drops it (it is still in
    the disk cache, if there is one), so a push whose load never came cannot pin a device's memory."""

    def __init__(self, cache_dir: str | Path | None, max_bytes: int = 4 << 30):
        self.dir = Path(cache_dir) if cache_dir else None
        self.max_bytes = max_bytes
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # content hash -> state dict
        self.index: dict[tuple[str, str], str] = {}  # (model hash, spec json) -> content hash
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            for meta in self.dir.glob("*.json"):
                try:
                    m = json.loads(meta.read_text())
                    self.index[(m["model_hash"], m["spec"])] = m["content_hash"]
                except (OSError, ValueError, KeyError):
                    log.warning("ignoring unreadable shard cache entry %s", meta)

    def have(self, model_hash: str, spec: str) -> str:
        h = self.index.get((model_hash, spec), "")
        return h if h and (h in self.pending or self._file(h).exists()) else ""

    @property
    def pending_bytes(self) -> int:
        """Bytes of pushed shards waiting for their load (counted once by the worker's admission)."""
        return sum(_state_bytes(st) for st in self.pending.values())

    def drop_pending(self) -> None:
        self.pending.clear()

    def receive(self, parts, admit: Callable[[pb.ShardPart], int] | None = None,
                trim: Callable[[], None] | None = None) -> tuple[str, int, bool]:
        """Consume a PushShard stream; returns (content hash, bytes, cached on disk).

        admit(head) sees the header before any tensor arrives: it raises to refuse the push, or
        returns the most bytes of tensors the push may bring (0: no bound); more is refused.
        trim() is called every _FLUSH_BYTES received: the chunks' freed buffers sit between the
        tensors in the heap, and would otherwise add up to ~30 MiB over a 130 MiB shard."""
        it = iter(parts)
        head = next(it, None)
        if head is None or not head.model_hash or not head.spec_json:
            raise GalaxyError("a shard push must start with model_hash and spec_json")
        self.pending.clear()  # an older push nobody loaded
        limit = admit(head) if admit is not None else 0
        h, state, total, final, cur, since = hashlib.sha256(), {}, 0, "", None, 0
        for part in it:
            if part.chunk:
                if cur is None:
                    raise GalaxyError("tensor bytes arrived before any tensor was announced")
                cur.add(part.chunk, h)
                since += len(part.chunk)
                if trim is not None and since >= _FLUSH_BYTES:
                    trim()
                    since = 0
                continue
            if cur is not None:
                cur.done()
                cur = None
            if part.content_hash:
                final = part.content_hash
                break
            if part.alias_of:
                if part.alias_of not in state:
                    raise GalaxyError(f"tensor {part.name!r} aliases {part.alias_of!r}, which was not sent")
                digest(h, part.name, None, part.alias_of)
                state[part.name] = state[part.alias_of]
                continue
            if not part.name or not part.HasField("tensor"):
                raise GalaxyError("a shard part must announce a tensor, alias one, or carry bytes")
            shape = tuple(int(d) for d in part.tensor.shape)
            dtype, nbytes = announced_layout(part.tensor.dtype, shape, f"shard tensor {part.name}")
            total += nbytes
            if limit and total > limit:
                raise GalaxyError(f"the push brings more than the {limit} bytes its shard spec holds "
                                  f"(tensor {part.name!r} reaches {total})")
            h.update(part.name.encode() + b"\0")
            h.update(f"{dtype}:{shape}".encode())
            cur = _Filling(part.name, torch.empty(shape, dtype=dtype))
            state[part.name] = cur.tensor
            if part.tensor.data:  # a sender may put the first bytes in the announcement itself
                cur.add(part.tensor.data, h)
        if cur is not None:
            cur.done()
        mine = h.hexdigest()
        if not final or final != mine:
            raise GalaxyError(f"shard content hash mismatch (sent {final or 'none'}, received {mine}): "
                              "the transfer was cut or corrupted; push it again")
        if head.n_tensors and len(state) != head.n_tensors:
            raise GalaxyError(f"shard push announced {head.n_tensors} tensors, {len(state)} arrived")
        self.pending[mine] = state
        self.index[(head.model_hash, head.spec_json)] = mine
        cached = self._save(mine, head.model_hash, head.spec_json, state, total)
        return mine, total, cached

    def put(self, model_hash: str, spec: str, state: dict[str, torch.Tensor]) -> str:
        """Keep a shard this device built itself (from a file or random init) for fast reloads."""
        h, total = hashlib.sha256(), 0
        aliases = _aliases(state)
        for name, t in state.items():
            digest(h, name, None if name in aliases else t, aliases.get(name, ""))
            total += 0 if name in aliases else t.numel() * t.element_size()
        key = h.hexdigest()
        self.index[(model_hash, spec)] = key
        if not self._save(key, model_hash, spec, state, total):
            self.index.pop((model_hash, spec), None)
        return key

    def take(self, content_hash: str) -> dict[str, torch.Tensor]:
        """The shard's state dict: just pushed, or read back (and re-verified) from the disk cache."""
        if content_hash in self.pending:
            return self.pending.pop(content_hash)
        f = self._file(content_hash)
        if not f.exists():
            raise GalaxyError(f"no shard {content_hash[:12]} on this device: push it first")
        try:
            state, order, aliases = _read_safetensors(f)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            f.unlink(missing_ok=True)
            raise GalaxyError(f"cached shard {content_hash[:12]} is unreadable ({e}; deleted): push it again") from None
        h = hashlib.sha256()
        for name in order:
            if name in aliases:
                state[name] = state[aliases[name]]
                digest(h, name, None, aliases[name])
            else:
                digest(h, name, state[name])
        if h.hexdigest() != content_hash:
            f.unlink(missing_ok=True)
            raise GalaxyError(f"cached shard {content_hash[:12]} is corrupt on disk (deleted): push it again")
        os.utime(f)  # most recently used
        return {name: state[name] for name in order}

    # -- disk cache -----------------------------------------------------------------------
    def _file(self, content_hash: str) -> Path:
        return (self.dir or Path("/nonexistent")) / f"{content_hash}.safetensors"

    def _save(self, content_hash: str, mh: str, spec: str, state: dict, total: int) -> bool:
        if not self.dir or total > self.max_bytes:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)  # it may have been cleaned away since start
        _write_safetensors(self._file(content_hash), state)
        (self.dir / f"{content_hash}.json").write_text(json.dumps(
            {"model_hash": mh, "spec": spec, "content_hash": content_hash, "bytes": total}))
        self._evict()
        return True

    def _evict(self) -> None:
        files = sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        used = sum(f.stat().st_size for f in files)
        for f in files:
            if used <= self.max_bytes:
                break
            used -= f.stat().st_size
            f.unlink(missing_ok=True)
            f.with_suffix(".json").unlink(missing_ok=True)
            self.index = {k: v for k, v in self.index.items() if v != f.stem}


# -- the cache file: safetensors, written and read a chunk at a time ---------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}
_ST_FROM = {v: k for k, v in _ST_DTYPES.items()}
_FLUSH_BYTES = 16 << 20  # written or read this much: flush it to disk and drop it from the page cache


def _state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for name, t in state.items() if name not in _aliases(state))


def _drop_cache(fd: int, write: bool) -> None:
    """Let the kernel forget the file's pages we wrote or read (they count in a memory cgroup)."""
    if write:
        os.fdatasync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """state as a safetensors file (aliases stored once, named in the metadata), from the tensors'
    own memory: no serialised copy of the shard is ever built."""
    aliases = _aliases(state)
    unique = [(k, v.contiguous()) for k, v in state.items() if k not in aliases]
    header, offset = {}, 0
    for name, t in unique:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"order": json.dumps(list(state)), "aliases": json.dumps(aliases)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        since = 0
        for _, t in unique:
            data = memoryview(_bytes_of(t))
            for a in range(0, len(data), PUSH_CHUNK_BYTES):
                since += f.write(data[a: a + PUSH_CHUNK_BYTES])
                if since >= _FLUSH_BYTES:
                    f.flush()
                    _drop_cache(f.fileno(), write=True)
                    since = 0
        f.flush()
        _drop_cache(f.fileno(), write=True)
    os.replace(tmp, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """(unique tensors, names in order, aliases) of a file _write_safetensors made, each tensor read
    straight into its final memory."""
    state = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {}) or {}
        base, since = 8 + n, 0
        for name, d in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty([int(x) for x in d["shape"]], dtype=_ST_FROM[d["dtype"]])
            a, b = (int(x) for x in d["data_offsets"])
            raw = memoryview(_bytes_of(t))
            if b - a != len(raw):
                raise ValueError(f"tensor {name}: {b - a} bytes on disk for shape {d['shape']} {d['dtype']}")
            f.seek(base + a)
            got = 0
            while got < len(raw):
                k = f.readinto(raw[got: got + PUSH_CHUNK_BYTES])
                if not k:
                    raise ValueError(f"tensor {name}: the file ends after {got} of its {len(raw)} bytes")
                got += k
                since += k
                if since >= _FLUSH_BYTES:
                    _drop_cache(f.fileno(), write=False)
                    since = 0
            state[name] = t
        _drop_cache(f.fileno(), write=False)
    order = json.loads(meta.get("order", "[]")) or list(state)
    return state, order, json.loads(meta.get("aliases", "{}"))


def _aliases(state: dict) -> dict[str, str]:
    """name -> earlier name of the very same tensor (a tied LM head)."""
    out, seen = {}, {}
    for k, v in state.items():
        if id(v) in seen:
            out[k] = seen[id(v)]
        else:
            seen[id(v)] = k
    return out
