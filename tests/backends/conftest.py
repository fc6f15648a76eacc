"""One graph cache for the whole session: shards of the same shape share graphs, as on a device."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-graphs")
