"""The `galaxy` command line: one module per subcommand, the shared options in `args`.

Each subcommand module registers its parser (`add_parser`) and runs it (`cmd_*`): it parses, calls the
library, and prints tables or JSON; the work itself lives in the packages below (runtime, planner,
bench, serving, transport). Errors the user can act on (GalaxyError and bad values) end the command
with exit code 2 and one line naming what is wrong; -v shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from devices.cli import add_devices_parser

from ..errors import GalaxyError
from ..version import __version__
from . import bench, cache, chat, dashboard, keys, plan, run, serve, worker


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="galaxy", description="Collaborative transformer inference "
                                 "across edge devices (hybrid model parallelism).")
    ap.add_argument("--version", action="version", version=f"galaxy {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in (run, plan, bench, chat, serve, dashboard):
        module.add_parser(sub)
    add_devices_parser(sub)
    keys.add_parser(sub)
    worker.add_parser(sub)
    cache.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (GalaxyError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"galaxy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"galaxy {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
