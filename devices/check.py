"""`galaxy devices check`: measure how faithful a running emulated cluster is.

Links: a real TCP transfer between neighbouring devices of the ring (namespace to namespace,
through both tbf qdiscs and the bridge), goodput against the configured rate min(A, B). The
probes run outside the devices' CPU cgroups, so this measures the link, not the CPU cap.
CPU: the same fixed GEMM work inside each device's CPU cgroup, all devices at once (as during
an inference), against the same work on one free core of this machine: measured share vs
configured share, and the devices' speed ratios. Burst: short tasks with idle gaps, the shape of
a forward pass waiting on its peers, to show what the CFS period does to short work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from galaxy.errors import GalaxyError
from galaxy.units import fmt_rate, format_rows

from . import layout as L
from . import system as S

PROBE_PORT = 5201  # the sink's port inside a device namespace (the worker has spec.port)
LINK_TOL = 0.10  # measured goodput within 10% of the configured rate
CPU_TOL = 0.15  # measured speed ratios within 15% of the configured share ratios
PROBE_TIMEOUT = 180.0
QUIET_CORES = 0.15  # other work above this many cores makes CPU measurements unreliable


def _probe(args: list[str], netns: str | None = None, procs: list[str] | None = None,
           cpus: list[int] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "devices.probe", *args]
    if netns or procs or cpus:
        cmd = L.enter_command(netns, procs or [], cmd, cpus=cpus or ())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env, cwd="/")


def _result(p: subprocess.Popen, what: str, timeout: float = PROBE_TIMEOUT) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise GalaxyError(f"probe {what} did not finish within {timeout:.0f} s") from None
    lines = [s for s in out.splitlines() if s.startswith("{")]
    if p.returncode != 0 or not lines:
        raise GalaxyError(f"probe {what} failed (exit {p.returncode}): {err.strip()[-500:]}")
    return json.loads(lines[-1])


def _wait_line(p: subprocess.Popen, prefix: str, what: str, timeout: float = 30.0) -> None:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise GalaxyError(f"probe {what} exited (status {p.returncode}): {p.stderr.read().strip()[-500:]}")
            if sel.select(timeout=0.2) and p.stdout.readline().startswith(prefix):
                return
        raise GalaxyError(f"probe {what} did not start within {timeout:.0f} s")
    finally:
        sel.close()


def measure_link(src: dict, dst: dict, seconds: float) -> dict:
    """TCP goodput from device src to device dst (their state rows)."""
    ip = dst["address"].rsplit(":", 1)[0]
    what = f"{src['name']}->{dst['name']}"
    sink = _probe(["sink", "--listen", f"{ip}:{PROBE_PORT}", "--timeout", str(seconds + 30)], dst.get("netns"))
    try:
        _wait_line(sink, "PROBE-READY", f"sink {what}")
        source = _probe(["source", "--connect", f"{ip}:{PROBE_PORT}", "--seconds", str(seconds)], src.get("netns"))
        _result(source, f"source {what}", timeout=seconds + 60)
        got = _result(sink, f"sink {what}", timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate()
    want = min(src["rate_bps"], dst["rate_bps"])
    return {"link": what, "configured_bps": want, "measured_bps": got["bps"], "ratio": got["bps"] / want,
            "ok": abs(got["bps"] / want - 1) <= LINK_TOL}


def _reference(cg: S.Cgroups | None, cluster: str, seconds: float) -> tuple[dict, dict]:
    """The GEMM and burst probes on one uncapped core, in a cgroup with the devices' (maximum) CPU weight,
    so that other work on the machine disturbs the yardstick as little as it disturbs the devices."""
    created: list[dict] = []
    procs: list[str] = []
    try:
        if cg is not None:
            name = f"{L.netns_prefix(cluster)}_reference"  # '_' never starts a device name
            weight = ("cpu", "cpu.shares", str(L.CPU_SHARES_V1)) if cg.version == 1 else \
                ("cpu", "cpu.weight", str(L.CPU_WEIGHT_V2))
            S.make_cgroup(cg, name, [weight], created)
            procs = [os.path.join(cg.dirs(name)["cpu"], "cgroup.procs")]
        warm = _result(_probe(["cpu", "--work", "20"], procs=procs), "cpu reference (warm-up)")
        work = max(20, int(seconds / (warm["seconds"] / 20)))
        ref = _result(_probe(["cpu", "--work", str(work)], procs=procs), "cpu reference")
        burst = _result(_probe(["burst"], procs=procs), "burst reference")
        return ref, burst
    finally:
        S.teardown(created)


def measure_cpu(rows: list[dict], seconds: float, cg: S.Cgroups | None, cluster: str = "check",
                repeats: int = 3) -> dict:
    """Speed of each device (in cores of this machine) running the same GEMM, all at once; median of repeats.

    The speed ratio compares each device's part of the cluster's total measured speed with its
    part of the configured total (so one noisy device does not skew every other ratio).
    """
    ref, burst_ref = _reference(cg, cluster, seconds)
    per_gemm = ref["seconds"] / ref["work"]

    def procs_of(d):
        return [os.path.join(cg.dirs(d["cgroup"])["cpu"], "cgroup.procs")] if cg and d.get("cgroup") else []

    runs, foreign = [], []
    for _ in range(repeats):
        procs = [_probe(["cpu", "--work", str(max(10, int(seconds / per_gemm * d["cpu"]))),  # each busy ~`seconds`
                         "--threads", str(d["threads"])], d.get("netns"), procs_of(d), d.get("cpus")) for d in rows]
        results = [_result(p, f"cpu {d['name']}") for p, d in zip(procs, rows)]
        runs.append([r["gflops"] / ref["gflops"] for r in results])
        # other work on the machine meanwhile: what the longest probe saw busy, less our probes' own use
        longest = max(results, key=lambda r: r["seconds"])
        foreign.append(longest["machine_busy_cores"] - sum(r["cpu_s"] / r["seconds"] for r in results))
    speeds = [statistics.median(run[i] for run in runs) for i in range(len(rows))]
    bursts = [_probe(["burst"], d.get("netns"), procs_of(d)) for d in rows]
    burst_res = [_result(p, f"burst {d['name']}") for p, d in zip(bursts, rows)]
    want_total, got_total = sum(d["cpu"] for d in rows), sum(speeds)
    out = []
    for d, speed, b in zip(rows, speeds, burst_res):
        want, got = d["cpu"] / want_total, speed / got_total
        out.append({"device": d["name"], "configured_cores": d["cpu"], "measured_cores": speed,
                    "efficiency": speed / d["cpu"], "configured_part": want, "measured_part": got,
                    "ratio_error": got / want - 1, "ok": abs(got / want - 1) <= CPU_TOL,
                    "burst_expected_s": burst_ref["median_s"] / min(1.0, d["cpu"]), "burst_measured_s": b["median_s"]})
    return {"reference_gflops": ref["gflops"], "burst_reference_s": burst_ref["median_s"], "repeats": repeats,
            "foreign_cores_during": max(0.0, statistics.median(foreign)), "devices": out}


def _cpu_ticks() -> tuple[int, int]:
    """(total, idle) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals[:8]), vals[3] + (vals[4] if len(vals) > 4 else 0)


def _busy_between(a: tuple[int, int], b: tuple[int, int]) -> float:
    total = b[0] - a[0]
    return (os.cpu_count() or 1) * (1 - (b[1] - a[1]) / total) if total > 0 else 0.0


def busy_cores(seconds: float = 1.0) -> float:
    """Cores of this machine busy over the next `seconds` (all processes; our workers idle meanwhile)."""
    a = _cpu_ticks()
    time.sleep(seconds)
    return _busy_between(a, _cpu_ticks())


def wait_quiet(limit: float, timeout: float, progress=lambda m: None) -> float:
    """Wait (up to `timeout` s) until other work on this machine uses less than `limit` cores."""
    deadline = time.monotonic() + timeout
    busy = busy_cores()
    while busy > limit and time.monotonic() < deadline:
        progress(f"machine busy ({busy:.2f} cores in use by other work); waiting for it to go quiet")
        time.sleep(2.0)
        busy = busy_cores()
    return busy


def check_running(state_rows: list[dict], seconds: float = 3.0, links: bool = True, cpu: bool = True,
                  progress=lambda m: None, quiet_timeout: float = 0.0, cluster: str = "check") -> dict:
    """Measure a running cluster from its state rows (see emulate.status)."""
    load = os.getloadavg()[0]
    busy = wait_quiet(QUIET_CORES, quiet_timeout, progress) if quiet_timeout else busy_cores()
    report = {"load_average_1min": load, "busy_cores_before": busy, "cores": os.cpu_count(), "links": [], "cpu": None}
    if busy > QUIET_CORES:
        progress(f"WARNING: {busy:.2f} cores busy with other work before measuring: CPU figures will read low")
    if links and len(state_rows) > 1:
        n = len(state_rows)
        pairs = [(i, (i + 1) % n) for i in range(n if n > 2 else 1)]
        for i, j in pairs:
            progress(f"link {state_rows[i]['name']} -> {state_rows[j]['name']}: {seconds:g} s TCP transfer")
            report["links"].append(measure_link(state_rows[i], state_rows[j], seconds))
    if cpu:
        progress("cpu: reference on a free core, then every device at once inside its cgroup")
        cg = S.detect_cgroups() if any(d.get("cgroup") for d in state_rows) else None
        report["cpu"] = measure_cpu(state_rows, seconds, cg, cluster)
    return report


def format_report(rep: dict) -> str:
    out = [f"before measuring: {rep['busy_cores_before']:.2f} of {rep['cores']} cores busy with other work "
           f"(load average {rep['load_average_1min']:.2f})"]
    if rep["links"]:
        rows = [("link", "configured", "measured goodput", "measured/configured", "within 10%")]
        for r in rep["links"]:
            rows.append((r["link"], fmt_rate(r["configured_bps"]), fmt_rate(r["measured_bps"]), f"{r['ratio']:.3f}",
                         "yes" if r["ok"] else "NO"))
        out += ["", format_rows(rows)]
    if rep["cpu"]:
        c = rep["cpu"]
        rows = [("device", "cores (configured)", "cores (measured)", "measured/configured", "part of cluster (cfg)",
                 "(measured)", "error", "within 15%", "burst task (expected)", "(measured)")]
        for r in c["devices"]:
            rows.append((r["device"], f"{r['configured_cores']:.3f}", f"{r['measured_cores']:.3f}",
                         f"{r['efficiency']:.2f}", f"{r['configured_part']:.3f}", f"{r['measured_part']:.3f}",
                         f"{r['ratio_error']:+.1%}", "yes" if r["ok"] else "NO",
                         f"{r['burst_expected_s'] * 1e3:.1f} ms",
                         f"{r['burst_measured_s'] * 1e3:.1f} ms"))
        out += ["", f"reference: one free core {c['reference_gflops']:.1f} GFLOP/s; burst task "
                f"{c['burst_reference_s'] * 1e3:.1f} ms; other work during the runs: "
                f"{c['foreign_cores_during']:.2f} cores (median of {c['repeats']})", format_rows(rows)]
    return "\n".join(out)
