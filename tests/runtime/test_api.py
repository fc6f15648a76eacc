"""The Python API an on-device app uses: connect, load, generate/stream/encode, typed errors."""

from __future__ import annotations

import numpy as np
import pytest

import galaxy
from galaxy.errors import GalaxyError, PeerUnreachable, PlanMismatch


def test_generate_stream_and_chat_over_local_worker_processes(smollm2_path):
    with galaxy.connect(local=2) as cluster:
        assert [d.name for d in cluster.devices()] == ["local0", "local1"]
        lm = cluster.load()
        text = lm.generate("The capital of France is", max_new_tokens=4)
        assert "Paris" in text
        pieces = list(lm.stream("The capital of France is", max_new_tokens=4))
        assert "".join(pieces) == text and len(pieces) >= 2
        reply = lm.chat([{"role": "user", "content": "What is the capital of Germany?"}], max_new_tokens=12)
        assert "Berlin" in reply


def test_encode_returns_normalised_sentence_embeddings(minilm_path):
    with galaxy.connect(local=3, transport="inproc") as cluster:
        enc = cluster.load("minilm", weights=[0.9, 0.6, 0.45])
        e = enc.encode(["hello world", "hi there", "the stock market fell"])
        assert e.shape == (3, 384) and e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(e[0, :2], [-0.034477, 0.031023], atol=1e-5)
        assert e[0] @ e[1] > e[0] @ e[2]
        with pytest.raises(GalaxyError, match="encoder"):
            enc.generate("hello")


def test_encode_on_a_causal_lm_is_a_clear_error():
    with galaxy.connect(local=1, transport="inproc") as cluster:
        lm = cluster.load(random_init="tiny-gpt2")
        with pytest.raises(GalaxyError, match="causal LM; encode"):
            lm.encode("x")


def test_unreachable_device_raises_peer_unreachable():
    with pytest.raises(PeerUnreachable, match="127.0.0.1:1"):
        galaxy.connect(addresses=["127.0.0.1:1"])


def test_split_for_another_device_count_is_a_plan_mismatch():
    with galaxy.connect(local=2, transport="inproc") as cluster, pytest.raises(PlanMismatch, match="3 weights for 2"):
        cluster.load(random_init="tiny-llama", weights=[1, 1, 1])


def test_connect_needs_exactly_one_way_to_find_devices():
    with pytest.raises(GalaxyError, match="exactly one"):
        galaxy.connect()
    with pytest.raises(GalaxyError, match="exactly one"):
        galaxy.connect(["127.0.0.1:5"], local=2)
