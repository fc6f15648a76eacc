"""`galaxy cache ls|clear`: what Galaxy keeps on disk between runs (galaxy/paths.py), and emptying it.

Workers cache the shards streamed to them (per device name, up to --shard-cache-bytes each), the
planner caches device timings, the ONNX backend its exported graphs: all under one root
($GALAXY_CACHE, else ~/.cache/galaxy). Each is rebuilt on demand, so clearing costs time, not data.
"""

from __future__ import annotations

import argparse
import json

from .. import paths
from ..errors import GalaxyError
from ..units import fmt_bytes, format_rows

EXAMPLES = """examples:
  galaxy cache ls                                    what is cached, per kind and device, with sizes
  galaxy cache clear --kind shards --name jetson     the shards streamed to worker 'jetson'
  galaxy cache clear                                 everything (rebuilt on demand)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="what Galaxy caches on disk (shards, profiles, ONNX graphs); clear it",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    ls = cache_sub.add_parser("ls", help="list the caches with their sizes", formatter_class=argparse.
                              RawDescriptionHelpFormatter, epilog="examples:\n  galaxy cache ls\n"
                              "  galaxy cache ls --kind shards --json\n")
    clear = cache_sub.add_parser("clear", help="delete cached files (all, or one kind / device)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                                     "examples:\n  galaxy cache clear --kind profiles      re-time the devices "
                                     "at the next `galaxy plan`\n  galaxy cache clear --name local0\n"))
    for q in (ls, clear):
        q.add_argument("--kind", choices=paths.KINDS, help="only this kind: profiles (device timings), shards "
                       "(streamed weights, per worker), onnx (exported graphs), native (compiled int4 expansion)")
        q.add_argument("--name", metavar="DEVICE", help="only this device's profiles and shards")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    ls.set_defaults(func=cmd_ls)
    clear.set_defaults(func=cmd_clear)


def _selected(args) -> list[paths.CacheEntry]:
    if args.name is not None and (not args.name or "/" in args.name or args.name in (".", "..")):
        raise GalaxyError(f"--name {args.name!r}: a device name, as `galaxy worker --name` gave it")
    if args.name is not None and args.kind == "onnx":
        raise GalaxyError("--kind onnx has no per-device entries (the graphs are shared); drop --name")
    return paths.entries(args.kind, args.name)


def cmd_ls(args) -> int:
    found = _selected(args)
    if args.json:
        print(json.dumps({"root": str(paths.cache_root()), "entries": [
            {"kind": e.kind, "device": e.device, "files": e.files, "bytes": e.bytes} for e in found]}))
        return 0
    print(f"cache root  {paths.cache_root()}  (set $GALAXY_CACHE to move it)")
    if not found:
        print("(empty)")
        return 0
    rows = [("kind", "device", "files", "size")]
    rows += [(e.kind, e.device or "-", str(e.files), fmt_bytes(e.bytes)) for e in found]
    rows.append(("total", "", str(sum(e.files for e in found)), fmt_bytes(sum(e.bytes for e in found))))
    print(format_rows(rows))
    return 0


def cmd_clear(args) -> int:
    found = _selected(args)
    for e in found:
        paths.remove(e)
        print(f"removed {e.kind}{' of ' + e.device if e.device else ''}: {e.files} files, {fmt_bytes(e.bytes)}")
    if not found:
        print("nothing to remove")
    return 0
