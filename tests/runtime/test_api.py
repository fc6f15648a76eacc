"""The Python API an on-device app uses: connect, load, generate/stream/encode, typed errors."""

from __future__ import annotations

import numpy as np
import pytest

import galaxy
from galaxy.errors import GalaxyError, InvalidRequest, ModelUnloaded, PeerUnreachable, PlanMismatch
from galaxy.runtime.api import default_weights_format


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


def test_load_defaults_to_the_files_own_format_and_to_fp32_where_compact_formats_do_not_run():
    with galaxy.connect(local=1, transport="inproc") as cluster:
        assert cluster.load(random_init="tiny-llama").weights_format == "fp32"  # a float source's own format
        assert cluster.load(random_init="tiny-llama", weights_format="fp16").weights_format == "fp16"
    # compact formats quantize float32 weights on torch: a bfloat16 or ONNX load is not refused for the default
    assert [default_weights_format(*a) for a in [("float32", "torch"), ("bfloat16", "torch"), ("float32", "onnx")]] \
        == ["auto", "fp32", "fp32"]


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


# --- a session holds one model: an older handle refuses to run ------------------------------------

def test_model_used_after_the_session_loaded_another_raises_model_unloaded():
    with galaxy.connect(local=2, transport="inproc") as cluster:
        lm = cluster.load(random_init="tiny-llama")
        assert lm.partition.world == 2 and lm.loaded
        prompt = [5, 6, 7, 8]
        first = lm.generate(prompt, max_new_tokens=3, details=True).tokens  # now in lm's prefix cache
        encoder = cluster.load(random_init="tiny-bert")
        assert not lm.loaded and encoder.loaded
        # the cached prompt used to fail with "no KV cache 'seq0' to fork from", a new one returned garbage
        for p in (prompt, [9, 10, 11]):
            with pytest.raises(ModelUnloaded, match=r"random_init='tiny-llama'.* no longer on the devices: the "
                               r"session loaded random_init='tiny-bert' after it"):
                lm.generate(p, max_new_tokens=3)
        with pytest.raises(ModelUnloaded):
            lm.forward(prompt)
        assert encoder.forward([1, 2, 3]).shape == (3, encoder.config.hidden)
        lm = cluster.load(random_init="tiny-llama")  # loading it again brings back the same answers
        assert lm.generate(prompt, max_new_tokens=3, details=True).tokens == first
        with pytest.raises(ModelUnloaded, match="tiny-bert"):
            encoder.encode("x" if encoder.tokenizer else [1, 2])


def test_a_stream_interrupted_by_another_load_stops_with_model_unloaded():
    with galaxy.connect(local=1, transport="inproc") as cluster:
        lm = cluster.load(random_init="tiny-gpt2")
        steps = iter(lm.submit([1, 2, 3], 50))  # 50 tokens: far from done when the next load begins
        next(steps)
        cluster.load(random_init="tiny-opt")
        with pytest.raises(ModelUnloaded, match="tiny-opt"):
            list(steps)


def test_model_of_a_closed_session_raises_model_unloaded():
    cluster = galaxy.connect(local=1, transport="inproc")
    lm = cluster.load(random_init="tiny-gpt2")
    cluster.close()
    with pytest.raises(ModelUnloaded, match="closed"):
        lm.generate([1, 2], max_new_tokens=2)


# --- bad input is an InvalidRequest (a GalaxyError and a ValueError) naming the argument ---------------

BAD_GENERATE = [
    (("",), {}, r"prompt='': the text is empty"),
    ((5,), {}, r"prompt=5: must be text \(str\) or token ids"),
    (([],), {}, r"prompt: no token ids"),
    ((["a"],), {}, r"prompt: token ids must be integers, got 'a'"),
    (([1, 10**6],), {}, r"prompt: token ids \[1000000\] are outside the vocabulary \[0, 49152\)"),
    (([[1, 2]],), {}, r"prompt: token ids must be integers"),
    (("hi", -1), {}, r"max_new_tokens=-1: must be >= 0"),
    (("hi", 1.5), {}, r"max_new_tokens=1.5: must be an integer, got float"),
    (("hi", 10**5), {}, r"max_new_tokens=100000: the prompt's \d+ tokens \+ 100000 new ones exceed the model's"),
    (("hi",), {"temperature": -1}, r"temperature=-1: must be >= 0"),
    (("hi",), {"temperature": float("nan")}, r"temperature=nan: must be a finite number"),
    (("hi",), {"top_p": 0}, r"top_p=0: must be > 0"),
    (("hi",), {"top_p": 1.5}, r"top_p=1.5: must be <= 1"),
    (("hi",), {"top_k": -3}, r"top_k=-3: must be >= 0"),
    (("hi",), {"seed": "a"}, r"seed='a': must be an integer"),
    (("hi",), {"stop": 5}, r"stop=5: must be a string or a list of strings"),
    (("hi",), {"stop": ["ok", ""]}, r"every stop string must be non-empty"),
    (("hi",), {"prefill_chunk": -1}, r"prefill_chunk=-1: must be >= 0"),
]


def test_bad_generate_arguments_raise_invalid_request_naming_them(smollm2_path):
    with galaxy.connect(local=1, transport="inproc") as cluster:
        lm = cluster.load(smollm2_path)
        for args, kw, message in BAD_GENERATE:
            for call in (lm.generate, lm.stream):
                with pytest.raises(InvalidRequest, match=message) as e:
                    call(*args, **kw)
                assert isinstance(e.value, galaxy.GalaxyError) and isinstance(e.value, ValueError)
        with pytest.raises(InvalidRequest, match=r"messages='hi': must be a non-empty list"):
            lm.chat("hi")
        with pytest.raises(InvalidRequest, match=r"messages\[0\]=.*must be a dict with a 'role' and a 'content'"):
            lm.chat([{"role": "user"}])
        with pytest.raises(InvalidRequest, match=r"causal LM; encode\(\) needs an encoder"):
            lm.encode("x")


def test_bad_load_and_connect_arguments_raise_galaxy_errors(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(4 << 20))
    with galaxy.connect(local=2, transport="inproc") as cluster:
        cases = [
            (lambda: cluster.load("/nonexistent"), galaxy.CheckpointError, "'/nonexistent' does not exist"),
            (lambda: cluster.load(str(cut)), galaxy.CheckpointError, r"cut\.gguf: truncated or corrupt GGUF"),
            (lambda: cluster.load(random_init="nope"), GalaxyError, "unknown preset 'nope'"),
            (lambda: cluster.load("minilm", random_init="tiny-gpt2"), InvalidRequest, "give one of them, not both"),
            (lambda: cluster.load(random_init="tiny-gpt2", strategy="fast"), InvalidRequest,
             "strategy='fast': must be one of 'galaxy'"),
            (lambda: cluster.load(random_init="tiny-gpt2", weights=[1, -1]), InvalidRequest, r"weights\[1\]=-1"),
            (lambda: cluster.load(random_init="tiny-gpt2", weights="1,1"), InvalidRequest, "weights='1,1'"),
            (lambda: cluster.load(random_init="tiny-gpt2", dtype="int3"), PlanMismatch, "dtype='int3'"),
            (lambda: cluster.load(42), InvalidRequest, "model=42: must be a path"),
        ]
        for call, kind, message in cases:
            with pytest.raises(kind, match=message) as e:
                call()
            assert isinstance(e.value, GalaxyError), e.value
    for kw, message in [({"local": 0}, "local=0: must be >= 1"), ({"addresses": "127.0.0.1:5"}, "must be a non-empty "
                        "list of 'HOST:PORT'"), ({"local": 2, "transport": "udp"}, "transport='udp'"),
                        ({"addresses": ["nohost"]}, "'nohost' is not HOST:PORT")]:
        with pytest.raises(GalaxyError, match=message):
            galaxy.connect(**kw)
