"""`galaxy serve`: an OpenAI-compatible HTTP endpoint for a model split across devices."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from planner.plan import KV_PATHS

from ..engine.engine import EngineConfig
from ..errors import GalaxyError
from ..serving.server import Server
from .args import (
    add_cluster_args,
    add_decode_layout_arg,
    add_decode_threads_arg,
    add_model_args,
    add_weights_format_arg,
    int_at_least,
    number_in,
    size,
)
from .session import device_count, open_session, read_plan

EXAMPLES = """examples:
  galaxy serve --local 3                                  http://127.0.0.1:8000/v1, the embedded SmolLM2
  galaxy serve --cluster lan.yaml --host 0.0.0.0 --api-key $KEY --recover
  galaxy serve --model minilm --port 8001                 /v1/embeddings
  galaxy serve --local 2 --api-key $KEY                   then open http://127.0.0.1:8000/dashboard?key=$KEY
"""


def add_parser(subparsers):
    """Register `galaxy serve` on the CLI's subparsers; returns the parser."""
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP endpoint for a model split across devices",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Serve /v1/chat/completions (causal LMs), /v1/embeddings (encoders), "
                              "/v1/models, /health, /metrics (Prometheus) and /dashboard (a live page of the devices, "
                              "the split, the last step and the serving numbers). Chat requests are batched on the "
                              "devices (continuous batching); embeddings run one at a time.")
    add_model_args(p)
    add_cluster_args(p, recover=True)
    p.add_argument("--plan", metavar="PLAN.json", help="the split from `galaxy plan -o` (its \"serve\" section, if "
                   "any, places prefill and decode)")
    add_weights_format_arg(p)
    add_decode_threads_arg(p)
    ph = p.add_argument_group("phase-separated serving (docs/engine.md)")
    ph.add_argument("--prefill-devices", metavar="I,J,..", help="devices (indices, names or addresses) that prefill "
                    "prompts, split HMP over them; with --decode-devices")
    ph.add_argument("--decode-devices", metavar="I,..", help="devices that decode, the K/V of each sequence moved "
                    "to them after its first token")
    add_decode_layout_arg(ph, "auto")
    ph.add_argument("--kv-path", choices=KV_PATHS, help="how each sequence's K/V reach the decode devices: direct "
                    "(one hop from each prefill device, with the coordinator's ticket; where both groups are workers) "
                    "or coordinator (pulled here, then pushed: two hops). Default: the plan's, else direct")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for the LAN)")
    h.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    h.add_argument("--api-key", default=os.environ.get("GALAXY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default $GALAXY_API_KEY)")
    h.add_argument("--served-model-name", help="the model id clients use (default: the --model name)")
    h.add_argument("--max-queue", type=int, default=64, help="generation requests waiting for a place in the "
                   "batch; more get 429 (default 64)")
    h.add_argument("--queue-timeout", type=float, default=120.0,
                   help="seconds an embedding request may wait for the one before it (default 120)")
    h.add_argument("--slo-ttft", dest="admission_slo_ttft", type=number_in(1e-3, 86400.0), metavar="SECONDS",
                   help="a time-to-first-token objective: a request predicted to miss it (from the queue and the "
                   "measured step cost) is refused at once with 503 and Retry-After (default: off, admit all)")
    h.add_argument("--request-timeout", type=float, default=600.0,
                   help="a generation's deadline in seconds: then it ends, truncated (default 600)")
    h.add_argument("--default-max-tokens", type=int, default=256,
                   help="completion tokens when a request sets no max_tokens (default 256)")
    h.add_argument("--default-temperature", type=float, default=1.0,
                   help="temperature when a request sets none (default 1.0, as OpenAI; 0 = greedy)")
    h.add_argument("--max-body", type=size, default=1 << 20, metavar="SIZE",
                   help="largest request body (default 1MiB)")
    add_engine_args(p)
    d = p.add_argument_group("dashboard (/dashboard)")
    d.add_argument("--no-dashboard", action="store_true", help="serve no /dashboard (and poll no device for it)")
    add_monitor_args(d)
    p.set_defaults(func=cmd_serve)
    return p


def add_engine_args(p) -> None:
    """The serving engine's batching settings (galaxy.engine.EngineConfig), for serve and bench serve."""
    e = p.add_argument_group("batching (the serving engine)")
    e.add_argument("--max-batched-tokens", type=int, default=EngineConfig.max_batched_tokens,
                   help=f"tokens in one step, decodes and prompt chunks (default {EngineConfig.max_batched_tokens})")
    e.add_argument("--chunk-size", type=int, help="most prompt tokens one request runs per step (default: the budget)")
    e.add_argument("--max-stall", type=float, default=EngineConfig.max_stall,
                   help="a step carrying prompt chunks beside running streams takes at most this many times their "
                   f"decode-only step, its chunk derived from the measured step cost (default "
                   f"{EngineConfig.max_stall}; "
                   "0: no bound but --max-batched-tokens)")
    e.add_argument("--itl-target", type=float, default=EngineConfig.itl_target,
                   help="an objective instead: such a step takes at most this many times the unloaded TPOT (the "
                   "one-stream decode step the engine measures), e.g. 1.6; with --max-stall too, the smaller chunk "
                   "(default: off)")
    e.add_argument("--min-chunk", type=int_at_least(1), default=EngineConfig.min_chunk,
                   help=f"prompt tokens a step beside streams may always carry (default {EngineConfig.min_chunk})")
    e.add_argument("--kv-blocks", type=int_at_least(1), help="KV blocks in each device's pool (default: as many as "
                   "the smallest device's memory budget holds, sized when the model is loaded; give a count when "
                   "another session's shards or pool share the workers)")
    e.add_argument("--kv-spill-mib", type=int_at_least(0), default=0,
                   help="MiB of the coordinator's memory for the K/V of prefix blocks evicted from the devices' pool: "
                   "a later request with that prefix gets them written back instead of prefilled (default 0: off)")
    e.add_argument("--kv-pool-mib", type=int_at_least(0), default=0,
                   help="MiB of each device's memory, beyond its plan and the KV pool, for its own heads' K/V of "
                   "prefix blocks evicted from the pool: a later request with that prefix gets them copied back on "
                   "every device, nothing on the wire; in front of --kv-spill-mib when both are set. Refused at start "
                   "if a device lacks it (default 0: off)")
    e.add_argument("--kv-spill-dir", metavar="DIR", help="keep that spill store in files of a private directory made "
                   "in DIR instead of in memory (--kv-spill-mib is then its disk budget)")


def engine_config(args) -> EngineConfig:
    return EngineConfig(max_batched_tokens=args.max_batched_tokens, chunk_size=args.chunk_size,
                        max_stall=args.max_stall or None, itl_target=args.itl_target, min_chunk=args.min_chunk,
                        slo_ttft=getattr(args, "admission_slo_ttft", None),
                        kv_blocks=args.kv_blocks, spill_bytes=getattr(args, "kv_spill_mib", 0) << 20,
                        spill_dir=getattr(args, "kv_spill_dir", None),
                        device_pool_bytes=getattr(args, "kv_pool_mib", 0) << 20)


def cmd_serve(args) -> int:
    name = args.served_model_name or args.model or args.random_init or "smollm2"
    name = Path(name).stem if ("/" in name or name.endswith(".gguf")) else name
    with open_session(args, device_count(args)) as session:
        print("galaxy: loading shards ...", file=sys.stderr, flush=True)
        placement = serve_placement(args)
        model = session.load(args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
                             plan=None if placement else args.plan, placement=placement,
                             weights_format=args.weights_format, engine=engine_config(args),
                             decode_threads=args.decode_threads,
                             decode_layout=args.decode_layout, kv_path=args.kv_path,
                             greedy=args.default_temperature == 0)  # the endpoint samples unless told
        server = Server(model, args.host, args.port, served_model_name=name, api_key=args.api_key,
                        max_queue=args.max_queue, queue_timeout=args.queue_timeout, max_body_bytes=args.max_body,
                        request_timeout=args.request_timeout,
                        default_max_tokens=args.default_max_tokens, default_temperature=args.default_temperature,
                        dashboard=not args.no_dashboard, plan=read_plan(args), poll_interval=args.poll_interval,
                        measure_links=not args.no_link_test)
        server._bind()
        kind = "chat completions" if model.config.causal else "embeddings"
        page = "" if args.no_dashboard else f", dashboard at http://{server.address}/dashboard"
        print(f"galaxy serve: {name} ({kind}) on {session.world} devices at http://{server.address}/v1{page} "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
        serve_until_stopped(server, "galaxy serve")
    return 0


def serve_placement(args) -> dict | None:
    """The disaggregated placement the flags ask for (--prefill-devices/--decode-devices); None: the
    plan's serve section decides, if the plan has one (Session.load reads it with the plan's split)."""
    pre, dec = getattr(args, "prefill_devices", None), getattr(args, "decode_devices", None)
    if bool(pre) != bool(dec):
        raise GalaxyError("--prefill-devices and --decode-devices go together")
    if pre:
        return {"placement": "disaggregated", "prefill": pre, "decode": dec}
    return None


def add_monitor_args(group) -> None:
    """How the dashboard watches the devices: `galaxy serve` and `galaxy dashboard` alike."""
    group.add_argument("--poll-interval", type=number_in(0.1, 60.0), default=1.0, metavar="SECONDS",
                       help="how often the dashboard asks each device whether it is up (default 1)")
    group.add_argument("--no-link-test", action="store_true",
                       help="the dashboard measures no ring link at start (half a second of traffic per link)")


def serve_until_stopped(server, label: str) -> None:
    """Serve until Ctrl-C or SIGTERM, then say so."""
    with _sigterm_as_interrupt():
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print(f"{label}: stopped", file=sys.stderr)


@contextmanager
def _sigterm_as_interrupt():
    """`kill`, systemd and docker stop with SIGTERM: leave serve_forever the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
