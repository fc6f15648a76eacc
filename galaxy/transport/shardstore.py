"""Weight streaming: a device needs no model file.

The coordinator reads the checkpoint once and streams each worker exactly its shard, one tensor
at a time (so it holds about one tensor per worker above its own needs), ending with a SHA-256
over every tensor. The worker recomputes the hash, refuses a mismatch, and keeps the shard in a
bounded on-disk cache keyed by (model identity, shard spec), so a restarted worker is not sent
it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import GalaxyError
from ..parallel.sharding import ShardSpec, iter_shard_state, meta_model
from .protocol import from_proto

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
    """(name, tensor | None, alias) of a shard, one tensor at a time (no whole-model copy)."""
    model = meta_model(source.config, spec)
    for key, t in iter_shard_state(source, spec, model):
        yield (key, None, "embed.tokens") if t is None else (key, t.float(), "")


class ShardStore:
    """Shards pushed to this worker: in memory until loaded, and in a bounded on-disk cache."""

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

    def receive(self, parts) -> tuple[str, int, bool]:
        """Consume a PushShard stream; returns (content hash, bytes, cached on disk)."""
        it = iter(parts)
        head = next(it, None)
        if head is None or not head.model_hash or not head.spec_json:
            raise GalaxyError("a shard push must start with model_hash and spec_json")
        h, state, total, final = hashlib.sha256(), {}, 0, ""
        for part in it:
            if part.content_hash:
                final = part.content_hash
                break
            if part.alias_of:
                if part.alias_of not in state:
                    raise GalaxyError(f"tensor {part.name!r} aliases {part.alias_of!r}, which was not sent")
                digest(h, part.name, None, part.alias_of)
                state[part.name] = state[part.alias_of]
                continue
            t = from_proto(part.tensor, f"shard tensor {part.name}")
            digest(h, part.name, t)
            state[part.name] = t
            total += t.numel() * t.element_size()
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
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(f))
        aliases = json.loads(meta.get("aliases", "{}"))
        h = hashlib.sha256()
        for name in json.loads(meta.get("order", "[]")):
            if name in aliases:
                state[name] = state[aliases[name]]
                digest(h, name, None, aliases[name])
            else:
                digest(h, name, state[name])
        if h.hexdigest() != content_hash:
            f.unlink(missing_ok=True)
            raise GalaxyError(f"cached shard {content_hash[:12]} is corrupt on disk (deleted): push it again")
        os.utime(f)  # most recently used
        return state

    # -- disk cache -----------------------------------------------------------------------
    def _file(self, content_hash: str) -> Path:
        return (self.dir or Path("/nonexistent")) / f"{content_hash}.safetensors"

    def _save(self, content_hash: str, mh: str, spec: str, state: dict, total: int) -> bool:
        if not self.dir or total > self.max_bytes:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)  # it may have been cleaned away since start
        aliases = _aliases(state)
        unique = {k: v.contiguous() for k, v in state.items() if k not in aliases}
        save_file(unique, str(self._file(content_hash)),
                  metadata={"order": json.dumps(list(state)), "aliases": json.dumps(aliases)})
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


def _aliases(state: dict) -> dict[str, str]:
    """name -> earlier name of the very same tensor (a tied LM head)."""
    out, seen = {}, {}
    for k, v in state.items():
        if id(v) in seen:
            out[k] = seen[id(v)]
        else:
            seen[id(v)] = k
    return out
