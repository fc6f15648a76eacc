"""Device profiles and cluster files, parsed and validated into frozen dataclasses.

Pure: reads YAML, runs no commands. A cluster file lists devices; each device either names a
catalog profile (relative compute, memory, typical link) and may override any of them, or gives
`address: host:port` of a real running worker (then the whole cluster is real: no emulation).

Relative compute becomes a CPU share of *this* machine: the cluster's CPU budget (default 95% of
the cores, the rest left to the coordinator and the kernel's network work) is shared out in
proportion to relative compute. Explicit `cpu:` shares are taken as given. If the shares add up
to more than the machine's cores the devices would contend and every timing would lie, so the
shares are scaled down (ratios kept, and a note says so) or, with `oversubscribe: refuse`, the
cluster is refused.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from galaxy.addresses import AddressError, split_address
from galaxy.errors import GalaxyError
from galaxy.units import fmt_bytes, fmt_rate, parse_bytes, parse_rate

HERE = Path(__file__).resolve().parent
CATALOG_DIR = HERE / "catalog"
LINKS_FILE = HERE / "links.yaml"
CLUSTERS_DIR = HERE / "clusters"

BUDGET_FRACTION = 0.95  # default CPU budget: this share of the machine's cores goes to devices
MIN_SHARE = 0.05  # cores; below this CFS throttling no longer behaves like a slower CPU
DEFAULT_PERIOD_US = 10_000  # CFS period; see devices/README.md for why 10 ms and not the 100 ms default
DEFAULT_PORT = 50051  # every emulated worker listens on this port inside its own namespace
WORKER_OVERHEAD = 256 * 2**20  # bytes an idle `galaxy worker` holds before any weights (measured 234 MiB)
MIN_HEADROOM = 64 * 2**20  # a memory limit must leave at least this much for weights
CGROUP_SLACK = 32 * 2**20  # kept below the cgroup limit: kernel and page-cache charges the worker cannot see

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_CLUSTER_FIELDS = {"name", "description", "devices", "cpu_budget", "oversubscribe", "cfs_period_us", "subnet",
                   "port", "token"}
_DEVICE_FIELDS = {"name", "profile", "cpu", "memory", "link", "latency_ms", "address", "note"}
_PROFILE_FIELDS = {"name", "title", "compute", "memory", "link", "notes"}


class ClusterFileError(GalaxyError, ValueError):
    """A cluster file or profile that does not parse; the message names the file and the field."""


@dataclass(frozen=True)
class LinkPreset:
    name: str
    rate_bps: float  # shaped rate (tbf), bits per second on the wire
    latency_ms: float  # one-way latency injected by the receiving worker
    about: str = ""


@dataclass(frozen=True)
class Profile:
    """One real device from the catalog (devices/catalog/NAME.yaml)."""

    name: str
    title: str
    relative: float  # relative compute, Jetson Nano = 1.0 (basis and sources in the file)
    memory: int  # bytes of RAM the device has
    link: str  # name of its typical link preset (devices/links.yaml)
    basis: str = ""  # which published figure `relative` comes from
    path: str = ""


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a cluster, every value resolved to plain units."""

    name: str
    profile: str | None  # catalog name, or None
    cpu: float | None  # CPU share in cores of this machine (None: a real device, not emulated)
    memory: int | None  # memory limit in bytes (None: no limit)
    link_bps: float | None  # link rate, bits/s (None: a real device)
    latency_ms: float  # emulated one-way latency added to every frame this device receives
    address: str | None = None  # host:port of a real running worker; None: emulated
    link_name: str = ""  # the preset the rate came from, if any

    @property
    def threads(self) -> int:
        """Intra-op threads: one per started core of share (MACHINE.md: more threads than cores halves speed)."""
        return max(1, math.ceil((self.cpu or 1.0) - 1e-9))

    @property
    def memory_budget(self) -> int:
        """The worker's `--memory-budget`: a cap on its whole process (it counts its own resident memory
        and a load's transient copies against it), so the cgroup limit less a little slack."""
        return 0 if self.memory is None else max(0, self.memory - CGROUP_SLACK)


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    path: str
    devices: tuple[DeviceSpec, ...]
    cfs_period_us: int = DEFAULT_PERIOD_US
    subnet: str | None = None  # e.g. 10.77.3.0/24; None: the first free 10.77.N.0/24 at `up`
    port: int = DEFAULT_PORT
    token: str | None = None  # real clusters only: the workers' token (else $GALAXY_TOKEN)
    cores: int = 1  # the machine's cores the shares were planned for
    notes: tuple[str, ...] = field(default_factory=tuple)  # decisions worth printing (scaling, ...)

    @property
    def emulated(self) -> bool:
        return all(d.address is None for d in self.devices)

    @property
    def total_cpu(self) -> float:
        return sum(d.cpu or 0.0 for d in self.devices)

    def weights(self) -> list[float]:
        """Relative speeds for an uneven Galaxy split (the CPU shares; 1.0 each for a real cluster)."""
        return [d.cpu or 1.0 for d in self.devices]


# -- catalog ---------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClusterFileError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ClusterFileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ClusterFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_links(path: Path = LINKS_FILE) -> dict[str, LinkPreset]:
    data = _read_yaml(path)
    out = {}
    for name, d in data.items():
        where = f"{path}: link preset {name!r}"
        if not isinstance(d, dict) or "rate" not in d:
            raise ClusterFileError(f"{where}: needs a 'rate' (e.g. 100mbit)")
        out[name] = LinkPreset(name, _rate(d["rate"], where, "rate"), _number(d.get("latency_ms", 0.0), where,
                                                                              "latency_ms", low=0.0),
                               str(d.get("about", "")))
    return out


def load_profile(path: Path) -> Profile:
    data = _read_yaml(path)
    where = f"{path}"
    _no_unknown(data, _PROFILE_FIELDS, where)
    name = data.get("name", path.stem)
    if name != path.stem:
        raise ClusterFileError(f"{where}: field 'name' is {name!r} but the file is {path.name}; make them agree")
    compute = data.get("compute")
    if not isinstance(compute, dict) or "relative" not in compute:
        raise ClusterFileError(f"{where}: field 'compute' needs 'relative' (Jetson Nano = 1.0) and its source")
    if not compute.get("sources"):
        raise ClusterFileError(f"{where}: field 'compute.sources' must name where the figure comes from")
    rel = _number(compute["relative"], where, "compute.relative", low=0.0, strict=True)
    mem = _bytes(data.get("memory"), where, "memory")
    link = str(data.get("link", ""))
    if link not in load_links():
        raise ClusterFileError(f"{where}: field 'link' {link!r} is not a preset in {LINKS_FILE.name} "
                               f"({', '.join(load_links())})")
    return Profile(name, str(data.get("title", name)), rel, mem, link, str(compute.get("basis", "")), str(path))


def load_catalog(directory: Path = CATALOG_DIR) -> dict[str, Profile]:
    """Every profile in the catalog, by name."""
    return {p.stem: load_profile(p) for p in sorted(directory.glob("*.yaml"))}


# -- cluster files ---------------------------------------------------------------------------


def load_cluster(path, cores: int | None = None) -> ClusterSpec:
    """Parse and validate a cluster file; CPU shares are planned for `cores` (default: this machine's)."""
    path = Path(path)
    data = _read_yaml(path)
    return parse_cluster(data, str(path), cores or os.cpu_count() or 1)


def parse_cluster(data: dict, path: str, cores: int, catalog: dict[str, Profile] | None = None,
                  links: dict[str, LinkPreset] | None = None) -> ClusterSpec:
    """A cluster from already-loaded YAML; `path` only names the file in error messages."""
    _no_unknown(data, _CLUSTER_FIELDS, path)
    catalog = load_catalog() if catalog is None else catalog
    links = load_links() if links is None else links
    name = str(data.get("name", Path(path).stem))
    if not _NAME.match(name) or len(name) > 40:
        raise ClusterFileError(f"{path}: field 'name' {name!r}: use lower-case letters, digits and '-', "
                               "at most 40 characters")
    raw = data.get("devices")
    if not isinstance(raw, list) or not raw:
        raise ClusterFileError(f"{path}: field 'devices' must be a non-empty list of devices")
    devices = [_parse_device(d, i, path, catalog, links) for i, d in enumerate(raw)]
    names = [d["name"] for d in devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ClusterFileError(f"{path}: field 'devices': device names must be unique, repeated: {', '.join(dup)}")
    real = [d["address"] is not None for d in devices]
    if any(real) and not all(real):
        raise ClusterFileError(f"{path}: field 'devices': either every device gives 'address' (real workers) "
                               "or none does (emulated); this file mixes both")
    token = data.get("token")
    if all(real):
        specs = tuple(DeviceSpec(d["name"], d["profile"], None, None, None, d["latency_ms"] or 0.0, d["address"])
                      for d in devices)
        return ClusterSpec(name, path, specs, token=None if token is None else str(token), cores=cores)
    if token is not None:
        raise ClusterFileError(f"{path}: field 'token' is for real clusters only; `up` makes a fresh token")

    policy = str(data.get("oversubscribe", "scale"))
    if policy not in ("scale", "refuse"):
        raise ClusterFileError(f"{path}: field 'oversubscribe' must be 'scale' or 'refuse', got {policy!r}")
    budget = data.get("cpu_budget")
    budget = BUDGET_FRACTION * cores if budget is None else _number(budget, path, "cpu_budget", low=0.0,
                                                                    strict=True)
    shares, notes = plan_shares([d["cpu"] for d in devices], [d["relative"] for d in devices], budget, cores,
                                policy, path)
    period = int(_number(data.get("cfs_period_us", DEFAULT_PERIOD_US), path, "cfs_period_us", low=1000))
    if period > 1_000_000:
        raise ClusterFileError(f"{path}: field 'cfs_period_us' is {period}; the kernel allows 1000..1000000")
    subnet = data.get("subnet")
    if subnet is not None:
        subnet = validate_subnet(str(subnet), path)
    port = int(_number(data.get("port", DEFAULT_PORT), path, "port", low=1))
    if port > 65535:
        raise ClusterFileError(f"{path}: field 'port' is {port}; use 1..65535")
    specs = tuple(
        DeviceSpec(d["name"], d["profile"], s, d["memory"], d["link_bps"], d["latency_ms"], None, d["link_name"])
        for d, s in zip(devices, shares)
    )
    return ClusterSpec(name, path, specs, period, subnet, port, None, cores, tuple(notes))


def _parse_device(d, i: int, path: str, catalog: dict[str, Profile], links: dict[str, LinkPreset]) -> dict:
    if not isinstance(d, dict):
        raise ClusterFileError(f"{path}: devices[{i}] must be a mapping with at least 'name', got {d!r}")
    label = f"devices[{i}]" + (f" ({d['name']})" if "name" in d else "")
    where = f"{path}: {label}"
    _no_unknown(d, _DEVICE_FIELDS, where)
    name = str(d.get("name", ""))
    if not _NAME.match(name) or len(name) > 20:
        raise ClusterFileError(f"{where}: field 'name' {name!r}: use lower-case letters, digits and '-', "
                               "at most 20 characters")
    prof = None
    if d.get("profile") is not None:
        prof = catalog.get(str(d["profile"]))
        if prof is None:
            raise ClusterFileError(f"{where}: field 'profile' {d['profile']!r} is not in the catalog; known: "
                                   f"{', '.join(sorted(catalog))}")
    out = {"name": name, "profile": prof.name if prof else None, "address": None}
    out["latency_ms"] = None if d.get("latency_ms") is None else _number(d["latency_ms"], where, "latency_ms",
                                                                         low=0.0)
    if d.get("address") is not None:
        addr = str(d["address"])
        try:
            split_address(addr)
        except AddressError:
            raise ClusterFileError(
                f"{where}: field 'address' {addr!r}: expected host:port of a running worker") from None
        out["address"] = addr
        return out
    out["cpu"] = None if d.get("cpu") is None else _number(d["cpu"], where, "cpu", low=0.0, strict=True)
    if out["cpu"] is None and prof is None:
        raise ClusterFileError(f"{where}: give 'profile' (a catalog device) or 'cpu' (cores of this machine)")
    out["relative"] = prof.relative if prof else None
    mem = d.get("memory", prof.memory if prof else None)
    out["memory"] = None if mem in (None, "none") else _bytes(mem, where, "memory")
    if out["memory"] is not None and out["memory"] < WORKER_OVERHEAD + MIN_HEADROOM:
        raise ClusterFileError(f"{where}: field 'memory' is {fmt_bytes(out['memory'])}; a worker process alone "
                               f"holds ~{fmt_bytes(WORKER_OVERHEAD)}, so give at least "
                               f"{fmt_bytes(WORKER_OVERHEAD + MIN_HEADROOM)}")
    link = d.get("link", prof.link if prof else None)
    if link is None:
        raise ClusterFileError(f"{where}: field 'link' is missing (a rate like 100mbit or a preset: "
                               f"{', '.join(links)})")
    if str(link) in links:
        preset = links[str(link)]
        out["link_bps"], out["link_name"] = preset.rate_bps, preset.name
        if out["latency_ms"] is None:
            out["latency_ms"] = preset.latency_ms
    else:
        out["link_bps"], out["link_name"] = _rate(link, where, "link", presets=links), ""
    if out["link_bps"] < 1e5 or out["link_bps"] > 1e11:
        raise ClusterFileError(f"{where}: field 'link' is {fmt_rate(out['link_bps'])}; use 100kbit..100gbit")
    out["latency_ms"] = out["latency_ms"] or 0.0
    return out


def plan_shares(explicit: list[float | None], relative: list[float | None], budget: float, cores: int,
                policy: str = "scale", path: str = "<cluster>") -> tuple[list[float], list[str]]:
    """CPU shares (cores of this machine) per device, and notes on what was decided.

    Devices with an explicit share keep it; the others split what is left of `budget` in
    proportion to their relative compute. A total above `cores` is scaled down to `budget`
    (ratios kept) or refused, by `policy`.
    """
    notes = []
    fixed = sum(x for x in explicit if x is not None)
    derived = [r for x, r in zip(explicit, relative) if x is None]
    shares = list(explicit)
    if derived:
        left = budget - fixed
        if left <= MIN_SHARE * len(derived):
            raise ClusterFileError(f"{path}: field 'cpu': explicit shares take {fixed:.2f} of the {budget:.2f}-core "
                                   f"budget, leaving {max(left, 0):.2f} for {len(derived)} profile-derived devices")
        unit = left / sum(derived)
        shares = [x if x is not None else r * unit for x, r in zip(explicit, relative)]
        notes.append(f"CPU shares from relative compute: {left:.2f} cores shared in proportion "
                     f"({unit:.3f} cores per unit of relative compute)")
    total = sum(shares)
    if total > cores + 1e-9:
        if policy == "refuse":
            raise ClusterFileError(f"{path}: field 'cpu': the shares add up to {total:.2f} cores but this machine "
                                   f"has {cores}; devices would contend and timings would lie (set "
                                   "'oversubscribe: scale' to scale them down)")
        factor = min(budget, cores) / total
        shares = [s * factor for s in shares]
        notes.append(f"CPU shares added up to {total:.2f} cores > {cores} cores of this machine: scaled by "
                     f"{factor:.3f} to {sum(shares):.2f} cores (ratios kept)")
    small = [i for i, s in enumerate(shares) if s < MIN_SHARE]
    if small:
        raise ClusterFileError(f"{path}: devices[{small[0]}]: field 'cpu': share {shares[small[0]]:.3f} cores is "
                               f"below {MIN_SHARE}; CFS cannot emulate a CPU that slow faithfully (drop devices or "
                               "raise cpu_budget)")
    return [round(s, 4) for s in shares], notes


def validate_subnet(text: str, where: str) -> str:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ClusterFileError(f"{where}: field 'subnet' {text!r}: {e}") from None
    if net.version != 4 or not net.is_private or net.prefixlen > 26:
        raise ClusterFileError(f"{where}: field 'subnet' {text!r}: use a private IPv4 /24 (e.g. 10.77.3.0/24)")
    return str(net)


# -- small validators ------------------------------------------------------------------------


def _no_unknown(d: dict, known: set[str], where: str) -> None:
    bad = sorted(set(d) - known)
    if bad:
        raise ClusterFileError(f"{where}: unknown field {bad[0]!r} (known: {', '.join(sorted(known))})")


def _number(v, where: str, field_name: str, low: float | None = None, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ClusterFileError(f"{where}: field '{field_name}': expected a number, got {v!r}")
    if low is not None and (v < low or (strict and v == low)):
        raise ClusterFileError(f"{where}: field '{field_name}': must be {'>' if strict else '>='} {low}, got {v}")
    return float(v)


def _bytes(v, where: str, field_name: str) -> int:
    try:
        n = parse_bytes(v)
    except ValueError as e:
        raise ClusterFileError(f"{where}: field '{field_name}': {e}") from None
    if n <= 0:
        raise ClusterFileError(f"{where}: field '{field_name}': must be positive, got {v!r}")
    return n


def _rate(v, where: str, field_name: str, presets: dict | None = None) -> float:
    try:
        return parse_rate(v)
    except ValueError as e:
        hint = f" or a preset ({', '.join(presets)})" if presets else ""
        raise ClusterFileError(f"{where}: field '{field_name}': {e}{hint}") from None
