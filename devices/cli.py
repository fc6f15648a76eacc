"""`galaxy devices up|down|status|check|ls`: argparse wiring and printing only.

galaxy/cli/__init__.py calls `add_devices_parser(sub)`; `python -m devices ...` runs the same commands
stand-alone. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from galaxy.errors import GalaxyError
from galaxy.transport.discovery import devices_ls
from galaxy.units import fmt_bytes, fmt_rate, format_rows

from .check import check_running, format_report
from .emulate import cleanup_on_interrupt, device_table, down, down_all, read_state, status, up
from .spec import CLUSTERS_DIR, load_catalog, load_cluster, load_links


def _progress(msg: str) -> None:
    print(f"galaxy devices: {msg}", file=sys.stderr, flush=True)


EXAMPLES = """examples:
  galaxy devices catalog                                     devices, link presets, ready cluster files
  galaxy devices up devices/clusters/hetero-trio.yaml        root; falls back to loopback without it
  galaxy devices status
  galaxy devices down devices/clusters/hetero-trio.yaml
"""


def _examples(*lines: str) -> dict:
    """The epilog of a subcommand: its examples, shown as written."""
    return {"epilog": "examples:\n" + "".join(f"  {line}\n" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_devices_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("devices", help="emulated edge devices: a LAN of namespaces, tbf links and cgroups",
                              description="Bring an emulated LAN of edge devices up and down on this machine "
                              "(needs root; without it, plain loopback workers).", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="devices_command", required=True)

    u = sub.add_parser("up", help="start the cluster a file describes", **_examples(
        "galaxy devices up devices/clusters/hetero-trio.yaml      as root: namespaces, shaped links, cgroups",
        "galaxy devices up devices/clusters/homo-trio.yaml --loopback --json"))
    u.add_argument("cluster", metavar="CLUSTER.yaml", help="the cluster file (devices, links, budgets; see "
                   "devices/README.md)")
    u.add_argument("--loopback", action="store_true", help="plain loopback workers, no emulation (even as root)")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the workers (default 120)")
    u.add_argument("--json", action="store_true", help="print the devices as JSON")
    u.set_defaults(func=cmd_up)

    d = sub.add_parser("down", help="remove everything the cluster made", **_examples(
        "galaxy devices down devices/clusters/hetero-trio.yaml",
        "galaxy devices down --all                                  every Galaxy cluster on this machine"))
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("cluster", nargs="?", metavar="CLUSTER.yaml|NAME", help="the cluster file, or its name")
    g.add_argument("--all", action="store_true", help="every Galaxy cluster and every gx- object on this machine")
    d.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="running clusters and their devices", **_examples(
        "galaxy devices status", "galaxy devices status hetero-trio --json"))
    s.add_argument("cluster", nargs="?", metavar="CLUSTER.yaml|NAME", help="only this cluster (default: every one)")
    s.add_argument("--json", action="store_true", help="print the clusters as JSON")
    s.set_defaults(func=cmd_status)

    c = sub.add_parser("check", help="measure link throughput and CPU speed against the configuration", **_examples(
        "galaxy devices check devices/clusters/hetero-trio.yaml",
        "galaxy devices check devices/clusters/hetero-trio.yaml --no-cpu --seconds 5 --json"))
    c.add_argument("cluster", metavar="CLUSTER.yaml", help="the cluster file (brought up for the check if it is "
                   "not up, and down again after)")
    c.add_argument("--seconds", type=float, default=3.0, help="length of each measurement (default 3)")
    c.add_argument("--no-links", action="store_true", help="skip the link throughput measurements")
    c.add_argument("--no-cpu", action="store_true", help="skip the CPU speed measurements")
    c.add_argument("--keep", action="store_true", help="leave the cluster up if check brought it up")
    c.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other work on the machine to stop (CPU figures need it)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_check)

    cat = sub.add_parser("catalog", help="the device catalog, link presets and ready cluster files",
                         **_examples("galaxy devices catalog"))
    cat.set_defaults(func=cmd_catalog)

    ls = sub.add_parser("ls", help="workers announcing themselves on this machine's subnets (discovery)",
                        **_examples("galaxy devices ls", "galaxy devices ls --cluster-name home --token $GALAXY_TOKEN"))
    ls.add_argument("--cluster-name", help="only this cluster (default: every cluster heard)")
    ls.add_argument("--timeout", type=float, default=2.0, help="seconds to listen (default 2)")
    ls.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"),
                    help="accept only announcements signed with the cluster token (needs --cluster-name)")
    ls.set_defaults(func=cmd_ls)
    return p


def cmd_up(args) -> int:
    spec = load_cluster(args.cluster)
    for note in spec.notes:
        _progress(note)
    ec = up(spec, progress=_progress, startup_timeout=args.timeout)
    if args.json:
        print(json.dumps({"cluster": spec.name, "mode": ec.mode, "addresses": ec.addresses, "devices": ec.devices,
                          "notes": ec.notes}))
    else:
        print(device_table(ec.devices))
    if ec.mode != "emulated":
        _progress(f"cluster {spec.name} is up as plain LOOPBACK workers: NOT EMULATED (see above)")
    else:
        _progress(f"cluster {spec.name} is up; `galaxy run --cluster {args.cluster}` uses it, "
                  f"`galaxy devices down {args.cluster}` removes it")
    return 0


def cmd_down(args) -> int:
    removed = down_all(progress=_progress) if args.all else down(args.cluster, progress=_progress)
    for r in removed:
        print(f"removed {r}")
    return 0


def cmd_status(args) -> int:
    clusters = status(args.cluster)
    if args.json:
        print(json.dumps(clusters))
        return 0
    if not clusters:
        print("no Galaxy device cluster is up")
        return 0 if args.cluster is None else 1
    for c in clusters:
        print(f"{c['cluster']}: {c['state']} ({c['mode']}, subnet {c.get('subnet') or '-'}) from {c['file']}")
        print(device_table(c["devices"]))
        dead = [d["name"] for d in c["devices"] if not d["alive"]]
        if dead:
            print(f"dead workers: {', '.join(dead)}")
    return 0 if all(c["state"] == "up" for c in clusters) else 1


def cmd_check(args) -> int:
    spec = load_cluster(args.cluster)
    if not spec.emulated:
        raise GalaxyError(f"{args.cluster} lists real workers: `check` measures emulated clusters only")
    running = status(spec.name)
    ours = not (running and running[0]["state"] == "up")
    if ours:
        _progress(f"cluster {spec.name} is not up: bringing it up for the check")
        up(spec, progress=_progress, detached=False)
    with cleanup_on_interrupt():
        return _check(args, spec, ours)


def _check(args, spec, ours: bool) -> int:
    try:
        state = read_state(spec.name)
        if state["mode"] != "emulated":
            _progress("this cluster runs as plain loopback workers: nothing is emulated, the figures below "
                      "are this machine's, not the devices'")
        print(device_table(state["devices"]))
        rep = check_running(state["devices"], args.seconds, links=not args.no_links, cpu=not args.no_cpu,
                            progress=_progress, quiet_timeout=args.wait_quiet, cluster=spec.name)
    finally:
        if ours and not args.keep:
            down(spec.name, progress=_progress)
    rep["cluster"], rep["mode"] = spec.name, state["mode"]
    print(json.dumps(rep) if args.json else "\n" + format_report(rep))
    bad = [r for r in rep["links"] if not r["ok"]] + [r for r in (rep["cpu"] or {}).get("devices", []) if not r["ok"]]
    return 1 if bad else 0


def cmd_catalog(args) -> int:
    links = load_links()
    rows = [("profile", "device", "relative compute", "memory", "typical link")]
    for p in load_catalog().values():
        rows.append((p.name, p.title, f"{p.relative:.2f}", fmt_bytes(p.memory), p.link))
    print(format_rows(rows))
    print()
    rows = [("link preset", "rate", "latency", "")]
    for lk in links.values():
        rows.append((lk.name, fmt_rate(lk.rate_bps), f"{lk.latency_ms:g} ms", lk.about))
    print(format_rows(rows))
    print()
    rows = [("cluster file", "devices", "cpu shares (cores)")]
    for f in sorted(CLUSTERS_DIR.glob("*.yaml")):
        spec = load_cluster(f)
        rows.append((str(f), " ".join(d.name for d in spec.devices),
                     " + ".join(f"{d.cpu:.2f}" for d in spec.devices if d.cpu is not None) or "real"))
    print(format_rows(rows))
    return 0


def cmd_ls(args) -> int:
    return devices_ls(args.cluster_name, args.timeout, token=args.token if args.cluster_name else None)
