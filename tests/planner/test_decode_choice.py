"""The decode layout of a loaded model (planner/serving.py decode_options, choose_decode; planner/phases.py
sync_s): the layout the phase model predicts fastest is chosen, refused layouts never are, and workers
that oversubscribe their machine's cores pay the measured wait at every all-reduce."""

from __future__ import annotations

import pytest

from galaxy.model.config import preset
from planner.phases import OVERSUBSCRIBED_SYNC_S, DecodeLayout, PhaseModel
from planner.plan import PlanError
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link, Tenancy
from planner.serving import choose_decode, decode_options

CFG = preset("smollm2-135m")
GB = 1e9
CONTEXT = 128


def dev(name: str, bytes_per_s: float, overhead: float = 1e-4, tenancy=None, memory: float = 8 * GB):
    cm = ComputeModel(100e9, overhead)
    return DeviceProfile(name, f"{name}:50051", cm, cm, ComputeModel(10e9, overhead / 5), int(memory),
                         head=ComputeModel(bytes_per_s / 2, overhead), tenancy=tenancy)


def cluster(devices, latency_s: float = 5e-5, bandwidth_bps: float = 5e9) -> ClusterProfile:
    n = len(devices)
    return ClusterProfile(list(devices), [[None if i == j else Link(bandwidth_bps, latency_s) for j in range(n)]
                                          for i in range(n)])


def even(n: int) -> DecodeLayout:
    return DecodeLayout("tp", tuple(range(n)), tuple(1 / n for _ in range(n)))


def loopback_trio() -> PhaseModel:
    """Three one-thread workers on one 2-core machine, as `--local 3` is here."""
    return PhaseModel(CFG, cluster([dev(f"local{i}", 4 * GB, tenancy=Tenancy("host", 1.0, 2)) for i in range(3)]))


def test_workers_that_oversubscribe_their_machine_pay_the_measured_wait_at_every_all_reduce():
    pm = loopback_trio()
    rows = CFG.hidden * 4
    assert pm.all_reduce_s((0, 1, 2), rows) == pytest.approx(OVERSUBSCRIBED_SYNC_S)
    # two one-thread workers on two cores: no wait beyond the link's message time
    assert pm.all_reduce_s((0, 1), rows) == pytest.approx(rows * 8 / 5e9 + 5e-5)
    # devices with machines of their own never wait for a core
    apart = PhaseModel(CFG, cluster([dev(n, 4 * GB) for n in "abc"]))
    assert apart.all_reduce_s((0, 1, 2), rows) == pytest.approx(rows * 8 / 5e9 + 5e-5)


def test_the_chosen_layout_is_the_one_the_phase_model_predicts_fastest():
    pm = loopback_trio()
    options = decode_options(pm, even(3), CONTEXT)
    assert [o.kind for o in options] == ["split", "tp", "one", "one", "one"]
    for o in options:  # each priced with only its own devices busy: one request decoding alone
        assert o.seconds == pytest.approx(pm.decode_s(o.layout, 1, CONTEXT, o.layout.devices))
    choice = choose_decode(options)
    assert choice.chosen.seconds == min(o.seconds for o in options)
    # 61 waits of a millisecond each: fewer workers, which leave the cores to one another, beat the split
    assert choice.chosen.kind != "split" and choice.chosen.seconds < options[0].seconds
    assert choice.line().startswith(f"decode layout: {choice.chosen.name} ") and "split local0+local1+local2" in \
        choice.line()


def test_the_split_stays_when_separate_devices_read_their_shares_in_parallel():
    # a model that takes 100 ms to stream on one device, a fast LAN: a third each beats the all-reduces
    pm = PhaseModel(CFG, cluster([dev(n, 5 * GB) for n in "abc"]))
    choice = choose_decode(decode_options(pm, even(3), CONTEXT))
    assert choice.chosen.kind == "split"
    assert choice.chosen.seconds == min(o.seconds for o in choice.options)


def test_a_layout_refused_for_memory_is_never_chosen_and_says_why():
    pm = loopback_trio()

    def refuse(lay: DecodeLayout) -> str:
        return "both shards need 900 MiB, the budget leaves 600" if len(lay.devices) == 1 else ""

    choice = choose_decode(decode_options(pm, even(3), CONTEXT, refuse))
    assert choice.chosen.kind != "one"
    assert all(o.excluded for o in choice.options if o.kind == "one")
    assert "refused: both shards need 900 MiB" in choice.line()
    with pytest.raises(PlanError, match="no decode layout fits"):
        choose_decode(decode_options(pm, even(3), CONTEXT, lambda lay: "no room"))


def test_a_device_whose_profiled_memory_cannot_hold_the_model_beside_its_share_is_not_a_candidate():
    small = 300e6  # SmolLM2's float32 weights are 538 MB
    devs = [dev(f"local{i}", 4 * GB, tenancy=Tenancy("host", 1.0, 2), memory=small if i else 8 * GB)
            for i in range(3)]
    pm = PhaseModel(CFG, cluster(devs))
    options = decode_options(pm, even(3), CONTEXT)
    alone = {o.name: o for o in options if o.kind == "one"}
    assert not alone["local0 alone"].excluded
    assert alone["local1 alone"].excluded and alone["local2 alone"].excluded
    assert choose_decode(options).chosen.name == "local0 alone"
