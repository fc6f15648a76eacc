"""One graph cache for the whole session: shards of the same shape share graphs, as on a device."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """$XDG_CACHE_HOME/galaxy/onnx under a temporary XDG_CACHE_HOME (see xdg_cache)."""
    return tmp_path_factory.mktemp("xdg") / "galaxy" / "onnx"


@pytest.fixture
def xdg_cache(onnx_cache, monkeypatch):
    """Point default_cache_dir() (the profiler's cache) at the session's cache, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(onnx_cache.parent.parent))
    return onnx_cache
