"""`galaxy run`: one inference (a forward pass, or generation) across devices, checked on request."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from .. import units
from ..errors import GalaxyError
from ..model.transformer import DTYPES, mean_pool
from ..parallel.sharding import Strategy
from ..runtime.check import check_output
from ..runtime.report import layer_overlap
from ..runtime.sources import DEFAULT_PROMPT, make_request, open_source, reference_generate, reference_output
from .args import (
    add_cluster_args,
    add_decode_layout_arg,
    add_decode_threads_arg,
    add_generation_args,
    add_input_args,
    add_model_args,
    add_weights_format_arg,
    floats,
    generation_config,
    int_at_least,
    output_file,
    progress,
)
from .session import (
    device_count,
    open_session,
    partition_from_args,
    stream_flag,
    weights_format_from_args,
    wire_formats,
)

EXAMPLES = """examples:
  galaxy run --local 3 --check                                   the embedded SmolLM2 on 3 local workers, fp32, checked
  galaxy run --local 3 --weights-format int4 --check             ... its linears in int4 (docs/decode-formats.md)
  galaxy run --local 3 --max-new-tokens 32
      the file's own format (int4 for this Q4_1 GGUF); every device prefills, decode where the planner
      predicts it fastest (split, fewer devices or one); --check keeps fp32 and the split it pins
  galaxy run --prompt "What is the capital of France?" --max-new-tokens 16 --check    a chat model's reply
  galaxy run --prompt "The capital of France is" --max-new-tokens 16 --raw          plain text, continued
  galaxy run --model minilm --prompt "hello world" --weights 0.9,0.6,0.45
  galaxy run --random-init gpt2-large --seq-len 256 --plan plan.json --check
"""


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="run one inference across devices", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(run)
    add_input_args(run)
    add_cluster_args(run)
    run.add_argument("--strategy", choices=[s.value for s in (Strategy.GALAXY, Strategy.MEGATRON, Strategy.PIPELINE)],
                     default="galaxy",
                     help="how to split: galaxy (HMP, default), megatron (tensor parallel) or pipeline (layers)")
    run.add_argument("--weights", type=floats, help="relative device speeds for an uneven split, "
                     "e.g. 0.9,0.6,0.45 (default: even)")
    run.add_argument("--tiles", type=int_at_least(1), default=1, help="sub-tiles per device chunk in each ring step")
    run.add_argument("--backend", choices=["torch", "onnx", "auto"], default="torch",
                     help="compute backend per device: torch, ONNX Runtime, or auto (each device keeps the faster)")
    run.add_argument("--check", action="store_true", help="compare with the single-device reference")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--save-output", metavar="FILE.npy", type=output_file,
                     help="write logits (causal LM) or last hidden states (encoder) as float32 [seq, dim]")
    run.add_argument("--wire", choices=["fp32", "bf16", "fp16", "int8"],
                     help="lossy activation format on every link (default: the plan's choice, else fp32 exact)")
    run.add_argument("--weights-from", choices=["auto", "coordinator", "path"], default="auto",
                     help="coordinator: stream each device its shard (devices need no model file); path: "
                          "devices read the checkpoint path themselves; auto: path for --local, else stream")
    run.add_argument("--plan", metavar="PLAN.json", help="the split from `galaxy plan -o`")
    add_weights_format_arg(run)
    add_decode_threads_arg(run)
    add_generation_args(run)
    add_decode_layout_arg(run, None)
    run.add_argument("--raw", action="store_true", help="with --max-new-tokens on a chat model: send the prompt as "
                     "plain text (default: as a user message, through the model's chat template)")
    run.set_defaults(func=cmd_run)


def decode_layout(args, generating: bool) -> str:
    """--decode-layout, else where the planner predicts decode fastest -- but the split for `--check`, which
    pins the split's exactness against the single device, and for a run that only prefills."""
    if not generating:
        return "split"
    return args.decode_layout or ("split" if args.check else "auto")


def cmd_run(args) -> int:
    source = open_source(args.model, args.random_init, args.seed)
    cfg = source.config
    n = device_count(args)
    weights_format = weights_format_from_args(args, source)
    partition = partition_from_args(args, cfg, n, weights_format)
    generating = args.max_new_tokens is not None
    if generating and not cfg.causal:
        raise GalaxyError(f"--max-new-tokens needs a causal LM; {source.path} is an encoder")
    prompt = args.prompt
    templated = generating and not args.raw and _chat_model(source) and args.input_ids is None and not args.seq_len
    if templated:  # an instruct model answers a user message; plain text it merely continues
        prompt = source.tokenizer().apply_chat_template(
            [{"role": "user", "content": prompt if prompt is not None else DEFAULT_PROMPT}])
        progress("a chat model: the prompt goes in as a user message, through its chat template (--raw: as is)")
    req, how = make_request(source, prompt, args.input_ids, args.seq_len, args.seed)
    gc = generation_config(args) if generating else None
    if generating and args.check and args.temperature:
        raise GalaxyError("--check compares greedy tokens; drop --temperature")
    if generating:  # the limits of the model, before any worker starts
        room = cfg.max_positions - int(req.ids.shape[0])
        if args.max_new_tokens > room:
            raise GalaxyError(f"--max-new-tokens {args.max_new_tokens}: the prompt takes {req.ids.shape[0]} of the "
                              f"model's {cfg.max_positions} positions; at most {room} new tokens fit")
    t0 = time.perf_counter()
    with open_session(args, n) as session:
        spawn_s = time.perf_counter() - t0
        infos = session.devices()
        progress("loading shards" + (" on " + ", ".join(i.name for i in infos) if infos else ""))
        t1 = time.perf_counter()
        wire = wire_formats(args, n)
        reserve = int(req.ids.shape[0]) + (args.max_new_tokens or 0)  # what the devices hold memory for
        model = session.load(source, partition=partition, strategy=args.strategy, dtype=args.dtype, tiles=args.tiles,
                             stream_weights=stream_flag(args), wire=wire, backend=args.backend,
                             seq_len=min(reserve, cfg.max_positions), weights_format=weights_format,
                             decode_threads=args.decode_threads,
                             decode_layout=decode_layout(args, generating))
        partition = model.partition
        seconds = {"connect": spawn_s, "load": time.perf_counter() - t1}
        base = {"model": source.path, "family": cfg.family, "strategy": partition.strategy, "devices": n,
                "dtype": args.dtype, "input": how, "seq_len": int(req.ids.shape[0]),
                "partition": partition_rows(partition, req), "wire": wire or "fp32", "chat_template": templated,
                "backend": session.executor.backends or args.backend, "weights_format": model.weights_format,
                "decode_threads": getattr(session.executor, "decode_threads", None)}
        if generating:
            return _run_generate(args, model, req, gc, base, seconds)
        return _run_forward(args, model, req, base, seconds, infos)


def _run_forward(args, model, req, report: dict, seconds: dict, infos) -> int:
    progress("running the forward pass")
    res = model.execute(req)
    seconds["forward"] = res.seconds
    out, cfg, tok = res.output.float(), model.config, model.tokenizer
    per_device = []
    for d in res.devices:
        row = {"rank": d.rank, "weight_bytes": model.weight_bytes[d.rank], "forward_s": d.forward_s,
               "peak_rss_bytes": d.peak_rss_bytes}
        if infos:
            row.update(name=infos[d.rank].name, address=infos[d.rank].address)
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
        ref = reference_output(model.source, req, dtype=dtype, weights_format=model.weights_format)
        wire = report.get("wire") if isinstance(report.get("wire"), list) else None
        check = check_output(out, ref, dtype, wire, logits=cfg.causal, weights_format=model.weights_format)
        ok = check.ok
        report.update(check.to_dict())
    if args.save_output:
        np.save(args.save_output, out.numpy().astype(np.float32))
        report["saved"] = args.save_output
    if args.json:
        print(json.dumps(report))
    else:
        _print_run(report)
    return 0 if ok else 1


def _run_generate(args, model, req, gc, report: dict, seconds: dict) -> int:
    ids = req.ids.tolist()
    progress(f"generating up to {args.max_new_tokens} tokens")
    stream = model.engine.submit(ids, gc)
    try:
        for ev in stream:
            if not args.json:
                print(ev.text, end="", flush=True)
    except KeyboardInterrupt:  # leaving the stream cancels the request on the devices
        if not args.json:
            print(flush=True)  # end the text's line: "interrupted" goes on a line of its own
        raise
    if not args.json:
        print()
    gen = stream.generation
    decode = [s for s in gen.steps if s.phase == "decode"]
    # the decode count each device settled on over these steps (parallel/threads.py DecodeTuner), not the load's
    decoder = model.groups[1] if model.groups else model.session.executor
    report["decode_threads"] = getattr(decoder, "decode_threads", report.get("decode_threads"))
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
        progress("checking against the single-device reference (greedy)")
        ref = reference_generate(model.source, ids, len(gen.tokens) if gen.finish != "eos" else args.max_new_tokens,
                                 weights_format=model.weights_format)
        ok = ref[: len(gen.tokens)] == gen.tokens and (gen.finish != "eos" or len(ref) == len(gen.tokens))
        report.update(tokens_match=ok, reference_tokens=ref)
    if args.json:
        print(json.dumps(report))
    else:
        per_token = (f", {gen.per_token_s * 1000:.1f} ms/token ({report['decode_collective']})" if decode else "")
        print(f"galaxy: {len(gen.tokens)} tokens ({gen.finish}); time to first token {gen.ttft_s:.3f} s"
              f"{per_token}; KV cache per device " + ", ".join(units.fmt_bytes(b) for b in gen.kv_cache_bytes)
              + ("" if not args.check else f"; tokens match reference: {ok}"), file=sys.stderr)
    return 0 if ok else 1


def _chat_model(source) -> bool:
    tok = source.tokenizer()
    return tok is not None and bool(tok.chat_template)


def partition_rows(p, req) -> list[dict]:
    rows = []
    tokens = p.tokens(int(req.ids.shape[0])) if p.strategy == Strategy.GALAXY else None
    for r in range(p.world):
        row = {"device": r, "heads": p.heads[r], "mlp_cols": p.cols[r], "vocab_rows": p.vocab[r]}
        if p.strategy == Strategy.PIPELINE:
            row = {"device": r, "layers": p.layers[r]}
        if tokens is not None:
            row["tokens"] = tokens[r]
        rows.append(row)
    return rows


def _print_run(rep: dict) -> None:
    fmt = rep.get("weights_format", "fp32")
    held = f", weights {fmt}" if fmt != "fp32" else ""
    print(f"model     {rep['model']}  ({rep['family']}, {rep['dtype']}{held})")
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
