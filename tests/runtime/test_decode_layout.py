"""Where a loaded model decodes (galaxy/runtime/decode_layout.py, Session.load(decode_layout=...)): the
planner's choice on real loopback workers decodes exactly the single device's tokens, a device that
cannot hold both shards is refused, and the split stays where nothing else can run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import galaxy
from galaxy.engine.disagg import DisaggEngine
from galaxy.engine.engine import Engine
from galaxy.errors import DeviceOutOfMemory, InvalidRequest
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel import memory
from galaxy.parallel.executor import DeviceInfo, LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import even_partition
from galaxy.runtime.decode_layout import decide, memory_refusal
from galaxy.runtime.sources import reference_generate, reference_output
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link, Tenancy

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = RandomWeights(preset("tiny-llama"), seed=3)
PROMPT = [5, 17, 33, 2, 9, 41]


def test_the_planners_layout_on_loopback_workers_decodes_the_single_devices_tokens():
    want = reference_generate(SRC, PROMPT, 12, stop_at_eos=False)
    with galaxy.connect(local=3, threads=1) as session:
        lm = session.load(SRC)  # decode_layout="auto": the API's default
        choice = lm.decode.choice
        assert choice is not None and lm.decode.line == choice.line()
        allowed = [o for o in choice.options if not o.excluded]
        assert choice.chosen.seconds == min(o.seconds for o in allowed)  # the fastest predicted
        if choice.chosen.kind == "split":
            assert isinstance(lm.engine, Engine) and lm.groups is None
        else:  # a mixed placement: every device prefills on the split, the chosen ones decode
            assert isinstance(lm.engine, DisaggEngine)
            assert lm.placement.prefill == (0, 1, 2) and lm.placement.decode == choice.chosen.layout.devices
        got = lm.generate(PROMPT, 12, details=True)
        assert got.tokens == want
        # a device asked for decodes holding the whole model: its forward is the single device's
        lm = session.load(SRC, decode_layout="local1")
        assert lm.placement.decode == (1,) and isinstance(lm.engine, DisaggEngine)
        assert lm.generate(PROMPT, 12, details=True).tokens == want
        assert lm.engine.prefill.moved == 1  # it did decode there
        ids = torch.tensor(PROMPT)
        err = (lm.groups[1].forward(Request(ids)).output - reference_output(SRC, Request(ids))).abs().max()
        assert float(err) <= 1e-4


def test_split_decodes_on_the_loaded_split_and_in_process_ranks_keep_it():
    with galaxy.connect(local=2, transport="inproc") as session:
        lm = session.load(SRC)
        assert isinstance(lm.engine, Engine) and "in-process devices are not profiled" in lm.decode.line
        lm = session.load(SRC, decode_layout="split")
        assert lm.decode.line == "decode layout: split (as asked)"
        with pytest.raises(InvalidRequest, match="decode_layout"):
            session.load(SRC, decode_layout="")


class _Devices:
    """The executor surface decide() reads: Hello, names, and the profiling methods' presence."""

    def __init__(self, infos):
        self.infos, self.names = infos, [i.name for i in infos]

    def hello(self):
        return self.infos

    def profile(self, *a, **k):
        raise AssertionError("profiles come from the test")

    link_test = profile


def _profile(n: int) -> ClusterProfile:
    cm = ComputeModel(1e10, 1e-4)
    devs = [DeviceProfile(f"d{i}", f"d{i}:1", cm, cm, cm, 1 << 40, head=ComputeModel(2e9, 1e-4),
                          tenancy=Tenancy("host", 1.0, 2)) for i in range(n)]
    return ClusterProfile(devs, [[None if i == j else Link(5e9, 1e-4) for j in range(n)] for i in range(n)])


def test_a_device_whose_budget_cannot_hold_both_shards_is_refused_and_never_a_candidate():
    cfg = SRC.config
    part = even_partition(cfg, 3)
    options = LoadOptions(seq_len=64)
    params, whole = options.memory_params, even_partition(cfg, 1).spec(0, cfg)
    pre = memory.shard_need(cfg, part.spec(1, cfg), params, 64, part.tokens(64)[1])
    pushed = memory.load_transient_bytes(cfg, whole, params, None, compact_push=True)
    dec = memory.shard_need(cfg, whole, params, 64, 64, pushed)
    both = pre.weights + pre.kv + pre.activations + dec.total  # the prefill shard loaded, then the whole model
    roomy = DeviceInfo("d:1", "d0", 2, 1, "cpu", 8 << 30, 8 << 30, 0, "ok")
    fits = dataclasses.replace(roomy, name="d1", memory_budget=memory.RUN_SLACK + both, rss=0)
    assert memory_refusal(cfg, [roomy, fits, fits], ["d0", "d1", "d2"], part, (1,), options) == ""
    tight = dataclasses.replace(fits, memory_budget=memory.RUN_SLACK + both - memory.MiB)
    infos = [roomy, tight, dataclasses.replace(tight, name="d2")]
    assert memory_refusal(cfg, infos, [i.name for i in infos], part, (0,), options) == ""
    assert "d1 needs" in memory_refusal(cfg, infos, [i.name for i in infos], part, (1,), options)
    with pytest.raises(DeviceOutOfMemory, match="decode_layout='d1': d1 needs .* MiB for both shards"):
        decide(_Devices(infos), cfg, part, options, "d1")
    d = decide(_Devices(infos), cfg, part, options, "auto", profile=lambda *a, **k: _profile(3))
    refused = {o.name for o in d.choice.options if o.excluded}
    assert {"d1 alone", "d2 alone"} <= refused and "d0 alone" not in refused
    assert d.choice.chosen.name not in refused
    if d.placement is not None:
        assert 1 not in d.placement.decode and 2 not in d.placement.decode


def test_run_and_serve_choose_the_decode_layout_by_default_and_check_keeps_the_split():
    from galaxy.cli import build_parser
    from galaxy.cli.run import decode_layout

    ap = build_parser()
    assert ap.parse_args(["serve"]).decode_layout == "auto"
    assert decode_layout(ap.parse_args(["run", "--max-new-tokens", "4"]), generating=True) == "auto"
    assert decode_layout(ap.parse_args(["run", "--check", "--max-new-tokens", "4"]), generating=True) == "split"
    assert decode_layout(ap.parse_args(["run", "--check", "--decode-layout", "auto"]), generating=True) == "auto"
    assert decode_layout(ap.parse_args(["run", "--decode-layout", "local1"]), generating=False) == "split"
    assert ap.parse_args(["serve", "--decode-layout", "local1"]).decode_layout == "local1"


def test_a_quantized_file_runs_in_its_own_format_by_default_and_check_runs_fp32():
    from galaxy.cli import build_parser
    from galaxy.cli.session import weights_format_from_args
    from galaxy.runtime.sources import open_source

    ap = build_parser()
    smollm2 = open_source(None, None, 0)  # the embedded Q4_1 GGUF
    assert weights_format_from_args(ap.parse_args(["run"]), smollm2) == "int4"
    assert weights_format_from_args(ap.parse_args(["chat"]), smollm2) == "int4"
    assert weights_format_from_args(ap.parse_args(["run", "--check"]), smollm2) == "fp32"
    assert weights_format_from_args(ap.parse_args(["run", "--check", "--weights-format", "int8"]), smollm2) == "int8"
    assert weights_format_from_args(ap.parse_args(["run", "--random-init", "gpt2"]), open_source(None, "gpt2", 0)) \
        == "fp32"


def test_a_sampling_server_prices_each_decode_with_its_logit_row_back_and_a_greedy_one_with_its_top1():
    """`galaxy serve` samples unless its default temperature is 0: the layout it picks is priced with the
    vocabulary row each step returns over the device's link, not the top-1 a greedy step returns."""
    cfg = SRC.config
    part, roomy = even_partition(cfg, 3), DeviceInfo("d:1", "d0", 2, 1, "cpu", 8 << 30, 8 << 30, 0, "ok")
    infos = [dataclasses.replace(roomy, name=f"d{i}") for i in range(3)]
    slow = _profile(3)
    slow = dataclasses.replace(slow, links=[[None if i == j else Link(1e7, 1e-4) for j in range(3)] for i in range(3)])
    seconds = {g: {o.name: o.seconds for o in decide(_Devices(infos), cfg, part, LoadOptions(seq_len=64), "auto",
                                                     profile=lambda *a, **k: slow, greedy=g).choice.options}
               for g in (True, False)}
    row = cfg.vocab_size * 4 / 1e7  # one sequence's float32 logits over a 10 MB/s link
    for name, greedy_s in seconds[True].items():
        assert seconds[False][name] >= greedy_s + 0.5 * row, name
    from galaxy.cli import build_parser

    assert build_parser().parse_args(["serve"]).default_temperature != 0  # so serve loads with greedy=False
