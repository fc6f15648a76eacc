"""`galaxy chat`: talk to a causal LM split across devices, in the terminal."""

from __future__ import annotations

import argparse
import sys

from ..errors import GalaxyError
from ..parallel.sharding import Strategy
from ..runtime.sources import open_source
from .args import add_cluster_args, add_generation_args, add_model_args, floats, progress
from .session import device_count, open_session, partition_from_args

EXAMPLES = """examples:
  galaxy chat --system "You are concise."
  galaxy chat --cluster devices/clusters/hetero-trio.yaml --max-new-tokens 128
"""


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a causal LM split across devices", epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(chat)
    add_cluster_args(chat)
    chat.add_argument("--strategy", choices=[s.value for s in (Strategy.GALAXY, Strategy.MEGATRON, Strategy.PIPELINE)],
                      default="galaxy", help="how to split: galaxy (HMP, default), megatron or pipeline")
    chat.add_argument("--weights", type=floats, help="relative device speeds for an uneven split")
    chat.add_argument("--plan", metavar="PLAN.json", help="the split from `galaxy plan -o`")
    chat.add_argument("--tiles", type=int, default=1, help="sub-tiles per device chunk in each ring step")
    chat.add_argument("--system", help="system prompt (kept on the devices between turns)")
    add_generation_args(chat, default_tokens=256)
    chat.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    source = open_source(args.model, args.random_init, args.seed)
    if not source.config.causal or source.tokenizer() is None:
        raise GalaxyError(f"chat needs a causal LM with a tokenizer; {source.path} is not one")
    n = device_count(args)
    with open_session(args, n) as session:
        progress("loading shards")
        lm = session.load(source, partition=partition_from_args(args, source.config, n),
                          strategy=getattr(args, "strategy", "galaxy"), dtype=args.dtype, tiles=args.tiles)
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
            gc = lm.generation_config(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                      args.stop, args.prefill_chunk)
            print("model> ", end="", flush=True)
            reply = ""
            for ev in lm.generator().stream(ids, gc):
                reply += ev.text
                print(ev.text, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": reply})
