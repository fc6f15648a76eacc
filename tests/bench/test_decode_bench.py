"""`galaxy bench decode`: the report holds every engine and format side by side, the fp32 rows agree with
the reference, and bad requests are refused naming the field. Never a timing assertion: the figures
are measured side by side on a shared machine; llama.cpp is never needed (a random model is no GGUF)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from galaxy.bench.decode import DecodeBench, DecodeBenchError, run_decode_bench, table
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.quant import FormatError

# K a multiple of 32 everywhere (int4's group, int8pack's 16), GQA 4/2, a tied head.
CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=96, rope_theta=10000.0, tie_embeddings=True, name="bench-llama")


@pytest.fixture(scope="module")
def report():
    bench = DecodeBench(formats=("fp32", "int8", "int4"), threads=(1,), new_tokens=4, prefill_tokens=24, reps=2,
                        compile=False)
    return run_decode_bench(RandomWeights(CFG, seed=3), bench)


def test_every_engine_is_timed_at_every_thread_count_side_by_side(report):
    names = [r["engine"] for r in report["speed"]]
    assert names == ["galaxy fp32, 1 device (in-process)", "galaxy int8, 1 device (in-process)",
                     "galaxy int4, 1 device (in-process)", "decoder fp32 eager", "decoder int8 eager",
                     "decoder int4 eager"]
    for r in report["speed"]:
        assert r["threads"] == 1 and r["prefill_tokens"] == 24 and len(r["decode_ms_runs"]) == 2
        assert r["decode_ms"] > 0 and r["prefill_s"] > 0
    assert report["anchor"] == "not a GGUF file"


def test_the_fp32_decoder_generates_what_the_galaxy_engine_path_generates(report):
    rows = {r["engine"]: r for r in report["speed"]}
    assert rows["decoder fp32 eager"]["greedy_as_first"]
    assert rows["galaxy int4, 1 device (in-process)"]["weight_MB"] < rows["galaxy fp32, 1 device (in-process)"][
        "weight_MB"]


def test_accuracy_is_reported_per_format_and_fp32_is_the_reference(report):
    acc = {a["format"]: a for a in report["accuracy"]}
    assert list(acc) == ["fp32", "int8", "int4"]
    assert acc["fp32"]["top1_agreement"] == 1.0 and acc["fp32"]["max_abs_logit_err"] < 1e-4
    for a in acc.values():
        assert a["tokens"] == CFG.max_positions  # a short-context model is scored over all it holds
        assert 0.0 <= a["top1_agreement"] <= 1.0 and len(a["greedy"]) == 3
    assert acc["int4"]["max_abs_logit_err"] > 0  # a compact format is not exact: the figure is printed


def test_the_table_prints_speed_and_accuracy_rows(report):
    text = table(report)
    for needle in ("decoder int4 eager", "galaxy fp32, 1 device (in-process)", "top-1", "int8"):
        assert needle in text


@pytest.mark.parametrize(("kw", "field"), [({"formats": ("int9",)}, "int9"), ({"new_tokens": 0}, "new_tokens"),
                                           ({"threads": ()}, "threads"), ({"local": -1}, "local")])
def test_a_bad_request_is_refused_naming_the_field(kw, field):
    with pytest.raises((DecodeBenchError, FormatError), match=field):
        DecodeBench(**kw)


def test_a_prefill_longer_than_the_model_allows_is_refused_before_loading():
    with pytest.raises(DecodeBenchError, match="max_positions=96"):
        run_decode_bench(RandomWeights(CFG), DecodeBench(prefill_tokens=200, threads=(1,)))


def test_the_cli_takes_weights_formats_and_prints_json():
    torch.manual_seed(0)
    r = subprocess.run([sys.executable, "-m", "galaxy.cli", "-q", "bench", "decode", "--random-init", "tiny-llama",
                        "--weights-format", "fp32,fp16", "--threads", "1", "--reps", "1", "--new-tokens", "2",
                        "--prefill-tokens", "8", "--no-compile", "--no-accuracy", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["engine"] for x in rep["speed"]] == ["galaxy fp32, 1 device (in-process)",
                                                   "galaxy fp16, 1 device (in-process)", "decoder fp32 eager",
                                                   "decoder fp16 eager"]
    assert rep["accuracy"] == []


def test_the_engine_path_reports_the_time_between_tokens_beside_its_step(report):
    """The client's gap between tokens (the step and the engine loop's own work) is reported for the galaxy
    rows only, as a measured time."""
    for r in report["speed"]:
        assert ("token_gap_ms" in r) == r["engine"].startswith("galaxy")
        if "token_gap_ms" in r:
            assert r["token_gap_ms"] > 0
