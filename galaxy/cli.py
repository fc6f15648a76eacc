"""The `galaxy` command line. Parses arguments, calls the library, prints tables or JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
import torch

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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="galaxy", description="Collaborative transformer inference "
                                 "across edge devices (hybrid model parallelism).")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one inference across devices")
    add_model_args(run)
    add_input_args(run)
    run.add_argument("--local", type=int, default=3, metavar="N", help="N local devices (default 3)")
    run.add_argument("--strategy", choices=["galaxy", "megatron", "pipeline"], default="galaxy")
    run.add_argument("--weights", type=_floats, help="relative device speeds for an uneven split, "
                     "e.g. 0.9,0.6,0.45 (default: even)")
    run.add_argument("--tiles", type=int, default=1, help="sub-tiles per device chunk in each ring step")
    run.add_argument("--check", action="store_true", help="compare with the single-device reference")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--save-output", metavar="FILE.npy",
                     help="write logits (causal LM) or last hidden states (encoder) as float32 [seq, dim]")
    run.set_defaults(func=cmd_run)
    return ap


def cmd_run(args) -> int:
    from .model import mean_pool
    from .run import DTYPES, make_request, open_source, reference_output, run_inprocess_model
    from .sharding import even_partition, weighted_partition

    source = open_source(args.model, args.random_init, args.seed)
    cfg = source.config
    req, how = make_request(source, args.prompt, args.input_ids, args.seq_len, args.seed)
    n = args.local
    if n < 1:
        raise GalaxyError(f"--local {n}: need at least one device")
    if args.weights is not None:
        if len(args.weights) != n:
            raise GalaxyError(f"--weights has {len(args.weights)} entries for {n} devices")
        if args.strategy != "galaxy":
            raise GalaxyError("--weights shapes an uneven Galaxy split; drop it for megatron/pipeline")
        partition = weighted_partition(cfg, args.weights)
    else:
        partition = even_partition(cfg, n, args.strategy)
    dtype = DTYPES[args.dtype]
    res = run_inprocess_model(source, partition, req, tiles=args.tiles, dtype=dtype)
    out = res.output
    report = {
        "model": source.path, "family": cfg.family, "strategy": partition.strategy, "devices": n,
        "dtype": args.dtype, "input": how, "seq_len": int(req.ids.shape[0]),
        "input_ids": req.ids.tolist()[:64], "output_shape": list(out.shape),
        "partition": _partition_rows(partition, req),
        "seconds": {k: round(v, 4) for k, v in res.seconds.items()},
        "per_device": res.per_device,
    }
    tok = source.tokenizer()
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
        ref = reference_output(source, req, dtype=dtype).float()
        err = float((out - ref).abs().max())
        tol = FP32_TOLERANCE if dtype == torch.float32 else 5e-2 * float(ref.abs().max())
        ok = err <= tol
        report.update(max_abs_err=err, tolerance=tol, check="pass" if ok else "FAIL")
    if args.save_output:
        np.save(args.save_output, out.numpy().astype(np.float32))
        report["saved"] = args.save_output
    if args.json:
        print(json.dumps(report))
    else:
        _print_run(report)
    return 0 if ok else 1


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
    if "max_abs_err" in rep:
        print(f"check     max |parallel - reference| = {rep['max_abs_err']:.3g} "
              f"(tolerance {rep['tolerance']:.0e}): {rep['check']}")
    if "saved" in rep:
        print(f"saved     {rep['saved']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
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


if __name__ == "__main__":
    sys.exit(main())
