"""`galaxy chat`: talk to a causal LM split across devices, in the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import GalaxyError
from ..parallel.sharding import Strategy
from ..runtime.sources import open_source
from .args import (
    add_cluster_args,
    add_decode_threads_arg,
    add_generation_args,
    add_model_args,
    add_weights_format_arg,
    floats,
    generation_config,
    int_at_least,
    progress,
)
from .session import device_count, open_session, partition_from_args, weights_format_from_args

EXAMPLES = """examples:
  galaxy chat --system "You are concise."
  galaxy chat --weights-format fp32                    # the exact reference (default: the file's own, int4 here)
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
    chat.add_argument("--tiles", type=int_at_least(1), default=1, help="sub-tiles per device chunk in each ring step")
    chat.add_argument("--system", help="system prompt (kept on the devices between turns)")
    add_weights_format_arg(chat)
    add_decode_threads_arg(chat)
    add_generation_args(chat, default_tokens=256)
    chat.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    source = open_source(args.model, args.random_init, args.seed)
    if not source.config.causal or source.tokenizer() is None:
        raise GalaxyError(f"chat needs a causal LM with a tokenizer; {source.path} is not one")
    gc_all = generation_config(args)  # checked before any worker starts
    n = device_count(args)
    weights_format = weights_format_from_args(args, source)
    partition = partition_from_args(args, source.config, n, weights_format)
    with open_session(args, n) as session:
        progress("loading shards")
        lm = session.load(source, partition=partition, strategy=getattr(args, "strategy", "galaxy"), dtype=args.dtype,
                          tiles=args.tiles, weights_format=weights_format, decode_threads=args.decode_threads)
        history = [{"role": "system", "content": args.system}] if args.system else []
        print(f"galaxy chat: {source.config.name} on {n} devices. Ctrl-C stops a reply, /reset clears the "
              "history, /exit or Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
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
            room = lm.config.max_positions - len(ids)
            if room < 1:
                history.pop()
                print(f"galaxy chat: the conversation is {len(ids)} tokens, the model's context "
                      f"{lm.config.max_positions}; /reset clears it", file=sys.stderr)
                continue
            gc = dataclasses.replace(gc_all, max_new_tokens=min(gc_all.max_new_tokens, room))
            history.append({"role": "assistant", "content": _reply(lm, ids, gc)})


def _reply(lm, ids: list[int], gc) -> str:
    """Stream one reply; Ctrl-C stops it (the engine drops the request and frees its blocks) and
    keeps what was said."""
    print("model> ", end="", flush=True)
    reply = ""
    stream = lm.engine.submit(ids, gc)
    try:
        for ev in stream:
            reply += ev.text
            print(ev.text, end="", flush=True)
    except KeyboardInterrupt:
        stream.cancel()
        print(" [stopped]", end="")
    print(flush=True)
    return reply
