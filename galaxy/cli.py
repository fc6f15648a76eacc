"""The `galaxy` command line. Parses arguments, calls the library, prints tables or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import units
from .codec import LOSSY_REL_BOUND
from .errors import GalaxyError

log = logging.getLogger("galaxy")

FP32_TOLERANCE = 1e-4  # max abs error of a parallel run against the single-device reference



def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids wants comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="HF-style directory, .gguf file, or an embedded default: "
                   "'smollm2' (causal LM, the default) or 'minilm' (encoder)")
    g.add_argument("--random-init", metavar="PRESET",
                   help="random weights of a preset shape (e.g. gpt2-large, bert-large, opt-xl)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights / random input ids")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="text to encode with the model's tokenizer")
    g.add_argument("--input-ids", type=_ids, help="token ids, e.g. 1,2,3")
    g.add_argument("--seq-len", type=int, help="random input of this many tokens")


def add_generation_args(p: argparse.ArgumentParser, default_tokens: int | None = None) -> None:
    g = p.add_argument_group("generation (causal LMs)")
    g.add_argument("--max-new-tokens", type=int, default=default_tokens,
                   help="generate up to N tokens, streaming the text" if default_tokens is None else
                   f"tokens per reply (default {default_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--prefill-chunk", type=int, default=0, help="prompt tokens per prefill step (0: all)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="galaxy", description="Collaborative transformer inference "
                                 "across edge devices (hybrid model parallelism).")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one inference across devices")
    add_model_args(run)
    add_input_args(run)
    run.add_argument("--local", type=int, default=3, metavar="N",
                     help="spawn N local workers on loopback (default 3)")
    run.add_argument("--workers", type=_addresses, metavar="HOST:PORT,...",
                     help="use running workers at these addresses (ring order) instead of --local")
    run.add_argument("--transport", choices=["grpc", "inproc"], default="grpc",
                     help="grpc: worker processes (default); inproc: threads of this process (debugging)")
    run.add_argument("--threads", type=int, help="intra-op threads per local worker (default: cores / N)")
    run.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"),
                     help="shared cluster token (default $GALAXY_TOKEN)")
    run.add_argument("--tls", metavar="DIR", help="mutual TLS: the cluster CA and the coordinator's key pair")
    run.add_argument("--strategy", choices=["galaxy", "megatron", "pipeline"], default="galaxy")
    run.add_argument("--weights", type=_floats, help="relative device speeds for an uneven split, "
                     "e.g. 0.9,0.6,0.45 (default: even)")
    run.add_argument("--tiles", type=int, default=1, help="sub-tiles per device chunk in each ring step")
    run.add_argument("--backend", choices=["torch", "onnx", "auto"], default="torch",
                     help="compute backend per device: torch, ONNX Runtime, or auto (each device keeps the faster)")
    run.add_argument("--check", action="store_true", help="compare with the single-device reference")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--save-output", metavar="FILE.npy",
                     help="write logits (causal LM) or last hidden states (encoder) as float32 [seq, dim]")
    run.add_argument("--cluster", metavar="FILE.yaml", help="devices from a cluster file (emulated or real)")
    run.add_argument("--discover", nargs="?", const="galaxy", metavar="CLUSTER_NAME",
                     help="find the workers announcing themselves on the LAN (cluster name, default 'galaxy')")
    run.add_argument("--expect", type=int, metavar="N", help="with --discover: wait for exactly N workers")
    run.add_argument("--wire", choices=["fp32", "bf16", "fp16", "int8"],
                     help="lossy activation format on every link (default: the plan's choice, else fp32 exact)")
    run.add_argument("--weights-from", choices=["auto", "coordinator", "path"], default="auto",
                     help="coordinator: stream each device its shard (devices need no model file); path: "
                          "devices read the checkpoint path themselves; auto: path for --local, else stream")
    run.add_argument("--plan", metavar="PLAN.json", help="the split from `galaxy plan -o`")
    add_generation_args(run)
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="profile the devices and solve the split")
    add_model_args(plan)
    plan.add_argument("--local", type=int, default=3, metavar="N", help="plan for N local workers (default 3)")
    plan.add_argument("--workers", type=_addresses, metavar="HOST:PORT,...", help="running workers to profile")
    plan.add_argument("--cluster", metavar="FILE.yaml", help="devices from a cluster file (emulated or real)")
    plan.add_argument("--threads", type=int, help="intra-op threads per local worker")
    plan.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"))
    plan.add_argument("--tls", metavar="DIR", help="mutual TLS: the cluster CA and the coordinator's key pair")
    plan.add_argument("--seq-len", type=int, default=256, help="tokens to plan the prefill for (default 256)")
    plan.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                      help="cap every device's memory for the shard, e.g. 2GB")
    plan.add_argument("--strategy", choices=["auto", "galaxy", "megatron", "pipeline", "local"], default="auto",
                      help="force a strategy (default: the fastest predicted)")
    plan.add_argument("--reprofile", action="store_true", help="ignore cached device profiles")
    plan.add_argument("--wire", choices=["fp32", "bf16", "fp16", "int8", "auto"], default="fp32",
                      help="activation format on the links: fp32 exact (default), a lossy format everywhere, or "
                           "auto: per link from its measured bandwidth and the devices' codec speed")
    plan.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan file")
    plan.add_argument("--svg", metavar="FILE.svg", help="draw the plan")
    plan.add_argument("--png", metavar="FILE.png", help="draw the plan")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan, transport="grpc")

    bench = sub.add_parser("bench", help="Galaxy against its baselines and the roofline, side by side")
    add_model_args(bench)
    bench.add_argument("--cluster", metavar="FILE.yaml",
                       help="devices from a cluster file; an emulated one is brought up if it is not running "
                            "(default as root: devices/clusters/hetero-bench.yaml)")
    bench.add_argument("--local", type=int, metavar="N", help="N plain loopback workers instead (no emulation)")
    bench.add_argument("--workers", type=_addresses, metavar="HOST:PORT,...", help="running workers")
    bench.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"))
    bench.add_argument("--tls", metavar="DIR")
    bench.add_argument("--threads", type=int, help="intra-op threads per local worker")
    bench.add_argument("--seq-len", type=_ints, help="prompt lengths (default 256,512; --quick: 64)")
    bench.add_argument("--bandwidth", type=_rates, help="link rates to sweep on an emulated LAN, e.g. "
                       "1gbit,100mbit,50mbit (default that sweep; the first rate gets every --seq-len)")
    bench.add_argument("--reps", type=int, help="timed repetitions per strategy, interleaved (default 3; quick 2)")
    bench.add_argument("--strategies", type=lambda t: [x for x in t.split(",") if x],
                       help="subset of local,megatron,seqpar,pipeline,galaxy,galaxy-no-overlap,galaxy-grpc,"
                            "galaxy-fp16,galaxy-int8")
    bench.add_argument("--quick", action="store_true", help="a small model and one configuration (< 2 minutes)")
    bench.add_argument("--layers", type=int, help="keep the first N layers of the model (default: 12 of "
                       "gpt2-large's 36 identical ones, to keep the default suite under 10 minutes)")
    bench.add_argument("--calibrate", action="store_true",
                       help="refine Galaxy's split from the devices' measured busy times before timing")
    bench.add_argument("--decode", action="store_true", help="also time generation: TTFT and per-token latency")
    bench.add_argument("--backends", action="store_true", help="also time torch vs ONNX Runtime per block")
    bench.add_argument("--plot", metavar="FILE.png|svg", help="speed-up vs bandwidth and a per-layer timeline")
    bench.add_argument("--json", action="store_true", help="one JSON object on the last line of stdout")
    bench.set_defaults(func=cmd_bench, transport="grpc")

    chat = sub.add_parser("chat", help="talk to a causal LM split across devices")
    add_model_args(chat)
    chat.add_argument("--local", type=int, default=3, metavar="N", help="spawn N local workers (default 3)")
    chat.add_argument("--workers", type=_addresses, metavar="HOST:PORT,...", help="use running workers")
    chat.add_argument("--cluster", metavar="FILE.yaml", help="devices from a cluster file")
    chat.add_argument("--transport", choices=["grpc", "inproc"], default="grpc")
    chat.add_argument("--threads", type=int, help="intra-op threads per local worker")
    chat.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"))
    chat.add_argument("--tls", metavar="DIR", help="mutual TLS: the cluster CA and the coordinator's key pair")
    chat.add_argument("--strategy", choices=["galaxy", "megatron", "pipeline"], default="galaxy")
    chat.add_argument("--weights", type=_floats, help="relative device speeds for an uneven split")
    chat.add_argument("--plan", metavar="PLAN.json")
    chat.add_argument("--tiles", type=int, default=1)
    chat.add_argument("--system", help="system prompt (kept on the devices between turns)")
    add_generation_args(chat, default_tokens=256)
    chat.set_defaults(func=cmd_chat)

    from devices.cli import add_devices_parser

    from .serve import add_serve_parser

    add_devices_parser(sub)
    add_serve_parser(sub)

    keys = sub.add_parser("keys", help="the cluster's certificate authority and device keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kinit = keys_sub.add_parser("init", help="create a CA (once) and a key pair per device")
    kinit.add_argument("directory")
    kinit.add_argument("--device", action="append", default=[], metavar="NAME", help="device name (repeatable)")
    kinit.add_argument("--host", action="append", default=[], metavar="ADDR",
                       help="extra DNS name or IP for every certificate (repeatable)")
    kinit.set_defaults(func=cmd_keys_init)

    worker = sub.add_parser("worker", help="serve this device as a Galaxy peer")
    worker.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="address to serve on; port 0 picks a free one (default 127.0.0.1:50051)")
    worker.add_argument("--name", default="", help="device name shown in plans (default: hostname)")
    worker.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads")
    worker.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1, ...")
    worker.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"),
                        help="shared cluster token; without one the worker binds loopback only")
    worker.add_argument("--memory-budget", type=_bytes, default=0, metavar="SIZE",
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
    worker.add_argument("--shard-cache-bytes", type=_bytes, default=4 << 30, metavar="SIZE",
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
    return ap


def _bytes(text: str) -> int:
    try:
        return units.parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _addresses(text: str) -> list[str]:
    out = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in out if ":" not in a]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT...], got {text!r}")
    return out


def progress(msg: str) -> None:
    print(f"galaxy: {msg} ...", file=sys.stderr, flush=True)


def cmd_keys_init(args) -> int:
    from .security import COORDINATOR, init_keys

    written = init_keys(args.directory, args.device, args.host)
    for p in written:
        print(f"wrote {p} (+ .key)")
    print(f"CA: {Path(args.directory) / 'ca.pem'} (keep ca.key on this machine only). Copy ca.pem, NAME.pem and "
          f"NAME.key to each device and start it with `galaxy worker --tls DIR --name NAME`; the coordinator "
          f"uses the '{COORDINATOR}' pair (--tls DIR).")
    return 0


def cmd_worker(args) -> int:
    from .rpc.worker import READY_LINE, WorkerSettings, serve

    if args.exit_with_parent:
        _exit_with_parent()
    tls = None
    if args.tls:
        from .security import TlsFiles

        tls = TlsFiles.load(args.tls, args.tls_name or args.name or socket.gethostname())
    name = args.name or socket.gethostname()
    cache = args.shard_cache
    if cache is None:
        cache = str(Path(os.environ.get("GALAXY_CACHE", Path.home() / ".cache" / "galaxy")) / "shards" / name)
    settings = WorkerSettings(name=name, threads=args.threads, device=args.device, token=args.token,
                              memory_budget=args.memory_budget, link_delay_ms=args.link_delay_ms, tls=tls,
                              shard_cache=None if cache == "none" else cache,
                              shard_cache_bytes=args.shard_cache_bytes, cache_own_shards=args.cache_own_shards,
                              data_port=args.data_port)
    serve(args.listen, settings, ready=lambda addr: print(f"{READY_LINE} {addr}", flush=True),
          announce=args.cluster_name if args.announce else None, announce_interfaces=args.announce_interface)
    return 0


def _exit_with_parent() -> None:
    """Stop this worker when the process that spawned it goes away (even by SIGKILL)."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="galaxy-parent-watch").start()


def _read_plan(args):
    from planner.plan import Plan

    if not getattr(args, "plan", None):
        return None
    try:
        return Plan.from_json(Path(args.plan).read_text())
    except OSError as e:
        raise GalaxyError(f"--plan {args.plan}: {e.strerror}") from None


def _addresses_for(args) -> tuple[list[str] | None, str | None]:
    """Worker addresses (None: spawn local ones) and token; a plan picks its own devices."""
    if not hasattr(args, "_endpoints"):  # discovery listens for seconds: do it once
        args._endpoints = _find_endpoints(args)
    return args._endpoints


def _find_endpoints(args) -> tuple[list[str] | None, str | None]:
    token = args.token
    if getattr(args, "discover", None):
        from .discovery import discovered_addresses

        progress(f"listening for workers of cluster {args.discover!r}")
        addresses = discovered_addresses(args.discover, timeout_s=3.0, expect=args.expect, token=token)
    elif getattr(args, "cluster", None):
        from devices.emulate import cluster_endpoints

        addresses, file_token = cluster_endpoints(args.cluster)
        token = token or file_token
    else:
        addresses = args.workers
    plan = _read_plan(args)
    if plan is not None and addresses is not None:
        missing = [a for a in plan.addresses() if a not in addresses]
        if missing:
            raise GalaxyError(f"--plan {args.plan} uses devices {missing} that the cluster does not have "
                              f"({addresses}); re-plan with `galaxy plan`")
        addresses = plan.addresses()  # the plan may leave slow devices out
    return addresses, token


def _wire(args, n: int) -> list[list[str]] | None:
    """Per-link activation formats: --wire for every link, else the plan's, else None (fp32)."""
    if getattr(args, "wire", None):
        return [[args.wire] * n for _ in range(n)]
    plan = _read_plan(args)
    return plan.wire() if plan is not None else None


def _stream_flag(args) -> bool | None:
    return {"auto": None, "coordinator": True, "path": False}[getattr(args, "weights_from", "auto")]


def _open_session(args, n: int):
    from .api import connect

    if args.transport == "inproc":
        return connect(local=n, transport="inproc")
    addresses, token = _addresses_for(args)
    if addresses is not None:
        return connect(addresses=addresses, token=token, tls=args.tls)
    progress(f"starting {n} local workers")
    return connect(local=n, token=token, threads=args.threads, tls=args.tls)


def _device_count(args) -> int:
    plan = _read_plan(args)
    if plan is not None:
        return len(plan.devices)
    addresses, _ = _addresses_for(args)
    n = len(addresses) if addresses is not None else args.local
    if n < 1:
        raise GalaxyError(f"--local {n}: need at least one device")
    return n


def _partition(args, cfg, n: int):
    from .api import _plan_partition
    from .sharding import even_partition, weighted_partition

    if getattr(args, "plan", None):
        return _plan_partition(args.plan, cfg, n)
    if args.weights is not None:
        if len(args.weights) != n:
            raise GalaxyError(f"--weights has {len(args.weights)} entries for {n} devices")
        if args.strategy != "galaxy":
            raise GalaxyError("--weights shapes an uneven Galaxy split; drop it for megatron/pipeline")
        return weighted_partition(cfg, args.weights)
    return even_partition(cfg, n, args.strategy)


def cmd_run(args) -> int:
    from .run import make_request, open_source

    source = open_source(args.model, args.random_init, args.seed)
    cfg = source.config
    n = _device_count(args)
    partition = _partition(args, cfg, n)
    generating = args.max_new_tokens is not None
    if generating and not cfg.causal:
        raise GalaxyError(f"--max-new-tokens needs a causal LM; {source.path} is an encoder")
    req, how = make_request(source, args.prompt, args.input_ids, args.seq_len, args.seed)
    t0 = time.perf_counter()
    with _open_session(args, n) as session:
        spawn_s = time.perf_counter() - t0
        infos = session.devices()
        progress("loading shards" + (" on " + ", ".join(i.name for i in infos) if infos else ""))
        t1 = time.perf_counter()
        wire = _wire(args, n)
        model = session.load(source, partition=partition, dtype=args.dtype, tiles=args.tiles,
                             stream_weights=_stream_flag(args), wire=wire, backend=args.backend)
        seconds = {"connect": spawn_s, "load": time.perf_counter() - t1}
        base = {"model": source.path, "family": cfg.family, "strategy": partition.strategy, "devices": n,
                "dtype": args.dtype, "input": how, "seq_len": int(req.ids.shape[0]),
                "partition": _partition_rows(partition, req), "wire": wire or "fp32",
                "backend": getattr(session._ex, "backends", None) or args.backend}
        if generating:
            return _run_generate(args, model, req, base, seconds)
        return _run_forward(args, model, req, base, seconds, infos)


def _run_forward(args, model, req, report: dict, seconds: dict, infos) -> int:
    from .model import mean_pool
    from .run import DTYPES, layer_overlap, reference_output

    progress("running the forward pass")
    res = model.session._ex.forward(req)
    seconds["forward"] = res.seconds
    out, cfg, tok = res.output.float(), model.config, model.tokenizer
    per_device = []
    for d in res.devices:
        r = d["rank"]
        row = {"rank": r, "weight_bytes": model.weight_bytes[r], "forward_s": d["forward_s"],
               "peak_rss_bytes": d["peak_rss_bytes"]}
        if infos:
            row.update(name=infos[r].name, address=infos[r].address)
        per_device.append(row)
    report.update(input_ids=req.ids.tolist()[:64], output_shape=list(out.shape),
                  seconds={k: round(v, 4) for k, v in seconds.items()}, per_device=per_device,
                  layers=layer_overlap(res.devices))
    if cfg.causal:
        top = torch.topk(out[-1], 5)
        report["next_token_id"] = int(top.indices[0])
        report["top5"] = [
            {"id": int(i), "logit": round(float(v), 4), "text": tok.decode([int(i)]) if tok else None}
            for v, i in zip(top.values, top.indices)
        ]
        report["output"] = report["top5"][0]["text"] if tok else int(top.indices[0])
    else:
        emb = mean_pool(out)
        report["embedding_head"] = [round(float(x), 5) for x in emb[:8]]
        report["output"] = report["embedding_head"]
    ok = True
    if args.check:
        dtype = DTYPES[args.dtype]
        ref = reference_output(model.source, req, dtype=dtype).float()
        err = float((out - ref).abs().max())
        rel = err / max(float(ref.abs().max()), 1e-30)
        lossy = {f for row in (report.get("wire") if isinstance(report.get("wire"), list) else []) for f in row}
        lossy.discard("fp32")
        if lossy:  # a lossy wire is checked against its measured bound, relative to the output's scale
            bound = max(LOSSY_REL_BOUND[f] for f in lossy)
            ok = rel <= bound
            report.update(max_abs_err=err, max_rel_err=rel, tolerance_rel=bound, check="pass" if ok else "FAIL")
        else:
            tol = FP32_TOLERANCE if dtype == torch.float32 else 5e-2 * float(ref.abs().max())
            ok = err <= tol
            report.update(max_abs_err=err, max_rel_err=rel, tolerance=tol, check="pass" if ok else "FAIL")
        if model.config.causal:
            report["top1_agreement"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    if args.save_output:
        np.save(args.save_output, out.numpy().astype(np.float32))
        report["saved"] = args.save_output
    if args.json:
        print(json.dumps(report))
    else:
        _print_run(report)
    return 0 if ok else 1


def _run_generate(args, model, req, report: dict, seconds: dict) -> int:
    from .generate import Generation
    from .run import reference_generate

    ids = req.ids.tolist()
    gen = Generation(ids)
    gc = model._gen_config(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                           args.stop, args.prefill_chunk)
    progress(f"generating up to {args.max_new_tokens} tokens")
    for ev in model._generator().stream(ids, gc, gen):
        if not args.json:
            print(ev.text, end="", flush=True)
    if not args.json:
        print()
    decode = [s for s in gen.steps if s.phase == "decode"]
    report.update(
        text=gen.text, tokens=gen.tokens, finish=gen.finish, prompt_tokens=len(ids),
        ttft_s=round(gen.ttft_s, 4), per_token_s=round(gen.per_token_s, 4),
        tokens_per_s=round(1 / gen.per_token_s, 2) if gen.per_token_s else None,
        decode_collective=decode[0].collective if decode else None,
        prefill_steps=[{"tokens": s.tokens, "seconds": round(s.seconds, 4), "collective": s.collective}
                       for s in gen.steps if s.phase == "prefill"],
        kv_cache_bytes=gen.kv_cache_bytes, seconds={k: round(v, 4) for k, v in seconds.items()})
    ok = True
    if args.check:
        if args.temperature:
            raise GalaxyError("--check compares greedy tokens; drop --temperature")
        progress("checking against the single-device reference (greedy, no cache)")
        ref = reference_generate(model.source, ids, len(gen.tokens) if gen.finish != "eos" else args.max_new_tokens)
        ok = ref[: len(gen.tokens)] == gen.tokens and (gen.finish != "eos" or len(ref) == len(gen.tokens))
        report.update(tokens_match=ok, reference_tokens=ref)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"galaxy: {len(gen.tokens)} tokens ({gen.finish}); time to first token {gen.ttft_s:.3f} s, "
              f"{gen.per_token_s * 1000:.1f} ms/token ({report['decode_collective']}); KV cache per device "
              + ", ".join(units.fmt_bytes(b) for b in gen.kv_cache_bytes)
              + ("" if not args.check else f"; tokens match reference: {ok}"), file=sys.stderr)
    return 0 if ok else 1


def cmd_plan(args) -> int:
    from planner import render
    from planner import wire as wire_choice
    from planner.profiler import profile_cluster
    from planner.solver import solve

    from .run import DTYPES, open_source

    source = open_source(args.model, args.random_init, args.seed)
    cfg = source.config
    if not 1 <= args.seq_len <= cfg.max_positions:
        raise GalaxyError(f"--seq-len {args.seq_len} outside 1..{cfg.max_positions}")
    budgets = {}
    if args.cluster:
        from devices.spec import load_cluster

        budgets = {d.name: d.memory for d in load_cluster(args.cluster).devices if getattr(d, "memory", None)}
    n = _device_count(args)
    with _open_session(args, n) as session:
        prof = profile_cluster(session._ex, cfg, [args.seq_len], args.dtype, memory_budget=args.memory_budget,
                               budgets=budgets, reprofile=args.reprofile)
    dtype_bytes = DTYPES[args.dtype].itemsize
    n_prof = len(prof.devices)
    wire = wire_choice.choose(prof) if args.wire == "auto" else [[args.wire] * n_prof for _ in range(n_prof)]
    plan = solve(cfg, args.seq_len, wire_choice.effective(prof, wire),
                 None if args.strategy == "auto" else args.strategy, dtype_bytes)
    if args.wire != "fp32":
        index = {d.name: i for i, d in enumerate(prof.devices)}
        ring = [index[d.name] for d in plan.devices]
        plan = dataclasses.replace(plan, devices=tuple(
            dataclasses.replace(d, wire=tuple(wire[ring[k]][m] for m in ring)) for k, d in enumerate(plan.devices)))
    if args.output:
        Path(args.output).write_text(plan.to_json())
    for path in (args.svg, args.png):
        if path:
            render.draw(plan, path)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        print(render.table(plan))
        for what, path in (("plan", args.output), ("drawing", args.svg), ("drawing", args.png)):
            if path:
                print(f"{what} written to {path}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _rates(text: str) -> list[float]:
    try:
        return [units.parse_rate(x) for x in text.split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_bench(args) -> int:
    from contextlib import ExitStack

    from planner.profiler import profile_cluster

    from . import bench
    from .rpc.client import Cluster
    from .rpc.spawn import LocalWorkers
    from .run import open_source

    if args.random_init is None and args.model is None:
        args.random_init = "gpt2" if args.quick else "gpt2-large"
        if args.layers is None and not args.quick:
            args.layers = 12
    source = open_source(args.model, args.random_init, args.seed)
    if args.layers:
        if args.model is not None:
            raise GalaxyError("--layers applies to --random-init models")
        from .checkpoints.random import RandomWeights

        cfg0 = source.config
        source = RandomWeights(cfg0.replace(n_layers=min(args.layers, cfg0.n_layers),
                                            name=f"{cfg0.name} ({min(args.layers, cfg0.n_layers)} of "
                                                 f"{cfg0.n_layers} layers)"), seed=args.seed)
    cfg = source.config
    seqs = args.seq_len or ([64] if args.quick else [256, 512])
    reps = args.reps or (2 if args.quick else 3)
    strategies = args.strategies or list(bench.STRATEGIES)
    bad = [x for x in strategies if x not in bench.STRATEGIES]
    if bad:
        raise GalaxyError(f"--strategies: unknown {bad}; choose from {', '.join(bench.STRATEGIES)}")
    with ExitStack() as stack:
        emulated, token, tls = None, args.token, None
        if args.tls:
            from .security import COORDINATOR, TlsFiles

            tls = TlsFiles.load(args.tls, COORDINATOR)
        if args.workers:
            addresses = args.workers
        elif args.local or (not args.cluster and (args.quick or os.geteuid() != 0)):
            addresses = stack.enter_context(LocalWorkers(args.local or 3, threads=args.threads, token=token))
        else:
            emulated, addresses, token = _bench_cluster(args.cluster, stack)
        rates = (args.bandwidth or ([] if args.quick else [1e9, 1e8, 5e7])) if emulated else [None]
        bench._progress(f"profiling {len(addresses)} devices for {cfg.name} (cached per device and shape)")
        with Cluster(addresses, token=token, tls=tls) as c:
            prof = profile_cluster(c, cfg, seqs, show_progress=False)
        report = {"model": cfg.name, "family": cfg.family, "devices": [d.name for d in prof.devices],
                  "machine": _machine(), "strategies": strategies, "reps": reps, "runs": []}
        for i, rate in enumerate(rates or [None]):
            if rate is not None:
                from devices.emulate import set_link_rate

                before = set_link_rate(emulated, rate, progress=bench._progress)
                if i == 0:  # a cluster that stays up is left with the links it had
                    stack.callback(set_link_rate, emulated, before, progress=bench._progress)
                with Cluster(addresses, token=token, tls=tls) as c:
                    prof = profile_cluster(c, cfg, seqs, show_progress=False)  # links re-measured
            lossy_here = rate is not None and rate < 5e8  # compressed activations pay off on slow links
            here = strategies if args.strategies else [  # the default suite, kept under 10 minutes:
                x for x in strategies
                if (lossy_here or x not in ("galaxy-fp16", "galaxy-int8"))  # lossy wires on slow links only
                and (not lossy_here or x not in ("seqpar", "galaxy-no-overlap", "galaxy-grpc"))]  # no also-rans
            for seq in (seqs if i == 0 else seqs[:1]):
                run = bench.run_config(cfg, source, seq, prof, addresses, token, tls, here, reps, seed=args.seed,
                                       calibrate_split=args.calibrate)
                run["bandwidth_bps"] = rate
                links = [lk.bandwidth_bps for row in prof.links for lk in row if lk]
                run["measured_link_bps"] = min(links) if links else None
                run["auto"] = bench.auto_choice(cfg, seq, prof, lossy=lossy_here)
                bench.judge_auto(run)
                report["runs"].append(run)
            if i == 0 and args.decode and cfg.causal:  # generation on the first (fastest) links
                bench._progress("timing generation (TTFT and per-token latency)")
                report["decode"] = bench.decode_bench(lambda: (addresses, token, tls), source, prof)
                if rate is not None:
                    report["decode_bandwidth_bps"] = rate
        if args.backends:
            from .backends.bench import compare

            bench._progress("timing torch vs ONNX Runtime per block (this machine, 1 thread)")
            torch.set_num_threads(1)
            report["backends"] = [dict(r, onnx_over_torch=r["onnx_s"] / r["torch_s"])
                                  for r in compare(cfg, seqs, repeats=3, rounds=2)]
    if args.plot:
        bench.plot(report, args.plot)
    if args.json:
        print(bench.dumps(report))
    else:
        print(bench.table(report))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _bench_cluster(path: str | None, stack):
    """The emulated cluster to bench on: up already, or brought up now (and down at the end)."""
    from devices.emulate import cluster_endpoints, down, read_state, up
    from devices.spec import load_cluster

    spec = load_cluster(path or str(Path(__file__).resolve().parent.parent / "devices" / "clusters" /
                                    "hetero-bench.yaml"))
    if spec.emulated and read_state(spec.name) is None:
        up(spec, progress=lambda m: print(f"galaxy devices: {m}", file=sys.stderr))
        stack.callback(down, spec.name)
    addresses, token = cluster_endpoints(spec.path)
    return (spec.name if spec.emulated else None), addresses, token


def _machine() -> str:
    import platform

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor()} x{os.cpu_count()}, {platform.system()} {platform.release()}"


def cmd_chat(args) -> int:
    from .run import open_source

    source = open_source(args.model, args.random_init, args.seed)
    if not source.config.causal or source.tokenizer() is None:
        raise GalaxyError(f"chat needs a causal LM with a tokenizer; {source.path} is not one")
    n = _device_count(args)
    with _open_session(args, n) as session:
        progress("loading shards")
        lm = session.load(source, partition=_partition(args, source.config, n), dtype=args.dtype, tiles=args.tiles)
        history = [{"role": "system", "content": args.system}] if args.system else []
        print(f"galaxy chat: {source.config.name} on {n} devices. /reset clears the history, /exit quits.",
              file=sys.stderr)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(history))
            gc = lm._gen_config(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                args.stop, args.prefill_chunk)
            print("model> ", end="", flush=True)
            reply = ""
            for ev in lm._generator().stream(ids, gc):
                reply += ev.text
                print(ev.text, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": reply})


def _partition_rows(p, req) -> list[dict]:
    rows = []
    tokens = p.tokens(int(req.ids.shape[0])) if p.strategy == "galaxy" else None
    for r in range(p.world):
        row = {"device": r, "heads": p.heads[r], "mlp_cols": p.cols[r], "vocab_rows": p.vocab[r]}
        if p.strategy == "pipeline":
            row = {"device": r, "layers": p.layers[r]}
        if tokens is not None:
            row["tokens"] = tokens[r]
        rows.append(row)
    return rows


def _print_run(rep: dict) -> None:
    print(f"model     {rep['model']}  ({rep['family']}, {rep['dtype']})")
    print(f"strategy  {rep['strategy']} on {rep['devices']} devices; input {rep['seq_len']} tokens "
          f"({rep['input']})")
    cols = list(rep["partition"][0])
    print("  " + "  ".join(f"{c:>10}" for c in cols))
    for row in rep["partition"]:
        print("  " + "  ".join(f"{row[c]:>10}" for c in cols))
    print("time      " + ", ".join(f"{k} {v:.3f} s" for k, v in rep["seconds"].items()))
    if "top5" in rep:
        shown = [repr(t["text"]) if t["text"] is not None else f"#{t['id']}" for t in rep["top5"]]
        print("next token " + ", ".join(f"{s} ({t['logit']})" for s, t in zip(shown, rep["top5"])))
    else:
        print(f"embedding {rep['embedding_head']} ...")
    if "tolerance_rel" in rep:
        print(f"check     lossy wire: max |parallel - reference| = {rep['max_abs_err']:.3g}, "
              f"{100 * rep['max_rel_err']:.2f}% of the output's scale (bound {100 * rep['tolerance_rel']:.0f}%); "
              f"top-1 agreement {100 * rep.get('top1_agreement', 1):.0f}%: {rep['check']}")
    elif "max_abs_err" in rep:
        print(f"check     max |parallel - reference| = {rep['max_abs_err']:.3g} "
              f"(tolerance {rep['tolerance']:.0e}): {rep['check']}")
    if "saved" in rep:
        print(f"saved     {rep['saved']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
