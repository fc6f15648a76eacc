"""The side effects: run `ip`/`tc`, write cgroup files, start and stop processes, remove objects.

Everything created is described by a small JSON-able record ({"kind": "netns", "name": ...});
`remove()` undoes one record and tolerates objects that are already gone, so teardown can run
any number of times, after a crash too. Commands are argument lists (never a shell), every
return code is checked, and every wait has a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import psutil

from galaxy.errors import GalaxyError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 20.0  # seconds for one ip/tc command


class SystemCommandError(GalaxyError):
    """An ip/tc command or a cgroup write failed; the message has the command and its stderr."""


def run(cmd: list[str], check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    log.debug("run: %s", " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SystemCommandError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise SystemCommandError(f"`{cmd[0]}` is not installed (needed: iproute2's ip and tc)") from None
    if check and res.returncode != 0:
        raise SystemCommandError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): "
                                 f"{(res.stderr or res.stdout).strip()}")
    return res


def why_not_root() -> str | None:
    """None if this process can build an emulated LAN; else the reason it cannot."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): network namespaces, tc and cgroups need root"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    if detect_cgroups() is None:
        return "no usable cgroup hierarchy with the cpu and memory controllers"
    return None


# -- cgroups -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cgroups:
    """Where this process may create child cgroups: one parent per controller (v1) or one (v2)."""

    version: int
    parents: dict  # controller -> directory under which `gx-...` cgroups are made

    def dirs(self, name: str) -> dict:
        """controller -> the cgroup directory called `name`."""
        return {c: os.path.join(p, name) for c, p in self.parents.items()}

    def unique_dirs(self, name: str) -> list[str]:
        return sorted(set(self.dirs(name).values()))


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fs type, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4], rfields[0], set(rfields[2].split(","))))
    return out


def _own_paths() -> dict:
    """controller ('' for v2) -> this process's cgroup path inside that hierarchy."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _under(mount_root: str, mount_point: str, own: str) -> str:
    rel = own[len(mount_root):] if mount_root != "/" and own.startswith(mount_root) else own
    return os.path.join(mount_point, rel.lstrip("/"))


def detect_cgroups() -> Cgroups | None:
    """cgroup v1 with cpu and memory hierarchies, else a v2 unified hierarchy with both controllers.

    Our cgroups go under the cgroup this process already is in (its own subtree), so their
    usage still counts towards whatever contains us.
    """
    try:
        mounts, own = _mounts(), _own_paths()
    except OSError:
        return None
    v1 = {}
    for root, point, fstype, opts in mounts:
        for ctrl in ("cpu", "memory"):
            if fstype == "cgroup" and ctrl in opts and ctrl not in v1 and ctrl in own:
                v1[ctrl] = _under(root, point, own[ctrl])
    if len(v1) == 2:
        return Cgroups(1, v1)
    for _root, point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        try:
            with open(os.path.join(point, "cgroup.controllers")) as f:
                ctrls = f.read().split()
        except OSError:
            continue
        if {"cpu", "memory"} <= set(ctrls):
            # v2 forbids controllers in a cgroup that also holds processes, except at the root:
            # our own cgroup holds us, so our cgroups go directly under the root (untested here).
            return Cgroups(2, {"cpu": point, "memory": point})
    return None


def make_cgroup(cg: Cgroups, name: str, values: list[tuple[str, str, str]], created: list) -> dict:
    """Create the cgroup `name` (recording each directory in `created` first) and write its values."""
    if cg.version == 2:
        parent = cg.parents["cpu"]
        _write(os.path.join(parent, "cgroup.subtree_control"), "+cpu +memory")
    dirs = cg.dirs(name)
    for d in cg.unique_dirs(name):
        created.append({"kind": "cgroup", "path": d})
        os.mkdir(d)
    for ctrl, fname, value in values:
        path = os.path.join(dirs[ctrl], fname)
        if fname == "memory.swap.max" and not os.path.exists(path):
            continue  # no swap accounting: nothing to cap
        _write(path, value)
    if cg.version == 1:
        memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
        limit = [v for c, f, v in values if f == "memory.limit_in_bytes"]
        if limit and os.path.exists(memsw):
            _write(memsw, limit[0])  # no swapping past the limit either
    return dirs


def procs_files(cg: Cgroups, name: str) -> list[str]:
    return [os.path.join(d, "cgroup.procs") for d in cg.unique_dirs(name)]


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise SystemCommandError(f"could not write {value!r} to {path}: {e.strerror}") from None


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


# -- listing what exists -------------------------------------------------------------------------


def list_netns() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    try:
        return [n["name"] for n in json.loads(out)] if out else []
    except (ValueError, KeyError, TypeError):
        return []


def list_links() -> list[dict]:
    out = run(["ip", "-j", "link", "show"]).stdout.strip()
    return json.loads(out) if out else []


def list_ipv4_subnets() -> set[str]:
    """Every IPv4 network configured on an interface of the root namespace."""
    out = run(["ip", "-j", "-4", "addr", "show"]).stdout.strip()
    nets = set()
    for link in json.loads(out) if out else []:
        for a in link.get("addr_info", []):
            nets.add(f"{a['local']}/{a['prefixlen']}")
    return nets


def list_cgroups(cg: Cgroups, prefix: str) -> list[str]:
    out = []
    for parent in sorted(set(cg.parents.values())):
        try:
            out += [os.path.join(parent, n) for n in sorted(os.listdir(parent)) if n.startswith(prefix)]
        except OSError:
            pass
    return out


# -- processes -------------------------------------------------------------------------------------


def process_record(proc: subprocess.Popen, what: str) -> dict:
    try:
        started = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        started = 0.0
    return {"kind": "process", "pid": proc.pid, "started": started, "what": what}


def _same_process(rec: dict) -> psutil.Process | None:
    """The recorded process if it still runs (same pid *and* start time), else None."""
    try:
        p = psutil.Process(rec["pid"])
        if rec.get("started") and abs(p.create_time() - rec["started"]) > 1.0:
            return None  # the pid was reused by something else
        return p
    except psutil.Error:
        return None


def stop_pids(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL whatever is left (and reap our children)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        log.warning("pid %d ignored SIGTERM; killing it", p.pid)
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5.0)


# -- removing ----------------------------------------------------------------------------------------


def describe(rec: dict) -> str:
    """A record in words: 'netns gx-c.d', 'qdisc tbf on eth0 in gx-c.d', 'process 1234 (worker d)'."""
    kind = rec["kind"]
    if kind == "qdisc":
        return f"qdisc tbf on {rec['dev']}" + (f" in {rec['netns']}" if rec.get("netns") else "")
    if kind == "process":
        return f"process {rec['pid']} ({rec.get('what', '')})"
    return f"{kind} {rec.get('name') or rec.get('path')}"


def remove(rec: dict) -> None:
    """Undo one created object; an object already gone is fine."""
    kind = rec["kind"]
    if kind == "process":
        p = _same_process(rec)
        if p is not None:
            stop_pids([p.pid])
    elif kind == "cgroup":
        remove_cgroup(rec["path"])
    elif kind == "qdisc":
        cmd = ["tc"] + (["-n", rec["netns"]] if rec.get("netns") else []) + ["qdisc", "del", "dev", rec["dev"],
                                                                             "root"]
        run(cmd, check=False)
    elif kind == "link":
        if any(link.get("ifname") == rec["name"] for link in list_links()):
            run(["ip", "link", "del", "dev", rec["name"]])
    elif kind == "netns":
        if rec["name"] in list_netns():
            pids = run(["ip", "netns", "pids", rec["name"]], check=False).stdout.split()
            stop_pids([int(p) for p in pids if p.isdigit()])
            run(["ip", "netns", "del", rec["name"]])
    elif kind == "dir":
        shutil.rmtree(rec["path"], ignore_errors=True)
    else:
        raise ValueError(f"unknown object kind {kind!r}")


def remove_cgroup(path: str, timeout: float = 10.0) -> None:
    """Stop whatever still runs in the cgroup, then remove it (rmdir fails while tasks remain)."""
    if not os.path.isdir(path):
        return
    stop_pids(cgroup_pids(path))
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise SystemCommandError(f"could not remove cgroup {path}: {e.strerror} "
                                         f"(still holds pids {cgroup_pids(path)})") from None
            stop_pids(cgroup_pids(path), timeout=1.0)
            time.sleep(0.1)


def teardown(records: list[dict]) -> list[str]:
    """Undo records newest first: processes, then cgroups, qdiscs, links, namespaces. Returns errors."""
    order = {"process": 0, "cgroup": 1, "qdisc": 2, "link": 3, "netns": 4, "dir": 5}
    errors = []
    for rec in sorted(reversed(records), key=lambda r: order.get(r["kind"], 9)):
        try:
            remove(rec)
        except (GalaxyError, OSError, ValueError) as e:
            errors.append(f"{describe(rec)}: {e}")
    return errors
