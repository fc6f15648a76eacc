"""Where Galaxy keeps files between runs: one root for every cache it writes.

    profiles/   device timings per model shape (planner/profiler.py)
    shards/     weight shards streamed to a worker, per device name (transport/shardstore.py)
    onnx/       exported ONNX graphs (backends/onnx.py)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$GALAXY_CACHE, else $XDG_CACHE_HOME/galaxy, else ~/.cache/galaxy."""
    if os.environ.get("GALAXY_CACHE"):
        return Path(os.environ["GALAXY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "galaxy"


def cache_dir(kind: str) -> Path:
    """The directory of one kind of cache ("profiles", "shards" or "onnx") under the root."""
    return cache_root() / kind
