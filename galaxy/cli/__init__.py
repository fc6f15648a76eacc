"""The `galaxy` command line: one module per subcommand, the shared options in `args`.

Each subcommand module registers its parser (`add_parser`) and runs it (`cmd_*`): it parses, calls the
library, and prints tables or JSON; the work itself lives in the packages below (runtime, planner,
bench, serving, transport). Errors the user can act on (GalaxyError and bad values) end the command
with exit code 2 and one line naming what is wrong; -v shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import GalaxyError
from ..version import __version__

# The subcommands in --help order, and the module that registers and runs each. A command line that names
# one imports only that module: a `galaxy worker` needs neither the planner, the benches nor the server,
# and every local worker and emulated device starts one (0.1-0.2 s of CPU saved per start).
COMMANDS = {"run": "galaxy.cli.run", "plan": "galaxy.cli.plan", "bench": "galaxy.cli.bench",
            "chat": "galaxy.cli.chat", "serve": "galaxy.cli.serve", "dashboard": "galaxy.cli.dashboard",
            "devices": "devices.cli", "keys": "galaxy.cli.keys", "worker": "galaxy.cli.worker",
            "cache": "galaxy.cli.cache"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `galaxy` parser with every subcommand, or with `command`'s alone (what main() parses with
    when the command line names one: the same options, help and errors for that command)."""
    ap = argparse.ArgumentParser(prog="galaxy", description="Collaborative transformer inference "
                                 "across edge devices (hybrid model parallelism).")
    ap.add_argument("--version", action="version", version=f"galaxy {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        if command is None or name == command:
            mod = importlib.import_module(module)
            (mod.add_devices_parser if name == "devices" else mod.add_parser)(sub)
    return ap


def _command_in(argv: list[str]) -> str | None:
    """The subcommand argv names: its first word that is not an option (the top-level options take no
    value), if it is one of COMMANDS."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser(_command_in(sys.argv[1:] if argv is None else argv)).parse_args(argv)
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
