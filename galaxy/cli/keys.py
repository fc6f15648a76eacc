"""`galaxy keys init`: the cluster's certificate authority and a key pair per device (mutual TLS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..transport.security import COORDINATOR, init_keys

EXAMPLES = """examples:
  galaxy keys init keys --device jetson --device pi5 --device laptop
  galaxy keys init keys --device jetson --host 192.168.1.20      an extra address in every certificate
"""


def add_parser(sub) -> None:
    keys = sub.add_parser("keys", help="the cluster's certificate authority and device keys", epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kinit = keys_sub.add_parser("init", help="create a CA (once) and a key pair per device", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    kinit.add_argument("directory", help="where to write ca.pem/ca.key and NAME.pem/NAME.key (created if missing)")
    kinit.add_argument("--device", action="append", default=[], metavar="NAME", help="device name (repeatable)")
    kinit.add_argument("--host", action="append", default=[], metavar="ADDR",
                       help="extra DNS name or IP for every certificate (repeatable)")
    kinit.set_defaults(func=cmd_keys_init)


def cmd_keys_init(args) -> int:
    written = init_keys(args.directory, args.device, args.host)
    for p in written:
        print(f"wrote {p} (+ .key)")
    d = Path(args.directory)
    print(f"CA: {d / 'ca.pem'}. {d / 'ca.key'} signs certificates for the whole cluster: keep it on this machine "
          "only, out of version control, and off-line once every device has its pair (it is needed only to add "
          f"devices). Copy ca.pem, NAME.pem and NAME.key to each device and start it with `galaxy worker --tls DIR "
          f"--name NAME`; the coordinator uses the '{COORDINATOR}' pair (--tls DIR).")
    return 0
