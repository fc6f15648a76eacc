"""With peers (a split over two ranks), a compiled decode half that fails ends the step on every rank, and only
the rank whose graph raised decodes eagerly from then on (its graph would fail again every step); the peer that
saw the step end in its collective keeps its graphs, and the next step gives the eager step's logits."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import GalaxyError
from galaxy.parallel import decode_graph
from tests.parallel.test_decode_graph import _load, _one_token_logits


@pytest.fixture
def compile_on(monkeypatch):  # the graphs traced, not inductor-compiled (test_decode_graph.py says why)
    monkeypatch.setenv(decode_graph.COMPILE_ENV, "traced")


def test_a_graph_error_turns_the_graphs_off_on_its_rank_and_a_collective_error_does_not(compile_on):
    with _load(2, "int4") as ex:
        broken, peer = (rt.graphs for rt in ex.runtimes)

        def fails(*args):
            raise RuntimeError("inductor said no")

        broken.mlp.fn = fails
        with pytest.raises((GalaxyError, RuntimeError), match="inductor said no"):
            _one_token_logits(ex, 5)
        assert broken.failed == "inductor said no" and peer.failed is None  # the peer's was a collective's error
        after = _one_token_logits(ex, 5)  # rank 0 eager, rank 1 compiled: the same collectives, the same logits
        for rt in ex.runtimes:
            rt.graphs = None
        assert torch.equal(after, _one_token_logits(ex, 5))
