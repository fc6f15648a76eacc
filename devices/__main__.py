"""`python -m devices up|down|status|check|ls ...`: the `galaxy devices` commands stand-alone."""

from __future__ import annotations

import argparse
import logging
import sys

from galaxy.errors import GalaxyError

from .cli import add_devices_parser


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devices")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    add_devices_parser(sub)
    args = ap.parse_args(["devices", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (GalaxyError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"galaxy devices: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("galaxy devices: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
