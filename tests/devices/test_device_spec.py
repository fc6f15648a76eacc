"""Cluster files and the device catalog, without root: parsing, validation, share planning."""

from __future__ import annotations

import pytest
import yaml

from devices.spec import (
    BUDGET_FRACTION,
    CGROUP_SLACK,
    CLUSTERS_DIR,
    WORKER_OVERHEAD,
    ClusterFileError,
    load_catalog,
    load_cluster,
    load_links,
    plan_shares,
)
from galaxy.parallel.memory import planner_room

NANO_GFLOPS = 235.9


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_catalog_has_the_eight_devices_with_sources():
    cat = load_catalog()
    assert set(cat) == {"jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano", "raspberry-pi-4",
                        "raspberry-pi-5", "laptop-midrange", "phone-soc"}
    assert cat["jetson-nano"].relative == 1.0
    for p in cat.values():
        raw = yaml.safe_load(open(p.path))
        assert raw["compute"]["sources"], p.name
        # relative compute is the stated FP32 peak over the Nano's: the two numbers must agree
        assert raw["compute"]["relative"] == pytest.approx(raw["compute"]["peak_fp32_gflops"] / NANO_GFLOPS,
                                                           rel=0.01), p.name
        assert p.memory >= 2**30 and p.link in load_links()


def test_every_ready_cluster_file_parses_and_fits_the_machine():
    files = sorted(CLUSTERS_DIR.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"homo-trio", "slow-wifi", "mem-starved"} <= names and any("hetero" in n for n in names)
    for f in files:
        spec = load_cluster(f, cores=2)
        assert spec.emulated and spec.name == f.stem
        assert spec.total_cpu <= 2 + 1e-9, f


def test_hetero_trio_shares_follow_relative_compute():
    spec = load_cluster(CLUSTERS_DIR / "hetero-trio.yaml", cores=2)
    shares = [d.cpu for d in spec.devices]
    assert [d.profile for d in spec.devices] == ["jetson-xavier-nx", "jetson-tx2", "jetson-nano"]
    assert sum(shares) == pytest.approx(BUDGET_FRACTION * 2, abs=1e-3)
    assert shares[0] / shares[2] == pytest.approx(3.58, rel=0.01)
    assert shares[1] / shares[2] == pytest.approx(2.82, rel=0.01)
    assert all(d.link_bps == 100e6 for d in spec.devices)


def test_mem_starved_no_device_can_hold_the_default_model_alone():
    model_fp32 = 513 * 2**20  # SmolLM2-135M weights at fp32, as the worker counts them
    spec = load_cluster(CLUSTERS_DIR / "mem-starved.yaml", cores=2)
    for d in spec.devices:  # the budget caps the whole worker: an idle one holds ~WORKER_OVERHEAD
        assert d.memory_budget == d.memory - CGROUP_SLACK
        assert planner_room(d.memory_budget, WORKER_OVERHEAD) < model_fp32
    room = sum(planner_room(d.memory_budget, WORKER_OVERHEAD) for d in spec.devices)
    assert room > model_fp32 * 1.3  # room for the three shards, their KV caches and activations


def test_overrides_and_presets(tmp_path):
    spec = load_cluster(write(tmp_path, {"name": "x", "devices": [
        {"name": "a", "profile": "raspberry-pi-5", "link": "wifi5"},
        {"name": "b", "cpu": 0.5, "memory": "1GiB", "link": "50mbit", "latency_ms": 3},
    ]}), cores=2)
    a, b = spec.devices
    assert a.link_bps == 200e6 and a.latency_ms == 2.0 and a.memory == 8 * 2**30 and a.link_name == "wifi5"
    assert b.cpu == 0.5 and b.link_bps == 50e6 and b.latency_ms == 3 and b.memory == 2**30 and b.profile is None
    assert a.cpu == pytest.approx(1.9 - 0.5)  # the rest of the budget
    assert b.threads == 1


def test_real_cluster_with_addresses(tmp_path):
    spec = load_cluster(write(tmp_path, {"name": "lab", "token": "s3cret", "devices": [
        {"name": "a", "address": "192.0.2.10:50051"}, {"name": "b", "address": "host-b:50051", "latency_ms": 1}]}))
    assert not spec.emulated and spec.token == "s3cret"
    assert [d.address for d in spec.devices] == ["192.0.2.10:50051", "host-b:50051"]


@pytest.mark.parametrize("data, field", [
    ({"devices": [{"name": "a", "profile": "jetson-nano", "cpu": "fast"}]}, "'cpu'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano", "cpu": -1}]}, "'cpu'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano", "memory": "lots"}]}, "'memory'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano", "memory": "100MiB"}]}, "'memory'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano", "link": "fast"}]}, "'link'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano", "latency_ms": "x"}]}, "'latency_ms'"),
    ({"devices": [{"name": "a", "profile": "jetson-nanoo"}]}, "'profile'"),
    ({"devices": [{"name": "A b", "profile": "jetson-nano"}]}, "'name'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano", "colour": "red"}]}, "'colour'"),
    ({"devices": [{"name": "a"}]}, "'profile'"),
    ({"devices": [{"name": "a", "address": "nohostport"}]}, "'address'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano"}, {"name": "a", "profile": "jetson-nano"}]}, "'devices'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano"}, {"name": "b", "address": "h:1"}]}, "'devices'"),
    ({"devices": []}, "'devices'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano"}], "subnet": "8.8.8.0/24"}, "'subnet'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano"}], "oversubscribe": "maybe"}, "'oversubscribe'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano"}], "cfs_period_us": 10}, "'cfs_period_us'"),
    ({"devices": [{"name": "a", "profile": "jetson-nano"}], "speed": 3}, "'speed'"),
])
def test_bad_fields_name_the_field_and_the_file(tmp_path, data, field):
    path = write(tmp_path, data, "bad-cluster.yaml")
    with pytest.raises(ClusterFileError) as e:
        load_cluster(path, cores=2)
    assert field in str(e.value) and "bad-cluster.yaml" in str(e.value)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ClusterFileError, match="not valid YAML"):
        load_cluster(write(tmp_path, "devices: [a, b", "broken.yaml"))
    with pytest.raises(ClusterFileError, match="no such file"):
        load_cluster(tmp_path / "nope.yaml")


# -- share planning ------------------------------------------------------------------------------


def test_shares_split_the_budget_by_relative_compute():
    shares, notes = plan_shares([None, None, None], [3.58, 2.82, 1.0], budget=1.9, cores=2)
    assert sum(shares) == pytest.approx(1.9, abs=1e-3)
    assert shares[0] / shares[2] == pytest.approx(3.58, rel=1e-3)
    assert notes and "in proportion" in notes[0]


def test_oversubscribed_explicit_shares_are_scaled_and_said_so():
    shares, notes = plan_shares([1.2, 0.9, 0.6], [None] * 3, budget=1.9, cores=2)
    assert sum(shares) == pytest.approx(1.9, abs=1e-3)
    assert shares[0] / shares[2] == pytest.approx(2.0, rel=1e-3)  # ratios kept
    assert any("scaled" in n and "2.70" in n for n in notes)


def test_oversubscribed_shares_are_refused_when_asked():
    with pytest.raises(ClusterFileError, match="2.70 cores but this machine has 2"):
        plan_shares([1.2, 0.9, 0.6], [None] * 3, budget=1.9, cores=2, policy="refuse")


def test_exactly_the_cores_is_allowed():
    shares, notes = plan_shares([1.0, 1.0], [None, None], budget=1.9, cores=2, policy="refuse")
    assert shares == [1.0, 1.0] and not notes


def test_too_small_shares_are_refused():
    with pytest.raises(ClusterFileError, match="below"):
        plan_shares([None] * 2, [100.0, 1.0], budget=1.9, cores=2)


def test_refuse_policy_in_a_file(tmp_path):
    path = write(tmp_path, {"oversubscribe": "refuse", "devices": [
        {"name": "a", "cpu": 1.5, "link": "1gbit"}, {"name": "b", "cpu": 1.5, "link": "1gbit"}]})
    with pytest.raises(ClusterFileError, match="contend"):
        load_cluster(path, cores=2)
    spec = load_cluster(path.parent / write(tmp_path, {"devices": [
        {"name": "a", "cpu": 1.5, "link": "1gbit"}, {"name": "b", "cpu": 1.5, "link": "1gbit"}]}, "s.yaml"), cores=2)
    assert spec.total_cpu == pytest.approx(1.9) and any("scaled" in n for n in spec.notes)
    assert [d.threads for d in spec.devices] == [1, 1]
