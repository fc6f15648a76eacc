"""`python -m devices.enter [--netns NS] [--cgroup-procs FILE ...] [--cpus 0,1] -- CMD ...`

Joins the given cgroups (by writing its own pid to each cgroup.procs) and network namespace,
pins itself to the given CPUs, then execs CMD, which so starts inside both and cannot escape
them. A separate process rather than a `preexec_fn`, which is unsafe in a parent that already
runs threads (gRPC, pytest).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000


def join_cgroup(procs_file: str) -> None:
    with open(procs_file, "w") as f:
        f.write(str(os.getpid()))


def join_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devices.enter")
    ap.add_argument("--netns")
    ap.add_argument("--cgroup-procs", action="append", default=[])
    ap.add_argument("--cpus", help="comma-separated CPU numbers to pin to (inherited by every thread)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command to run after --")
    for p in args.cgroup_procs:
        join_cgroup(p)
    if args.netns:
        join_netns(args.netns)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
