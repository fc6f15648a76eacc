"""`galaxy bench --quick`: the report's structure, exactness of every strategy, the plot. Never a
timing assertion: the numbers are measured side by side, and a shared CI machine is noisy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from galaxy.bench import strategies as bench
from galaxy.model.config import preset
from galaxy.parallel.collectives import OpStat
from galaxy.parallel.executor import DeviceStats
from galaxy.runtime.report import layer_overlap
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link


def test_quick_bench_reports_every_strategy_exactly(tmp_path):
    png = tmp_path / "bench.png"
    r = subprocess.run([sys.executable, "-m", "galaxy.cli", "-q", "bench", "--quick", "--local", "2",
                        "--random-init", "tiny-llama", "--seq-len", "16", "--reps", "2", "--decode",
                        "--plot", str(png), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["model"] == "tiny-llama" and len(rep["devices"]) == 2 and rep["machine"]
    run = rep["runs"][0]
    rows = {row["strategy"]: row for row in run["strategies"]}
    assert set(rows) == {"local", "megatron", "seqpar", "pipeline", "galaxy", "galaxy-no-overlap", "galaxy-grpc"}
    for row in rows.values():
        assert row["reps"] == 2 and row["median_s"] > 0 and row["spread_s"] >= 0
        assert row["exact"] is True and row["max_abs_err"] <= 1e-4, row
        assert 0 < row["roofline_fraction"] and len(row["weights_bytes"]) == len(row["devices"])
        assert all(b >= 0 for b in row["peak_activation_bytes"])
        assert len(row["cpu_s"]) == len(row["devices"]) and all(c > 0 for c in row["cpu_s"]), row
    assert rows["local"]["roofline_fraction"] <= 1.0 + 1e-9  # a lower bound: nothing beats it
    assert rows["local"]["speedup_vs_local"] == pytest.approx(1.0)
    assert run["roofline"]["seconds"] > 0
    assert run["roofline"]["bound_by"] in ("local", "local (measured)", "compute", "network")
    assert run["auto"]["strategy"] and run["auto"]["reason"]
    assert any(t["layer"] == "L0" for t in run["timeline"])
    g = run["galaxy_devices"]
    assert g["devices"] == rows["galaxy"]["devices"] and len(g["busy_s"]) == len(g["waiting_s"]) == 2
    assert all(b > 0 for b in g["busy_s"]) and all(w >= 0 for w in g["waiting_s"]) and g["no_wait_speedup"] > 0
    assert [d["strategy"] for d in rep["decode"]] == ["local", "galaxy"] and rep["decode"][0]["tokens_match"]
    assert png.stat().st_size > 10_000


def _cluster(bw: float) -> ClusterProfile:
    devs = [DeviceProfile(f"d{i}", f"a{i}", ComputeModel(r), ComputeModel(r), ComputeModel(r), 10**10)
            for i, r in enumerate((4e10, 2e10))]
    return ClusterProfile(devs, [[None, Link(bw, 1e-4)], [Link(bw, 1e-4), None]])


def test_roofline_is_the_tighter_of_perfect_parallelism_and_the_fastest_device_alone():
    cfg = preset("gpt2-large")
    fast = bench.roofline(cfg, 256, _cluster(1e12))
    assert fast["bound_by"] == "compute" and fast["seconds"] == pytest.approx(fast["local_s"] * 4 / 6, rel=1e-6)
    slow = bench.roofline(cfg, 256, _cluster(1e6))  # a link so slow that one device alone is best
    assert slow["bound_by"] == "local" and slow["seconds"] == pytest.approx(slow["local_s"])


def test_busy_time_is_each_devices_forward_minus_its_waiting_and_the_busiest_bounds_the_speedup():
    devices = [DeviceStats(0, 1.0, (OpStat("L0.attn.ag", 0.5, 0.2, 0.3, 0), OpStat("L0.mlp.rs", 0.4, 0.1, 0.3, 0))),
               DeviceStats(1, 1.0, (OpStat("L0.attn.ag", 0.5, 0.0, 0.5, 0),))]
    g = bench.busy_and_waiting(devices, ["fast", "slow"], local_s=1.6)
    assert g["devices"] == ["fast", "slow"]
    assert g["busy_s"] == pytest.approx([0.7, 1.0]) and g["waiting_s"] == pytest.approx([0.3, 0.0])
    assert g["no_wait_speedup"] == pytest.approx(1.6)  # the slow device never waited: it is the bound
    assert bench.busy_and_waiting(devices)["no_wait_speedup"] is None  # no local run to compare with


def test_worker_cpu_is_the_median_per_device_and_absent_when_any_worker_did_not_report_it():
    assert bench.worker_cpu([[0.5, 0.3], [0.7, 0.2], [0.6, 0.4]]) == pytest.approx([0.6, 0.3])
    assert bench.worker_cpu([[0.5, 0.0]]) is None  # a worker older than the field reports 0
    assert bench.worker_cpu([]) is None


def test_table_sets_galaxys_cpu_seconds_against_locals():
    def row(name, cpu):
        return {"strategy": name, "median_s": 1.0, "spread_s": 0.0, "speedup_vs_local": 1.0, "roofline_fraction": 0.5,
                "exact": True, "weights_bytes": [2**20] * len(cpu), "peak_activation_bytes": [0] * len(cpu),
                "cpu_s": cpu, "note": ""}

    run = {"seq_len": 8, "roofline": {"seconds": 0.5, "bound_by": "compute"},
           "strategies": [row("local", [1.0]), row("galaxy", [0.6, 0.3, 0.3])]}
    work = bench.cpu_work(run)
    assert work["local_s"] == 1.0 and work["ratio"] == pytest.approx(1.2)
    text = bench.table({"model": "m", "runs": [run]})
    assert "0.600 + 0.300 + 0.300 = 1.200, local 1.000: the split costs 1.20x local's work" in text
    run["strategies"][1]["cpu_s"] = None  # a worker that did not report it: no line, a dash in the column
    assert "CPU per pass" not in bench.table({"model": "m", "runs": [run]})


def test_timeline_prices_communication_as_bytes_at_the_link_rate_not_socket_hand_off():
    # one layer on two devices: each sent 1 MB, handed to its socket in 1 ms, waited 2 ms
    ops = (OpStat("L0.mlp.rs", 0.05, 0.002, 0.04, 1_000_000, 0.001),)
    devices = [DeviceStats(0, 0.05, ops), DeviceStats(1, 0.05, ops)]
    [row] = layer_overlap(devices, s_per_byte=[8e-9, 8e-9])  # 1 MB at 1 Gbit/s: 8 ms on the wire
    assert row["comm_s"] == pytest.approx(0.008) and row["exposed_s"] == pytest.approx(0.002)
    assert row["hidden_s"] == pytest.approx(0.006) and row["hidden_frac"] == pytest.approx(0.75)
    [bare] = layer_overlap(devices)  # no link rates: the hand-off time, a lower bound
    assert bare["comm_s"] == pytest.approx(0.001) and bare["hidden_s"] == 0.0
