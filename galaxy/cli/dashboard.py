"""`galaxy dashboard`: the live dashboard of a cluster, without serving a model.

The same page `galaxy serve` hosts at /dashboard (galaxy/serving/dashboard_http.py), for devices that
something else drives or nothing does yet: each device's name, address, CPU share, memory and link,
up or down, live; with `--plan`, the split the plan file describes. There is no engine here, so no
timeline and no serving metrics: those come from `galaxy serve`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..serving.server import Server
from .args import add_cluster_args
from .serve import add_monitor_args, serve_until_stopped
from .session import device_count, open_session, read_plan

EXAMPLES = """examples:
  galaxy dashboard --cluster lan.yaml                     http://127.0.0.1:8080/dashboard
  galaxy dashboard --workers 10.0.0.5:50051,10.0.0.7:50051 --plan plan.json
  galaxy dashboard --discover --host 0.0.0.0 --api-key $KEY
"""


def add_parser(subparsers):
    """Register `galaxy dashboard` on the CLI's subparsers; returns the parser."""
    p = subparsers.add_parser("dashboard", help="a live web page of the devices (and a plan), without serving",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Host the dashboard `galaxy serve` shows at /dashboard -- the devices, "
                              "up or down, their CPU, memory and links, live; with --plan the split it "
                              "describes -- without loading a model or serving the API.")
    add_cluster_args(p, local_help="spawn N idle local workers on loopback (a demo; default 3)", transport=False)
    p.add_argument("--plan", metavar="PLAN.json", help="draw the split from this plan (`galaxy plan -o`)")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for the LAN)")
    h.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    h.add_argument("--api-key", default=os.environ.get("GALAXY_API_KEY"),
                   help="require this key to open the page (default $GALAXY_API_KEY)")
    add_monitor_args(h)
    p.set_defaults(func=cmd_dashboard)
    return p


def cmd_dashboard(args) -> int:
    with open_session(args, device_count(args)) as session:
        session.devices()  # every device answers once (names them), or the command fails here naming it
        server = Server(session, args.host, args.port, api_key=args.api_key, api=False, plan=read_plan(args),
                        poll_interval=args.poll_interval, measure_links=not args.no_link_test)
        server._bind()
        print(f"galaxy dashboard: {session.world} devices at http://{server.address}/dashboard (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        serve_until_stopped(server, "galaxy dashboard")
    return 0
