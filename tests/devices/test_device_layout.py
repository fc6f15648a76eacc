"""Names, addresses, cgroup values and commands of an emulated cluster, without root."""

from __future__ import annotations

import ipaddress

import pytest

from devices import layout as L
from devices.spec import CLUSTERS_DIR, load_cluster


@pytest.fixture
def hetero():
    return load_cluster(CLUSTERS_DIR / "hetero-trio.yaml", cores=2)


def test_addresses_bridge_first_devices_from_ten():
    bridge, ips = L.assign_addresses("10.77.3.0/24", 3)
    assert bridge == "10.77.3.1" and ips == ["10.77.3.10", "10.77.3.11", "10.77.3.12"]
    with pytest.raises(ValueError, match="too small"):
        L.assign_addresses("10.77.3.0/28", 8)


def test_pick_subnet_skips_used_and_overlapping():
    assert L.pick_subnet(set()) == "10.77.1.0/24"
    assert L.pick_subnet({"10.77.1.0/24", "192.0.2.2/24"}) == "10.77.2.0/24"
    with pytest.raises(ValueError, match="in use"):
        L.pick_subnet({"10.77.0.0/16"})
    got = L.pick_subnet({"10.77.1.0/24", "10.77.2.0/23"})
    assert got == "10.77.4.0/24"


def test_layout_names_fit_interface_limits_and_never_collide(hetero):
    lay = L.make_layout(hetero, "10.77.5.0/24")
    assert lay.bridge_ip == "10.77.5.1" and lay.addresses == ["10.77.5.10:50051", "10.77.5.11:50051",
                                                              "10.77.5.12:50051"]
    links = [lay.bridge] + [d.host_link for d in lay.devices]
    assert all(len(n) <= 15 for n in links) and len(set(links)) == len(links)
    assert all(n.startswith(lay.tag) for n in links)
    assert [d.netns for d in lay.devices] == ["gx-hetero-trio.xavier-nx", "gx-hetero-trio.tx2", "gx-hetero-trio.nano"]
    # one cluster's prefix never matches another cluster's objects ('.' is not allowed in names)
    assert not "gx-hetero-trio.nano".startswith(L.netns_prefix("hetero"))
    assert L.cluster_tag("hetero") != L.cluster_tag("hetero-trio")
    for d in lay.devices:
        assert ipaddress.ip_address(d.ip) in ipaddress.ip_network(lay.subnet)


def test_cfs_values_keep_the_share_and_at_least_1ms_quota():
    assert L.cfs_values(0.45, 10_000) == (10_000, 4500)
    assert L.cfs_values(1.5, 10_000) == (10_000, 15000)
    period, quota = L.cfs_values(0.05, 10_000)  # 0.5 ms would be below the kernel's 1 ms minimum
    assert quota >= 1000 and quota / period == pytest.approx(0.05)


def test_tbf_on_both_ends_with_enough_burst(hetero):
    lay = L.make_layout(hetero, "10.77.5.0/24")
    d = lay.devices[0]
    host, ns = L.shaping_commands(d)
    assert host[:5] == ["tc", "qdisc", "replace", "dev", d.host_link]
    assert ns[:3] == ["tc", "-n", d.netns] and "eth0" in ns
    for cmd in (host, ns):
        assert cmd[cmd.index("rate") + 1] == "100000000bit" and "tbf" in cmd
    assert L.tbf_burst(100e6) == 65536 and L.tbf_burst(10e9) == 1_250_000


def test_veth_created_with_its_peer_in_the_namespace(hetero):
    lay = L.make_layout(hetero, "10.77.5.0/24")
    d = lay.devices[1]
    cmds = L.veth_commands(lay, d)
    assert cmds[0] == ["ip", "link", "add", d.host_link, "type", "veth", "peer", "name", "eth0", "netns", d.netns]
    assert ["ip", "link", "set", "dev", d.host_link, "master", lay.bridge] in cmds
    assert ["ip", "-n", d.netns, "addr", "add", f"{d.ip}/24", "dev", "eth0"] in cmds
    assert all(isinstance(a, str) for c in cmds + L.bridge_commands(lay) for a in c)


def test_cgroup_values_v1_and_v2(hetero):
    d = L.make_layout(hetero, "10.77.5.0/24").devices[2]  # the Nano: 0.26 cores, 4 GiB
    v1 = L.cgroup_values(d, 1)
    assert v1[0] == ("cpu", "cpu.cfs_period_us", "10000")
    assert v1[1][1] == "cpu.cfs_quota_us" and int(v1[1][2]) == round(d.cpu * 10000)
    assert ("memory", "memory.limit_in_bytes", str(4 * 2**30)) in v1
    assert ("cpu", "cpu.shares", str(L.CPU_SHARES_V1)) in v1  # first in line for its quota
    v2 = L.cgroup_values(d, 2)
    assert v2[0] == ("cpu", "cpu.max", f"{round(d.cpu * 10000)} 10000")
    assert ("memory", "memory.max", str(4 * 2**30)) in v2


def test_worker_command_carries_budget_delay_and_threads(hetero):
    d = L.make_layout(hetero, "10.77.5.0/24").devices[0]
    cmd = L.worker_command(d, detached=True)
    assert cmd[cmd.index("--listen") + 1] == "10.77.5.10:50051"
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert cmd[cmd.index("--memory-budget") + 1] == str(d.memory_budget)
    assert cmd[cmd.index("--link-delay-ms") + 1] == "0.2"
    assert "--exit-with-parent" not in cmd and "--exit-with-parent" in L.worker_command(d, detached=False)
    assert "--token" not in cmd  # the token travels in the environment, not in ps output
    wrapped = L.enter_command(d.netns, ["/cg/cpu/x/cgroup.procs"], cmd)
    assert wrapped[1:3] == ["-m", "devices.enter"] and wrapped[wrapped.index("--") + 1:] == cmd


@pytest.mark.parametrize("shares, cpus, want", [
    ([0.9, 0.6, 0.45], [0, 1], [(0,), (1,), (1,)]),  # the largest alone; 1.05 on the other CPU is tolerated
    ([0.63, 0.63, 0.63], [0, 1], [(0,), (1,), (0, 1)]),  # the third fits no CPU: it spills over both
    ([0.3, 0.3, 0.3, 0.3], [2, 5], [(2,), (5,), (2,), (5,)]),  # CPU numbers as the machine names them
    ([1.5, 0.4], [0, 1], [(0, 1), (0, 1)]),  # more than a core: that many CPUs
    ([2.5], [0, 1], [(0, 1)]),  # more than the machine: all of it
])
def test_pack_cpus_keeps_each_device_on_cpus_with_room_for_its_share(shares, cpus, want):
    assert L.pack_cpus(shares, cpus) == want


def test_layout_pins_devices_and_enter_command_passes_the_cpus(hetero):
    lay = L.make_layout(hetero, "10.77.5.0/24", cpus=[0, 1])
    assert [d.cpus for d in lay.devices] == L.pack_cpus([d.cpu for d in hetero.devices], [0, 1])
    d = lay.devices[0]
    wrapped = L.enter_command(d.netns, [], ["true"], cpus=d.cpus)
    assert wrapped[wrapped.index("--cpus") + 1] == ",".join(map(str, d.cpus))


def test_enter_pins_the_command_it_execs():
    import subprocess
    import sys

    cpu = sorted(L.machine_cpus())[-1]
    out = subprocess.run(L.enter_command(None, [], [sys.executable, "-c", "import os; print(os.sched_getaffinity(0))"],
                                         cpus=(cpu,)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str({cpu}), out.stderr


def test_real_clusters_have_no_layout(tmp_path):
    p = tmp_path / "real.yaml"
    p.write_text("devices:\n  - {name: a, address: 'h:1'}\n")
    with pytest.raises(ValueError, match="nothing to emulate"):
        L.make_layout(load_cluster(p), "10.77.5.0/24")
