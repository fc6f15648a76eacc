"""`galaxy worker`: serve this device as a Galaxy peer (transport.worker does the serving)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

from ..paths import cache_dir
from ..transport.security import TlsFiles
from ..transport.worker import READY_LINE, WorkerSettings, serve
from .args import size

EXAMPLES = """examples:
  galaxy worker --listen 127.0.0.1:50051 --name laptop                 loopback only, no credentials
  galaxy worker --listen 0.0.0.0:50051 --name jetson --tls keys --announce --cluster-name home
  galaxy worker --listen 0.0.0.0:50051 --token $GALAXY_TOKEN --memory-budget 1.5GB
"""


def add_parser(sub) -> None:
    worker = sub.add_parser("worker", help="serve this device as a Galaxy peer", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    worker.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="address to serve on; port 0 picks a free one (default 127.0.0.1:50051)")
    worker.add_argument("--name", default="", help="device name shown in plans (default: hostname)")
    worker.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads")
    worker.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1, ...")
    worker.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"),
                        help="shared cluster token; without one the worker binds loopback only")
    worker.add_argument("--memory-budget", type=size, default=0, metavar="SIZE",
                        help="cap on this worker process's memory, e.g. 2GB: a load that would take the process "
                             "past it (resident memory + shard + transient copies) is refused (default: no cap)")
    worker.add_argument("--data-port", type=int, default=0, metavar="PORT",
                        help="TCP port for tensors from peers, on the --listen host (default 0: any free port, "
                             "announced to the coordinator; -1: none, peers send tensors over gRPC)")
    worker.add_argument("--link-delay-ms", type=float, default=0.0,
                        help="emulated one-way link latency added to every received tile (emulated LANs)")
    worker.add_argument("--shard-cache", metavar="DIR",
                        help="keep streamed weight shards here (default $GALAXY_CACHE/shards/NAME; "
                             "'none': memory only)")
    worker.add_argument("--shard-cache-bytes", type=size, default=4 << 30, metavar="SIZE",
                        help="bound on the shard cache (default 4GiB)")
    worker.add_argument("--cache-own-shards", action="store_true",
                        help="also cache shards read from a file or random init (fast reloads, e.g. for bench)")
    worker.add_argument("--tls", metavar="DIR", help="mutual TLS with the cluster CA from `galaxy keys init DIR`")
    worker.add_argument("--tls-name", help="which key pair in DIR (default: --name)")
    worker.add_argument("--announce", action="store_true",
                        help="announce this worker on its subnet so `galaxy run --discover` finds it")
    worker.add_argument("--cluster-name", default="galaxy", help="cluster to announce in (default 'galaxy')")
    worker.add_argument("--announce-interface", action="append", metavar="IFACE",
                        help="announce on this interface only (repeatable; default: the listen address's)")
    worker.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    if args.exit_with_parent:
        _exit_with_parent()
    tls = None
    if args.tls:
        tls = TlsFiles.load(args.tls, args.tls_name or args.name or socket.gethostname())
    name = args.name or socket.gethostname()
    cache = args.shard_cache if args.shard_cache is not None else str(cache_dir("shards") / name)
    settings = WorkerSettings(name=name, threads=args.threads, device=args.device, token=args.token,
                              memory_budget=args.memory_budget, link_delay_ms=args.link_delay_ms, tls=tls,
                              shard_cache=None if cache == "none" else cache,
                              shard_cache_bytes=args.shard_cache_bytes, cache_own_shards=args.cache_own_shards,
                              data_port=args.data_port)
    serve(args.listen, settings, ready=lambda addr: print(f"{READY_LINE} {addr}", flush=True),
          announce=args.cluster_name if args.announce else None, announce_interfaces=args.announce_interface)
    _exit_now(0)
    return 0  # not reached


def _exit_now(code: int) -> None:
    """End the process without the interpreter's finalization. serve() has returned: the server is
    stopped and the sessions closed, and the shard store's files are whole (written to a .part file,
    then renamed), so nothing is left to finalize -- but tearing down torch's modules took ~0.45 s of
    CPU per worker (1.52 s against 1.98 s for an import and exit, medians of 7), paid on every stop and
    by whoever waits for it (a coordinator's `--local N` teardown, a restart)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent() -> None:
    """Stop this worker when the process that spawned it goes away (even by SIGKILL)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="galaxy-parent-watch").start()
