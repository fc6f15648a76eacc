"""Where Galaxy keeps files between runs: one root for every cache it writes, and what is in it.

    profiles/   device timings per model shape (planner/profiler.py), files NAME-DIGEST.json
    shards/     weight shards streamed to a worker, one directory per device name
                (transport/shardstore.py; bounded by `galaxy worker --shard-cache-bytes`, 4 GiB)
    onnx/       exported ONNX graphs (backends/onnx.py), shared by the workers of this machine
    native/     small native functions compiled on first use (model/int4_expand.py), shared likewise

`galaxy cache ls` and `galaxy cache clear` (galaxy/cli/cache.py) read and empty it through
`entries` and `remove`, which never touch anything outside the root.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

KINDS = ("profiles", "shards", "onnx", "native")
_PROFILE_FILE = re.compile(r"^(?P<name>.+)-[0-9a-f]{16}\.json$")


def cache_root() -> Path:
    """$GALAXY_CACHE, else $XDG_CACHE_HOME/galaxy, else ~/.cache/galaxy."""
    if os.environ.get("GALAXY_CACHE"):
        return Path(os.environ["GALAXY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "galaxy"


def cache_dir(kind: str) -> Path:
    """The directory of one kind of cache ("profiles", "shards", "onnx" or "native") under the root."""
    return cache_root() / kind


@dataclass(frozen=True)
class CacheEntry:
    """What one device (or, for ONNX graphs, the machine) keeps in one kind of cache."""

    kind: str
    device: str  # "" for onnx: graphs are shared, not per device
    paths: tuple[Path, ...]
    files: int
    bytes: int


def _size(path: Path) -> tuple[int, int]:
    """(files, bytes) under a file or directory."""
    if path.is_file():
        return 1, path.stat().st_size
    files = total = 0
    for p in path.rglob("*"):
        if p.is_file():
            files, total = files + 1, total + p.stat().st_size
    return files, total


def _safe(name: str) -> str:
    """A device name as the profiler writes it into file names."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def entries(kind: str | None = None, device: str | None = None) -> list[CacheEntry]:
    """What the cache holds, per kind and device; `kind` / `device` keep only those."""
    out = []
    for k in KINDS if kind is None else (kind,):
        d = cache_dir(k)
        if not d.is_dir():
            continue
        groups: dict[str, list[Path]] = {}
        if k == "shards":
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                groups[sub.name] = [sub]
        elif k == "profiles":
            for f in sorted(d.glob("*.json")):
                m = _PROFILE_FILE.match(f.name)
                groups.setdefault(m.group("name") if m else "", []).append(f)
        else:
            groups[""] = sorted(p for p in d.iterdir() if not p.name.startswith("."))  # not the export lock
        for name, paths in groups.items():
            if not paths or device is not None and name not in (device, _safe(device)):
                continue
            sizes = [_size(p) for p in paths]
            out.append(CacheEntry(k, name, tuple(paths), sum(f for f, _ in sizes), sum(b for _, b in sizes)))
    return out


def remove(entry: CacheEntry) -> None:
    """Delete what an entry holds (only paths inside the cache root)."""
    root = cache_root().resolve()
    for p in entry.paths:
        if root not in p.resolve().parents:
            raise ValueError(f"{p} is outside the cache root {root}")
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
