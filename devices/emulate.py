"""Bring an emulated LAN of edge devices up and down on this machine; find a cluster's workers.

`up(spec)` builds, per device, a network namespace on a bridge with tbf-shaped veth links, a
cgroup capping CPU share and memory, and a `galaxy worker` started inside both (details in
devices/layout.py). Every object is written to the cluster's state file *before* it is created,
so an interrupted `up` (exception, Ctrl-C, SIGTERM) tears down exactly what it made, and a later
`up` or `down` also finds leftovers of a crash by their `gx-` names. `galaxy run --cluster FILE`
finds the workers with `cluster_endpoints(FILE)`.

Without root there is no emulation: `up` starts plain loopback workers and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from galaxy.errors import GalaxyError
from galaxy.units import fmt_bytes, fmt_rate, format_rows

from . import layout as L
from . import system as S
from .spec import ClusterSpec, load_cluster

log = logging.getLogger(__name__)

STATE_ENV = "GALAXY_STATE_DIR"
STARTUP_TIMEOUT = 120.0  # seconds for every worker to print its ready line (torch import under a CPU cap)


def _quiet(msg: str) -> None:
    pass


def state_dir() -> Path:
    """Where state files live: $GALAXY_STATE_DIR, /run/galaxy (root), or a per-user runtime dir."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    if os.geteuid() == 0:
        return Path("/run/galaxy")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "galaxy" if runtime else Path(tempfile.gettempdir()) / f"galaxy-{os.getuid()}"


def state_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def read_state(name: str) -> dict | None:
    try:
        return json.loads(state_path(name).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("state file %s is corrupt; treating the cluster as crashed", state_path(name))
        return {"cluster": name, "objects": [], "devices": [], "corrupt": True}


def all_states() -> list[dict]:
    d = state_dir()
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        s = read_state(p.stem)
        if s is not None:
            out.append(s)
    return out


def _digest(spec: ClusterSpec) -> str:
    return hashlib.sha1(repr((spec.devices, spec.cfs_period_us, spec.port, spec.subnet)).encode()).hexdigest()[:12]


class _State:
    """The cluster's state file, rewritten (atomically, mode 0600: it holds the token) on every change."""

    def __init__(self, data: dict):
        self.data = data
        self.path = state_path(data["cluster"])

    @property
    def objects(self) -> list[dict]:
        return self.data["objects"]

    def add(self, rec: dict) -> None:
        self.objects.append(rec)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class EmulatedCluster:
    """A running cluster: its workers' addresses, token and a row per device."""

    spec: ClusterSpec
    mode: str  # "emulated" (namespaces, tbf, cgroups) or "loopback" (plain workers: not emulated)
    addresses: list[str]
    token: str
    devices: list[dict]
    notes: list[str] = field(default_factory=list)
    reused: bool = False  # True: `up` found it already running

    def down(self, progress=_quiet) -> list[str]:
        return down(self.spec.name, progress=progress)


# -- up ----------------------------------------------------------------------------------------------


def up(spec: ClusterSpec, progress=_quiet, detached: bool = True, reuse: bool = True, loopback: bool = False,
       startup_timeout: float = STARTUP_TIMEOUT) -> EmulatedCluster:
    """Bring the cluster up (or return it if it is already up as specified).

    detached: workers outlive this process (`galaxy devices up`); otherwise they exit with it.
    loopback: skip emulation even as root (plain loopback workers).
    """
    if not spec.emulated:
        raise GalaxyError(f"{spec.path} lists real worker addresses: there is nothing to bring up "
                          f"(use `galaxy run --cluster {spec.path}` directly)")
    old = read_state(spec.name)
    if old is not None and reuse and not old.get("corrupt") and old.get("digest") == _digest(spec) \
            and _workers_alive(old):
        progress(f"cluster {spec.name} is already up ({old['mode']})")
        return _from_state(spec, old, reused=True)
    if old is not None:
        progress(f"removing the earlier cluster {spec.name} (stale or different)")
    _remove_all(spec.name, old, progress)

    reason = S.why_not_root()
    if loopback or reason:
        return _up_loopback(spec, reason or "loopback requested", progress, detached, startup_timeout)

    token = secrets.token_urlsafe(24)
    state = _State({"cluster": spec.name, "file": str(Path(spec.path).resolve()), "mode": "emulated",
                    "digest": _digest(spec), "token": token, "created": time.time(), "pid": os.getpid(),
                    "objects": [], "devices": [], "notes": list(spec.notes), "status": "starting"})
    state.save()
    with cleanup_on_interrupt():
        try:
            lay, cg = _build(spec, state, progress)
            procs = _start_workers(spec, lay, cg, state, token, progress, detached)
            _wait_ready(procs, [d.name for d in lay.devices], state, startup_timeout, progress)
            _check_reachable(lay.addresses, token, progress)
        except BaseException:
            progress(f"bring-up of {spec.name} failed: removing what was made")
            with _no_interrupts():  # a second Ctrl-C must not leave half of it behind
                errors = S.teardown(state.objects)
                state.delete()
            for e in errors:
                log.error("cleanup: %s", e)
            raise
    rows = [_row(spec.devices[d.index], d, cg.version, p.pid) for d, p in zip(lay.devices, procs)]
    state.data.update(devices=rows, subnet=lay.subnet, bridge=lay.bridge, bridge_ip=lay.bridge_ip,
                      cgroup_version=cg.version, status="up")
    state.save()
    return _from_state(spec, state.data)


def _build(spec: ClusterSpec, state: _State, progress) -> tuple[L.NetLayout, S.Cgroups]:
    cg = S.detect_cgroups()
    if cg is None:
        raise GalaxyError("no cgroup hierarchy with the cpu and memory controllers")
    with _subnet_lock():  # two `up`s at once must not pick the same subnet
        used = S.list_ipv4_subnets() | {s["subnet"] for s in all_states() if s.get("subnet")}
        subnet = spec.subnet or L.pick_subnet(used)
        clash = [u for u in used if _overlaps(subnet, u)]
        if spec.subnet and clash:
            raise GalaxyError(f"{spec.path}: subnet {subnet} overlaps {clash[0]}, already in use on this machine")
        lay = L.make_layout(spec, subnet)
        state.data["subnet"] = subnet
        progress(f"bridge {lay.bridge} {lay.bridge_ip}/{lay.prefixlen} (coordinator side)")
        state.add({"kind": "link", "name": lay.bridge})
        for cmd in L.bridge_commands(lay):
            S.run(cmd)
    for d in lay.devices:
        progress(f"device {d.name}: namespace {d.netns}, {d.ip}, {fmt_rate(d.rate_bps)}, "
                 f"{d.cpu:.2f} cores, memory {fmt_bytes(d.memory) if d.memory else 'unlimited'}")
        state.add({"kind": "netns", "name": d.netns})
        for cmd in L.netns_commands(d):
            S.run(cmd)
        state.add({"kind": "link", "name": d.host_link})
        for cmd in L.veth_commands(lay, d):
            S.run(cmd)
        state.add({"kind": "qdisc", "dev": d.host_link})
        state.add({"kind": "qdisc", "dev": L.NS_IFACE, "netns": d.netns})
        for cmd in L.shaping_commands(d):
            S.run(cmd)
        created: list[dict] = []
        try:
            S.make_cgroup(cg, d.cgroup, L.cgroup_values(d, cg.version), created)
        finally:
            state.objects.extend(created)
            state.save()
    return lay, cg


@contextlib.contextmanager
def _subnet_lock(timeout: float = 30.0):
    """A machine-wide lock that leaves no file behind: an abstract unix socket bound while held."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.bind("\0galaxy-devices-up")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise GalaxyError(f"another `galaxy devices up` has held the subnet lock for over {timeout:.0f} s"
                                      ) from None
                time.sleep(0.1)
        yield
    finally:
        sock.close()


def _overlaps(a: str, b: str) -> bool:
    import ipaddress

    return ipaddress.ip_network(a, strict=False).overlaps(ipaddress.ip_network(b, strict=False))


def _log_dir(name: str) -> Path:
    return state_dir() / name


def _worker_env(token: str) -> dict:
    from galaxy.transport.spawn import MALLOC_ENV

    return {**os.environ, **MALLOC_ENV, "PYTHONUNBUFFERED": "1", "GALAXY_TOKEN": token,
            "OMP_NUM_THREADS": "1"}


def _start_workers(spec, lay: L.NetLayout, cg: S.Cgroups, state: _State, token: str, progress,
                   detached: bool) -> list[subprocess.Popen]:
    logs = _log_dir(spec.name)
    state.add({"kind": "dir", "path": str(logs)})
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    progress(f"starting {len(lay.devices)} workers inside their namespaces and cgroups")
    procs = []
    for d in lay.devices:
        cmd = L.enter_command(d.netns, S.procs_files(cg, d.cgroup), L.worker_command(d, detached, cluster=spec.name),
                              cpus=d.cpus)
        procs.append(_spawn(cmd, logs / f"{d.name}.log", _worker_env(token), detached))
        state.add(S.process_record(procs[-1], f"worker {d.name}"))
    return procs


def _spawn(cmd: list[str], log_path: Path, env: dict, detached: bool) -> subprocess.Popen:
    with open(log_path, "w") as logf:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, close_fds=True, cwd="/")


def _wait_ready(procs: list[subprocess.Popen], names: list[str], state: _State, timeout: float,
                progress) -> list[str]:
    """Each worker's bound address, read from the ready line in its log."""
    from galaxy.transport.worker import READY_LINE

    logs = _log_dir(state.data["cluster"])
    deadline = time.monotonic() + timeout
    found: dict[int, str] = {}
    while len(found) < len(procs):
        for i, (p, name) in enumerate(zip(procs, names)):
            if i in found:
                continue
            text = _read(logs / f"{name}.log")
            for line in text.splitlines():
                if line.startswith(READY_LINE):
                    found[i] = line.split()[1]
            if i not in found and p.poll() is not None:
                raise GalaxyError(f"worker {name} exited with status {p.returncode} while starting:\n"
                                  f"{_tail(text)}")
        if time.monotonic() > deadline:
            late = [names[i] for i in range(len(procs)) if i not in found]
            raise GalaxyError(f"workers {', '.join(late)} did not start within {timeout:.0f} s (logs in {logs})")
        time.sleep(0.1)
    progress("workers ready: " + ", ".join(found[i] for i in range(len(procs))))
    return [found[i] for i in range(len(procs))]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, n: int = 15) -> str:
    return "\n".join("    " + s for s in text.strip().splitlines()[-n:])


def _check_reachable(addresses: list[str], token: str, progress, timeout: float = 20.0) -> None:
    """Hello every worker from here (the root namespace), through the bridge and the shaped links."""
    from galaxy.transport.client import Cluster

    with Cluster(addresses, token=token, connect_timeout=timeout) as c:
        infos = c.hello()
    progress("reachable from the coordinator: " + ", ".join(f"{i.name}@{i.address}" for i in infos))


@contextlib.contextmanager
def cleanup_on_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while `up` runs, so it too cleans up; restore after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _no_interrupts():
    """Ignore SIGINT and SIGTERM for the duration (main thread only), so cleanup runs to the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _row(d_spec, d: L.DeviceLayout, cgroup_version: int, pid: int) -> dict:
    return {"name": d.name, "profile": d_spec.profile, "netns": d.netns, "address": d.address, "cpu": d.cpu,
            "threads": d.threads, "cfs": f"{d.quota_us}/{d.period_us} us", "memory": d.memory,
            "memory_budget": d.memory_budget, "rate_bps": d.rate_bps, "latency_ms": d.latency_ms, "pid": pid,
            "cgroup": d.cgroup, "cgroup_version": cgroup_version, "host_link": d.host_link, "cpus": list(d.cpus)}


# -- the fallback without root -------------------------------------------------------------------------


def _up_loopback(spec: ClusterSpec, reason: str, progress, detached: bool, timeout: float) -> EmulatedCluster:
    from galaxy.transport.spawn import worker_command

    warning = (f"NOT EMULATED ({reason}): starting plain loopback workers with no bandwidth shaping and no "
               "CPU or memory caps (memory budgets and link delays are still passed to the workers)")
    progress(warning)
    token = secrets.token_urlsafe(24)
    state = _State({"cluster": spec.name, "file": str(Path(spec.path).resolve()), "mode": "loopback",
                    "digest": _digest(spec), "token": token, "created": time.time(), "pid": os.getpid(),
                    "objects": [], "devices": [], "notes": [warning, *spec.notes], "status": "starting"})
    state.save()
    logs = _log_dir(spec.name)
    procs = []
    with cleanup_on_interrupt():
        try:
            state.add({"kind": "dir", "path": str(logs)})
            logs.mkdir(parents=True, exist_ok=True, mode=0o700)
            for d in spec.devices:
                cmd = worker_command("127.0.0.1:0", d.name, d.threads,
                                     extra=["--memory-budget", str(d.memory_budget), "--link-delay-ms",
                                            f"{d.latency_ms:g}"])
                if detached:
                    cmd = [a for a in cmd if a != "--exit-with-parent"]
                procs.append(_spawn(cmd, logs / f"{d.name}.log", _worker_env(token), detached))
                state.add(S.process_record(procs[-1], f"worker {d.name}"))
            addrs = _wait_ready(procs, [d.name for d in spec.devices], state, timeout, progress)
        except BaseException:
            with _no_interrupts():
                S.teardown(state.objects)
                state.delete()
            raise
    rows = [{"name": d.name, "profile": d.profile, "netns": "-", "address": a, "cpu": d.cpu, "threads": d.threads,
             "cfs": "not capped", "memory": d.memory, "memory_budget": d.memory_budget, "rate_bps": d.link_bps,
             "latency_ms": d.latency_ms, "pid": p.pid, "cgroup": None, "cgroup_version": None}
            for d, a, p in zip(spec.devices, addrs, procs)]
    state.data.update(devices=rows, status="up")
    state.save()
    return _from_state(spec, state.data)


# -- down, status, endpoints -------------------------------------------------------------------------------


def _workers_alive(state: dict) -> bool:
    recs = [o for o in state.get("objects", []) if o["kind"] == "process"]
    return bool(recs) and state.get("status") == "up" and all(S._same_process(r) is not None for r in recs)


def _from_state(spec: ClusterSpec, state: dict, reused: bool = False) -> EmulatedCluster:
    return EmulatedCluster(spec, state["mode"], [d["address"] for d in state["devices"]], state["token"],
                           state["devices"], list(state.get("notes", [])), reused)


def find_stale(name: str) -> list[dict]:
    """Objects named for cluster `name` that exist now, found by their names (no state file needed)."""
    if os.geteuid() != 0:
        return []
    recs = [{"kind": "netns", "name": n} for n in S.list_netns() if n.startswith(L.netns_prefix(name))]
    tag = L.cluster_tag(name)
    for link in S.list_links():
        alias = link.get("ifalias", "")
        if link["ifname"].startswith(tag) or alias == f"galaxy:{name}" or alias.startswith(f"galaxy:{name}:"):
            recs.append({"kind": "link", "name": link["ifname"]})
    cg = S.detect_cgroups()
    if cg is not None:
        recs += [{"kind": "cgroup", "path": p} for p in S.list_cgroups(cg, L.netns_prefix(name))]
    return recs


def _remove_all(name: str, state: dict | None, progress) -> list[str]:
    recs = list(state.get("objects", [])) if state else []
    known = {json.dumps(r, sort_keys=True) for r in recs}
    recs += [r for r in find_stale(name) if json.dumps(r, sort_keys=True) not in known]
    if recs:
        progress(f"removing {len(recs)} objects of cluster {name}")
    errors = S.teardown(recs)
    with contextlib.suppress(FileNotFoundError):
        state_path(name).unlink()
    with contextlib.suppress(OSError):
        state_dir().rmdir()  # only if empty: the machine as we found it
    return errors


def _name_of(name_or_spec) -> str:
    if isinstance(name_or_spec, ClusterSpec):
        return name_or_spec.name
    text = str(name_or_spec)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return load_cluster(text).name
    return text


def down(name_or_spec, progress=_quiet) -> list[str]:
    """Remove everything cluster `name_or_spec` (a name, a cluster file or a spec) made. Returns what was removed."""
    name = _name_of(name_or_spec)
    state = read_state(name)
    removed = [S.describe(r) for r in (state or {}).get("objects", [])]
    stale = [r for r in find_stale(name) if r not in (state or {}).get("objects", [])]
    removed += [f"{S.describe(r)} (found by name)" for r in stale]
    if state is None and not stale:
        progress(f"cluster {name} is not up; nothing to remove")
        return []
    errors = _remove_all(name, state, progress)
    if errors:
        raise GalaxyError(f"could not remove everything of cluster {name}:\n  " + "\n  ".join(errors))
    progress(f"cluster {name} is down")
    return removed


def down_all(progress=_quiet) -> list[str]:
    """Remove every cluster with a state file and every `gx-` object found by name."""
    removed = []
    for s in all_states():
        removed += down(s["cluster"], progress)
    if os.geteuid() == 0:
        recs = [{"kind": "netns", "name": n} for n in S.list_netns() if n.startswith(f"{L.PREFIX}-") and "." in n]
        recs += [{"kind": "link", "name": lk["ifname"]} for lk in S.list_links()
                 if lk.get("ifalias", "").startswith("galaxy:")]
        cg = S.detect_cgroups()
        if cg is not None:
            recs += [{"kind": "cgroup", "path": p} for p in S.list_cgroups(cg, f"{L.PREFIX}-")]
        errors = S.teardown(recs)
        removed += [f"{S.describe(r)} (found by name)" for r in recs]
        if errors:
            raise GalaxyError("could not remove everything:\n  " + "\n  ".join(errors))
    return removed


def status(name_or_spec=None) -> list[dict]:
    """Running (or crashed) clusters with a state file: name, mode, devices with an `alive` flag each."""
    states = all_states() if name_or_spec is None else [s for s in [read_state(_name_of(name_or_spec))] if s]
    out = []
    for s in states:
        procs = {o["pid"]: o for o in s.get("objects", []) if o["kind"] == "process"}
        devices = [{**d, "alive": d.get("pid") in procs and S._same_process(procs[d["pid"]]) is not None}
                   for d in s.get("devices", [])]
        health = "up" if devices and all(d["alive"] for d in devices) and s.get("status") == "up" else "broken"
        out.append({"cluster": s["cluster"], "file": s.get("file"), "mode": s.get("mode"), "state": health,
                     "subnet": s.get("subnet"), "devices": devices, "notes": s.get("notes", [])})
    return out


def _layout_of(state: dict) -> tuple[ClusterSpec, L.NetLayout]:
    spec = load_cluster(state["file"])
    return spec, L.make_layout(spec, state["subnet"])


def _running_device(name_or_spec, device: str) -> tuple[str, dict, ClusterSpec, L.DeviceLayout]:
    """(cluster name, its state, its spec, the device's layout) of a device of a running emulated cluster."""
    name = _name_of(name_or_spec)
    state = read_state(name)
    if state is None or state.get("mode") != "emulated":
        raise GalaxyError(f"cluster {name!r} is not up as an emulated LAN")
    spec, lay = _layout_of(state)
    d = next((x for x in lay.devices if x.name == device), None)
    if d is None:
        raise GalaxyError(f"cluster {name!r} has no device {device!r}")
    return name, state, spec, d


def restart_worker(name_or_spec, device: str, progress=_quiet, timeout: float = STARTUP_TIMEOUT) -> str:
    """Start device `device`'s worker again (after it crashed or was killed) in its namespace and
    cgroups, as `up` did; returns its address. Fault-injection tests use it."""
    name, state, spec, d = _running_device(name_or_spec, device)
    cg = S.detect_cgroups()
    cmd = L.enter_command(d.netns, S.procs_files(cg, d.cgroup), L.worker_command(d, True, cluster=spec.name),
                          cpus=d.cpus)
    proc = _spawn(cmd, _log_dir(name) / f"{d.name}.log", _worker_env(state["token"]), True)
    st = _State(state)
    st.add(S.process_record(proc, f"worker {d.name}"))
    for row in state["devices"]:
        if row["name"] == device:
            row["pid"] = proc.pid
    _wait_ready([proc], [d.name], st, timeout, progress)
    st.save()
    return d.address


def set_link_up(name_or_spec, device: str, up_: bool) -> None:
    """Take a device's link down (or up again): its veth on the bridge side, as if unplugged."""
    name = _name_of(name_or_spec)
    state = read_state(name)
    row = next((r for r in (state or {}).get("devices", []) if r["name"] == device), None)
    if row is None or "host_link" not in row:
        raise GalaxyError(f"cluster {name!r} has no running emulated device {device!r}")
    S.run(["ip", "link", "set", row["host_link"], "up" if up_ else "down"])


def set_cpu_share(name_or_spec, device: str, cores: float) -> None:
    """Change a running device's CPU share (cgroup quota), e.g. to make it a straggler."""
    *_, d = _running_device(name_or_spec, device)
    cg = S.detect_cgroups()
    period, quota = L.cfs_values(cores, d.period_us)
    values = [v for v in L.cgroup_values(dataclasses.replace(d, cpu=cores, period_us=period, quota_us=quota),
                                         cg.version) if v[0] == "cpu"]
    for controller, fname, value in values:
        with open(os.path.join(cg.dirs(d.cgroup)[controller], fname), "w") as f:
            f.write(value)


def set_link_rate(name_or_spec, rate_bps: float | dict[str, float], progress=_quiet) -> dict[str, float]:
    """Re-shape every device's link of a running emulated cluster (both ends), e.g. for a
    bandwidth sweep; the workers keep running. rate_bps: one rate for all, or per device name.
    Returns the rates the links had before, to put them back with."""
    name = _name_of(name_or_spec)
    state = read_state(name)
    if state is None or state.get("mode") != "emulated":
        raise GalaxyError(f"cluster {name!r} is not up as an emulated LAN; `galaxy devices up` it first")
    before = {}
    for d in state["devices"]:
        if "host_link" not in d:
            raise GalaxyError(f"cluster {name!r} was brought up by an older Galaxy; down and up it again")
        rate = rate_bps.get(d["name"], d["rate_bps"]) if isinstance(rate_bps, dict) else rate_bps
        S.run(["tc", "qdisc", "replace", "dev", d["host_link"], *L.tbf_args(rate)])
        S.run(["tc", "-n", d["netns"], "qdisc", "replace", "dev", L.NS_IFACE, *L.tbf_args(rate)])
        before[d["name"]], d["rate_bps"] = d["rate_bps"], rate
    _State(state).save()
    rates = sorted({d["rate_bps"] for d in state["devices"]})
    progress(f"links of {name} shaped to {' / '.join(f'{r / 1e6:g}' for r in rates)} Mbit/s")
    return before


def cluster_endpoints(path) -> tuple[list[str], str | None]:
    """(worker addresses in ring order, token) of the cluster a file describes.

    Real clusters: the addresses in the file and its token (or $GALAXY_TOKEN). Emulated ones: the
    running cluster's state file; an error says to run `galaxy devices up FILE` if it is not up.
    """
    spec = load_cluster(path)
    if not spec.emulated:
        return [d.address for d in spec.devices], spec.token or os.environ.get("GALAXY_TOKEN")
    state = read_state(spec.name)
    if state is None or state.get("status") != "up":
        raise GalaxyError(f"cluster {spec.name} ({path}) is not up: run `galaxy devices up {path}` first")
    if state.get("digest") != _digest(spec):
        raise GalaxyError(f"cluster {spec.name} is up with another configuration than {path} now has: "
                          f"run `galaxy devices down {path}` and `galaxy devices up {path}`")
    if not _workers_alive(state):
        raise GalaxyError(f"cluster {spec.name} is broken (a worker died): run `galaxy devices up {path}` again")
    return [d["address"] for d in state["devices"]], state["token"]


@contextlib.contextmanager
def emulated(spec: ClusterSpec, progress=_quiet, **kwargs):
    """`with emulated(spec) as ec:` — a fresh cluster, always torn down on exit (workers die with us)."""
    kwargs.setdefault("detached", False)
    ec = up(spec, progress=progress, reuse=False, **kwargs)
    try:
        yield ec
    finally:
        down(spec.name, progress=progress)


# -- presentation --------------------------------------------------------------------------------------


def device_table(rows: list[dict]) -> str:
    """name, namespace, address, cpu share, memory, link: one line per device."""
    head = ("device", "profile", "namespace", "address", "cpu", "cfs quota", "memory", "link", "latency")
    lines = [head]
    for d in rows:
        lines.append((d["name"], d.get("profile") or "-", d.get("netns") or "-", d["address"],
                      f"{d['cpu']:.2f}" if d.get("cpu") is not None else "-", d.get("cfs", "-"),
                      fmt_bytes(d["memory"]) if d.get("memory") else "unlimited",
                      _link(d), f"{d.get('latency_ms', 0):g} ms"))
    return format_rows(lines)


def _link(d: dict) -> str:
    if d.get("netns") in (None, "-"):
        return "loopback (not shaped)"
    return fmt_rate(d["rate_bps"]) if d.get("rate_bps") else "-"
